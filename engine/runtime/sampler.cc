#include "engine/runtime/sampler.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <limits>
#include <random>

#include "absl/strings/str_cat.h"

// Bit-reproducible float arithmetic needs a * b + c to stay two roundings.
// GCC does not contract in ISO mode (-std=c++20); clang would, so say no.
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#endif

namespace nibble {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Descending logit, ties by ascending id: "a comes before b". A function
// object (not a function pointer) so the std algorithms inline it.
struct BetterT {
  bool operator()(const Sampler::Candidate& a, const Sampler::Candidate& b) const {
    return a.logit > b.logit || (a.logit == b.logit && a.id < b.id);
  }
};
constexpr BetterT Better;

inline float Clean(float x) { return std::isnan(x) ? kNegInf : x; }

// e^x for x <= 0 using only +, *, and integer bit operations, so the result
// is the same on every IEEE-754 platform (libm's expf is not) and loops over
// the vocabulary vectorise (no float compares or float->int conversions, which
// block if-conversion under -ftrapping-math). Range reduction x = n ln2 + r,
// |r| <= ln2 / 2, then a degree-7 Taylor polynomial: relative error ~1e-7.
// x below -87.3, -inf and NaN give exactly 0; x must not be > 0 (callers pass
// (logit - max) * positive scale).
inline float ExpNonPositive(float x) {
  const uint32_t u = std::bit_cast<uint32_t>(x);
  constexpr uint32_t kNegZero = 0x80000000u;
  constexpr uint32_t kLimit = 0x42AE999Au;  // bits(-87.3f) - bits(-0.0f)
  // In range: -87.3 <= x <= -0 (sign-magnitude order), or +0.
  const uint32_t mask = ((u - kNegZero <= kLimit) | (u == 0)) ? 0xFFFFFFFFu : 0u;
  const float xc = std::bit_cast<float>(u & mask);
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;  // few mantissa bits: n * kLn2Hi is exact
  constexpr float kLn2Lo = -2.12194440e-4f;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float t = xc * kLog2e + kRound;
  const float nf = t - kRound;  // round(xc / ln2), in [-126, 0]
  const float r = (xc - nf * kLn2Hi) - nf * kLn2Lo;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const uint32_t n_biased = std::bit_cast<uint32_t>(t) - 0x4B400000u + 127u;  // n + 127 in [1, 127]
  const float scale = std::bit_cast<float>(n_biased << 23);
  return std::bit_cast<float>(std::bit_cast<uint32_t>(p * scale) & mask);
}

// out[i] = ExpNonPositive((in[i] - max) * scale).
void ExpShifted(const float* __restrict in, float* __restrict out, size_t n, float max,
                float scale) {
  for (size_t i = 0; i < n; ++i) out[i] = ExpNonPositive((in[i] - max) * scale);
}

// Sum of floats in double, four independent accumulators (order fixed).
double SumDouble(const float* w, size_t n) {
  double a0 = 0, a1 = 0, a2 = 0, a3 = 0;
  size_t i = 0;
  for (; i + 4 <= n; i += 4) {
    a0 += w[i];
    a1 += w[i + 1];
    a2 += w[i + 2];
    a3 += w[i + 3];
  }
  for (; i < n; ++i) a0 += w[i];
  return (a0 + a1) + (a2 + a3);
}

uint64_t SplitMix64(uint64_t* state) {
  uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

inline uint64_t Rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

// Lowest id among the largest logits (NaN = -inf); 0 if none is > -inf.
int32_t Argmax(std::span<const float> logits) {
  int32_t best = 0;
  float best_v = Clean(logits[0]);
  for (size_t i = 1; i < logits.size(); ++i) {
    const float v = logits[i];
    if (v > best_v) {  // false for NaN
      best_v = v;
      best = static_cast<int32_t>(i);
    }
  }
  return best;
}

absl::Status RangeError(const char* field, double value, const char* want) {
  return absl::InvalidArgumentError(
      absl::StrCat("sampling parameter ", field, " = ", value, " is out of range: ", want));
}

}  // namespace

absl::Status SamplingParams::Validate() const {
  // Written as !(in range) so that NaN is rejected too.
  if (!(temperature >= 0.0f) || !std::isfinite(temperature)) {
    return RangeError("temperature", temperature, "must be finite and >= 0");
  }
  if (top_k < 0) return RangeError("top_k", top_k, "must be >= 0 (0 disables)");
  if (!(top_p >= 0.0f && top_p <= 1.0f)) return RangeError("top_p", top_p, "must be in [0, 1]");
  if (!(min_p >= 0.0f && min_p <= 1.0f)) return RangeError("min_p", min_p, "must be in [0, 1]");
  if (!(repeat_penalty > 0.0f) || !std::isfinite(repeat_penalty)) {
    return RangeError("repeat_penalty", repeat_penalty, "must be finite and > 0 (1 disables)");
  }
  if (repeat_last_n < -1) {
    return RangeError("repeat_last_n", repeat_last_n, "must be >= -1 (-1 = whole history)");
  }
  if (!(frequency_penalty >= -2.0f && frequency_penalty <= 2.0f)) {
    return RangeError("frequency_penalty", frequency_penalty, "must be in [-2, 2]");
  }
  if (!(presence_penalty >= -2.0f && presence_penalty <= 2.0f)) {
    return RangeError("presence_penalty", presence_penalty, "must be in [-2, 2]");
  }
  return absl::OkStatus();
}

Sampler::Sampler(const SamplingParams& params, int vocab_size) : params_(params) {
  EnsureCapacity(vocab_size > 0 ? static_cast<size_t>(vocab_size) : 0);
  topn_.reserve(kMaxTopLogprobs);
  Reset(params.seed);
}

absl::StatusOr<Sampler> Sampler::Create(const SamplingParams& params, int vocab_size) {
  if (absl::Status s = params.Validate(); !s.ok()) return s;
  if (vocab_size <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("sampler vocab_size = ", vocab_size, " must be > 0"));
  }
  return Sampler(params, vocab_size);
}

void Sampler::EnsureCapacity(size_t n) {
  if (counts_.size() < n) counts_.resize(n, 0);
  if (cand_.capacity() < n) cand_.reserve(n);
  if (weights_.capacity() < n) weights_.reserve(n);
  if (draw_.capacity() < n) draw_.reserve(n);
}

void Sampler::Reset(uint64_t seed) {
  if (seed == kRandomSeed) {
    std::random_device rd;
    seed = (uint64_t{rd()} << 32) ^ uint64_t{rd()};
    if (seed == kRandomSeed) seed = 0;  // keep seed() a reproducible value
  }
  seed_ = seed;
  uint64_t sm = seed;
  for (uint64_t& s : rng_) s = SplitMix64(&sm);
}

double Sampler::NextUniform() {
  // xoshiro256** (Blackman & Vigna).
  const uint64_t result = Rotl(rng_[1] * 5, 7) * 9;
  const uint64_t t = rng_[1] << 17;
  rng_[2] ^= rng_[0];
  rng_[3] ^= rng_[1];
  rng_[1] ^= rng_[2];
  rng_[0] ^= rng_[3];
  rng_[2] ^= t;
  rng_[3] = Rotl(rng_[3], 45);
  return static_cast<double>(result >> 11) * 0x1.0p-53;
}

void Sampler::ApplyPenalties(std::span<float> logits, std::span<const int32_t> history) {
  const SamplingParams& p = params_;
  const bool repeat = p.repeat_penalty != 1.0f && p.repeat_penalty > 0.0f &&
                      std::isfinite(p.repeat_penalty);
  const bool freq = p.frequency_penalty != 0.0f && std::isfinite(p.frequency_penalty);
  const bool pres = p.presence_penalty != 0.0f && std::isfinite(p.presence_penalty);
  if (p.repeat_last_n == 0 || history.empty() || !(repeat || freq || pres)) return;
  if (p.repeat_last_n > 0 && history.size() > static_cast<size_t>(p.repeat_last_n)) {
    history = history.last(static_cast<size_t>(p.repeat_last_n));
  }
  const size_t n = logits.size();
  for (int32_t t : history) {
    if (t < 0 || static_cast<size_t>(t) >= n) continue;
    if (counts_[t]++ == 0) touched_.push_back(t);
  }
  for (int32_t t : touched_) {
    const int32_t c = counts_[t];
    counts_[t] = 0;
    float l = logits[t];
    if (repeat) l = l <= 0.0f ? l * p.repeat_penalty : l / p.repeat_penalty;
    if (freq) l -= static_cast<float>(c) * p.frequency_penalty;
    if (pres) l -= p.presence_penalty;
    logits[t] = l;
  }
  touched_.clear();
}

void Sampler::SelectTopK(std::span<const float> logits, size_t k, std::vector<Candidate>* out) {
  // Bounded heap whose front is the worst kept candidate; most logits are
  // rejected by one comparison against it.
  out->clear();
  const size_t n = logits.size();
  for (size_t i = 0; i < k; ++i) out->push_back({Clean(logits[i]), static_cast<int32_t>(i)});
  std::make_heap(out->begin(), out->end(), Better);
  float worst = out->front().logit;
  for (size_t i = k; i < n; ++i) {
    // Ids only grow, so an equal logit never beats the front; NaN compares false.
    if (!(logits[i] > worst)) continue;
    std::pop_heap(out->begin(), out->end(), Better);
    out->back() = {logits[i], static_cast<int32_t>(i)};
    std::push_heap(out->begin(), out->end(), Better);
    worst = out->front().logit;
  }
  std::sort_heap(out->begin(), out->end(), Better);  // best first
}

void Sampler::ExtendSorted(size_t want) {
  want = std::min(want, cand_.size());
  if (want <= sorted_) return;
  auto first = cand_.begin() + static_cast<ptrdiff_t>(sorted_);
  auto mid = cand_.begin() + static_cast<ptrdiff_t>(want);
  // [sorted_, end) holds candidates all worse than [0, sorted_): bring the
  // best (want - sorted_) of them forward, then order just those.
  if (mid != cand_.end()) std::nth_element(first, mid, cand_.end(), Better);
  std::sort(first, mid, Better);
  sorted_ = want;
}

int32_t Sampler::SampleStochastic(std::span<const float> logits) {
  const SamplingParams& p = params_;
  const size_t n = logits.size();
  const float inv_temp = 1.0f / p.temperature;
  const float trunc_scale = p.temperature_last ? 1.0f : inv_temp;
  const bool use_top_p = p.top_p < 1.0f;
  const bool use_min_p = p.min_p > 0.0f;
  const float log_min_p = use_min_p ? std::log(p.min_p) : kNegInf;

  // min-p (5) keeps a prefix of the descending order, and so does top-p (4);
  // "top-p then min-p" therefore keeps the shorter of the two prefixes, so
  // min-p is applied first (it is a cheap threshold) while top-p still uses
  // the normaliser z of all top-k survivors. Only top-p needs sorting, and
  // only as far as its cut.
  double z = 0.0;  // sum of exp((logit - max) * trunc_scale) over the top-k survivors
  float max_logit = kNegInf;
  bool full_weights = false;  // weights_[id] holds exp((logit - max) * trunc_scale)
  const size_t k = p.top_k > 0 ? std::min(static_cast<size_t>(p.top_k), n) : n;
  if (k < n) {
    // 3. top-k: sorted survivors.
    SelectTopK(logits, k, &cand_);
    sorted_ = k;
    max_logit = cand_[0].logit;
    if (!std::isfinite(max_logit) || !std::isfinite(max_logit * inv_temp)) {
      return Argmax(logits);  // all -inf, or +inf present: nothing to draw from
    }
    if (use_top_p) {
      for (const Candidate& c : cand_) z += ExpNonPositive((c.logit - max_logit) * trunc_scale);
    }
    if (use_min_p) {
      size_t w = 0;
      while (w < cand_.size() && (cand_[w].logit - max_logit) * trunc_scale >= log_min_p) ++w;
      cand_.resize(w);
      sorted_ = w;
    }
  } else {
    // No top-k: the whole vocabulary, unsorted.
    for (float l : logits) max_logit = l > max_logit ? l : max_logit;  // skips NaN
    if (!std::isfinite(max_logit) || !std::isfinite(max_logit * inv_temp)) {
      return Argmax(logits);
    }
    if (use_top_p) {
      weights_.resize(n);
      ExpShifted(logits.data(), weights_.data(), n, max_logit, trunc_scale);
      z = SumDouble(weights_.data(), n);
      full_weights = true;
    }
    cand_.clear();
    sorted_ = 0;
    for (size_t i = 0; i < n; ++i) {
      const float l = Clean(logits[i]);
      if ((l - max_logit) * trunc_scale >= log_min_p) cand_.push_back({l, static_cast<int32_t>(i)});
    }
  }

  // 4. top-p.
  if (use_top_p && cand_.size() > 1) {
    const double target = static_cast<double>(p.top_p) * z;
    double cum = 0.0;
    size_t keep_n = cand_.size();
    for (size_t i = 0; i < cand_.size(); ++i) {
      if (i >= sorted_) ExtendSorted(std::max<size_t>(64, 2 * sorted_));
      cum += full_weights ? weights_[cand_[i].id]
                          : ExpNonPositive((cand_[i].logit - max_logit) * trunc_scale);
      if (cum >= target) {
        keep_n = i + 1;
        break;
      }
    }
    cand_.resize(keep_n);
    sorted_ = std::min(sorted_, keep_n);
  }
  if (cand_.size() == 1) return cand_[0].id;

  // 6. draw from softmax(logit / T) over the survivors (max_logit survives
  // every stage, so the largest weight is exactly 1).
  const size_t m = cand_.size();
  draw_.resize(m);
  for (size_t i = 0; i < m; ++i) draw_[i] = ExpNonPositive((cand_[i].logit - max_logit) * inv_temp);
  const double u = NextUniform() * SumDouble(draw_.data(), m);
  double cum = 0.0;
  size_t last_positive = 0;
  for (size_t i = 0; i < m; ++i) {
    if (draw_[i] <= 0.0f) continue;
    cum += draw_[i];
    last_positive = i;
    if (u < cum) return cand_[i].id;
  }
  return cand_[last_positive].id;  // rounding: u landed past the last edge
}

int32_t Sampler::Sample(std::span<float> logits, std::span<const int32_t> history) {
  if (logits.empty()) return -1;
  EnsureCapacity(logits.size());
  ApplyPenalties(logits, history);
  if (!(params_.temperature > 0.0f)) return Argmax(logits);
  return SampleStochastic(logits);
}

int32_t Sampler::SampleWithLogprobs(std::span<float> logits, std::span<const int32_t> history,
                                    int top_n, SampleResult* out) {
  out->token = Sample(logits, history);
  out->logprob = 0.0f;
  out->top.clear();
  if (out->token < 0) return out->token;
  FillLogprobs(logits, out->token, top_n, out);
  return out->token;
}

void Sampler::FillLogprobs(std::span<const float> logits, int32_t token, int top_n,
                           SampleResult* out) {
  const float scale = params_.temperature > 0.0f ? 1.0f / params_.temperature : 1.0f;
  float max_logit = kNegInf;
  for (float l : logits) max_logit = std::max(max_logit, Clean(l));
  const size_t n = std::min<size_t>(static_cast<size_t>(std::clamp(top_n, 0, kMaxTopLogprobs)),
                                    logits.size());
  if (!std::isfinite(max_logit) || !std::isfinite(max_logit * scale)) {
    // Degenerate distribution: all mass on the argmax (which is `token`).
    out->logprob = 0.0f;
    if (n > 0) out->top.push_back({token, 0.0f});
    return;
  }
  weights_.resize(logits.size());
  ExpShifted(logits.data(), weights_.data(), logits.size(), max_logit, scale);
  const double log_z = std::log(SumDouble(weights_.data(), logits.size()));
  auto logprob = [&](float l) {
    return static_cast<float>(static_cast<double>((Clean(l) - max_logit) * scale) - log_z);
  };
  out->logprob = logprob(logits[token]);
  if (n == 0) return;
  SelectTopK(logits, n, &topn_);
  for (const Candidate& c : topn_) out->top.push_back({c.id, logprob(c.logit)});
}

}  // namespace nibble
