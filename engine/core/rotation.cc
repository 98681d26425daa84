#include "engine/core/rotation.h"

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

}  // namespace

std::vector<float> StructuredRotation(int n, uint64_t seed) {
  int a = 1;
  while (a < 4096 && n % (2 * a) == 0) a *= 2;
  const int b = n / a;
  // Normalized Sylvester Hadamard: H[p][r] = (-1)^popcount(p & r) / sqrt(a).
  const double ha = 1.0 / std::sqrt(double(a));
  std::vector<double> c(size_t(b) * b);
  for (int k = 0; k < b; ++k)
    for (int i = 0; i < b; ++i)
      c[size_t(k) * b + i] = std::sqrt((k == 0 ? 1.0 : 2.0) / b) * std::cos(std::numbers::pi * (2 * i + 1) * k / (2.0 * b));
  std::vector<double> s(n);
  uint64_t state = seed;
  for (int i = 0; i < n; ++i) s[i] = (SplitMix64(&state) >> 63) ? -1.0 : 1.0;
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

}  // namespace nibble
