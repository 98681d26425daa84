#include "server/openai_api.h"

#include <cmath>
#include <limits>

#include "absl/strings/cord.h"
#include "absl/strings/str_cat.h"
#include "engine/runtime/chat_template.h"
#include "engine/tokenizer/utf8.h"

namespace nibble::server {

using json = nlohmann::json;

namespace {

constexpr absl::string_view kParamPayload = "type.nibble/param";
constexpr int kMaxStop = 16;
constexpr int kDefaultCompletionMaxTokens = 16;  // OpenAI's default for /v1/completions

absl::Status Invalid(absl::string_view msg, absl::string_view param) {
  return ApiError(absl::StatusCode::kInvalidArgument, msg, param);
}

const json* Find(const json& obj, const char* key) {
  auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return nullptr;
  return &*it;
}

// Integers, or floats with an integral value (some clients send 16.0).
absl::Status GetInt(const json& obj, const char* key, int64_t lo, int64_t hi, std::optional<int64_t>* out) {
  const json* v = Find(obj, key);
  if (v == nullptr) return absl::OkStatus();
  int64_t x = 0;
  if (v->is_number_integer()) {
    if (v->is_number_unsigned() && v->get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      return Invalid(absl::StrCat("'", key, "' is too large (at most ", hi, ")"), key);
    }
    x = v->get<int64_t>();
  } else if (v->is_number_float()) {
    const double d = v->get<double>();
    if (!std::isfinite(d) || d != std::floor(d) || std::fabs(d) > 9.0e15) {
      return Invalid(absl::StrCat("'", key, "' must be an integer"), key);
    }
    x = static_cast<int64_t>(d);
  } else {
    return Invalid(absl::StrCat("'", key, "' must be an integer"), key);
  }
  if (x < lo || x > hi) {
    return Invalid(absl::StrCat("'", key, "' is ", x, "; it must be in [", lo, ", ", hi, "]"), key);
  }
  *out = x;
  return absl::OkStatus();
}

absl::Status GetFloat(const json& obj, const char* key, double lo, double hi, float* out) {
  const json* v = Find(obj, key);
  if (v == nullptr) return absl::OkStatus();
  if (!v->is_number()) return Invalid(absl::StrCat("'", key, "' must be a number"), key);
  const double d = v->get<double>();
  if (!(d >= lo && d <= hi)) {
    return Invalid(absl::StrCat("'", key, "' is ", d, "; it must be in [", lo, ", ", hi, "]"), key);
  }
  *out = static_cast<float>(d);
  return absl::OkStatus();
}

absl::Status GetBool(const json& obj, const char* key, bool* out) {
  const json* v = Find(obj, key);
  if (v == nullptr) return absl::OkStatus();
  if (!v->is_boolean()) return Invalid(absl::StrCat("'", key, "' must be a boolean"), key);
  *out = v->get<bool>();
  return absl::OkStatus();
}

absl::StatusOr<std::vector<int32_t>> TokenList(const json& arr, const ModelContext& ctx) {
  std::vector<int32_t> ids;
  ids.reserve(arr.size());
  const int32_t vocab = ctx.tokenizer->vocab_size();
  for (const json& t : arr) {
    if (!t.is_number_integer() || t.get<int64_t>() < 0 || t.get<int64_t>() >= vocab) {
      return Invalid(absl::StrCat("'prompt' token ids must be integers in [0, ", vocab, ")"), "prompt");
    }
    ids.push_back(static_cast<int32_t>(t.get<int64_t>()));
  }
  return ids;
}

absl::StatusOr<std::vector<int32_t>> EncodeText(const std::string& text, bool parse_special, const ModelContext& ctx,
                                                const char* param) {
  const Tokenizer& tok = *ctx.tokenizer;
  auto ids = tok.Encode(text, {.add_bos = tok.ShouldAddBos(), .parse_special = parse_special});
  if (!ids.ok()) return Invalid(absl::StrCat("cannot tokenize '", param, "': ", ids.status().message()), param);
  return ids;
}

// Prompts of /v1/completions: string | [string] | [int] | [[int]].
absl::Status ParsePrompts(const json& body, const ModelContext& ctx, std::vector<std::vector<int32_t>>* prompts,
                          std::vector<std::string>* texts) {
  const json* p = Find(body, "prompt");
  if (p == nullptr) return Invalid("'prompt' is required", "prompt");
  auto add_text = [&](const std::string& s) -> absl::Status {
    auto ids = EncodeText(s, false, ctx, "prompt");
    if (!ids.ok()) return ids.status();
    prompts->push_back(*std::move(ids));
    texts->push_back(s);
    return absl::OkStatus();
  };
  auto add_ids = [&](const json& arr) -> absl::Status {
    auto ids = TokenList(arr, ctx);
    if (!ids.ok()) return ids.status();
    texts->push_back(ctx.tokenizer->Decode(*ids));
    prompts->push_back(*std::move(ids));
    return absl::OkStatus();
  };
  if (p->is_string()) return add_text(p->get<std::string>());
  if (!p->is_array() || p->empty()) {
    return Invalid("'prompt' must be a string, a list of strings or a list of token ids", "prompt");
  }
  if ((*p)[0].is_number()) return add_ids(*p);
  for (const json& e : *p) {
    absl::Status s = e.is_string() ? add_text(e.get<std::string>())
                     : e.is_array() ? add_ids(e)
                                    : Invalid("'prompt' list entries must be strings or token-id lists", "prompt");
    if (!s.ok()) return s;
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> MessageContent(const json& m, size_t i) {
  const json* c = Find(m, "content");
  if (c == nullptr) return std::string();
  if (c->is_string()) return c->get<std::string>();
  if (c->is_array()) {
    std::string out;
    for (const json& part : *c) {
      const json* type = part.is_object() ? Find(part, "type") : nullptr;
      const json* text = part.is_object() ? Find(part, "text") : nullptr;
      if (type == nullptr || !type->is_string() || type->get<std::string>() != "text" || text == nullptr ||
          !text->is_string()) {
        return Invalid(absl::StrCat("messages[", i, "].content: only {\"type\":\"text\",\"text\":...} parts are supported"),
                       "messages");
      }
      out += text->get<std::string>();
    }
    return out;
  }
  return Invalid(absl::StrCat("messages[", i, "].content must be a string or a list of text parts"), "messages");
}

absl::Status ParseMessages(const json& body, const ModelContext& ctx, std::vector<std::vector<int32_t>>* prompts,
                           std::vector<std::string>* texts) {
  const json* ms = Find(body, "messages");
  if (ms == nullptr || !ms->is_array() || ms->empty()) {
    return Invalid("'messages' must be a non-empty list", "messages");
  }
  std::vector<ChatMessage> msgs;
  for (size_t i = 0; i < ms->size(); ++i) {
    const json& m = (*ms)[i];
    const json* role = m.is_object() ? Find(m, "role") : nullptr;
    if (role == nullptr || !role->is_string()) {
      return Invalid(absl::StrCat("messages[", i, "] needs a string 'role'"), "messages");
    }
    auto content = MessageContent(m, i);
    if (!content.ok()) return content.status();
    std::string r = role->get<std::string>();
    if (r == "developer") r = "system";
    msgs.push_back({std::move(r), *std::move(content)});
  }
  auto text = ApplyChatTemplate(ctx.chat_template, msgs, true, nullptr);
  if (!text.ok()) return Invalid(text.status().message(), "messages");
  auto ids = EncodeText(*text, true, ctx, "messages");
  if (!ids.ok()) return ids.status();
  prompts->push_back(*std::move(ids));
  texts->push_back(*std::move(text));
  return absl::OkStatus();
}

absl::Status ParseStop(const json& body, std::vector<std::string>* stop) {
  const json* s = Find(body, "stop");
  if (s == nullptr) return absl::OkStatus();
  if (s->is_string()) {
    stop->push_back(s->get<std::string>());
    return absl::OkStatus();
  }
  if (!s->is_array() || s->size() > kMaxStop) {
    return Invalid(absl::StrCat("'stop' must be a string or a list of at most ", kMaxStop, " strings"), "stop");
  }
  for (const json& e : *s) {
    if (!e.is_string()) return Invalid("'stop' entries must be strings", "stop");
    stop->push_back(e.get<std::string>());
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status ApiError(absl::StatusCode code, absl::string_view message, absl::string_view param) {
  absl::Status s(code, message);
  if (!param.empty()) s.SetPayload(kParamPayload, absl::Cord(param));
  return s;
}

std::string ApiParam(const absl::Status& s) {
  auto p = s.GetPayload(kParamPayload);
  return p ? std::string(*p) : std::string();
}

int HttpStatusFor(const absl::Status& s) {
  switch (s.code()) {
    case absl::StatusCode::kOk: return 200;
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kOutOfRange: return 400;
    case absl::StatusCode::kUnauthenticated: return 401;
    case absl::StatusCode::kPermissionDenied: return 403;
    case absl::StatusCode::kNotFound: return 404;
    case absl::StatusCode::kFailedPrecondition: return 413;
    case absl::StatusCode::kResourceExhausted: return 429;
    case absl::StatusCode::kUnavailable: return 503;
    case absl::StatusCode::kDeadlineExceeded: return 504;
    case absl::StatusCode::kCancelled: return 499;
    default: return 500;
  }
}

json ErrorJson(int http_status, absl::string_view message) {
  const char* type = "invalid_request_error";
  const char* code = nullptr;
  switch (http_status) {
    case 401: type = "authentication_error"; code = "invalid_api_key"; break;
    case 404: code = "model_not_found"; break;
    case 413: code = "request_too_large"; break;
    case 429: type = "rate_limit_error"; code = "rate_limit_exceeded"; break;
    case 503: type = "server_error"; code = "unavailable"; break;
    case 504: type = "server_error"; code = "timeout"; break;
    default:
      if (http_status >= 500) type = "server_error";
  }
  json err = {{"message", std::string(message)}, {"type", type}, {"param", nullptr}, {"code", nullptr}};
  if (code != nullptr) err["code"] = code;
  return json{{"error", err}};
}

json ErrorJson(const absl::Status& s) {
  json j = ErrorJson(HttpStatusFor(s), s.message());
  const std::string param = ApiParam(s);
  if (!param.empty()) j["error"]["param"] = param;
  if (s.code() == absl::StatusCode::kOutOfRange) j["error"]["code"] = "context_length_exceeded";
  return j;
}

std::string Dump(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

std::string SseData(const json& j) { return absl::StrCat("data: ", Dump(j), "\n\n"); }

absl::StatusOr<ParsedRequest> ParseRequest(Endpoint endpoint, absl::string_view body, const ModelContext& ctx) {
  if (!utf8::IsValid(std::string_view(body.data(), body.size()))) return Invalid("the request body is not valid UTF-8", "");
  json j = json::parse(body.begin(), body.end(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return Invalid("the request body is not valid JSON", "");
  if (!j.is_object()) return Invalid("the request body must be a JSON object", "");

  ParsedRequest r;
  r.endpoint = endpoint;
  r.model = ctx.model_id;
  if (const json* m = Find(j, "model")) {
    if (!m->is_string()) return Invalid("'model' must be a string", "model");
    if (m->get<std::string>() != ctx.model_id) {
      return ApiError(absl::StatusCode::kNotFound,
                      absl::StrCat("The model '", m->get<std::string>(), "' does not exist; this server serves '",
                                   ctx.model_id, "'"),
                      "model");
    }
  }
  if (absl::Status s = GetBool(j, "stream", &r.stream); !s.ok()) return s;
  if (const json* so = Find(j, "stream_options")) {
    if (!so->is_object()) return Invalid("'stream_options' must be an object", "stream_options");
    if (absl::Status s = GetBool(*so, "include_usage", &r.include_usage); !s.ok()) return s;
  }

  GenerationRequest g;
  g.sampling = SamplingParams{};
  g.sampling.temperature = 1.0f;
  g.sampling.top_p = 1.0f;
  g.sampling.top_k = 0;
  g.sampling.min_p = 0.0f;
  if (absl::Status s = GetFloat(j, "temperature", 0.0, 2.0, &g.sampling.temperature); !s.ok()) return s;
  if (absl::Status s = GetFloat(j, "top_p", 0.0, 1.0, &g.sampling.top_p); !s.ok()) return s;
  if (absl::Status s = GetFloat(j, "min_p", 0.0, 1.0, &g.sampling.min_p); !s.ok()) return s;
  if (absl::Status s = GetFloat(j, "frequency_penalty", -2.0, 2.0, &g.sampling.frequency_penalty); !s.ok()) return s;
  if (absl::Status s = GetFloat(j, "presence_penalty", -2.0, 2.0, &g.sampling.presence_penalty); !s.ok()) return s;
  if (absl::Status s = GetFloat(j, "repeat_penalty", 1e-3, 100.0, &g.sampling.repeat_penalty); !s.ok()) return s;
  std::optional<int64_t> top_k, seed, n, max_tokens, max_completion, logprobs_n, top_lp;
  if (absl::Status s = GetInt(j, "top_k", 0, 1 << 30, &top_k); !s.ok()) return s;
  if (top_k) g.sampling.top_k = static_cast<int>(*top_k);
  if (absl::Status s = GetInt(j, "seed", std::numeric_limits<int64_t>::min(), std::numeric_limits<int64_t>::max(),
                              &seed);
      !s.ok()) {
    return s;
  }
  if (absl::Status s = GetInt(j, "n", 1, ctx.max_n, &n); !s.ok()) return s;
  r.n = n ? static_cast<int>(*n) : 1;
  const int64_t hi = std::numeric_limits<int32_t>::max();
  if (absl::Status s = GetInt(j, "max_tokens", std::numeric_limits<int64_t>::min(), hi, &max_tokens); !s.ok()) return s;
  if (absl::Status s = GetInt(j, "max_completion_tokens", std::numeric_limits<int64_t>::min(), hi, &max_completion);
      !s.ok()) {
    return s;
  }
  if (max_completion) max_tokens = max_completion;
  const char* mt_param = max_completion ? "max_completion_tokens" : "max_tokens";
  if (max_tokens && (*max_tokens < 1 || *max_tokens > ctx.max_tokens_limit)) {
    return Invalid(absl::StrCat("'", mt_param, "' is ", *max_tokens, "; it must be in [1, ", ctx.max_tokens_limit, "]"),
                   mt_param);
  }
  if (max_tokens) {
    g.max_tokens = static_cast<int>(*max_tokens);
  } else {
    g.max_tokens = endpoint == Endpoint::kCompletions ? std::min(kDefaultCompletionMaxTokens, ctx.max_tokens_limit)
                                                      : std::min(ctx.max_tokens_limit, ctx.context_length);
  }
  if (absl::Status s = GetBool(j, "ignore_eos", &g.ignore_eos); !s.ok()) return s;
  if (absl::Status s = ParseStop(j, &g.stop); !s.ok()) return s;

  if (endpoint == Endpoint::kCompletions) {
    if (absl::Status s = GetBool(j, "echo", &r.echo); !s.ok()) return s;
    if (absl::Status s = GetInt(j, "logprobs", 0, kMaxTopLogprobs, &logprobs_n); !s.ok()) return s;
    r.logprobs = logprobs_n.has_value();
    r.top_logprobs = logprobs_n ? static_cast<int>(*logprobs_n) : 0;
  } else {
    if (absl::Status s = GetBool(j, "logprobs", &r.logprobs); !s.ok()) return s;
    if (absl::Status s = GetInt(j, "top_logprobs", 0, kMaxTopLogprobs, &top_lp); !s.ok()) return s;
    if (top_lp && !r.logprobs) return Invalid("'top_logprobs' requires 'logprobs': true", "top_logprobs");
    r.top_logprobs = top_lp ? static_cast<int>(*top_lp) : 0;
  }
  g.top_logprobs = r.top_logprobs;
  if (absl::Status s = g.sampling.Validate(); !s.ok()) return Invalid(s.message(), "");

  std::vector<std::vector<int32_t>> prompts;
  absl::Status ps = endpoint == Endpoint::kCompletions ? ParsePrompts(j, ctx, &prompts, &r.prompt_texts)
                                                       : ParseMessages(j, ctx, &prompts, &r.prompt_texts);
  if (!ps.ok()) return ps;
  const char* pparam = endpoint == Endpoint::kCompletions ? "prompt" : "messages";
  for (const auto& p : prompts) {
    if (p.empty()) return Invalid("the prompt is empty and the model adds no BOS token", pparam);
    if (static_cast<int64_t>(p.size()) >= ctx.context_length) {
      return ApiError(absl::StatusCode::kOutOfRange,
                      absl::StrCat("the prompt has ", p.size(), " tokens; this model's context length is ",
                                   ctx.context_length),
                      pparam);
    }
  }
  for (auto& p : prompts) {
    for (int i = 0; i < r.n; ++i) {
      GenerationRequest gi = g;
      gi.prompt = p;
      if (seed) gi.sampling.seed = static_cast<uint64_t>(*seed) + static_cast<uint64_t>(i);
      r.requests.push_back(std::move(gi));
    }
  }
  return r;
}

TokenInfo MakeTokenInfo(const Tokenizer& tok, const GenerationEvent& ev) {
  TokenInfo t;
  t.token = ev.token;
  t.text = tok.TokenBytes(ev.token, true);
  t.logprob = ev.logprob;
  for (const TokenLogprob& lp : ev.top_logprobs) t.top.emplace_back(tok.TokenBytes(lp.token, true), lp.logprob);
  return t;
}

void Accumulate(const ParsedRequest& req, const Tokenizer& tok, const GenerationEvent& ev, ChoiceResult* c) {
  c->text += ev.text;
  if (!ev.final && ev.token >= 0 && req.logprobs) c->tokens.push_back(MakeTokenInfo(tok, ev));
  if (ev.final) c->finish = ev.finish_reason;
  c->usage = ev.usage;
}

const char* OpenAiFinishReason(FinishReason r) { return r == FinishReason::kLength ? "length" : "stop"; }

json UsageJson(const ParsedRequest& req, const std::vector<ChoiceResult>& choices) {
  int64_t prompt = 0, completion = 0, cached = 0;
  for (size_t i = 0; i < choices.size(); ++i) {
    if (i % static_cast<size_t>(std::max(req.n, 1)) == 0) {
      prompt += choices[i].usage.prompt_tokens;
      cached += choices[i].usage.cached_prompt_tokens;
    }
    completion += choices[i].usage.completion_tokens;
  }
  return json{{"prompt_tokens", prompt},
              {"completion_tokens", completion},
              {"total_tokens", prompt + completion},
              {"prompt_tokens_details", {{"cached_tokens", cached}}}};
}

namespace {

std::vector<int> Bytes(const std::string& s) {
  std::vector<int> b;
  for (unsigned char c : s) b.push_back(c);
  return b;
}

// Completions logprobs object for `tokens`, text offsets starting at `offset`.
json CompletionLogprobs(const std::vector<TokenInfo>& tokens, size_t offset) {
  json toks = json::array(), lps = json::array(), tops = json::array(), offs = json::array();
  for (const TokenInfo& t : tokens) {
    toks.push_back(t.text);
    lps.push_back(t.logprob);
    json top = json::object();
    for (const auto& [text, lp] : t.top) {
      if (!top.contains(text)) top[text] = lp;
    }
    tops.push_back(top);
    offs.push_back(offset);
    offset += t.text.size();
  }
  return json{{"tokens", toks}, {"token_logprobs", lps}, {"top_logprobs", tops}, {"text_offset", offs}};
}

json ChatLogprobs(const std::vector<TokenInfo>& tokens) {
  json content = json::array();
  for (const TokenInfo& t : tokens) {
    json top = json::array();
    for (const auto& [text, lp] : t.top) top.push_back({{"token", text}, {"logprob", lp}, {"bytes", Bytes(text)}});
    content.push_back({{"token", t.text}, {"logprob", t.logprob}, {"bytes", Bytes(t.text)}, {"top_logprobs", top}});
  }
  return json{{"content", content}};
}

}  // namespace

json BuildResponse(const ParsedRequest& req, const std::vector<ChoiceResult>& choices, const std::string& id,
                   int64_t created) {
  json cs = json::array();
  for (size_t i = 0; i < choices.size(); ++i) {
    const ChoiceResult& c = choices[i];
    json choice = {{"index", i}, {"finish_reason", OpenAiFinishReason(c.finish)}};
    if (req.endpoint == Endpoint::kCompletions) {
      const size_t prompt_i = i / static_cast<size_t>(std::max(req.n, 1));
      const std::string prefix = req.echo && prompt_i < req.prompt_texts.size() ? req.prompt_texts[prompt_i] : "";
      choice["text"] = prefix + c.text;
      choice["logprobs"] = req.logprobs ? CompletionLogprobs(c.tokens, prefix.size()) : json(nullptr);
    } else {
      choice["message"] = {{"role", "assistant"}, {"content", c.text}};
      choice["logprobs"] = req.logprobs ? ChatLogprobs(c.tokens) : json(nullptr);
    }
    cs.push_back(std::move(choice));
  }
  const bool chat = req.endpoint == Endpoint::kChat;
  return json{{"id", id},
              {"object", chat ? "chat.completion" : "text_completion"},
              {"created", created},
              {"model", req.model},
              {"system_fingerprint", "nibble"},
              {"choices", cs},
              {"usage", UsageJson(req, choices)}};
}

json BuildChunk(const ParsedRequest& req, int index, absl::string_view text, const std::vector<TokenInfo>& tokens,
                FinishReason finish, bool first, size_t text_offset, const std::string& id, int64_t created) {
  json choice = {{"index", index}};
  choice["finish_reason"] = finish == FinishReason::kNone ? json(nullptr) : json(OpenAiFinishReason(finish));
  const bool chat = req.endpoint == Endpoint::kChat;
  if (!chat) {
    choice["text"] = std::string(text);
    choice["logprobs"] = req.logprobs ? CompletionLogprobs(tokens, text_offset) : json(nullptr);
  } else {
    json delta = json::object();
    if (first) delta["role"] = "assistant";
    if (!text.empty() || (first && finish == FinishReason::kNone)) delta["content"] = std::string(text);
    choice["delta"] = delta;
    choice["logprobs"] = req.logprobs ? ChatLogprobs(tokens) : json(nullptr);
  }
  json j = {{"id", id},
            {"object", chat ? "chat.completion.chunk" : "text_completion"},
            {"created", created},
            {"model", req.model},
            {"system_fingerprint", "nibble"},
            {"choices", json::array({choice})}};
  if (req.include_usage) j["usage"] = nullptr;
  return j;
}

json BuildUsageChunk(const ParsedRequest& req, const std::vector<ChoiceResult>& choices, const std::string& id,
                     int64_t created) {
  const bool chat = req.endpoint == Endpoint::kChat;
  return json{{"id", id},
              {"object", chat ? "chat.completion.chunk" : "text_completion"},
              {"created", created},
              {"model", req.model},
              {"system_fingerprint", "nibble"},
              {"choices", json::array()},
              {"usage", UsageJson(req, choices)}};
}

json ModelsJson(const std::string& model_id, int64_t created) {
  return json{{"object", "list"},
              {"data", json::array({{{"id", model_id}, {"object", "model"}, {"created", created},
                                     {"owned_by", "nibble"}}})}};
}

}  // namespace nibble::server
