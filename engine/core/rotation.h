// Structured orthogonal matrices for rotating a model's residual stream
// (quantizers/rotation.h folds them into the weights; LlamaModel applies the
// residual rotation of tied-embedding models at run time, ModelConfig::
// residual_rotation).
#pragma once

#include <cstdint>
#include <vector>

namespace nibble {

// An orthogonal [n, n] matrix (row-major): (H_a (x) C_b) diag(s), where a is the
// largest power of two dividing n (at most 2^12), b = n / a, H_a the
// normalized Sylvester Hadamard matrix, C_b the orthonormal DCT-II matrix and s
// random signs drawn from `seed` (splitmix64, so the same on every platform;
// the entries are computed in double and rounded once). Every entry is at most
// sqrt(2 / n) in magnitude.
std::vector<float> StructuredRotation(int n, uint64_t seed);

// x <- R x for rows of length n, R = StructuredRotation(n, seed), in
// O(n (log a + b)) per row: signs, the DCT along the b-blocks, then a fast
// Walsh-Hadamard transform across them. Equal to the dense product up to fp32
// rounding (rotation_test). For the run-time rotation of FFN activations.
class FastRotation {
 public:
  FastRotation(int n, uint64_t seed);
  int n() const { return n_; }
  // Rotates `rows` vectors of n floats in place.
  void Apply(float* x, int64_t rows) const;

 private:
  int n_, a_, b_;
  float h_scale_;               // 1 / sqrt(a)
  std::vector<float> c_;        // [b][b] DCT-II
  std::vector<float> signs_;    // [n]
};

}  // namespace nibble
