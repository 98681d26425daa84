#include "engine/runtime/sampler.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <limits>
#include <numeric>
#include <vector>

#include "gtest/gtest.h"

namespace nibble {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

SamplingParams Plain(float temperature = 1.0f) {
  SamplingParams p;
  p.temperature = temperature;
  p.top_k = 0;
  p.top_p = 1.0f;
  p.min_p = 0.0f;
  p.seed = 1234;
  return p;
}

// Independent reference: the sampling distribution written directly from the
// definitions (full sort, double precision), not from the Sampler's code.
std::vector<double> ExpectedDistribution(const std::vector<float>& logits,
                                         const SamplingParams& p) {
  const size_t n = logits.size();
  std::vector<size_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t a, size_t b) { return logits[a] > logits[b]; });
  size_t keep = n;
  if (p.top_k > 0) keep = std::min<size_t>(keep, p.top_k);
  const double trunc_t = p.temperature_last ? 1.0 : p.temperature;
  std::vector<double> prob(keep);
  double z = 0.0;
  for (size_t i = 0; i < keep; ++i) z += std::exp(logits[order[i]] / trunc_t);
  for (size_t i = 0; i < keep; ++i) prob[i] = std::exp(logits[order[i]] / trunc_t) / z;
  if (p.top_p < 1.0f) {
    double cum = 0.0;
    for (size_t i = 0; i < keep; ++i) {
      cum += prob[i];
      if (cum >= p.top_p) {
        keep = i + 1;
        break;
      }
    }
  }
  if (p.min_p > 0.0f) {
    size_t m = 0;
    while (m < keep && prob[m] >= p.min_p * prob[0]) ++m;
    keep = m;
  }
  std::vector<double> out(n, 0.0);
  double zf = 0.0;
  for (size_t i = 0; i < keep; ++i) zf += std::exp(logits[order[i]] / p.temperature);
  for (size_t i = 0; i < keep; ++i) out[order[i]] = std::exp(logits[order[i]] / p.temperature) / zf;
  return out;
}

// Draws `draws` tokens and checks every count lies within 5 sigma of the
// expected binomial mean; tokens of probability 0 must never appear.
void ExpectFrequencies(const std::vector<float>& logits, const SamplingParams& p, int draws) {
  const std::vector<double> want = ExpectedDistribution(logits, p);
  Sampler s(p, static_cast<int>(logits.size()));
  std::vector<int> counts(logits.size(), 0);
  std::vector<float> buf;
  for (int d = 0; d < draws; ++d) {
    buf = logits;
    const int32_t t = s.Sample(buf, {});
    ASSERT_GE(t, 0);
    ASSERT_LT(t, static_cast<int32_t>(logits.size()));
    ++counts[t];
  }
  for (size_t i = 0; i < logits.size(); ++i) {
    const double mean = draws * want[i];
    if (want[i] == 0.0) {
      EXPECT_EQ(counts[i], 0) << "token " << i << " should have been truncated";
    } else {
      const double sigma = std::sqrt(draws * want[i] * (1.0 - want[i]));
      EXPECT_NEAR(counts[i], mean, 5.0 * sigma + 1.0)
          << "token " << i << " p=" << want[i] << " T=" << p.temperature << " k=" << p.top_k
          << " top_p=" << p.top_p << " min_p=" << p.min_p;
    }
  }
}

const std::vector<float> kSmall = {1.0f, 2.0f, 0.5f, 3.0f, -1.0f, 2.5f, 0.0f, 1.5f};

TEST(SamplerTest, GreedyPicksArgmaxLowestIdOnTies) {
  SamplingParams p = Plain(0.0f);
  Sampler s(p, 6);
  std::vector<float> l = {0.1f, 5.0f, -3.0f, 5.0f, 4.9f, std::nanf("")};
  EXPECT_EQ(s.Sample(l, {}), 1);
  std::vector<float> l2 = {std::nanf(""), -1.0f, 7.0f, 2.0f};
  EXPECT_EQ(s.Sample(l2, {}), 2);
  // Greedy ignores truncation settings and the seed.
  p.top_k = 1;
  p.seed = 99;
  Sampler s2(p, 8);
  std::vector<float> l3 = kSmall;
  EXPECT_EQ(s2.Sample(l3, {}), 3);
}

TEST(SamplerTest, TopK1IsGreedy) {
  SamplingParams p = Plain(1.5f);
  p.top_k = 1;
  Sampler s(p, 8);
  for (int i = 0; i < 50; ++i) {
    std::vector<float> l = kSmall;
    EXPECT_EQ(s.Sample(l, {}), 3);
  }
}

TEST(SamplerTest, EdgeCases) {
  Sampler s(Plain(1.0f), 4);
  std::vector<float> empty;
  EXPECT_EQ(s.Sample(empty, {}), -1);
  std::vector<float> all_neg_inf = {-kInf, -kInf, -kInf};
  EXPECT_EQ(s.Sample(all_neg_inf, {}), 0);
  std::vector<float> with_inf = {0.0f, kInf, 1.0f, kInf};
  EXPECT_EQ(s.Sample(with_inf, {}), 1);
  std::vector<float> one = {-3.0f};
  EXPECT_EQ(s.Sample(one, {}), 0);
  // Logits larger than the vocab_size hint, k larger than the vocab.
  SamplingParams p = Plain(1.0f);
  p.top_k = 1000;
  Sampler small(p, 2);
  std::vector<float> l = kSmall;
  const int32_t t = small.Sample(l, {});
  EXPECT_GE(t, 0);
  EXPECT_LT(t, 8);
}

TEST(SamplerTest, SeedReproducibility) {
  SamplingParams p = Plain(1.0f);
  std::vector<float> flat(64, 0.0f);
  auto run = [&](uint64_t seed) {
    p.seed = seed;
    Sampler s(p, 64);
    std::vector<int32_t> out;
    for (int i = 0; i < 200; ++i) {
      std::vector<float> l = flat;
      out.push_back(s.Sample(l, {}));
    }
    return out;
  };
  const std::vector<int32_t> a = run(42), b = run(42), c = run(43);
  EXPECT_EQ(a, b);
  EXPECT_NE(a, c);
  // Reset restarts the same sequence.
  p.seed = 42;
  Sampler s(p, 64);
  for (int i = 0; i < 10; ++i) {
    std::vector<float> l = flat;
    s.Sample(l, {});
  }
  s.Reset(42);
  EXPECT_EQ(s.seed(), 42u);
  for (int i = 0; i < 200; ++i) {
    std::vector<float> l = flat;
    ASSERT_EQ(s.Sample(l, {}), a[i]) << i;
  }
  // Random seeds: reported, and (overwhelmingly likely) different.
  Sampler r1(Plain(1.0f), 4), r2(SamplingParams{}, 4);
  EXPECT_NE(r1.seed(), kRandomSeed);
  EXPECT_NE(r2.seed(), kRandomSeed);
  EXPECT_NE(r1.seed(), r2.seed());
}

TEST(SamplerTest, GoldenSequenceIsPlatformIndependent) {
  // The first uniform variates of xoshiro256** seeded by splitmix64(0) are
  // fixed by the algorithm; with 2^k equal logits the draw is floor(u * 2^k)
  // exactly (power-of-two total), so the token sequence is platform-independent.
  // Reference values: splitmix64 state 0 -> xoshiro256** outputs, computed by
  // the published algorithms (see sampler.h), top 3 bits = token.
  SamplingParams p = Plain(1.0f);
  p.seed = 0;
  Sampler s(p, 8);
  std::vector<int32_t> got;
  for (int i = 0; i < 16; ++i) {
    std::vector<float> l(8, 0.0f);
    got.push_back(s.Sample(l, {}));
  }
  // Independent re-implementation of the generator, straight from the paper.
  uint64_t sm = 0, st[4];
  for (uint64_t& x : st) {
    uint64_t z = (sm += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    x = z ^ (z >> 31);
  }
  auto rotl = [](uint64_t x, int k) { return (x << k) | (x >> (64 - k)); };
  std::vector<int32_t> want;
  for (int i = 0; i < 16; ++i) {
    const uint64_t r = rotl(st[1] * 5, 7) * 9;
    const uint64_t t = st[1] << 17;
    st[2] ^= st[0];
    st[3] ^= st[1];
    st[1] ^= st[2];
    st[0] ^= st[3];
    st[2] ^= t;
    st[3] = rotl(st[3], 45);
    want.push_back(static_cast<int32_t>(r >> 61));
  }
  EXPECT_EQ(got, want);
}

TEST(SamplerTest, FrequenciesNoTruncation) {
  ExpectFrequencies(kSmall, Plain(1.0f), 20000);
  ExpectFrequencies(kSmall, Plain(0.7f), 20000);
  ExpectFrequencies(kSmall, Plain(1.8f), 20000);
}

TEST(SamplerTest, FrequenciesTopK) {
  SamplingParams p = Plain(1.0f);
  p.top_k = 3;
  ExpectFrequencies(kSmall, p, 20000);
  p.top_k = 5;
  p.temperature = 0.6f;
  ExpectFrequencies(kSmall, p, 20000);
}

TEST(SamplerTest, FrequenciesTopP) {
  SamplingParams p = Plain(1.0f);
  p.top_p = 0.8f;  // probs 0.38,0.23,0.14,0.09(cum 0.84) -> 4 kept
  ExpectFrequencies(kSmall, p, 20000);
  p.top_p = 0.5f;
  ExpectFrequencies(kSmall, p, 20000);
  p.top_p = 0.0f;  // keeps exactly one
  ExpectFrequencies(kSmall, p, 2000);
}

TEST(SamplerTest, FrequenciesMinP) {
  SamplingParams p = Plain(1.0f);
  p.min_p = 0.2f;  // keeps logits >= 3 + ln(0.2) = 1.39
  ExpectFrequencies(kSmall, p, 20000);
  p.min_p = 0.05f;
  ExpectFrequencies(kSmall, p, 20000);
}

TEST(SamplerTest, FrequenciesCombined) {
  SamplingParams p = Plain(0.9f);
  p.top_k = 6;
  p.top_p = 0.9f;
  p.min_p = 0.1f;
  ExpectFrequencies(kSmall, p, 20000);
  p.temperature = 1.3f;
  p.top_p = 0.7f;
  p.min_p = 0.02f;
  ExpectFrequencies(kSmall, p, 20000);
}

TEST(SamplerTest, TemperatureOrderMatters) {
  // At T = 0.5 the tempered distribution is sharper, so top-p keeps fewer
  // tokens when it sees it (temperature_last = false) than when it does not.
  SamplingParams p = Plain(0.5f);
  p.top_p = 0.8f;
  p.temperature_last = true;
  const std::vector<double> last = ExpectedDistribution(kSmall, p);
  p.temperature_last = false;
  const std::vector<double> first = ExpectedDistribution(kSmall, p);
  auto support = [](const std::vector<double>& d) {
    return std::count_if(d.begin(), d.end(), [](double x) { return x > 0; });
  };
  ASSERT_NE(support(last), support(first));  // the test setup must discriminate
  p.temperature_last = true;
  ExpectFrequencies(kSmall, p, 20000);
  p.temperature_last = false;
  ExpectFrequencies(kSmall, p, 20000);
  p.top_p = 1.0f;
  p.min_p = 0.3f;
  ExpectFrequencies(kSmall, p, 20000);
  p.temperature_last = true;
  ExpectFrequencies(kSmall, p, 20000);
}

std::vector<float> BigLogits(size_t n, uint64_t seed) {
  std::vector<float> l(n);
  uint64_t x = seed;
  for (float& v : l) {
    x = x * 6364136223846793005ull + 1442695040888963407ull;
    const double u = static_cast<double>(x >> 11) * 0x1.0p-53;
    v = static_cast<float>(14.0 * u * u * u * u - 2.0);  // a few large, many small
  }
  return l;
}

TEST(SamplerTest, LargeVocabSupportMatchesReference) {
  const std::vector<float> logits = BigLogits(49152, 7);
  for (int variant = 0; variant < 4; ++variant) {
    SamplingParams p = Plain(1.0f);
    if (variant == 0) p.top_p = 0.9f;                    // full-vocab top-p, no k
    if (variant == 1) p.top_p = 0.5f, p.min_p = 0.01f;
    if (variant == 2) p = SamplingParams{}, p.seed = 5;  // defaults: k=40, p=.95, min_p=.05
    if (variant == 3) p.top_k = 200, p.top_p = 0.99f, p.temperature = 1.4f;
    const std::vector<double> want = ExpectedDistribution(logits, p);
    const auto kept = std::count_if(want.begin(), want.end(), [](double x) { return x > 0; });
    ASSERT_GT(kept, 1) << variant;
    Sampler s(p, 49152);
    std::vector<float> buf;
    int top_hits = 0;
    const size_t top = std::max_element(want.begin(), want.end()) - want.begin();
    const int draws = 400;
    for (int d = 0; d < draws; ++d) {
      buf = logits;
      const int32_t t = s.Sample(buf, {});
      ASSERT_GT(want[t], 0.0) << "variant " << variant << " drew truncated token " << t;
      top_hits += t == static_cast<int32_t>(top);
    }
    const double sigma = std::sqrt(draws * want[top] * (1 - want[top]));
    EXPECT_NEAR(top_hits, draws * want[top], 5 * sigma + 1) << variant << " kept " << kept;
  }
}

TEST(SamplerTest, PenaltiesFollowFormula) {
  SamplingParams p = Plain(0.0f);
  p.repeat_penalty = 1.5f;
  p.frequency_penalty = 0.25f;
  p.presence_penalty = 0.5f;
  p.repeat_last_n = 8;
  Sampler s(p, 6);
  std::vector<float> l = {2.0f, -1.0f, 0.5f, 0.0f, 3.0f, -2.0f};
  // Window = last 8: {1, 1, 3, 5, 5, 5, 99, -3}; token 2 and 0 are older.
  const std::vector<int32_t> history = {2, 0, 1, 1, 3, 5, 5, 5, 99, -3};
  s.Sample(l, history);
  EXPECT_FLOAT_EQ(l[0], 2.0f);
  EXPECT_FLOAT_EQ(l[1], -1.0f * 1.5f - 2 * 0.25f - 0.5f);
  EXPECT_FLOAT_EQ(l[2], 0.5f);
  EXPECT_FLOAT_EQ(l[3], 0.0f * 1.5f - 1 * 0.25f - 0.5f);
  EXPECT_FLOAT_EQ(l[4], 3.0f);
  EXPECT_FLOAT_EQ(l[5], -2.0f * 1.5f - 3 * 0.25f - 0.5f);

  // Positive logits are divided; repeat_last_n = -1 covers all history.
  p.repeat_last_n = -1;
  p.frequency_penalty = 0.0f;
  p.presence_penalty = 0.0f;
  Sampler all(p, 6);
  std::vector<float> l2 = {2.0f, -1.0f, 0.5f, 0.0f, 3.0f, -2.0f};
  const std::vector<int32_t> h2 = {0, 4, 4};
  EXPECT_EQ(all.Sample(l2, h2), 4);  // 3 / 1.5 = 2 > 2 / 1.5
  EXPECT_FLOAT_EQ(l2[0], 2.0f / 1.5f);
  EXPECT_FLOAT_EQ(l2[4], 3.0f / 1.5f);
  EXPECT_FLOAT_EQ(l2[1], -1.0f);

  // Penalties steer greedy decoding away from repeats, and repeated calls do
  // not leak counts between calls.
  p.repeat_penalty = 4.0f;
  p.repeat_last_n = 2;
  Sampler g(p, 6);
  const std::vector<float> base = {2.0f, -1.0f, 1.0f, 0.0f, 3.0f, -2.0f};
  std::vector<float> l3 = base;
  EXPECT_EQ(g.Sample(l3, std::vector<int32_t>{4}), 0);  // 3 / 4 < 2
  std::vector<float> l4 = base;
  EXPECT_EQ(g.Sample(l4, std::vector<int32_t>{4, 0}), 2);  // 0.75, 0.5 < 1
  std::vector<float> l5 = base;
  EXPECT_EQ(g.Sample(l5, std::vector<int32_t>{4, 0, 1, 1}), 4);
  EXPECT_FLOAT_EQ(l5[4], 3.0f);

  // repeat_last_n = 0 disables everything.
  p.repeat_last_n = 0;
  p.frequency_penalty = 2.0f;
  Sampler off(p, 6);
  std::vector<float> l6 = {2.0f, -1.0f, 0.5f, 0.0f, 3.0f, -2.0f};
  off.Sample(l6, std::vector<int32_t>{4, 4, 4});
  EXPECT_FLOAT_EQ(l6[4], 3.0f);
}

TEST(SamplerTest, LogprobsAreLogSoftmaxOfScaledPenalisedLogits) {
  SamplingParams p = Plain(0.7f);
  p.presence_penalty = 1.0f;
  Sampler s(p, 8);
  std::vector<float> l = kSmall;
  SampleResult r;
  const std::vector<int32_t> history = {3};
  const int32_t t = s.SampleWithLogprobs(l, history, 3, &r);
  EXPECT_EQ(t, r.token);
  std::vector<double> scaled(kSmall.begin(), kSmall.end());
  scaled[3] -= 1.0;  // presence penalty
  double m = *std::max_element(scaled.begin(), scaled.end());
  double z = 0.0;
  for (double& v : scaled) z += std::exp((v - m) / 0.7);
  auto lp = [&](int i) { return (scaled[i] - m) / 0.7 - std::log(z); };
  EXPECT_NEAR(r.logprob, lp(t), 1e-5);
  // Ranking after the penalty: 5 (2.5), then 1 (2.0) and 3 (2.0) tie -> 1 first.
  ASSERT_EQ(r.top.size(), 3u);
  EXPECT_EQ(r.top[0].token, 5);
  EXPECT_EQ(r.top[1].token, 1);
  EXPECT_EQ(r.top[2].token, 3);
  for (const TokenLogprob& e : r.top) EXPECT_NEAR(e.logprob, lp(e.token), 1e-5);

  // Greedy reports temperature-1 logprobs; top_n is clamped.
  Sampler g(Plain(0.0f), 8);
  std::vector<float> l2 = kSmall;
  g.SampleWithLogprobs(l2, {}, 1000, &r);
  EXPECT_EQ(r.token, 3);
  EXPECT_EQ(r.top.size(), 8u);
  double z1 = 0.0;
  for (float v : kSmall) z1 += std::exp(v - 3.0);
  EXPECT_NEAR(r.logprob, -std::log(z1), 1e-5);
  EXPECT_EQ(r.top[0].token, 3);
  std::vector<float> l3 = kSmall;
  g.SampleWithLogprobs(l3, {}, 0, &r);
  EXPECT_TRUE(r.top.empty());
}

TEST(SamplerTest, ValidateRejectsOutOfRange) {
  EXPECT_TRUE(SamplingParams{}.Validate().ok());
  auto expect_bad = [](SamplingParams p, const char* field) {
    absl::Status s = p.Validate();
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << field;
    EXPECT_NE(s.message().find(field), std::string_view::npos) << s.message();
  };
  SamplingParams p;
  p.temperature = -0.1f;
  expect_bad(p, "temperature");
  p = {};
  p.temperature = std::nanf("");
  expect_bad(p, "temperature");
  p = {};
  p.top_p = 1.01f;
  expect_bad(p, "top_p");
  p = {};
  p.top_p = -0.5f;
  expect_bad(p, "top_p");
  p = {};
  p.top_k = -1;
  expect_bad(p, "top_k");
  p = {};
  p.min_p = 2.0f;
  expect_bad(p, "min_p");
  p = {};
  p.repeat_penalty = 0.0f;
  expect_bad(p, "repeat_penalty");
  p = {};
  p.repeat_last_n = -2;
  expect_bad(p, "repeat_last_n");
  p = {};
  p.frequency_penalty = 2.5f;
  expect_bad(p, "frequency_penalty");
  p = {};
  p.presence_penalty = -3.0f;
  expect_bad(p, "presence_penalty");
  p = {};
  p.temperature = 0.0f;
  p.top_p = 0.0f;
  p.min_p = 1.0f;
  p.repeat_last_n = -1;
  EXPECT_TRUE(p.Validate().ok());
  EXPECT_FALSE(Sampler::Create(SamplingParams{}, 0).ok());
  p = {};
  p.top_p = 3.0f;
  EXPECT_FALSE(Sampler::Create(p, 10).ok());
  EXPECT_TRUE(Sampler::Create(SamplingParams{}, 10).ok());
}

TEST(SamplerTest, SpeedOnSmolLMVocab) {
  // Not a benchmark; prints the per-call cost so regressions are visible.
  const std::vector<float> logits = BigLogits(49152, 11);
  std::vector<int32_t> history(64);
  for (size_t i = 0; i < history.size(); ++i) history[i] = static_cast<int32_t>(i * 700);
  for (int k : {40, 0}) {
    SamplingParams p;
    p.seed = 3;
    p.top_k = k;
    p.repeat_penalty = 1.1f;
    Sampler s(p, 49152);
    std::vector<float> buf = logits;
    const int iters = 300;
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < iters; ++i) {
      std::copy(logits.begin(), logits.end(), buf.begin());
      ASSERT_GE(s.Sample(buf, history), 0);
    }
    const double us = std::chrono::duration<double, std::micro>(
                          std::chrono::steady_clock::now() - t0).count() / iters;
    std::printf("top_k=%d: %.1f us per Sample (vocab 49152)\n", k, us);
  }
}

}  // namespace
}  // namespace nibble
