#include "quantizers/linalg.h"

#include <algorithm>
#include <atomic>
#include <cmath>

#include "quantizers/parallel.h"

namespace nibble {

#if defined(__x86_64__) && defined(__GNUC__)
#define NIBBLE_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define NIBBLE_CLONES
#endif

NIBBLE_CLONES void Axpy(double* y, double a, const double* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

NIBBLE_CLONES void Axpy(float* y, float a, const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

namespace {

constexpr int64_t kPanel = 48;     // Cholesky panel rows
constexpr int64_t kInvBlock = 16;  // rows of the inverse solved together

}  // namespace

bool CholeskyUpper(double* a, int64_t n, int n_threads) {
  for (int64_t k0 = 0; k0 < n; k0 += kPanel) {
    const int64_t k1 = std::min(n, k0 + kPanel);
    // Factor the panel rows [k0, k1) (their updates from earlier panels are done).
    for (int64_t k = k0; k < k1; ++k) {
      double* rk = a + k * n;
      const double d = rk[k];
      if (!(d > 0.0) || !std::isfinite(d)) return false;
      const double s = std::sqrt(d), inv = 1.0 / s;
      rk[k] = s;
      for (int64_t j = k + 1; j < n; ++j) rk[j] *= inv;
      for (int64_t i = k + 1; i < k1; ++i) Axpy(a + i * n + i, -rk[i], rk + i, n - i);
    }
    // Trailing update of rows [k1, n) with the panel.
    const double rest = static_cast<double>(n - k1);
    ParallelItems((n - k1 + 7) / 8, n_threads, rest * rest * (k1 - k0) / 2, [&](int, int64_t blk) {
      const int64_t i_end = std::min(n, k1 + 8 * (blk + 1));
      for (int64_t i = k1 + 8 * blk; i < i_end; ++i) {
        double* ri = a + i * n;
        for (int64_t k = k0; k < k1; ++k) Axpy(ri + i, -a[k * n + i], a + k * n + i, n - i);
      }
    });
  }
  for (int64_t i = 1; i < n; ++i) std::fill(a + i * n, a + i * n + i, 0.0);
  return true;
}

void InvertUpper(const double* u, int64_t n, double* out, int n_threads) {
  std::fill(out, out + n * n, 0.0);
  // Row i of X = U^-1 solves x^T U = e_i^T by forward substitution over
  // columns, written as axpys with U's rows; kInvBlock rows share each U row.
  const double nd = static_cast<double>(n);
  ParallelItems((n + kInvBlock - 1) / kInvBlock, n_threads, nd * nd * nd / 6, [&](int, int64_t blk) {
    const int64_t i0 = blk * kInvBlock, i1 = std::min(n, i0 + kInvBlock);
    for (int64_t i = i0; i < i1; ++i) out[i * n + i] = 1.0;
    for (int64_t k = i0; k < n; ++k) {
      const double* uk = u + k * n;
      const double inv = 1.0 / uk[k];
      for (int64_t i = i0; i < i1 && i <= k; ++i) {
        double* xi = out + i * n;
        xi[k] *= inv;
        if (xi[k] != 0.0) Axpy(xi + k + 1, -xi[k], uk + k + 1, n - k - 1);
      }
    }
  });
}

bool InverseCholeskyUpper(std::vector<double>& a, int64_t n, std::vector<double>* u, int n_threads) {
  // R = J A J, in place: reversing the flat array reverses rows and columns.
  std::reverse(a.begin(), a.begin() + n * n);
  if (!CholeskyUpper(a.data(), n, n_threads)) return false;
  std::vector<double> vinv(static_cast<size_t>(n * n));
  InvertUpper(a.data(), n, vinv.data(), n_threads);
  // U = J V^-T J: U[i][j] = Vinv[n-1-j][n-1-i].
  u->assign(static_cast<size_t>(n * n), 0.0);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = i; j < n; ++j) (*u)[i * n + j] = vinv[(n - 1 - j) * n + (n - 1 - i)];
  return true;
}

}  // namespace nibble
