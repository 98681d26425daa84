// The int8 and fp16 paged KV caches (PagedKVCache::Options::dtype = kInt8 /
// kF16) at model level, on stories260K: against the fp32 paged cache (itself checked against
// the contiguous Forward path, which is checked against llama.cpp), greedy
// decoding must pick the same tokens, logits must stay within a stated
// tolerance, and teacher-forced perplexity on TinyStories text must move by
// less than a stated relative amount.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <vector>

#include "engine/model/llama_model.h"
#include "engine/runtime/engine.h"
#include "gtest/gtest.h"
#include "tests/test_util.h"

namespace nibble {
namespace {

// Measured on stories260K (head_dim 8, 5 layers; x86 AVX-512 int8 kernel):
//  - greedy: the same 48 tokens; max |logit difference| over the 48 steps
//    0.595 (logits span ~20 units). Almost all of it comes from K: with V
//    alone quantized it is 0.27, with K alone 0.59 (K rows have outlier
//    channels that set the per-head scale). An fp32 cache holding the
//    dequantized values matches the int8 kernel to 7.6e-6, so this is
//    quantization error, not kernel error. Bound: 1.0.
//  - perplexity over 384 TinyStories tokens: f32 KV 6.9572, int8 KV 7.0377,
//    +1.16% relative (V-only quantization: +0.06%). Bound: 2%.
// A wrong scale or layout gives logit errors of several units and perplexity
// changes of 10x, far outside these bounds.
constexpr float kLogitTol = 1.0f;
constexpr double kPplRelTol = 0.02;
// fp16 KV (kF16), measured the same way: max |logit diff| 0.0172 over the
// 48 greedy steps (same tokens); perplexity 6.95719 -> 6.95616 (-0.015%).
// Bounds 0.1 and 0.2%: 35x / 13x below what int8 shows, far below a wrong
// layout (units of logits).
constexpr float kF16LogitTol = 0.1f;
constexpr double kF16PplRelTol = 0.002;

struct Stories {
  Engine e;
  bool ok = false;
};

Stories Load() {
  Stories s;
  if (!std::filesystem::exists(testing::Stories260KModel())) return s;
  LoadOptions lo;
  lo.tokenizer_path = testing::Stories260KTokenizer();
  auto e = OpenEngine(testing::Stories260KModel(), lo, 2);
  EXPECT_TRUE(e.ok()) << e.status();
  if (!e.ok()) return s;
  s.e = *std::move(e);
  s.ok = true;
  return s;
}

std::unique_ptr<PagedKVCache> MakeCache(const ModelConfig& c, KvDtype dtype) {
  auto cache = PagedKVCache::Create(c, {.block_size = 16, .num_blocks = 40, .prefix_caching = false, .dtype = dtype});
  EXPECT_TRUE(cache.ok()) << cache.status();
  return cache.ok() ? *std::move(cache) : nullptr;
}

int Argmax(const std::vector<float>& v) { return static_cast<int>(std::max_element(v.begin(), v.end()) - v.begin()); }

// Greedy: prefill `prompt` in one chunk, then decode n tokens one at a time.
// Returns the tokens; `logits_out` gets every step's logits.
std::vector<int32_t> Greedy(LlamaModel& m, KvDtype dtype, const std::vector<int32_t>& prompt, int n,
                            std::vector<std::vector<float>>* logits_out) {
  const ModelConfig& c = m.config();
  auto cache = MakeCache(c, dtype);
  BlockTable bt;
  std::vector<int32_t> seq = prompt, out;
  std::vector<float> logits(c.vocab_size);
  int pos = 0;
  for (int step = 0; step < n; ++step) {
    const int len = static_cast<int>(seq.size()) - pos;
    EXPECT_TRUE(cache->Reserve(&bt, pos + len).ok());
    BatchSequence b{std::span<const int32_t>(seq).subspan(pos, len), pos, &bt, true};
    const absl::Status st = m.ForwardBatched({&b, 1}, cache.get(), logits);
    EXPECT_TRUE(st.ok()) << st;
    if (!st.ok()) break;
    pos += len;
    logits_out->push_back(logits);
    out.push_back(Argmax(logits));
    seq.push_back(out.back());
  }
  cache->Free(&bt);
  return out;
}

// Teacher-forced perplexity of tokens[1..] given the prefix, one position per
// step (every decode crosses block boundaries as the context grows).
double Perplexity(LlamaModel& m, KvDtype dtype, const std::vector<int32_t>& tokens) {
  const ModelConfig& c = m.config();
  auto cache = MakeCache(c, dtype);
  BlockTable bt;
  std::vector<float> logits(c.vocab_size);
  double nll = 0.0;
  for (size_t p = 0; p + 1 < tokens.size(); ++p) {
    EXPECT_TRUE(cache->Reserve(&bt, p + 1).ok());
    BatchSequence b{std::span<const int32_t>(tokens).subspan(p, 1), static_cast<int>(p), &bt, true};
    const absl::Status st = m.ForwardBatched({&b, 1}, cache.get(), logits);
    EXPECT_TRUE(st.ok()) << st;
    if (!st.ok()) return 0.0;
    const float mx = *std::max_element(logits.begin(), logits.end());
    double z = 0.0;
    for (float x : logits) z += std::exp(double{x} - mx);
    nll -= double{logits[tokens[p + 1]]} - mx - std::log(z);
  }
  cache->Free(&bt);
  return std::exp(nll / double(tokens.size() - 1));
}

// Greedy decoding with `dtype` picks the fp32 cache's tokens, its logits stay
// within `tol` of them and differ somewhere (the cache really rounds).
void ExpectGreedyClose(KvDtype dtype, float tol) {
  Stories s = Load();
  if (!s.ok) GTEST_SKIP() << "stories260K not present";
  LlamaModel& m = *s.e.model;
  auto prompt = s.e.tokenizer->Encode("Once upon a time, there was a little girl named Lily. She",
                                      {.add_bos = true});
  ASSERT_TRUE(prompt.ok()) << prompt.status();
  constexpr int kSteps = 48;
  std::vector<std::vector<float>> lf, lq;
  const std::vector<int32_t> f32 = Greedy(m, KvDtype::kF32, *prompt, kSteps, &lf);
  const std::vector<int32_t> got = Greedy(m, dtype, *prompt, kSteps, &lq);
  ASSERT_EQ(f32.size(), size_t{kSteps});
  ASSERT_EQ(got.size(), size_t{kSteps});
  EXPECT_EQ(got, f32) << "greedy decoding diverged";
  float worst = 0.0f;
  for (int t = 0; t < kSteps; ++t)
    for (size_t i = 0; i < lf[t].size(); ++i) worst = std::max(worst, std::fabs(lf[t][i] - lq[t][i]));
  printf("%s vs f32 KV: max |logit diff| over %d steps = %.4g\n", KvDtypeName(dtype), kSteps, worst);
  EXPECT_LT(worst, tol);
  EXPECT_GT(worst, 0.0f) << KvDtypeName(dtype) << " cache gave bit-identical logits: is it really rounding?";
}

// Teacher-forced perplexity on TinyStories text moves by less than `rel_tol`.
void ExpectPerplexityClose(KvDtype dtype, double rel_tol) {
  Stories s = Load();
  if (!s.ok) GTEST_SKIP() << "stories260K not present";
  const std::string path = testing::SharedDir() + "/data/tinystories-val.txt";
  std::ifstream in(path);
  if (!in) GTEST_SKIP() << path << " not present";
  std::string text(3000, '\0');
  in.read(text.data(), static_cast<std::streamsize>(text.size()));
  text.resize(static_cast<size_t>(in.gcount()));
  auto ids = s.e.tokenizer->Encode(text, {.add_bos = true});
  ASSERT_TRUE(ids.ok()) << ids.status();
  std::vector<int32_t> toks = *ids;
  toks.resize(std::min<size_t>(toks.size(), 384));
  ASSERT_GT(toks.size(), 200u);
  LlamaModel& m = *s.e.model;
  const double p32 = Perplexity(m, KvDtype::kF32, toks);
  const double pq = Perplexity(m, dtype, toks);
  printf("perplexity over %zu tokens: f32 KV %.6f, %s KV %.6f (%+.5f%%)\n", toks.size(), p32, KvDtypeName(dtype), pq,
         100.0 * (pq - p32) / p32);
  ASSERT_GT(p32, 1.0);
  EXPECT_LT(std::fabs(pq - p32) / p32, rel_tol);
}

TEST(PagedInt8Forward, GreedyMatchesFp32KvAndLogitsStayClose) { ExpectGreedyClose(KvDtype::kInt8, kLogitTol); }
TEST(PagedInt8Forward, PerplexityChangeIsSmall) { ExpectPerplexityClose(KvDtype::kInt8, kPplRelTol); }
TEST(PagedF16Forward, GreedyMatchesFp32KvAndLogitsStayClose) { ExpectGreedyClose(KvDtype::kF16, kF16LogitTol); }
TEST(PagedF16Forward, PerplexityChangeIsTiny) { ExpectPerplexityClose(KvDtype::kF16, kF16PplRelTol); }

}  // namespace
}  // namespace nibble
