// Token sampler: logits -> next token id, llama.cpp-style.
//
// Goals: the llama.cpp default chain (penalties -> top-k -> top-p -> min-p ->
// temperature -> seeded draw), greedy decoding at temperature <= 0, a seeded
// draw that is bit-reproducible across runs and platforms (own PRNG and own
// uniform conversion; no std:: distributions, whose output is
// implementation-defined), OpenAI-style logprobs, and no heap allocation per
// call in the steady state (buffers are reused; top-k is a bounded heap, top-p
// sorts only as far as it needs).
// Non-goals: typical-p, tail-free, mirostat, DRY, XTC, grammars, logit bias.
//
// Pipeline of Sample(), in order:
//   1. penalties over the last `repeat_last_n` history tokens (-1 = all of it),
//      for every distinct token t there with count c (llama.cpp semantics):
//        logit[t] = logit[t] > 0 ? logit[t] / repeat_penalty
//                                : logit[t] * repeat_penalty
//        logit[t] -= c * frequency_penalty + (c > 0) * presence_penalty
//   2. temperature <= 0: greedy argmax (ties -> lowest id); stop here.
//   3. top-k: keep the k highest logits (k = 0 or k >= vocab: all).
//   4. softmax over the survivors; top-p: keep the smallest prefix of the
//      descending order whose cumulative probability is >= top_p (>= 1 kept).
//   5. min-p: keep tokens with p >= min_p * p_max.
//   6. renormalise softmax(logit / temperature) over the survivors and draw.
// In steps 4-5 the probabilities are those at temperature 1 when
// `temperature_last` is set (llama.cpp's order: its temperature sampler runs
// after top-p/min-p), else those of logit / temperature (the order of
// HF transformers / vLLM). Top-k is unaffected by temperature either way.
// Ties in the descending order are broken by lower token id.
//
// Reproducibility: the PRNG is xoshiro256** seeded through splitmix64, and the
// uniform variate is (next() >> 11) * 2^-53; the exponentials are our own
// (+, * and bit operations only; no libm, no FP contraction). So identical
// logits + identical seed give identical tokens on every IEEE-754 platform;
// the logits themselves may of course differ in the last bits between machines.
//
// Thread safety: a Sampler is per-sequence mutable state; not thread-safe.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace nibble {

// SamplingParams::seed value meaning "draw a seed from std::random_device".
inline constexpr uint64_t kRandomSeed = ~uint64_t{0};
// Most top logprobs SampleWithLogprobs reports (OpenAI's limit is 20).
inline constexpr int kMaxTopLogprobs = 20;

struct SamplingParams {
  float temperature = 0.8f;      // >= 0; <= 0 (i.e. 0) means greedy argmax
  int top_k = 40;                // >= 0; 0 disables; k > vocab keeps all
  float top_p = 0.95f;           // [0, 1]; 1 disables
  float min_p = 0.05f;           // [0, 1]; 0 disables
  float repeat_penalty = 1.0f;   // > 0; 1 disables
  int repeat_last_n = 64;        // >= -1; window of history penalised; 0 off, -1 all
  float frequency_penalty = 0.0f;  // [-2, 2] (OpenAI's range); 0 disables
  float presence_penalty = 0.0f;   // [-2, 2]; 0 disables
  // Default = a random seed from std::random_device (see Sampler::seed()).
  // Any other value gives a sequence reproducible across runs and platforms.
  uint64_t seed = kRandomSeed;
  // true: top-p/min-p see temperature-1 probabilities (llama.cpp's order);
  // false: they see the temperature-scaled ones (HF transformers' order).
  bool temperature_last = true;

  // OK, or INVALID_ARGUMENT naming the first out-of-range field and its value.
  absl::Status Validate() const;
};

struct TokenLogprob {
  int32_t token = -1;
  float logprob = 0.0f;  // natural log
};

// What SampleWithLogprobs reports, OpenAI "logprobs" style: log-softmax of the
// penalised logits divided by the temperature (temperature 1 when greedy),
// over the whole vocabulary, i.e. before any top-k/top-p/min-p truncation.
struct SampleResult {
  int32_t token = -1;
  float logprob = 0.0f;            // of `token`
  std::vector<TokenLogprob> top;   // up to top_n best, descending (ties: lower id)
};

class Sampler {
 public:
  // REQUIRES: params.Validate().ok() (Create() checks it). Out-of-range values
  // never crash; they degrade to the nearest sensible behaviour (NaN
  // temperature -> greedy, negative top_k -> disabled, ...).
  // `vocab_size` sizes the reusable buffers; larger logits still work (the
  // buffers then grow once).
  Sampler(const SamplingParams& params, int vocab_size);
  // Validates params (and vocab_size > 0) first.
  static absl::StatusOr<Sampler> Create(const SamplingParams& params, int vocab_size);

  // Picks the next token. `logits` (one per token id) may be modified: on
  // return it holds the penalised logits (temperature not applied).
  // `history`: earlier tokens of the sequence, oldest first (prompt and/or
  // generated, the caller's choice); ids outside [0, logits.size()) are ignored.
  // NaN logits count as -inf. Returns -1 iff logits is empty; if no logit is
  // finite the result is the greedy argmax.
  int32_t Sample(std::span<float> logits, std::span<const int32_t> history);

  // Sample() plus logprobs (see SampleResult) of the chosen token and the
  // top_n (clamped to [0, kMaxTopLogprobs]) most likely tokens. `out->top`'s
  // storage is reused. Returns out->token. REQUIRES: out != nullptr.
  int32_t SampleWithLogprobs(std::span<float> logits, std::span<const int32_t> history,
                             int top_n, SampleResult* out);

  // Restarts the random sequence (kRandomSeed: from std::random_device).
  void Reset(uint64_t seed);
  // The seed in use (the drawn one if kRandomSeed was asked for).
  uint64_t seed() const { return seed_; }
  const SamplingParams& params() const { return params_; }

  struct Candidate {
    float logit;
    int32_t id;
  };

 private:
  void EnsureCapacity(size_t n);
  void ApplyPenalties(std::span<float> logits, std::span<const int32_t> history);
  int32_t SampleStochastic(std::span<const float> logits);
  void SelectTopK(std::span<const float> logits, size_t k, std::vector<Candidate>* out);
  void ExtendSorted(size_t want);
  double NextUniform();  // [0, 1)
  void FillLogprobs(std::span<const float> logits, int32_t token, int top_n, SampleResult* out);

  SamplingParams params_;
  uint64_t seed_ = 0;
  uint64_t rng_[4] = {};

  std::vector<Candidate> cand_;   // current candidate set
  size_t sorted_ = 0;             // cand_[0, sorted_) is in final descending order
  std::vector<float> weights_;    // per-token exp((logit - max) * scale), full vocab
  std::vector<float> draw_;       // per-candidate final unnormalised probabilities
  std::vector<int32_t> counts_;   // per-token counts in the penalty window (kept all-zero)
  std::vector<int32_t> touched_;  // tokens with counts_ != 0
  std::vector<Candidate> topn_;   // logprobs heap
};

}  // namespace nibble
