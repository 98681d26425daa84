// OpenAI-compatible request parsing and response building, free of any
// transport: JSON body -> validated scheduler requests; scheduler events ->
// response objects and SSE chunks. The HTTP server (http_server.cc) only moves
// bytes; everything a client sees in a body is built here.
//
// Goals: /v1/completions and /v1/chat/completions request fields that the
// engine can honour (prompt as string / strings / token ids / token-id lists,
// messages, max_tokens / max_completion_tokens, temperature, top_p, seed, n,
// stop, logprobs, echo, stream, stream_options.include_usage, plus the vLLM /
// llama.cpp extensions top_k, min_p, repeat_penalty, ignore_eos); clear 4xx
// errors in OpenAI's shape {"error":{"message","type","param","code"}}.
// Non-goals: tools / function calling, response_format, logit_bias, suffix,
// best_of, images; unknown fields are ignored (as OpenAI-compatible servers do).
//
// Sampling defaults are OpenAI's (temperature 1, top_p 1) with top_k and
// min_p off (0) and no penalties; so a request with temperature/top_p/top_k/
// min_p/seed set reproduces `nibble-generate --temp T --top-p P --top-k K
// --min-p M -s SEED` exactly. With n > 1 choice i samples with seed + i.
//
// Errors are absl::Status values whose code says the HTTP status
// (HttpStatusFor) and whose "param" payload (ApiParam) names the field.
// Thread safety: all functions are pure (the Tokenizer is immutable).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "engine/runtime/scheduler.h"
#include "engine/tokenizer/tokenizer.h"
#include "nlohmann/json.hpp"

namespace nibble::server {

enum class Endpoint { kCompletions, kChat };

// What the parser needs to know about the served model.
struct ModelContext {
  const Tokenizer* tokenizer = nullptr;  // not owned
  std::string chat_template;             // Jinja source ("" = ChatML fallback)
  int context_length = 0;                // max_seq_len
  std::string model_id;
  int max_tokens_limit = 4096;           // largest max_tokens accepted
  int max_n = 16;                        // largest n accepted
};

struct ParsedRequest {
  Endpoint endpoint = Endpoint::kCompletions;
  std::string model;               // the served model id (echoed back)
  bool stream = false;
  bool include_usage = false;      // stream_options.include_usage
  bool echo = false;               // completions: prepend the prompt text
  int n = 1;
  bool logprobs = false;           // report logprobs
  int top_logprobs = 0;            // alternatives per token when logprobs
  std::vector<std::string> prompt_texts;  // one per prompt (for echo)
  // prompts.size() * n requests; requests[i] is choice index i (prompt i / n).
  std::vector<GenerationRequest> requests;
};

// Parses and validates a request body. Errors: INVALID_ARGUMENT (400) for
// malformed JSON, invalid UTF-8, wrong types or out-of-range values; NOT_FOUND
// (404) for a model other than ctx.model_id.
absl::StatusOr<ParsedRequest> ParseRequest(Endpoint endpoint, absl::string_view body, const ModelContext& ctx);

// An error status carrying the offending request field.
absl::Status ApiError(absl::StatusCode code, absl::string_view message, absl::string_view param = "");
std::string ApiParam(const absl::Status& s);  // "" if none
// HTTP status for a Status: INVALID_ARGUMENT/OUT_OF_RANGE 400, UNAUTHENTICATED
// 401, PERMISSION_DENIED 403, NOT_FOUND 404, FAILED_PRECONDITION 413 (body too
// large), RESOURCE_EXHAUSTED 429, UNAVAILABLE 503, DEADLINE_EXCEEDED 504,
// CANCELLED 499, else 500.
int HttpStatusFor(const absl::Status& s);
// {"error":{"message","type","param","code"}} for a Status (or a status code).
nlohmann::json ErrorJson(const absl::Status& s);
nlohmann::json ErrorJson(int http_status, absl::string_view message);

// Serialises JSON for the wire; invalid UTF-8 in strings becomes U+FFFD (no throw).
std::string Dump(const nlohmann::json& j);
// "data: <json>\n\n".
std::string SseData(const nlohmann::json& j);
inline constexpr const char* kSseDone = "data: [DONE]\n\n";

// The logprob data of one sampled token, already rendered to text.
struct TokenInfo {
  int32_t token = -1;
  std::string text;  // the token's bytes (may be partial UTF-8)
  float logprob = 0.0f;
  std::vector<std::pair<std::string, float>> top;  // alternatives, best first
};
TokenInfo MakeTokenInfo(const Tokenizer& tok, const GenerationEvent& ev);

// One choice accumulated from its events (non-streaming responses).
struct ChoiceResult {
  std::string text;
  std::vector<TokenInfo> tokens;  // filled only when logprobs are requested
  FinishReason finish = FinishReason::kNone;
  Usage usage;
};
// Folds one event into `c` (text, logprobs, finish, usage).
void Accumulate(const ParsedRequest& req, const Tokenizer& tok, const GenerationEvent& ev, ChoiceResult* c);

// "stop" / "length" (other reasons never reach a successful response).
const char* OpenAiFinishReason(FinishReason r);

// Sums usage over choices; prompt tokens are counted once per prompt.
nlohmann::json UsageJson(const ParsedRequest& req, const std::vector<ChoiceResult>& choices);

// The whole non-streaming response ("text_completion" / "chat.completion").
nlohmann::json BuildResponse(const ParsedRequest& req, const std::vector<ChoiceResult>& choices,
                             const std::string& id, int64_t created);

// One streaming chunk for choice `index`: a text delta with its tokens'
// logprobs (may be empty), and finish_reason when `finish` != kNone.
// `text_offset` is the choice's text length before this delta (completions
// logprobs). Chat chunks carry {"role":"assistant"} when `first`.
nlohmann::json BuildChunk(const ParsedRequest& req, int index, absl::string_view text,
                          const std::vector<TokenInfo>& tokens, FinishReason finish, bool first,
                          size_t text_offset, const std::string& id, int64_t created);
// The final usage-only chunk (choices: []) sent when include_usage is set.
nlohmann::json BuildUsageChunk(const ParsedRequest& req, const std::vector<ChoiceResult>& choices,
                               const std::string& id, int64_t created);

// GET /v1/models.
nlohmann::json ModelsJson(const std::string& model_id, int64_t created);

}  // namespace nibble::server
