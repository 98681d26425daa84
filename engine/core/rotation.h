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

}  // namespace nibble
