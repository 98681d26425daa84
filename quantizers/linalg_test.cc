// Cholesky / inverse-Cholesky factors checked against their defining
// identities with naive triple loops (A = U^T U, U^T U A = I).
#include "quantizers/linalg.h"

#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>


namespace nibble {
namespace {

// A = B B^T / m + 0.1 I for a random n x m B: SPD with spread eigenvalues.
std::vector<double> RandomSpd(int64_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> nd;
  const int64_t m = n + 5;
  std::vector<double> b(n * m), a(n * n, 0.0);
  for (double& v : b) v = nd(rng);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) {
      double s = 0;
      for (int64_t k = 0; k < m; ++k) s += b[i * m + k] * b[j * m + k];
      a[i * n + j] = s / m + (i == j ? 0.1 : 0.0);
    }
  return a;
}

double MaxAbs(const std::vector<double>& v) {
  double m = 0;
  for (double x : v) m = std::max(m, std::fabs(x));
  return m;
}

class LinalgTest : public ::testing::TestWithParam<int64_t> {};

TEST_P(LinalgTest, CholeskyReproducesA) {
  const int64_t n = GetParam();
  const int threads = 2;
  const std::vector<double> a = RandomSpd(n, 7 + n);
  std::vector<double> u = a;
  ASSERT_TRUE(CholeskyUpper(u.data(), n, threads));
  double worst = 0;
  for (int64_t i = 0; i < n; ++i) {
    EXPECT_GT(u[i * n + i], 0.0);
    for (int64_t j = 0; j < n; ++j) {
      if (j < i) {
        ASSERT_EQ(u[i * n + j], 0.0) << i << "," << j;
      }
      double s = 0;
      for (int64_t k = 0; k <= std::min(i, j); ++k) s += u[k * n + i] * u[k * n + j];
      worst = std::max(worst, std::fabs(s - a[i * n + j]));
    }
  }
  EXPECT_LT(worst, 1e-10 * MaxAbs(a));
}

TEST_P(LinalgTest, InverseCholeskyIsFactorOfInverse) {
  const int64_t n = GetParam();
  const int threads = 2;
  const std::vector<double> a = RandomSpd(n, 99 + n);
  std::vector<double> work = a, u;
  ASSERT_TRUE(InverseCholeskyUpper(work, n, &u, threads));
  // (U^T U) A must be the identity.
  std::vector<double> hinv(n * n, 0.0);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) {
      if (j < i) {
        ASSERT_EQ(u[i * n + j], 0.0);
      }
      double s = 0;
      for (int64_t k = 0; k <= std::min(i, j); ++k) s += u[k * n + i] * u[k * n + j];
      hinv[i * n + j] = s;
    }
  double worst = 0;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) {
      double s = 0;
      for (int64_t k = 0; k < n; ++k) s += hinv[i * n + k] * a[k * n + j];
      worst = std::max(worst, std::fabs(s - (i == j ? 1.0 : 0.0)));
    }
  EXPECT_LT(worst, 1e-9);
  for (int64_t i = 0; i < n; ++i) EXPECT_GT(u[i * n + i], 0.0);
}

INSTANTIATE_TEST_SUITE_P(Sizes, LinalgTest, ::testing::Values(1, 2, 17, 64, 97, 172, 500));  // 500: threaded paths

TEST(LinalgTest, RejectsIndefinite) {
  std::vector<double> a = {1.0, 2.0, 2.0, 1.0};  // eigenvalues 3, -1
  EXPECT_FALSE(CholeskyUpper(a.data(), 2, 1));
  std::vector<double> nan = {std::nan(""), 0.0, 0.0, 1.0}, u;
  EXPECT_FALSE(InverseCholeskyUpper(nan, 2, &u, 1));
}

TEST(LinalgTest, AxpyAllLengths) {
  for (int64_t n = 0; n < 70; ++n) {
    std::vector<double> y(n, 1.0), x(n);
    std::vector<float> yf(n, 1.0f), xf(n);
    for (int64_t i = 0; i < n; ++i) x[i] = xf[i] = static_cast<float>(i);
    Axpy(y.data(), -2.0, x.data(), n);
    Axpy(yf.data(), -2.0f, xf.data(), n);
    for (int64_t i = 0; i < n; ++i) {
      ASSERT_EQ(y[i], 1.0 - 2.0 * i);
      ASSERT_EQ(yf[i], 1.0f - 2.0f * i);
    }
  }
}

}  // namespace
}  // namespace nibble
