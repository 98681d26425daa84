// Unit tests of the transport-free OpenAI layer: request validation, the
// request -> GenerationRequest mapping, response / SSE chunk shapes, errors,
// and the Prometheus text. Tokenization uses stories260K's llama2.c tokenizer.
#include "server/openai_api.h"

#include <filesystem>

#include "engine/model/model_loader.h"
#include "engine/runtime/engine.h"
#include "gtest/gtest.h"
#include "server/metrics.h"
#include "tests/test_util.h"

namespace nibble::server {
namespace {

using json = nlohmann::json;

class OpenAiApiTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    if (!std::filesystem::exists(testing::Stories260KModel())) return;
    LoadOptions lo;
    lo.tokenizer_path = testing::Stories260KTokenizer();
    auto e = OpenEngine(testing::Stories260KModel(), lo, 1);
    ASSERT_TRUE(e.ok()) << e.status();
    engine_ = new Engine(*std::move(e));
  }
  static void TearDownTestSuite() {
    delete engine_;
    engine_ = nullptr;
  }
  void SetUp() override {
    if (engine_ == nullptr) GTEST_SKIP() << "stories260K not found";
    ctx_.tokenizer = engine_->tokenizer.get();
    ctx_.context_length = 512;
    ctx_.model_id = "m";
    ctx_.max_tokens_limit = 100;
  }
  absl::StatusOr<ParsedRequest> Parse(Endpoint ep, const std::string& body) { return ParseRequest(ep, body, ctx_); }
  static Engine* engine_;
  ModelContext ctx_;
};
Engine* OpenAiApiTest::engine_ = nullptr;

TEST_F(OpenAiApiTest, CompletionFieldsMapToGenerationRequests) {
  auto r = Parse(Endpoint::kCompletions,
                 R"({"model":"m","prompt":"Hello","max_tokens":7,"temperature":0.5,"top_p":0.9,"top_k":3,
                     "seed":11,"n":3,"stop":["a","b"],"logprobs":2,"stream":true,
                     "stream_options":{"include_usage":true}})");
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->requests.size(), 3u);
  EXPECT_TRUE(r->stream);
  EXPECT_TRUE(r->include_usage);
  EXPECT_TRUE(r->logprobs);
  EXPECT_EQ(r->top_logprobs, 2);
  const auto expected_prompt = *engine_->tokenizer->Encode("Hello", {.add_bos = engine_->tokenizer->ShouldAddBos()});
  for (int i = 0; i < 3; ++i) {
    const GenerationRequest& g = r->requests[i];
    EXPECT_EQ(g.prompt, expected_prompt);
    EXPECT_EQ(g.max_tokens, 7);
    EXPECT_FLOAT_EQ(g.sampling.temperature, 0.5f);
    EXPECT_FLOAT_EQ(g.sampling.top_p, 0.9f);
    EXPECT_EQ(g.sampling.top_k, 3);
    EXPECT_EQ(g.sampling.min_p, 0.0f);
    EXPECT_EQ(g.sampling.seed, 11u + i);  // choice i samples with seed + i
    EXPECT_EQ(g.stop, (std::vector<std::string>{"a", "b"}));
    EXPECT_EQ(g.top_logprobs, 2);
  }
  EXPECT_EQ(ctx_.tokenizer->bos_id(), expected_prompt.front());
}

TEST_F(OpenAiApiTest, DefaultsAndPromptForms) {
  auto r = Parse(Endpoint::kCompletions, R"({"prompt":[[5,6],[7]]})");
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->requests.size(), 2u);
  EXPECT_EQ(r->requests[0].prompt, (std::vector<int32_t>{5, 6}));
  EXPECT_EQ(r->requests[1].prompt, (std::vector<int32_t>{7}));
  EXPECT_EQ(r->requests[0].max_tokens, 16);                  // OpenAI's completions default
  EXPECT_FLOAT_EQ(r->requests[0].sampling.temperature, 1.0f);  // OpenAI's default
  EXPECT_EQ(r->requests[0].sampling.seed, kRandomSeed);
  auto c = Parse(Endpoint::kChat, R"({"messages":[{"role":"user","content":[{"type":"text","text":"Hi"}]}],
                                       "max_completion_tokens":9,"logprobs":true,"top_logprobs":4})");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->requests[0].max_tokens, 9);
  EXPECT_EQ(c->requests[0].top_logprobs, 4);
  EXPECT_NE(c->prompt_texts[0].find("<|im_start|>user\nHi<|im_end|>"), std::string::npos) << c->prompt_texts[0];
}

TEST_F(OpenAiApiTest, InvalidRequestsAreRejectedWithTheRightStatusAndParam) {
  struct Case {
    Endpoint ep;
    std::string body;
    int http;
    std::string param;
  } cases[] = {
      {Endpoint::kCompletions, "{", 400, ""},
      {Endpoint::kCompletions, "[1]", 400, ""},
      {Endpoint::kCompletions, "{\"prompt\":\"\xc3\x28\"}", 400, ""},
      {Endpoint::kCompletions, R"({"model":"other","prompt":"x"})", 404, "model"},
      {Endpoint::kCompletions, R"({"prompt":"x","max_tokens":0})", 400, "max_tokens"},
      {Endpoint::kCompletions, R"({"prompt":"x","max_tokens":-1})", 400, "max_tokens"},
      {Endpoint::kCompletions, R"({"prompt":"x","max_tokens":101})", 400, "max_tokens"},
      {Endpoint::kCompletions, R"({"prompt":"x","max_tokens":1e300})", 400, "max_tokens"},
      {Endpoint::kCompletions, R"({"prompt":"x","max_tokens":"5"})", 400, "max_tokens"},
      {Endpoint::kCompletions, R"({"prompt":"x","temperature":3})", 400, "temperature"},
      {Endpoint::kCompletions, R"({"prompt":"x","n":0})", 400, "n"},
      {Endpoint::kCompletions, R"({"prompt":"x","stop":[1]})", 400, "stop"},
      {Endpoint::kCompletions, R"({"prompt":"x","logprobs":21})", 400, "logprobs"},
      {Endpoint::kCompletions, R"({"prompt":[1,512]})", 400, "prompt"},
      {Endpoint::kCompletions, R"({"prompt":{}})", 400, "prompt"},
      {Endpoint::kCompletions, R"({})", 400, "prompt"},
      {Endpoint::kChat, R"({"messages":[]})", 400, "messages"},
      {Endpoint::kChat, R"({"messages":[{"content":"x"}]})", 400, "messages"},
      {Endpoint::kChat, R"({"messages":[{"role":"robot","content":"x"}]})", 400, "messages"},
      {Endpoint::kChat, R"({"messages":[{"role":"user","content":"x"}],"top_logprobs":2})", 400, "top_logprobs"},
  };
  for (const Case& c : cases) {
    auto r = Parse(c.ep, c.body);
    ASSERT_FALSE(r.ok()) << c.body;
    EXPECT_EQ(HttpStatusFor(r.status()), c.http) << c.body << ": " << r.status();
    EXPECT_EQ(ApiParam(r.status()), c.param) << c.body;
    json e = ErrorJson(r.status());
    EXPECT_TRUE(e["error"]["message"].is_string());
    EXPECT_TRUE(e["error"]["type"].is_string());
  }
  // A prompt as long as the context is OUT_OF_RANGE -> 400 context_length_exceeded.
  std::string long_prompt = R"({"prompt":[)";
  for (int i = 0; i < 512; ++i) long_prompt += (i ? ",5" : "5");
  auto r = Parse(Endpoint::kCompletions, long_prompt + "]}");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(HttpStatusFor(r.status()), 400);
  EXPECT_EQ(ErrorJson(r.status())["error"]["code"], "context_length_exceeded");
}

TEST(OpenAiErrors, StatusMapping) {
  EXPECT_EQ(HttpStatusFor(absl::ResourceExhaustedError("q")), 429);
  EXPECT_EQ(HttpStatusFor(absl::UnavailableError("d")), 503);
  EXPECT_EQ(HttpStatusFor(absl::UnauthenticatedError("k")), 401);
  EXPECT_EQ(HttpStatusFor(absl::FailedPreconditionError("big")), 413);
  json e = ErrorJson(absl::ResourceExhaustedError("queue full"));
  EXPECT_EQ(e["error"]["type"], "rate_limit_error");
  EXPECT_EQ(e["error"]["message"], "queue full");
  EXPECT_TRUE(e["error"]["param"].is_null());
  // Invalid UTF-8 never throws; it is replaced.
  EXPECT_EQ(Dump(json("\xff")), "\"\xEF\xBF\xBD\"");
  EXPECT_EQ(SseData(json{{"a", 1}}), "data: {\"a\":1}\n\n");
}

TEST_F(OpenAiApiTest, ResponsesAndChunks) {
  auto r = Parse(Endpoint::kChat, R"({"messages":[{"role":"user","content":"x"}],"n":2,"logprobs":true})");
  ASSERT_TRUE(r.ok());
  std::vector<ChoiceResult> choices(2);
  GenerationEvent tok_ev;
  tok_ev.token = 5;
  tok_ev.text = "ab";
  tok_ev.logprob = -0.5f;
  tok_ev.usage = {10, 1, 0};
  GenerationEvent fin;
  fin.final = true;
  fin.text = "c";
  fin.finish_reason = FinishReason::kLength;
  fin.usage = {10, 2, 4};
  for (auto& c : choices) {
    Accumulate(*r, *ctx_.tokenizer, tok_ev, &c);
    Accumulate(*r, *ctx_.tokenizer, fin, &c);
  }
  json resp = BuildResponse(*r, choices, "chatcmpl-1", 123);
  EXPECT_EQ(resp["object"], "chat.completion");
  EXPECT_EQ(resp["choices"][1]["index"], 1);
  EXPECT_EQ(resp["choices"][0]["message"]["content"], "abc");
  EXPECT_EQ(resp["choices"][0]["finish_reason"], "length");
  EXPECT_FLOAT_EQ(resp["choices"][0]["logprobs"]["content"][0]["logprob"].get<float>(), -0.5f);
  // Both choices share one prompt: prompt tokens counted once.
  EXPECT_EQ(resp["usage"]["prompt_tokens"], 10);
  EXPECT_EQ(resp["usage"]["completion_tokens"], 4);
  EXPECT_EQ(resp["usage"]["total_tokens"], 14);

  json first = BuildChunk(*r, 1, "ab", {}, FinishReason::kNone, true, 0, "id", 1);
  EXPECT_EQ(first["object"], "chat.completion.chunk");
  EXPECT_EQ(first["choices"][0]["index"], 1);
  EXPECT_EQ(first["choices"][0]["delta"]["role"], "assistant");
  EXPECT_EQ(first["choices"][0]["delta"]["content"], "ab");
  EXPECT_TRUE(first["choices"][0]["finish_reason"].is_null());
  json last = BuildChunk(*r, 0, "", {}, FinishReason::kStop, false, 2, "id", 1);
  EXPECT_EQ(last["choices"][0]["finish_reason"], "stop");
  EXPECT_FALSE(last["choices"][0]["delta"].contains("content"));

  auto c = Parse(Endpoint::kCompletions, R"({"prompt":"Hi","echo":true,"logprobs":1})");
  ASSERT_TRUE(c.ok());
  TokenInfo t{5, "xy", -1.0f, {{"xy", -1.0f}}};
  json cc = BuildChunk(*c, 0, "xy", {t}, FinishReason::kNone, false, 3, "id", 1);
  EXPECT_EQ(cc["object"], "text_completion");
  EXPECT_EQ(cc["choices"][0]["text"], "xy");
  EXPECT_EQ(cc["choices"][0]["logprobs"]["text_offset"][0], 3);
  EXPECT_EQ(cc["choices"][0]["logprobs"]["tokens"][0], "xy");
}

TEST(Metrics, PrometheusTextIsCumulativeAndLabelled) {
  SchedulerStats s;
  s.kv_blocks_total = 8;
  s.kv_blocks_used = 3;
  s.time_to_first_token.Add(0.002);
  s.time_to_first_token.Add(0.02);
  s.time_to_first_token.Add(100.0);
  RequestCounts counts = {{{"http", "200"}, 4}, {{"grpc", "8"}, 1}};
  const std::string t = PrometheusText(s, counts);
  EXPECT_NE(t.find("nibble_kv_blocks_used 3\n"), std::string::npos);
  EXPECT_NE(t.find("nibble_kv_blocks_total 8\n"), std::string::npos);
  EXPECT_NE(t.find("nibble_time_to_first_token_seconds_bucket{le=\"0.001\"} 0\n"), std::string::npos);
  EXPECT_NE(t.find("nibble_time_to_first_token_seconds_bucket{le=\"0.0025\"} 1\n"), std::string::npos);
  EXPECT_NE(t.find("nibble_time_to_first_token_seconds_bucket{le=\"0.025\"} 2\n"), std::string::npos);
  EXPECT_NE(t.find("nibble_time_to_first_token_seconds_bucket{le=\"10\"} 2\n"), std::string::npos);
  EXPECT_NE(t.find("nibble_time_to_first_token_seconds_bucket{le=\"+Inf\"} 3\n"), std::string::npos);
  EXPECT_NE(t.find("nibble_time_to_first_token_seconds_count 3\n"), std::string::npos);
  EXPECT_NE(t.find("nibble_requests_total{api=\"http\",status=\"200\"} 4\n"), std::string::npos);
  EXPECT_NE(t.find("# TYPE nibble_request_duration_seconds histogram\n"), std::string::npos);
}

}  // namespace
}  // namespace nibble::server
