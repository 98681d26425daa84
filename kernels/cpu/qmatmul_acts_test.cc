// qmm::QuantizeActs (AVX-512 where available) must write exactly the bytes of
// the scalar reference qmm::QuantizeActsScalar, for full and partial blocks,
// zero blocks, padding blocks past cols, extreme magnitudes, rounding ties and
// non-finite values; and the scalar reference itself must match the
// definition (codes = round-half-even(x * 127 / amax), dx = amax / 127).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "kernels/cpu/qmatmul_internal.h"

namespace nibble::cpu::qmm {
namespace {

struct Acts {
  std::vector<int8_t> xq;
  std::vector<float> dx, dxs, dx16, xsum;
  std::vector<int32_t> xs4;
  Acts(int64_t n_tokens, int64_t nb)
      : xq(n_tokens * nb * kBlock, 99), dx(n_tokens * nb, -1), dxs(n_tokens * nb, -1), dx16(n_tokens * nb * 8, -1),
        xsum(n_tokens * nb, -1), xs4(n_tokens * nb * 8, -1) {}
};

template <typename T>
bool SameBytes(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

void ExpectSame(const std::vector<float>& x, int64_t n_tokens, int64_t cols, const char* what) {
  const int64_t nb = (cols + 63) / 64 * 2;
  Acts a(n_tokens, nb), b(n_tokens, nb);
  QuantizeActs(x.data(), n_tokens, cols, nb, a.xq.data(), a.dx.data(), a.dxs.data(), a.dx16.data(), a.xs4.data(),
               a.xsum.data());
  QuantizeActsScalar(x.data(), n_tokens, cols, nb, b.xq.data(), b.dx.data(), b.dxs.data(), b.dx16.data(),
                     b.xs4.data(), b.xsum.data());
  EXPECT_TRUE(SameBytes(a.xq, b.xq)) << what << " cols " << cols;
  EXPECT_TRUE(SameBytes(a.dx, b.dx)) << what << " cols " << cols;
  EXPECT_TRUE(SameBytes(a.dxs, b.dxs)) << what << " cols " << cols;
  EXPECT_TRUE(SameBytes(a.dx16, b.dx16)) << what << " cols " << cols;
  EXPECT_TRUE(SameBytes(a.xs4, b.xs4)) << what << " cols " << cols;
  EXPECT_TRUE(SameBytes(a.xsum, b.xsum)) << what << " cols " << cols;
}

TEST(QuantizeActs, SimdMatchesScalarBytes) {
  std::mt19937 rng(7);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  for (int64_t cols : {1, 5, 31, 32, 33, 63, 64, 65, 100, 172, 576, 1536}) {
    const int64_t n_tokens = 3;
    std::vector<float> x(n_tokens * cols);
    for (float& v : x) v = nd(rng);
    ExpectSame(x, n_tokens, cols, "normal");
    // Heavy tails and huge / tiny magnitudes.
    for (size_t i = 0; i < x.size(); ++i) x[i] = nd(rng) * std::pow(10.0f, static_cast<float>(i % 9) - 4.0f);
    ExpectSame(x, n_tokens, cols, "scaled");
    for (size_t i = 0; i < x.size(); ++i) x[i] = (i % 7 == 0 ? 3.0e38f : 1.0e-38f) * (i % 2 ? -1.0f : 1.0f);
    ExpectSame(x, n_tokens, cols, "extreme");
    // Exact rounding ties: amax 127 makes inv = 1, so x.5 rounds half to even.
    for (size_t i = 0; i < x.size(); ++i) x[i] = (i % 32 == 0) ? 127.0f : static_cast<float>(i % 20) - 9.5f;
    ExpectSame(x, n_tokens, cols, "ties");
    std::fill(x.begin(), x.end(), 0.0f);
    ExpectSame(x, n_tokens, cols, "zeros");
    for (size_t i = 0; i < x.size(); ++i) x[i] = nd(rng);
    x[x.size() / 2] = std::numeric_limits<float>::quiet_NaN();
    x[0] = std::numeric_limits<float>::infinity();
    x[x.size() - 1] = -std::numeric_limits<float>::infinity();
    ExpectSame(x, n_tokens, cols, "non-finite");
  }
}

TEST(QuantizeActs, ScalarFollowsDefinition) {
  const int64_t cols = 70, nb = 4;  // blocks 2 (6 valid columns) and 3 (padding)
  std::vector<float> x(cols);
  for (int64_t i = 0; i < cols; ++i) x[i] = (i % 32 == 0) ? -127.0f : static_cast<float>(i % 11) - 4.5f;
  Acts a(1, nb);
  QuantizeActsScalar(x.data(), 1, cols, nb, a.xq.data(), a.dx.data(), a.dxs.data(), a.dx16.data(), a.xs4.data(),
                     a.xsum.data());
  for (int64_t b = 0; b < 3; ++b) {
    EXPECT_EQ(a.dx[b], 1.0f) << b;
    int sum = 0;
    for (int i = 0; i < kBlock; ++i) {
      const int64_t c = b * kBlock + i;
      const int want = c < cols ? static_cast<int>(std::nearbyint(x[c])) : 0;  // inv = 1, ties to even
      EXPECT_EQ(a.xq[b * kBlock + i], want) << "col " << c;
      sum += want;
    }
    EXPECT_EQ(a.dxs[b], static_cast<float>(sum));
    EXPECT_EQ(a.xsum[b], static_cast<float>(sum));
    for (int l = 0; l < 8; ++l) {
      const int8_t* q = &a.xq[b * kBlock + 4 * l];
      EXPECT_EQ(a.xs4[b * 8 + l], q[0] + q[1] + q[2] + q[3]);
    }
  }
  EXPECT_EQ(a.dx[3], 0.0f);
  EXPECT_EQ(a.xsum[3], 0.0f);
  for (int i = 0; i < kBlock; ++i) EXPECT_EQ(a.xq[3 * kBlock + i], 0);
  for (int l = 0; l < 16; ++l) EXPECT_EQ(a.dx16[l], a.dx[l / 8]);
}

}  // namespace
}  // namespace nibble::cpu::qmm
