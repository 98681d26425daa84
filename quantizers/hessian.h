// Second-moment statistics of a linear layer's input, the "Hessian" of
// GPTQ-style quantizers: H = (2/N) * sum_t x_t x_t^T over N calibration tokens.
//
// Goals: accumulate X^T X for one activation width exactly enough (double
// accumulators) and fast (a blocked, multi-threaded syrk over the upper
// triangle); hand the result out as a compact symmetric fp32 matrix.
// Non-goals: storing activations; per-token statistics other than the mean
// of x^2 (the Hessian diagonal up to a factor 2, used as importance by RTN).
//
// Precision choice: one Add() sees at most LlamaModel::kMaxBatch (256) tokens.
// Their products are summed in fp32 in registers (<= 256 terms: relative error
// ~1e-5 worst case, like GPTQ's own fp32 accumulation), and each batch's tile
// is then added to fp64 accumulators, so the long sum over hundreds of
// thousands of tokens loses nothing. Only the upper triangle (tiles touching
// it) is computed; Finish() mirrors it. The finished Hessian is stored as fp32
// (halves memory; GPTQ converts to fp64 before factoring). Memory while
// collecting: 8 * dim^2 bytes per matrix (SmolLM2-135M, all 30 layers x 4
// inputs: ~0.8 GB), fp32 result half that.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace nibble {

// A finished calibration Hessian of one linear input of width `dim`.
struct Hessian {
  int64_t dim = 0;
  int64_t n_tokens = 0;       // N, the number of token rows accumulated
  std::vector<float> h;       // [dim, dim] row-major, symmetric: (2/N) sum x x^T
  std::vector<float> mean_sq; // [dim] (1/N) sum_t x_t[i]^2 (== h[i,i] / 2)

  float at(int64_t i, int64_t j) const { return h[static_cast<size_t>(i * dim + j)]; }
  // Checks dim/n_tokens/sizes and that every entry is finite; `what` names it in errors.
  absl::Status Validate(const char* what) const;
};

// Accumulates sum x x^T for rows of width `dim`.
// Thread safety: not thread-safe; Add() may run worker threads internally.
class HessianAccumulator {
 public:
  explicit HessianAccumulator(int64_t dim);

  int64_t dim() const { return dim_; }
  int64_t n_tokens() const { return n_tokens_; }

  // Adds n rows x[t * dim .. t * dim + dim) using up to n_threads threads
  // (<= 0: all cores; small batches run on the caller's thread only).
  // REQUIRES: x holds n * dim floats.
  void Add(const float* x, int64_t n, int n_threads = 1);

  // The finished Hessian (scaled by 2/N, mirrored). N == 0 gives an all-zero H.
  Hessian Finish() const;

 private:
  int64_t dim_;
  int64_t padded_;              // dim rounded up to the tile width
  int64_t n_tokens_ = 0;
  std::vector<double> acc_;     // [padded_, padded_]; upper tiles valid
  std::vector<float> panel_;    // scratch: batch in panel layout
  std::vector<int32_t> tiles_;  // (i-block, j-block) pairs of the upper triangle
};

}  // namespace nibble
