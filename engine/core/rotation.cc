#include "engine/core/rotation.h"

#include <algorithm>
#include <cmath>
#include <numbers>

namespace nibble {
namespace {

uint64_t SplitMix64(uint64_t* state) {
  uint64_t z = (*state += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// n = a * b with a the largest power of two dividing n (<= 4096).
int PowerOfTwoPart(int n) {
  int a = 1;
  while (a < 4096 && n % (2 * a) == 0) a *= 2;
  return a;
}

// Orthonormal DCT-II [b][b]: C[k][i] = sqrt((k ? 2 : 1) / b) cos(pi (2i + 1) k / 2b).
std::vector<double> Dct(int b) {
  std::vector<double> c(size_t(b) * b);
  for (int k = 0; k < b; ++k)
    for (int i = 0; i < b; ++i)
      c[size_t(k) * b + i] = std::sqrt((k == 0 ? 1.0 : 2.0) / b) * std::cos(std::numbers::pi * (2 * i + 1) * k / (2.0 * b));
  return c;
}

std::vector<double> Signs(int n, uint64_t seed) {
  std::vector<double> s(n);
  uint64_t state = seed;
  for (int i = 0; i < n; ++i) s[i] = (SplitMix64(&state) >> 63) ? -1.0 : 1.0;
  return s;
}

}  // namespace

std::vector<float> StructuredRotation(int n, uint64_t seed) {
  const int a = PowerOfTwoPart(n);
  const int b = n / a;
  // Normalized Sylvester Hadamard: H[p][r] = (-1)^popcount(p & r) / sqrt(a).
  const double ha = 1.0 / std::sqrt(double(a));
  const std::vector<double> c = Dct(b);
  const std::vector<double> s = Signs(n, seed);
  std::vector<float> q(size_t(n) * n);
  for (int p = 0; p < a; ++p)
    for (int k = 0; k < b; ++k)
      for (int r = 0; r < a; ++r) {
        const double h = (__builtin_popcount(unsigned(p & r)) & 1) ? -ha : ha;
        for (int i = 0; i < b; ++i) {
          const int row = p * b + k, col = r * b + i;
          q[size_t(row) * n + col] = static_cast<float>(h * c[size_t(k) * b + i] * s[col]);
        }
      }
  return q;
}

FastRotation::FastRotation(int n, uint64_t seed) : n_(n), a_(PowerOfTwoPart(n)), b_(n / a_) {
  h_scale_ = static_cast<float>(1.0 / std::sqrt(double(a_)));
  for (double v : Dct(b_)) c_.push_back(static_cast<float>(v));
  for (double v : Signs(n, seed)) signs_.push_back(static_cast<float>(v));
}

void FastRotation::Apply(float* x, int64_t rows) const {
  thread_local std::vector<float> t;  // grows once per thread: no allocation per decode step
  t.resize(static_cast<size_t>(b_));
  for (int64_t row = 0; row < rows; ++row) {
    float* v = x + row * n_;
    for (int i = 0; i < n_; ++i) v[i] *= signs_[i];
    if (b_ > 1) {  // v[r][k] = sum_i C[k][i] v[r][i] for every r
      for (int r = 0; r < a_; ++r) {
        float* blk = v + int64_t{r} * b_;
        for (int k = 0; k < b_; ++k) {
          float acc = 0.0f;
          for (int i = 0; i < b_; ++i) acc += c_[size_t(k) * b_ + i] * blk[i];
          t[k] = acc;
        }
        std::copy(t.begin(), t.end(), blk);
      }
    }
    // Walsh-Hadamard over r (stride b), then 1/sqrt(a).
    for (int len = 1; len < a_; len *= 2)
      for (int r0 = 0; r0 < a_; r0 += 2 * len)
        for (int r = r0; r < r0 + len; ++r) {
          float* lo = v + int64_t{r} * b_;
          float* hi = v + int64_t{r + len} * b_;
          for (int k = 0; k < b_; ++k) {
            const float u = lo[k], w = hi[k];
            lo[k] = u + w;
            hi[k] = u - w;
          }
        }
    for (int i = 0; i < n_; ++i) v[i] *= h_scale_;
  }
}

}  // namespace nibble
