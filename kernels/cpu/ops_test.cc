#include "kernels/cpu/ops.h"

#include <atomic>
#include <cmath>
#include <cstring>
#include <random>
#include <string_view>
#include <vector>

#include "gtest/gtest.h"
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
