#include "kernels/cpu/ops.h"

#include <atomic>
#include <cmath>
#include <cstring>
#include <random>
#include <string_view>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/common/fp16.h"
#include "kernels/cpu/thread_pool.h"

namespace nibble::cpu {
namespace {

// fp32 dot products of length n with values in [-1, 1]: reassociation error is
// bounded by ~n * eps * sum|a_i b_i|; we allow that relative to the magnitude sum.
constexpr float kF32AccumRel = 4 * 1.1920929e-07f;

std::vector<float> Random(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> d(-1.0f, 1.0f);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

class IsaTest : public ::testing::TestWithParam<const char*> {
 protected:
  void SetUp() override {
    if (!ForceIsaForTesting(GetParam())) GTEST_SKIP() << "CPU lacks " << GetParam();
  }
  void TearDown() override { ForceIsaForTesting(""); }
};

TEST_P(IsaTest, MatMulMatchesReferenceAtOddSizes) {
  ThreadPool pool(2);
  for (int rows : {1, 3, 17, 64, 129}) {
    for (int cols : {1, 7, 16, 33, 172, 1025}) {
      for (int tokens : {1, 3, 4, 7, 8, 9, 17, 40}) {
        auto w = Random(size_t(rows) * cols, rows * 131 + cols);
        auto x = Random(size_t(tokens) * cols, cols * 7 + tokens);
        std::vector<float> y(size_t(tokens) * rows), ref(y.size());
        MatMulF32(w.data(), rows, cols, x.data(), tokens, y.data(), &pool);
        MatMulF32Ref(w.data(), rows, cols, x.data(), tokens, ref.data());
        for (int t = 0; t < tokens; ++t) {
          for (int r = 0; r < rows; ++r) {
            float mag = 0;
            for (int c = 0; c < cols; ++c) mag += std::fabs(w[size_t(r) * cols + c] * x[size_t(t) * cols + c]);
            ASSERT_NEAR(y[size_t(t) * rows + r], ref[size_t(t) * rows + r], kF32AccumRel * cols * mag + 1e-30f)
                << GetParam() << " rows=" << rows << " cols=" << cols << " tokens=" << tokens;
          }
        }
      }
    }
  }
}

// The packed-panel path (n_tokens >= kMatMulF32PackedMinTokens) equals its
// scalar order reference bit for bit at every size: row tails of the 32/16-row
// panels (rows 1, 15..33, 100), column tails of the 16-wide transposes and of
// the 256-column blocks (cols 1..17, 255..257, 600), token tails (8..40).
TEST_P(IsaTest, PackedMatMulIsTheSequentialFmaOrderBitForBit) {
  if (std::string_view(GetParam()) == "scalar") GTEST_SKIP() << "no packed path at scalar";
  ThreadPool pool(2);
  for (int rows : {1, 15, 16, 17, 31, 32, 33, 100}) {
    for (int cols : {1, 7, 15, 16, 17, 255, 256, 257, 600}) {
      for (int tokens : {8, 9, 13, 16, 23, 40}) {
        auto w = Random(size_t(rows) * cols, rows * 17 + cols);
        auto x = Random(size_t(tokens) * cols, cols * 5 + tokens);
        std::vector<float> y(size_t(tokens) * rows, -7.0f), ref(y.size());
        MatMulF32(w.data(), rows, cols, x.data(), tokens, y.data(), &pool);
        MatMulF32PackedOrderRef(w.data(), rows, cols, x.data(), tokens, ref.data());
        ASSERT_EQ(std::memcmp(y.data(), ref.data(), y.size() * sizeof(float)), 0)
            << GetParam() << " rows=" << rows << " cols=" << cols << " tokens=" << tokens;
      }
    }
  }
}

// Same bytes whatever the thread count (rows split differently over 1, 2, 3
// threads) and, from the packed threshold on, whatever the batch a token is in.
TEST_P(IsaTest, MatMulIsIndependentOfThreadsAndBatch) {
  const int rows = 300, cols = 259;
  ThreadPool p1(1), p2(2), p3(3);
  auto w = Random(size_t(rows) * cols, 11);
  for (int tokens : {1, 3, 8, 21, 40}) {
    auto x = Random(size_t(tokens) * cols, 12 + tokens);
    std::vector<float> y1(size_t(tokens) * rows), y2(y1.size()), y3(y1.size());
    MatMulF32(w.data(), rows, cols, x.data(), tokens, y1.data(), &p1);
    MatMulF32(w.data(), rows, cols, x.data(), tokens, y2.data(), &p2);
    MatMulF32(w.data(), rows, cols, x.data(), tokens, y3.data(), &p3);
    EXPECT_EQ(std::memcmp(y1.data(), y2.data(), y1.size() * sizeof(float)), 0) << GetParam() << " tokens=" << tokens;
    EXPECT_EQ(std::memcmp(y1.data(), y3.data(), y1.size() * sizeof(float)), 0) << GetParam() << " tokens=" << tokens;
    if (tokens < kMatMulF32PackedMinTokens) continue;
    // Tokens 5 .. 5+kMatMulF32PackedMinTokens-1 on their own: the same bytes as inside the big batch.
    const int64_t n = kMatMulF32PackedMinTokens;
    if (tokens < 5 + n) continue;
    std::vector<float> part(size_t(n) * rows);
    MatMulF32(w.data(), rows, cols, x.data() + 5 * cols, n, part.data(), &p2);
    EXPECT_EQ(std::memcmp(part.data(), y1.data() + 5 * rows, part.size() * sizeof(float)), 0)
        << GetParam() << " tokens=" << tokens;
  }
}

// Decode (1..3 tokens): every output is exactly DotF32 of its row, whatever
// the row count (the 4-row AVX-512 pass and its row tail) and column tail.
TEST_P(IsaTest, DecodeMatMulIsDotOfEachRowBitForBit) {
  for (int rows : {1, 3, 4, 5, 8, 9, 33}) {
    for (int cols : {1, 15, 16, 17, 31, 32, 33, 100, 576}) {
      for (int tokens : {1, 2, 3}) {
        auto w = Random(size_t(rows) * cols, rows * 29 + cols);
        auto x = Random(size_t(tokens) * cols, cols * 3 + tokens);
        std::vector<float> y(size_t(tokens) * rows, -7.0f);
        MatMulF32(w.data(), rows, cols, x.data(), tokens, y.data(), nullptr);
        for (int t = 0; t < tokens; ++t)
          for (int r = 0; r < rows; ++r) {
            const float want = DotF32(w.data() + size_t(r) * cols, x.data() + size_t(t) * cols, cols);
            ASSERT_EQ(std::memcmp(&y[size_t(t) * rows + r], &want, sizeof(float)), 0)
                << GetParam() << " rows=" << rows << " cols=" << cols << " tokens=" << tokens << " r=" << r;
          }
      }
    }
  }
}

// fp16 weights: random values rounded to fp16 (with a few subnormals, zeros
// of both signs and large magnitudes), and their exact fp32 widening.
struct F16Matrix {
  std::vector<uint16_t> h;
  std::vector<float> f;
};
// bf16: the same with bfloat16 rounding (subnormals at 1e-39).
F16Matrix RandomHalf(size_t n, uint32_t seed, bool bf16) {
  F16Matrix m;
  auto v = Random(n, seed);
  for (size_t i = 0; i < n; ++i) {
    float x = v[i];
    if (i % 97 == 5) x *= bf16 ? 1e-39f : 1e-6f;  // subnormal
    if (i % 89 == 7) x = (i & 1) ? 0.0f : -0.0f;
    if (i % 83 == 3) x *= bf16 ? 3.0e37f : 6.0e4f;
    m.h.push_back(bf16 ? Fp32ToBf16(x) : Fp32ToFp16(x));
    m.f.push_back(bf16 ? Bf16ToFp32(m.h.back()) : Fp16ToFp32(m.h.back()));
  }
  return m;
}

// MatMulF16 / MatMulBF16 are MatMulF32Filled over the widened matrix bit for bit, at every
// token count (decode rows, the 4-row AVX-512 pass and its tails, the packed
// prefill path), odd sizes and thread counts; and near the scalar reference.
TEST_P(IsaTest, MatMulF16AndBF16AreTheFp32KernelOnTheWidenedMatrix) {
  ThreadPool p1(1), p2(2);
  for (bool bf16 : {false, true}) {
    const auto matmul = bf16 ? MatMulBF16 : MatMulF16;
    const auto matmul_ref = bf16 ? MatMulBF16Ref : MatMulF16Ref;
    const auto dot = bf16 ? DotBF16 : DotF16;
    for (int rows : {1, 3, 4, 5, 17, 33, 100}) {
      for (int cols : {1, 15, 16, 17, 33, 172, 576}) {
        for (int tokens : {1, 2, 3, 5, 8, 9, 17}) {
          auto w = RandomHalf(size_t(rows) * cols, rows * 37 + cols, bf16);
          auto x = Random(size_t(tokens) * cols, cols * 11 + tokens);
          std::vector<float> y(size_t(tokens) * rows, -7.0f), y1(y.size(), -5.0f), want(y.size()), ref(y.size());
          matmul(w.h.data(), rows, cols, x.data(), tokens, y.data(), &p2);
          matmul(w.h.data(), rows, cols, x.data(), tokens, y1.data(), &p1);
          const RowFill fill = [&](int64_t r0, int64_t nr, float* dst) {
            std::memcpy(dst, w.f.data() + r0 * cols, size_t(nr * cols) * sizeof(float));
          };
          MatMulF32Filled(fill, rows, cols, x.data(), tokens, want.data(), &p2);
          ASSERT_EQ(std::memcmp(y.data(), want.data(), y.size() * sizeof(float)), 0)
              << GetParam() << (bf16 ? " bf16" : " f16") << " rows=" << rows << " cols=" << cols
              << " tokens=" << tokens;
          ASSERT_EQ(std::memcmp(y1.data(), want.data(), y.size() * sizeof(float)), 0)
              << GetParam() << " 1 thread rows=" << rows << " cols=" << cols << " tokens=" << tokens;
          matmul_ref(w.h.data(), rows, cols, x.data(), tokens, ref.data());
          for (int t = 0; t < tokens; ++t)
            for (int r = 0; r < rows; ++r) {
              float mag = 0;
              for (int c = 0; c < cols; ++c) mag += std::fabs(w.f[size_t(r) * cols + c] * x[size_t(t) * cols + c]);
              ASSERT_NEAR(y[size_t(t) * rows + r], ref[size_t(t) * rows + r], kF32AccumRel * cols * mag + 1e-30f)
                  << GetParam() << " rows=" << rows << " cols=" << cols << " tokens=" << tokens;
            }
          if (tokens < kMatMulF32PackedMinTokens) {
            for (int r = 0; r < rows; ++r) {
              const float d = dot(w.h.data() + size_t(r) * cols, x.data(), cols);
              const float e = DotF32(w.f.data() + size_t(r) * cols, x.data(), cols);
              ASSERT_EQ(std::memcmp(&d, &e, sizeof(float)), 0) << GetParam() << " cols=" << cols;
            }
          }
        }
      }
    }
  }
}

TEST_P(IsaTest, WidenF16AndBF16AreExact) {
  for (bool bf16 : {false, true})
    for (int n : {0, 1, 7, 8, 15, 16, 17, 100}) {
      auto w = RandomHalf(size_t(n), 3 + n, bf16);
      std::vector<float> got(size_t(n) + 1, 42.0f);
      (bf16 ? WidenBF16 : WidenF16)(w.h.data(), got.data(), n);
      for (int i = 0; i < n; ++i)
        ASSERT_EQ(std::memcmp(&got[i], &w.f[i], sizeof(float)), 0) << GetParam() << " i=" << i;
      EXPECT_EQ(got[n], 42.0f) << "wrote past the end";
    }
  // All 65536 fp16 bit patterns (NaNs compared as NaN).
  std::vector<uint16_t> all(65536);
  for (int i = 0; i < 65536; ++i) all[i] = static_cast<uint16_t>(i);
  std::vector<float> got(all.size());
  for (bool bf16 : {false, true}) {
    (bf16 ? WidenBF16 : WidenF16)(all.data(), got.data(), int64_t(all.size()));
    for (int i = 0; i < 65536; ++i) {
      const float want = bf16 ? Bf16ToFp32(all[i]) : Fp16ToFp32(all[i]);
      if (std::isnan(want)) {
        ASSERT_TRUE(std::isnan(got[i])) << i;
      } else {
        ASSERT_EQ(std::memcmp(&got[i], &want, sizeof(float)), 0) << GetParam() << " bf16=" << bf16 << " bits=" << i;
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(AllIsas, IsaTest, ::testing::Values("scalar", "avx2", "avx512"));

TEST(OpsTest, RopeInterleavedRotatesAdjacentPairs) {
  // Head of 4 dims at position 1, theta 10000: pair 0 rotates by 1 rad, pair 1 by 0.01 rad.
  std::vector<float> v = {1, 0, 0, 1};
  Rope(v.data(), 1, 4, 4, 1, 10000.0f, RopeStyle::kInterleaved);
  EXPECT_NEAR(v[0], std::cos(1.0f), 1e-6);
  EXPECT_NEAR(v[1], std::sin(1.0f), 1e-6);
  EXPECT_NEAR(v[2], -std::sin(0.01f), 1e-6);
  EXPECT_NEAR(v[3], std::cos(0.01f), 1e-6);
}

TEST(OpsTest, RopeHalfPairsIWithIPlusHalf) {
  std::vector<float> v = {1, 0, 0, 1};  // pairs (0,2) and (1,3)
  Rope(v.data(), 1, 4, 4, 1, 10000.0f, RopeStyle::kHalf);
  EXPECT_NEAR(v[0], std::cos(1.0f), 1e-6);
  EXPECT_NEAR(v[2], std::sin(1.0f), 1e-6);
  EXPECT_NEAR(v[1], -std::sin(0.01f), 1e-6);
  EXPECT_NEAR(v[3], std::cos(0.01f), 1e-6);
}

TEST(OpsTest, RmsNormSoftmaxSwiGLU) {
  std::vector<float> x = {3, 4}, w = {1, 2}, out(2);
  RmsNorm(x.data(), w.data(), 2, 0.0f, out.data());
  const float inv = 1.0f / std::sqrt(12.5f);
  EXPECT_NEAR(out[0], 3 * inv, 1e-6);
  EXPECT_NEAR(out[1], 8 * inv, 1e-6);
  std::vector<float> s = {-2.0f, -2.0f + std::log(3.0f)};
  Softmax(s.data(), 2);
  EXPECT_NEAR(s[0], 0.25, 1e-6);
  EXPECT_NEAR(s[1], 0.75, 1e-6);
  std::vector<float> g = {0, 2}, u = {5, 3};
  SwiGLU(g.data(), u.data(), 2);
  EXPECT_NEAR(g[0], 0, 1e-7);
  EXPECT_NEAR(g[1], 2 / (1 + std::exp(-2.0f)) * 3, 1e-5);
}

uint32_t FloatBits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}

// RmsNorm's sum of squares has one order on every ISA (16 lane chains, a
// fixed pairwise reduction): the same bits everywhere, and within float
// rounding of a double-precision reference.
TEST(OpsTest, RmsNormEveryIsaEqualsTheScalarReference) {
  std::mt19937 rng(3);
  std::normal_distribution<float> nd(0.0f, 2.0f);
  for (int64_t n : {1, 7, 16, 17, 64, 172, 576, 1000}) {
    std::vector<float> x(n), w(n), ref(n);
    for (int64_t i = 0; i < n; ++i) x[i] = nd(rng), w[i] = 1.0f + 0.1f * nd(rng);
    ASSERT_TRUE(ForceIsaForTesting("scalar"));
    RmsNorm(x.data(), w.data(), n, 1e-5f, ref.data());
    for (const char* isa : {"avx2", "avx512"}) {
      if (!ForceIsaForTesting(isa)) continue;
      std::vector<float> out(n);
      RmsNorm(x.data(), w.data(), n, 1e-5f, out.data());
      for (int64_t i = 0; i < n; ++i) ASSERT_EQ(FloatBits(out[i]), FloatBits(ref[i])) << isa << " n=" << n << " i=" << i;
    }
    ForceIsaForTesting("");
    double ss = 0;
    for (float v : x) ss += double(v) * v;
    const double s = 1.0 / std::sqrt(ss / n + 1e-5);
    for (int64_t i = 0; i < n; ++i) EXPECT_NEAR(ref[i], w[i] * s * x[i], 1e-5 * std::fabs(w[i] * s * x[i]) + 1e-7);
  }
}

// SwiGLU's exp is one fixed operation sequence (ops.cc): every ISA gives the
// scalar reference's bits, and the result stays within a few ulp of SiLU by
// std::exp over the whole float range that matters (and saturates cleanly).
TEST(OpsTest, SwiGluEveryIsaEqualsTheScalarReferenceAndStdExp) {
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> wide(-100.0f, 100.0f), narrow(-8.0f, 8.0f);
  const int64_t n = 16 * 97 + 13;  // vector bodies and a tail
  std::vector<float> g(n), u(n);
  for (int64_t i = 0; i < n; ++i) g[i] = i % 3 ? narrow(rng) : wide(rng), u[i] = narrow(rng);
  g[0] = 0.0f, g[1] = -87.5f, g[2] = 88.5f, g[3] = -1e30f, g[4] = 1e30f, g[5] = 1e-30f;
  std::vector<float> ref = g;
  ASSERT_TRUE(ForceIsaForTesting("scalar"));
  SwiGLU(ref.data(), u.data(), n);
  for (const char* isa : {"avx2", "avx512"}) {
    if (!ForceIsaForTesting(isa)) continue;
    std::vector<float> out = g;
    SwiGLU(out.data(), u.data(), n);
    for (int64_t i = 0; i < n; ++i) ASSERT_EQ(FloatBits(out[i]), FloatBits(ref[i])) << isa << " i=" << i << " g=" << g[i];
  }
  ForceIsaForTesting("");
  for (int64_t i = 0; i < n; ++i) {
    const double gd = g[i], want = gd / (1.0 + std::exp(-gd)) * u[i];
    EXPECT_NEAR(ref[i], want, 4e-7 * std::fabs(want) + 1e-30) << "i=" << i << " g=" << g[i];
  }
}

TEST(ThreadPoolTest, ParallelForCoversRangeOnce) {
  for (int threads : {2, 3}) {
    ThreadPool pool(threads);
    for (int64_t n : {1, 2, 15, 16, 17, 1000, 100003}) {
      std::vector<int> hits(n, 0);
      std::atomic<bool> misaligned{false};
      pool.ParallelFor(n, 4, [&](int t, int64_t b, int64_t e) {
        if (b % 4 != 0 || (e % 4 != 0 && e != n) || b >= e || t < 0 || t >= threads) misaligned = true;
        for (int64_t i = b; i < e; ++i) hits[i]++;
      });
      EXPECT_FALSE(misaligned) << "n=" << n;
      for (int64_t i = 0; i < n; ++i) ASSERT_EQ(hits[i], 1) << "n=" << n << " i=" << i;
    }
  }
}

}  // namespace
}  // namespace nibble::cpu
