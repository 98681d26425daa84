#include "kernels/cpu/paged_attention.h"

#include <algorithm>
#include <bit>
#include <cstdint>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/common/fp16.h"
#include "kernels/cpu/ops.h"
#include "kernels/cpu/thread_pool.h"

namespace nibble::cpu {
namespace {

// A paged pool holding n_pos positions of one layer (K and V interleaved per
// block like the engine's cache, with a decoy layer before it), the blocks
// placed in a shuffled order.
struct Fixture {
  int n_heads = 6, n_kv_heads = 2, head_dim = 16, block_size = 4;
  int n_pos = 0;
  std::vector<float> pool, q, k_flat, v_flat;
  std::vector<int32_t> table;

  Fixture(int n_positions, int n_tokens, uint32_t seed) : n_pos(n_positions) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    const int kv_dim = n_kv_heads * head_dim;
    const int n_blocks = (n_pos + block_size - 1) / block_size;
    table.resize(n_blocks);
    std::iota(table.begin(), table.end(), 0);
    std::shuffle(table.begin(), table.end(), rng);
    for (int32_t& b : table) b = 2 * b + 1;  // leave unused blocks between them
    const int64_t stride = int64_t{4} * block_size * kv_dim;  // 2 layers x K,V
    pool.assign(size_t(stride) * (2 * n_blocks + 2), std::nanf(""));  // unused slots are NaN
    k_flat.resize(size_t(n_pos) * kv_dim);
    v_flat.resize(k_flat.size());
    for (float& x : k_flat) x = nd(rng);
    for (float& x : v_flat) x = nd(rng);
    for (int p = 0; p < n_pos; ++p) {
      float* blk = pool.data() + table[p / block_size] * stride;
      std::copy_n(&k_flat[size_t(p) * kv_dim], kv_dim, blk + KOff() + (p % block_size) * kv_dim);
      std::copy_n(&v_flat[size_t(p) * kv_dim], kv_dim, blk + VOff() + (p % block_size) * kv_dim);
    }
    q.resize(size_t(n_tokens) * n_heads * head_dim);
    for (float& x : q) x = nd(rng);
  }
  int64_t KOff() const { return int64_t{2} * block_size * n_kv_heads * head_dim; }
  int64_t VOff() const { return int64_t{3} * block_size * n_kv_heads * head_dim; }

  PagedAttentionArgs Args(int n_tokens, int pos0, float* out) const {
    PagedAttentionArgs a;
    a.q = q.data();
    a.out = out;
    a.n_tokens = n_tokens;
    a.pos0 = pos0;
    a.n_heads = n_heads;
    a.n_kv_heads = n_kv_heads;
    a.head_dim = head_dim;
    a.base = pool.data();
    a.block_stride = int64_t{4} * block_size * n_kv_heads * head_dim;
    a.k_offset = KOff();
    a.v_offset = VOff();
    a.block_size = block_size;
    a.block_table = table.data();
    a.n_blocks = static_cast<int>(table.size());
    return a;
  }
};

// Independent reference over the contiguous K/V (double precision, softmax from its definition).
std::vector<double> Naive(const Fixture& f, int n_tokens, int pos0) {
  const int kv_dim = f.n_kv_heads * f.head_dim, qw = f.n_heads * f.head_dim, group = f.n_heads / f.n_kv_heads;
  std::vector<double> out(size_t(n_tokens) * qw, 0.0);
  for (int t = 0; t < n_tokens; ++t)
    for (int h = 0; h < f.n_heads; ++h) {
      const int n = pos0 + t + 1;
      std::vector<double> w(n);
      double z = 0.0;
      for (int p = 0; p < n; ++p) {
        double d = 0.0;
        for (int i = 0; i < f.head_dim; ++i)
          d += double{f.q[size_t(t) * qw + h * f.head_dim + i]} * f.k_flat[size_t(p) * kv_dim + (h / group) * f.head_dim + i];
        w[p] = std::exp(d / std::sqrt(double(f.head_dim)));
        z += w[p];
      }
      for (int p = 0; p < n; ++p)
        for (int i = 0; i < f.head_dim; ++i)
          out[size_t(t) * qw + h * f.head_dim + i] += w[p] / z * f.v_flat[size_t(p) * kv_dim + (h / group) * f.head_dim + i];
    }
  return out;
}

// Tolerance: fp32 dot products of length 16 and softmax over <= 64 terms of
// unit-normal data; 2e-5 absolute on outputs of magnitude ~1.
constexpr double kTol = 2e-5;

TEST(PagedAttention, MatchesNaiveReferenceDecodeAndChunk) {
  ThreadPool pool(2);
  for (auto [n_pos, n_tokens] : {std::pair{1, 1}, {13, 1}, {37, 5}, {64, 64}, {50, 17}}) {
    Fixture f(n_pos, n_tokens, 7 + n_pos);
    const int pos0 = n_pos - n_tokens;
    std::vector<float> out(f.q.size(), -1.0f), out_mt(f.q.size(), -2.0f), out_ref(f.q.size());
    std::vector<float> scratch;
    PagedAttention(f.Args(n_tokens, pos0, out.data()), nullptr, &scratch);
    PagedAttention(f.Args(n_tokens, pos0, out_mt.data()), &pool, &scratch);
    PagedAttentionRef(f.Args(n_tokens, pos0, out_ref.data()));
    const std::vector<double> want = Naive(f, n_tokens, pos0);
    for (size_t i = 0; i < want.size(); ++i) {
      ASSERT_NEAR(out[i], want[i], kTol) << "n_pos " << n_pos << " i " << i;
      ASSERT_EQ(out[i], out_mt[i]) << "threading changed the result at " << i;
      ASSERT_NEAR(out_ref[i], want[i], 1e-6) << i;
    }
  }
}

TEST(PagedAttention, BlockSizeDoesNotChangeBits) {
  // The same K/V in one big block vs. many shuffled small blocks: identical
  // operation order, so identical bits.
  Fixture small(40, 3, 99);
  Fixture big = small;
  big.block_size = 64;
  const int kv_dim = big.n_kv_heads * big.head_dim;
  big.table = {0};
  big.pool.assign(size_t(4) * 64 * kv_dim, 0.0f);
  for (int p = 0; p < 40; ++p) {
    std::copy_n(&big.k_flat[size_t(p) * kv_dim], kv_dim, big.pool.data() + big.KOff() + p * kv_dim);
    std::copy_n(&big.v_flat[size_t(p) * kv_dim], kv_dim, big.pool.data() + big.VOff() + p * kv_dim);
  }
  std::vector<float> a(small.q.size()), b(small.q.size()), scratch;
  PagedAttention(small.Args(3, 37, a.data()), nullptr, &scratch);
  PagedAttention(big.Args(3, 37, b.data()), nullptr, &scratch);
  for (size_t i = 0; i < a.size(); ++i) ASSERT_EQ(a[i], b[i]) << i;
}


// ---------------------------------------------------------------------------
// int8 K/V.

TEST(QuantizeKvRowInt8, ScaleRoundingAndSpecialValues) {
  // Two heads of 5: scale = max|x| / 127, codes = round(x / scale), |x - s c| <= s / 2.
  const float x[10] = {0.5f, -1.27f, 0.0f, 0.3f, 1.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
  int8_t c[10];
  float sc[2];
  QuantizeKvRowInt8(x, 2, 5, c, sc);
  EXPECT_FLOAT_EQ(sc[0], 1.27f / 127.0f);
  EXPECT_EQ(c[1], -127);
  EXPECT_EQ(c[0], 50);
  EXPECT_EQ(c[3], 30);
  EXPECT_EQ(c[4], 100);
  for (int i = 0; i < 5; ++i) EXPECT_LE(std::fabs(x[i] - sc[0] * c[i]), sc[0] / 2 + 1e-7f) << i;
  EXPECT_EQ(sc[1], 0.0f);  // all-zero head
  for (int i = 5; i < 10; ++i) EXPECT_EQ(c[i], 0);
  const float bad[4] = {1.0f, std::numeric_limits<float>::infinity(), 2.0f, std::nanf("")};
  int8_t cb[4];
  float sb[2];
  QuantizeKvRowInt8(bad, 2, 2, cb, sb);
  EXPECT_TRUE(std::isnan(sb[0]));
  EXPECT_TRUE(std::isnan(sb[1]));
}

// A paged int8 pool (decoy layer first, shuffled blocks with gaps, like
// Fixture) plus the exact fp32 values it dequantizes to.
struct Int8Fixture {
  int n_heads, n_kv_heads, head_dim, block_size, n_pos;
  int64_t section = 0, stride = 0;
  std::vector<float> q, k_flat, v_flat, k_deq, v_deq;
  std::vector<float> pool;  // bytes, as floats for alignment
  std::vector<int32_t> table;

  Int8Fixture(int nh, int nkv, int hd, int bs, int n_positions, int n_tokens, uint32_t seed)
      : n_heads(nh), n_kv_heads(nkv), head_dim(hd), block_size(bs), n_pos(n_positions) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    const int kv_dim = n_kv_heads * head_dim;
    const int n_blocks = (n_pos + block_size - 1) / block_size;
    table.resize(n_blocks);
    std::iota(table.begin(), table.end(), 0);
    std::shuffle(table.begin(), table.end(), rng);
    for (int32_t& b : table) b = 2 * b + 1;
    section = KvInt8Section::Bytes(block_size, n_kv_heads, head_dim);
    EXPECT_EQ(section % 4, 0);
    stride = 4 * section;  // 2 layers x K,V
    pool.assign(size_t(stride / 4) * (2 * n_blocks + 2), std::nanf(""));
    k_flat.resize(size_t(n_pos) * kv_dim);
    v_flat.resize(k_flat.size());
    for (float& x : k_flat) x = nd(rng);
    for (float& x : v_flat) x = 3.0f * nd(rng);
    k_deq.resize(k_flat.size());
    v_deq.resize(k_flat.size());
    uint8_t* bytes = reinterpret_cast<uint8_t*>(pool.data());
    const int64_t sb = KvInt8Section::ScalesBytes(block_size, n_kv_heads);
    for (int p = 0; p < n_pos; ++p) {
      for (int which = 0; which < 2; ++which) {
        uint8_t* sec = bytes + table[p / block_size] * stride + (which == 0 ? KOff() : VOff());
        float* scales = reinterpret_cast<float*>(sec) + (p % block_size) * n_kv_heads;
        int8_t* codes = reinterpret_cast<int8_t*>(sec + sb) + (p % block_size) * kv_dim;
        const float* src = (which == 0 ? k_flat : v_flat).data() + size_t(p) * kv_dim;
        QuantizeKvRowInt8(src, n_kv_heads, head_dim, codes, scales);
        float* deq = (which == 0 ? k_deq : v_deq).data() + size_t(p) * kv_dim;
        for (int i = 0; i < kv_dim; ++i) deq[i] = scales[i / head_dim] * codes[i];
      }
    }
    q.resize(size_t(n_tokens) * n_heads * head_dim);
    for (float& x : q) x = nd(rng);
  }
  int64_t KOff() const { return 2 * section; }
  int64_t VOff() const { return 3 * section; }

  PagedAttentionArgs Args(int n_tokens, int pos0, float* out) const {
    PagedAttentionArgs a;
    a.q = q.data();
    a.out = out;
    a.n_tokens = n_tokens;
    a.pos0 = pos0;
    a.n_heads = n_heads;
    a.n_kv_heads = n_kv_heads;
    a.head_dim = head_dim;
    a.base = pool.data();
    a.block_stride = stride;
    a.k_offset = KOff();
    a.v_offset = VOff();
    a.block_size = block_size;
    a.block_table = table.data();
    a.n_blocks = static_cast<int>(table.size());
    a.kv_dtype = KvDtype::kInt8;
    return a;
  }
};

// Naive double-precision attention over contiguous K/V (`k`, `v`: [n_pos, kv_dim]).
std::vector<double> NaiveKV(const Int8Fixture& f, const std::vector<float>& k, const std::vector<float>& v,
                            int n_tokens, int pos0) {
  const int kv_dim = f.n_kv_heads * f.head_dim, qw = f.n_heads * f.head_dim, group = f.n_heads / f.n_kv_heads;
  std::vector<double> out(size_t(n_tokens) * qw, 0.0);
  for (int t = 0; t < n_tokens; ++t)
    for (int h = 0; h < f.n_heads; ++h) {
      const int n = pos0 + t + 1;
      std::vector<double> s(n);
      double mx = -1e300, z = 0.0;
      for (int p = 0; p < n; ++p) {
        double d = 0.0;
        for (int i = 0; i < f.head_dim; ++i)
          d += double{f.q[size_t(t) * qw + h * f.head_dim + i]} * k[size_t(p) * kv_dim + (h / group) * f.head_dim + i];
        s[p] = d / std::sqrt(double(f.head_dim));
        mx = std::max(mx, s[p]);
      }
      for (double& x : s) z += (x = std::exp(x - mx));
      for (int p = 0; p < n; ++p)
        for (int i = 0; i < f.head_dim; ++i)
          out[size_t(t) * qw + h * f.head_dim + i] += s[p] / z * v[size_t(p) * kv_dim + (h / group) * f.head_dim + i];
    }
  return out;
}

struct Int8Case {
  int n_heads, n_kv_heads, head_dim, block_size, n_pos, n_tokens;
};
// Odd head dims (SIMD tails: 1, 7, 33, 65 = 64 + 1), lengths crossing block
// boundaries, decode (1 token) and chunked prefill, GQA and MHA.
constexpr Int8Case kInt8Cases[] = {{2, 1, 1, 3, 7, 1},   {6, 2, 7, 5, 23, 4},  {4, 4, 16, 4, 37, 37},
                                   {3, 1, 33, 16, 50, 3}, {4, 2, 64, 16, 70, 1}, {2, 1, 65, 7, 30, 9},
                                   {8, 2, 128, 16, 33, 2}};

// int8 kernel (every SIMD level this CPU has) vs. double-precision attention
// on the dequantized values: only fp32 rounding separates them. Scores are
// sums of head_dim products of magnitude <= ~|q| * 3, outputs are O(1..3);
// 2e-5 * (1 + |want|) covers fp32 accumulation over <= 128 terms.
TEST(PagedAttentionInt8, MatchesReferenceOnDequantizedValuesEveryIsa) {
  for (const Int8Case& k : kInt8Cases) {
    Int8Fixture f(k.n_heads, k.n_kv_heads, k.head_dim, k.block_size, k.n_pos, k.n_tokens, 11 + k.head_dim);
    const int pos0 = k.n_pos - k.n_tokens;
    const std::vector<double> want = NaiveKV(f, f.k_deq, f.v_deq, k.n_tokens, pos0);
    std::vector<float> ref(f.q.size());
    PagedAttentionRef(f.Args(k.n_tokens, pos0, ref.data()));
    for (size_t i = 0; i < want.size(); ++i) ASSERT_NEAR(ref[i], want[i], 1e-6 * (1 + std::fabs(want[i]))) << i;
    int ran = 0;
    for (const char* isa : {"scalar", "avx2", "avx512"}) {
      std::vector<float> out(f.q.size(), -7.0f), scratch;
      if (!PagedAttentionInt8ForIsaForTesting(f.Args(k.n_tokens, pos0, out.data()), isa, &scratch)) continue;
      ++ran;
      for (size_t i = 0; i < want.size(); ++i)
        ASSERT_NEAR(out[i], want[i], 2e-5 * (1 + std::fabs(want[i])))
            << isa << " head_dim " << k.head_dim << " n_pos " << k.n_pos << " i " << i;
    }
    EXPECT_GE(ran, 1);
  }
}

TEST(PagedAttentionInt8, DispatchedMatchesAndThreadingKeepsBits) {
  ThreadPool pool(2);
  for (const Int8Case& k : kInt8Cases) {
    Int8Fixture f(k.n_heads, k.n_kv_heads, k.head_dim, k.block_size, k.n_pos, k.n_tokens, 5 + k.n_pos);
    const int pos0 = k.n_pos - k.n_tokens;
    std::vector<float> a(f.q.size(), -1.0f), b(f.q.size(), -2.0f), ref(f.q.size()), scratch;
    PagedAttention(f.Args(k.n_tokens, pos0, a.data()), nullptr, &scratch);
    PagedAttention(f.Args(k.n_tokens, pos0, b.data()), &pool, &scratch);
    PagedAttentionRef(f.Args(k.n_tokens, pos0, ref.data()));
    for (size_t i = 0; i < a.size(); ++i) {
      ASSERT_EQ(a[i], b[i]) << "threading changed the result at " << i;
      ASSERT_NEAR(a[i], ref[i], 2e-5 * (1 + std::fabs(ref[i]))) << i;
    }
  }
}

// int8 vs. the original fp32 K/V. A rigorous bound per (token, head): every
// K element is off by <= s_k / 2 (s_k = that position's K scale), so score
// p moves by at most delta_p = sum_i |q_i| * s_k,p / 2 / sqrt(d); with
// Delta = max_p delta_p the softmax weights satisfy sum_p |w'_p - w_p| <=
// e^(2 Delta) - 1, and each V element is off by <= s_v / 2, so
// |out' - out| <= (e^(2 Delta) - 1) * max|v'| + max_p s_v,p / 2.
// On unit-normal data this bound is ~0.02..0.1; the observed error is far
// smaller, so the mean error is also checked against a tighter empirical cap.
TEST(PagedAttentionInt8, WithinQuantizationBoundOfFp32KV) {
  for (const Int8Case& k : kInt8Cases) {
    Int8Fixture f(k.n_heads, k.n_kv_heads, k.head_dim, k.block_size, k.n_pos, k.n_tokens, 3 + k.n_pos);
    const int pos0 = k.n_pos - k.n_tokens;
    const int kv_dim = k.n_kv_heads * k.head_dim, qw = k.n_heads * k.head_dim, group = k.n_heads / k.n_kv_heads;
    const std::vector<double> exact = NaiveKV(f, f.k_flat, f.v_flat, k.n_tokens, pos0);
    std::vector<float> out(f.q.size()), scratch;
    PagedAttention(f.Args(k.n_tokens, pos0, out.data()), nullptr, &scratch);
    auto head_amax = [&](const std::vector<float>& x, int p, int kvh) {
      float m = 0.0f;
      for (int i = 0; i < k.head_dim; ++i) m = std::max(m, std::fabs(x[size_t(p) * kv_dim + kvh * k.head_dim + i]));
      return double{m};
    };
    double sum_err = 0.0;
    for (int t = 0; t < k.n_tokens; ++t)
      for (int h = 0; h < k.n_heads; ++h) {
        const int kvh = h / group, n = pos0 + t + 1;
        double q1 = 0.0;
        for (int i = 0; i < k.head_dim; ++i) q1 += std::fabs(f.q[size_t(t) * qw + h * k.head_dim + i]);
        double delta = 0.0, vmax = 0.0, sv = 0.0;
        for (int p = 0; p < n; ++p) {
          delta = std::max(delta, q1 * head_amax(f.k_flat, p, kvh) / 127.0 / 2.0 / std::sqrt(double(k.head_dim)));
          vmax = std::max(vmax, head_amax(f.v_deq, p, kvh));
          sv = std::max(sv, head_amax(f.v_flat, p, kvh) / 127.0 / 2.0);
        }
        const double bound = std::expm1(2 * delta) * vmax + sv + 1e-5;
        for (int i = 0; i < k.head_dim; ++i) {
          const size_t j = size_t(t) * qw + h * k.head_dim + i;
          const double err = std::fabs(out[j] - exact[j]);
          ASSERT_LE(err, bound) << "head_dim " << k.head_dim << " t " << t << " h " << h << " i " << i;
          sum_err += err;
        }
      }
    // Empirical: mean |error| ~ 1e-3 for V of std 3 (the V rounding error
    // s_v / sqrt(12) averaged by the softmax); 1e-2 catches a broken scale.
    EXPECT_LT(sum_err / out.size(), 1e-2) << "head_dim " << k.head_dim;
  }
}
// ---------------------------------------------------------------------------
// Tiled (flash-style) kernel: shapes that stress it, every SIMD level, and the
// bit-identity invariants it promises.

// A shape: heads, kv heads (GQA ratio n_heads / n_kv_heads), head_dim, block
// size, cached positions, query tokens (the last n_tokens positions).
struct Shape {
  int n_heads, n_kv_heads, head_dim, block_size, n_pos, n_tokens;
};
// GQA ratios 1 / 3 / 4; head dims with every SIMD tail (1, 7, 17, 33, 65, 80);
// lengths crossing the 64-position K/V tiles (63, 64, 65, 130, 200); pos0 > 0
// (chunked prefill) and pos0 == 0; block sizes 1, 5, 16, 64, 128.
constexpr Shape kShapes[] = {
    {3, 1, 1, 1, 9, 9},       {4, 4, 7, 5, 65, 65},     {6, 2, 17, 16, 130, 40}, {8, 2, 33, 64, 200, 1},
    {9, 3, 64, 16, 130, 130}, {4, 1, 65, 5, 64, 3},     {3, 3, 80, 128, 63, 20}, {12, 4, 64, 7, 100, 17},
    {8, 2, 128, 16, 70, 70},
};

// Paged fp32 or int8 pool for a Shape: decoy layer first, shuffled blocks
// with gaps, unused slots NaN; k_val / v_val are the exact values the kernel
// reads (the dequantized ones for int8).
struct ShapeFixture {
  Shape sh;
  bool i8;
  int64_t sec = 0;  // one K or V section: floats (fp32) or bytes (int8)
  std::vector<float> q, k_val, v_val, pool;
  std::vector<int32_t> table;

  ShapeFixture(const Shape& s, bool int8, uint32_t seed, float q_gain = 1.0f) : sh(s), i8(int8) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    const int kv_dim = sh.n_kv_heads * sh.head_dim;
    const int n_blocks = (sh.n_pos + sh.block_size - 1) / sh.block_size;
    table.resize(n_blocks);
    std::iota(table.begin(), table.end(), 0);
    std::shuffle(table.begin(), table.end(), rng);
    for (int32_t& b : table) b = 2 * b + 1;
    sec = i8 ? KvInt8Section::Bytes(sh.block_size, sh.n_kv_heads, sh.head_dim) : int64_t{sh.block_size} * kv_dim;
    const int64_t stride_floats = i8 ? sec : 4 * sec;  // 2 layers x K,V (int8: 4 * sec bytes)
    pool.assign(size_t(stride_floats) * (2 * n_blocks + 2), std::nanf(""));
    k_val.resize(size_t(sh.n_pos) * kv_dim);
    v_val.resize(k_val.size());
    std::vector<float> src(kv_dim);
    for (int p = 0; p < sh.n_pos; ++p)
      for (int which = 0; which < 2; ++which) {
        for (float& x : src) x = nd(rng);
        float* val = (which == 0 ? k_val : v_val).data() + size_t(p) * kv_dim;
        const int64_t off = which == 0 ? KOff() : VOff();
        const int slot = p % sh.block_size;
        if (!i8) {
          std::copy(src.begin(), src.end(), val);
          std::copy(src.begin(), src.end(), pool.data() + table[p / sh.block_size] * BlockStride() + off + slot * kv_dim);
          continue;
        }
        uint8_t* sec_ptr = reinterpret_cast<uint8_t*>(pool.data()) + table[p / sh.block_size] * BlockStride() + off;
        float* scales = reinterpret_cast<float*>(sec_ptr) + slot * sh.n_kv_heads;
        int8_t* codes = reinterpret_cast<int8_t*>(sec_ptr + KvInt8Section::ScalesBytes(sh.block_size, sh.n_kv_heads)) +
                        slot * kv_dim;
        QuantizeKvRowInt8(src.data(), sh.n_kv_heads, sh.head_dim, codes, scales);
        for (int i = 0; i < kv_dim; ++i) val[i] = scales[i / sh.head_dim] * codes[i];
      }
    q.resize(size_t(sh.n_tokens) * sh.n_heads * sh.head_dim);
    for (float& x : q) x = q_gain * nd(rng);
  }
  int64_t BlockStride() const { return 4 * sec; }
  int64_t KOff() const { return 2 * sec; }
  int64_t VOff() const { return 3 * sec; }
  int Pos0() const { return sh.n_pos - sh.n_tokens; }

  // Args for query rows [t0, t0 + n) (a chunk of the prefill).
  PagedAttentionArgs Args(float* out, int t0 = 0, int n = -1) const {
    PagedAttentionArgs a;
    a.q = q.data() + size_t(t0) * sh.n_heads * sh.head_dim;
    a.out = out + size_t(t0) * sh.n_heads * sh.head_dim;
    a.n_tokens = n < 0 ? sh.n_tokens : n;
    a.pos0 = Pos0() + t0;
    a.n_heads = sh.n_heads;
    a.n_kv_heads = sh.n_kv_heads;
    a.head_dim = sh.head_dim;
    a.base = pool.data();
    a.block_stride = BlockStride();
    a.k_offset = KOff();
    a.v_offset = VOff();
    a.block_size = sh.block_size;
    a.block_table = table.data();
    a.n_blocks = static_cast<int>(table.size());
    a.kv_dtype = i8 ? KvDtype::kInt8 : KvDtype::kF32;
    return a;
  }
};

// Double-precision attention from the definition over contiguous K/V values.
std::vector<double> NaiveShape(const ShapeFixture& f) {
  const Shape& s = f.sh;
  const int kv_dim = s.n_kv_heads * s.head_dim, qw = s.n_heads * s.head_dim, group = s.n_heads / s.n_kv_heads;
  std::vector<double> out(size_t(s.n_tokens) * qw, 0.0), w;
  for (int t = 0; t < s.n_tokens; ++t)
    for (int h = 0; h < s.n_heads; ++h) {
      const int n = f.Pos0() + t + 1;
      const size_t kh = size_t(h / group) * s.head_dim;
      w.assign(n, 0.0);
      double mx = -1e300, z = 0.0;
      for (int p = 0; p < n; ++p) {
        double d = 0.0;
        for (int i = 0; i < s.head_dim; ++i)
          d += double{f.q[size_t(t) * qw + h * s.head_dim + i]} * f.k_val[size_t(p) * kv_dim + kh + i];
        w[p] = d / std::sqrt(double(s.head_dim));
        mx = std::max(mx, w[p]);
      }
      for (double& x : w) z += (x = std::exp(x - mx));
      for (int p = 0; p < n; ++p)
        for (int i = 0; i < s.head_dim; ++i)
          out[size_t(t) * qw + h * s.head_dim + i] += w[p] / z * f.v_val[size_t(p) * kv_dim + kh + i];
    }
  return out;
}

// fp32 rounding only: scores are dots of <= 128 unit-normal products (|s| ~ 1..40
// with q_gain 4, rounding ~1e-6 relative), softmax over <= 200 terms, the
// polynomial exp ~2 ulp; outputs O(1). 3e-5 * (1 + |want|) absolute.
constexpr double kTiledTol = 3e-5;

TEST(TiledAttention, MatchesDoubleReferenceEveryIsaDtypeAndShape) {
  ThreadPool pool(2);
  for (bool i8 : {false, true}) {
    for (float gain : {1.0f, 4.0f}) {  // gain 4: peaked softmax, the running max moves a lot
      for (const Shape& s : kShapes) {
        const ShapeFixture f(s, i8, 100 + s.head_dim + s.n_pos, gain);
        const std::vector<double> want = NaiveShape(f);
        int ran = 0;
        for (const char* isa : {"scalar", "avx2", "avx512"}) {
          std::vector<float> out(f.q.size(), -7.0f), scratch;
          if (!PagedAttentionForIsaForTesting(f.Args(out.data()), isa, &pool, &scratch)) continue;
          ++ran;
          for (size_t i = 0; i < want.size(); ++i)
            ASSERT_NEAR(out[i], want[i], kTiledTol * (1 + std::fabs(want[i])))
                << isa << (i8 ? " int8" : " fp32") << " gain " << gain << " heads " << s.n_heads << "/"
                << s.n_kv_heads << " head_dim " << s.head_dim << " n_pos " << s.n_pos << " i " << i;
        }
        EXPECT_GE(ran, 1);
      }
    }
  }
}

// Each query row's bits depend only on its q and the K/V it sees: chunked
// prefill (chunks of 1, 7, 64 rows: decode-sized to tile-sized) == one shot
// == single-threaded, on every SIMD level and both dtypes.
TEST(TiledAttention, ChunkingAndThreadsKeepBitsEveryIsa) {
  ThreadPool pool(2);
  for (bool i8 : {false, true}) {
    for (const Shape& s : kShapes) {
      const ShapeFixture f(s, i8, 7 + s.n_pos);
      for (const char* isa : {"scalar", "avx2", "avx512"}) {
        std::vector<float> whole(f.q.size()), scratch;
        if (!PagedAttentionForIsaForTesting(f.Args(whole.data()), isa, &pool, &scratch)) continue;
        for (int chunk : {1, 7, 64}) {
          std::vector<float> part(f.q.size(), -1.0f);
          for (int t0 = 0; t0 < s.n_tokens; t0 += chunk) {
            const int n = std::min(chunk, s.n_tokens - t0);
            ASSERT_TRUE(PagedAttentionForIsaForTesting(f.Args(part.data(), t0, n), isa, chunk == 7 ? &pool : nullptr,
                                                       &scratch));
          }
          for (size_t i = 0; i < part.size(); ++i)
            ASSERT_EQ(part[i], whole[i]) << isa << (i8 ? " int8" : " fp32") << " chunk " << chunk << " head_dim "
                                         << s.head_dim << " n_pos " << s.n_pos << " i " << i;
        }
      }
    }
  }
}

// The contiguous kernel (the decoder's Forward path) equals the paged one bit
// for bit on equal K/V, and is itself checked against the double reference.
TEST(TiledAttention, ContiguousEqualsPagedAndReference) {
  ThreadPool pool(2);
  for (const char* isa : {"scalar", "avx2", "avx512"}) {
    if (!ForceIsaForTesting(isa)) continue;
    for (const Shape& s : kShapes) {
      const ShapeFixture f(s, /*int8=*/false, 3 + s.n_pos);
      std::vector<float> paged(f.q.size()), contig(f.q.size(), -3.0f), scratch;
      PagedAttention(f.Args(paged.data()), &pool, &scratch);
      ContiguousAttention(f.q.data(), f.k_val.data(), f.v_val.data(), contig.data(), s.n_tokens, f.Pos0(), s.n_heads,
                          s.n_kv_heads, s.head_dim, &pool, &scratch);
      const std::vector<double> want = NaiveShape(f);
      for (size_t i = 0; i < paged.size(); ++i) {
        ASSERT_EQ(contig[i], paged[i]) << isa << " head_dim " << s.head_dim << " n_pos " << s.n_pos << " i " << i;
        ASSERT_NEAR(contig[i], want[i], kTiledTol * (1 + std::fabs(want[i]))) << isa << " i " << i;
      }
    }
  }
  ForceIsaForTesting("");
}

// Every SIMD level follows one canonical fp32 operation order (see
// paged_attention_tiled.h), so the outputs are bit-identical across ISAs:
// fp32 and int8 K/V, odd head counts / head dims / positions, prefill
// (pos0 == 0), chunk (pos0 > 0) and decode (one row over a long context),
// flat and peaked softmax, with and without the thread pool.
TEST(TiledAttention, BitIdenticalAcrossIsas) {
  ThreadPool pool(2);
  std::vector<Shape> shapes(std::begin(kShapes), std::end(kShapes));
  shapes.push_back({5, 5, 3, 3, 11, 11});     // odd heads, tiny head_dim, prefill
  shapes.push_back({7, 1, 31, 9, 150, 1});    // decode, 7:1 GQA, odd head_dim
  shapes.push_back({15, 5, 49, 13, 97, 33});  // odd everything, chunk at pos0 64
  shapes.push_back({9, 3, 64, 16, 257, 1});   // decode past four tiles (SmolLM2-like head_dim)
  shapes.push_back({2, 1, 96, 32, 129, 129}); // prefill, head_dim 96 (16-lane tail of 0, 32 of 0)
  // AVX-512 runs the 2..4 heads of a GQA group together (ScoresTRows/PvRows): groups of 2 and 4,
  // decode and a 3-token chunk, head_dim with a 64-column part and a tail.
  shapes.push_back({8, 2, 80, 16, 200, 1});
  shapes.push_back({4, 2, 64, 8, 70, 3});
  int compared = 0;
  for (bool i8 : {false, true}) {
    for (float gain : {1.0f, 4.0f}) {
      for (const Shape& s : shapes) {
        const ShapeFixture f(s, i8, 900 + s.head_dim + s.n_pos, gain);
        std::vector<float> first;
        const char* first_isa = nullptr;
        for (const char* isa : {"scalar", "avx2", "avx512"}) {
          std::vector<float> out(f.q.size(), -5.0f), scratch;
          if (!PagedAttentionForIsaForTesting(f.Args(out.data()), isa, s.n_tokens > 1 ? &pool : nullptr, &scratch))
            continue;
          if (first_isa == nullptr) {
            first = out;
            first_isa = isa;
            continue;
          }
          ++compared;
          for (size_t i = 0; i < out.size(); ++i)
            ASSERT_EQ(std::bit_cast<uint32_t>(out[i]), std::bit_cast<uint32_t>(first[i]))
                << isa << " vs " << first_isa << (i8 ? " int8" : " fp32") << " gain " << gain << " heads "
                << s.n_heads << "/" << s.n_kv_heads << " head_dim " << s.head_dim << " n_pos " << s.n_pos
                << " n_tokens " << s.n_tokens << " i " << i << ": " << out[i] << " vs " << first[i];
        }
      }
    }
  }
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    EXPECT_GT(compared, 0);
  }
#endif
}

// Transposed K (paged k_transposed and contiguous k_t) gives the bits of
// row-major K at every ISA, block size (multiples of 16: read in place by
// AVX-512; 1, 5, 7: copied), decode / chunk / prefill, with and without
// threads; unused K^T slots hold NaN and must never leak into the output.
TEST(TiledAttention, TransposedKEqualsRowMajorK) {
  ThreadPool pool(2);
  std::vector<Shape> shapes(std::begin(kShapes), std::end(kShapes));
  shapes.push_back({9, 3, 64, 16, 257, 1});
  shapes.push_back({8, 2, 80, 32, 200, 1});
  shapes.push_back({4, 2, 64, 48, 70, 3});
  int compared = 0;
  for (const char* isa : {"scalar", "avx2", "avx512"}) {
    if (!ForceIsaForTesting(isa)) continue;
    for (const Shape& s : shapes) {
      const ShapeFixture f(s, /*int8=*/false, 77 + s.n_pos + s.head_dim);
      const int bs = s.block_size, hd = s.head_dim, nkv = s.n_kv_heads, kv_dim = nkv * hd;
      // The pool with every K section rewritten as [kv head][dim][slot] (unused slots NaN).
      std::vector<float> tpool = f.pool;
      for (size_t b = 0; b < f.table.size(); ++b) {
        float* sec = tpool.data() + f.table[b] * f.BlockStride() + f.KOff();
        std::fill(sec, sec + int64_t{bs} * kv_dim, std::nanf(""));
        for (int slot = 0; slot < bs; ++slot) {
          const int p = int(b) * bs + slot;
          if (p >= s.n_pos) break;
          for (int h = 0; h < nkv; ++h)
            for (int i = 0; i < hd; ++i)
              sec[(int64_t{h} * hd + i) * bs + slot] = f.k_val[size_t(p) * kv_dim + h * hd + i];
        }
      }
      std::vector<float> kt(size_t(ContiguousKtFloats(s.n_pos, nkv, hd)), std::nanf(""));
      WriteContiguousKt(f.k_val.data(), s.n_pos, 0, nkv, hd, kt.data());
      for (ThreadPool* tp : {static_cast<ThreadPool*>(nullptr), &pool}) {
        std::vector<float> want(f.q.size(), -1.0f), paged_t(f.q.size(), -2.0f), contig_t(f.q.size(), -3.0f), scratch;
        PagedAttention(f.Args(want.data()), tp, &scratch);
        PagedAttentionArgs a = f.Args(paged_t.data());
        a.base = tpool.data();
        a.k_transposed = true;
        PagedAttention(a, tp, &scratch);
        ContiguousAttention(f.q.data(), nullptr, f.v_val.data(), contig_t.data(), s.n_tokens, f.Pos0(), s.n_heads, nkv,
                            hd, tp, &scratch, kt.data());
        for (size_t i = 0; i < want.size(); ++i) {
          ASSERT_EQ(std::bit_cast<uint32_t>(paged_t[i]), std::bit_cast<uint32_t>(want[i]))
              << isa << " paged bs " << bs << " head_dim " << hd << " n_pos " << s.n_pos << " n_tokens "
              << s.n_tokens << " i " << i << ": " << paged_t[i] << " vs " << want[i];
          ASSERT_EQ(std::bit_cast<uint32_t>(contig_t[i]), std::bit_cast<uint32_t>(want[i]))
              << isa << " contiguous head_dim " << hd << " n_pos " << s.n_pos << " i " << i;
        }
        // The double reference reads the transposed layout too.
        std::vector<float> ref(f.q.size());
        PagedAttentionArgs r = a;
        r.out = ref.data();
        PagedAttentionRef(r);
        for (size_t i = 0; i < want.size(); ++i) ASSERT_NEAR(ref[i], want[i], kTiledTol * (1 + std::fabs(ref[i])));
        ++compared;
      }
    }
  }
  ForceIsaForTesting("");
  EXPECT_GT(compared, 0);
}

// int8 K with transposed codes (k_transposed): the bits of row-major int8 K
// at every ISA and block size (scales unchanged, codes [kv head][dim][slot]).
TEST(TiledAttention, TransposedInt8KEqualsRowMajor) {
  ThreadPool pool(2);
  std::vector<Shape> shapes(std::begin(kShapes), std::end(kShapes));
  shapes.push_back({9, 3, 64, 16, 257, 1});
  int compared = 0;
  for (const Shape& s : shapes) {
    const ShapeFixture f(s, /*int8=*/true, 313 + s.n_pos + s.head_dim);
    const int bs = s.block_size, kv_dim = s.n_kv_heads * s.head_dim;
    std::vector<float> tpool = f.pool;
    const int64_t scales = KvInt8Section::ScalesBytes(bs, s.n_kv_heads);
    for (size_t b = 0; b < f.table.size(); ++b) {
      const uint8_t* src = reinterpret_cast<const uint8_t*>(f.pool.data()) + f.table[b] * f.BlockStride() + f.KOff();
      uint8_t* dst = reinterpret_cast<uint8_t*>(tpool.data()) + f.table[b] * f.BlockStride() + f.KOff();
      for (int slot = 0; slot < bs; ++slot)
        for (int e = 0; e < kv_dim; ++e) dst[scales + int64_t{e} * bs + slot] = src[scales + int64_t{slot} * kv_dim + e];
    }
    for (const char* isa : {"scalar", "avx2", "avx512"}) {
      for (ThreadPool* tp : {static_cast<ThreadPool*>(nullptr), &pool}) {
        std::vector<float> want(f.q.size(), -1.0f), got(f.q.size(), -2.0f), scratch;
        if (!PagedAttentionForIsaForTesting(f.Args(want.data()), isa, tp, &scratch)) continue;
        PagedAttentionArgs a = f.Args(got.data());
        a.base = tpool.data();
        a.k_transposed = true;
        ASSERT_TRUE(PagedAttentionForIsaForTesting(a, isa, tp, &scratch));
        ++compared;
        for (size_t i = 0; i < want.size(); ++i)
          ASSERT_EQ(std::bit_cast<uint32_t>(got[i]), std::bit_cast<uint32_t>(want[i]))
              << isa << " bs " << bs << " head_dim " << s.head_dim << " n_pos " << s.n_pos << " i " << i;
        // The double reference reads the transposed codes too.
        std::vector<float> ref(f.q.size());
        a.out = ref.data();
        PagedAttentionRef(a);
        for (size_t i = 0; i < want.size(); ++i) ASSERT_NEAR(ref[i], want[i], kTiledTol * (1 + std::fabs(ref[i]))) << i;
      }
    }
  }
  EXPECT_GT(compared, 0);
}

// fp16 K/V (kF16): the exact widening of fp16 means the kernel computes the
// fp32 kernel's bits on the fp16-rounded values, at every ISA and block size
// (in place at multiples of 16, copied otherwise), with and without threads.
TEST(TiledAttention, F16KvIsTheF32KernelOnRoundedValues) {
  ThreadPool pool(2);
  std::vector<Shape> shapes(std::begin(kShapes), std::end(kShapes));
  shapes.push_back({9, 3, 64, 16, 257, 1});
  shapes.push_back({8, 2, 80, 32, 200, 1});
  int compared = 0;
  for (const Shape& s : shapes) {
    const ShapeFixture f(s, /*int8=*/false, 501 + s.n_pos + s.head_dim);
    const int bs = s.block_size, hd = s.head_dim, nkv = s.n_kv_heads, kv_dim = nkv * hd;
    const int n_blocks = static_cast<int>(f.table.size());
    // Pools: fp16 (K^T, V rows; unused slots NaN) and fp32 (the rounded values, K^T, V rows).
    const int64_t sec16 = int64_t{bs} * kv_dim * 2, stride16 = 4 * sec16;  // 2 layers x K,V (bytes)
    const int64_t sec32 = int64_t{bs} * kv_dim, stride32 = 4 * sec32;      // floats
    std::vector<uint16_t> pool16(size_t(stride16 / 2) * (2 * n_blocks + 2), 0x7e00);
    std::vector<float> pool32(size_t(stride32) * (2 * n_blocks + 2), std::nanf(""));
    for (int p = 0; p < s.n_pos; ++p) {
      const int blk = f.table[p / bs], slot = p % bs;
      for (int e = 0; e < kv_dim; ++e) {
        const uint16_t kh = Fp32ToFp16(f.k_val[size_t(p) * kv_dim + e]);
        const uint16_t vh = Fp32ToFp16(f.v_val[size_t(p) * kv_dim + e]);
        pool16[size_t(blk * stride16 / 2 + 2 * sec16 / 2 + int64_t{e} * bs + slot)] = kh;
        pool16[size_t(blk * stride16 / 2 + 3 * sec16 / 2 + int64_t{slot} * kv_dim + e)] = vh;
        pool32[size_t(blk * stride32 + 2 * sec32 + int64_t{e} * bs + slot)] = Fp16ToFp32(kh);
        pool32[size_t(blk * stride32 + 3 * sec32 + int64_t{slot} * kv_dim + e)] = Fp16ToFp32(vh);
      }
    }
    PagedAttentionArgs a16 = f.Args(nullptr), a32 = f.Args(nullptr);
    a16.base = reinterpret_cast<const float*>(pool16.data());
    a16.block_stride = stride16;
    a16.k_offset = 2 * sec16;
    a16.v_offset = 3 * sec16;
    a16.kv_dtype = KvDtype::kF16;
    a16.k_transposed = true;
    a32.base = pool32.data();
    a32.block_stride = stride32;
    a32.k_offset = 2 * sec32;
    a32.v_offset = 3 * sec32;
    a32.k_transposed = true;
    std::vector<float> want(f.q.size(), -1.0f), ref(f.q.size());
    std::vector<float> scratch;
    a32.out = want.data();
    ASSERT_TRUE(PagedAttentionForIsaForTesting(a32, "scalar", nullptr, &scratch));
    PagedAttentionArgs r = a16;
    r.out = ref.data();
    PagedAttentionRef(r);
    for (size_t i = 0; i < want.size(); ++i) ASSERT_NEAR(ref[i], want[i], kTiledTol * (1 + std::fabs(ref[i]))) << i;
    // The contiguous fp16 layout (WriteContiguousF16 + ContiguousAttentionF16).
    std::vector<uint16_t> kt16(size_t(ContiguousKtFloats(s.n_pos, nkv, hd)), 0x7e00), v16(size_t(s.n_pos) * kv_dim);
    WriteContiguousF16(f.k_val.data(), f.v_val.data(), s.n_pos, 0, nkv, hd, kt16.data(), v16.data());
    for (const char* isa : {"scalar", "avx2", "avx512"}) {
      if (ForceIsaForTesting(isa)) {
        std::vector<float> got(f.q.size(), -4.0f);
        ContiguousAttentionF16(f.q.data(), kt16.data(), v16.data(), got.data(), s.n_tokens, f.Pos0(), s.n_heads, nkv,
                               hd, &pool, &scratch);
        for (size_t i = 0; i < want.size(); ++i)
          ASSERT_EQ(std::bit_cast<uint32_t>(got[i]), std::bit_cast<uint32_t>(want[i])) << isa << " contiguous " << i;
        ForceIsaForTesting("");
      }
      for (ThreadPool* tp : {static_cast<ThreadPool*>(nullptr), &pool}) {
        std::vector<float> got(f.q.size(), -2.0f);
        a16.out = got.data();
        if (!PagedAttentionForIsaForTesting(a16, isa, tp, &scratch)) continue;
        ++compared;
        for (size_t i = 0; i < want.size(); ++i)
          ASSERT_EQ(std::bit_cast<uint32_t>(got[i]), std::bit_cast<uint32_t>(want[i]))
              << isa << " bs " << bs << " head_dim " << hd << " n_pos " << s.n_pos << " n_tokens " << s.n_tokens
              << " i " << i << ": " << got[i] << " vs " << want[i];
      }
    }
  }
  EXPECT_GT(compared, 0);
  // fp16 K without the transposed layout is malformed: NaN, nothing read.
  const ShapeFixture f(kShapes[2], false, 9);
  std::vector<float> out(f.q.size(), 0.0f), scratch;
  PagedAttentionArgs bad = f.Args(out.data());
  bad.kv_dtype = KvDtype::kF16;
  PagedAttention(bad, nullptr, &scratch);
  EXPECT_TRUE(std::isnan(out[0]));
}

// Malformed shapes read nothing and yield NaN instead of crashing.
TEST(TiledAttention, MalformedArgsGiveNanWithoutReading) {
  const ShapeFixture f({6, 2, 16, 4, 20, 5}, false, 1);
  std::vector<float> out(f.q.size()), scratch;
  auto expect_nan = [&](PagedAttentionArgs a, const char* what) {
    std::fill(out.begin(), out.end(), 0.0f);
    a.out = out.data();
    PagedAttention(a, nullptr, &scratch);
    for (float x : out) ASSERT_TRUE(std::isnan(x)) << what;
  };
  PagedAttentionArgs a = f.Args(out.data());
  a.n_blocks = 4;  // covers 16 < 20 positions
  expect_nan(a, "short block table");
  a = f.Args(out.data());
  a.n_kv_heads = 4;  // 6 % 4 != 0
  expect_nan(a, "n_heads not a multiple of n_kv_heads");
  a = f.Args(out.data());
  a.block_size = 0;
  expect_nan(a, "block_size 0");
  a = f.Args(out.data());
  a.pos0 = -1;
  expect_nan(a, "negative pos0");
  std::fill(out.begin(), out.end(), 0.0f);
  ContiguousAttention(f.q.data(), nullptr, f.v_val.data(), out.data(), 5, 15, 6, 2, 16, nullptr, &scratch);
  for (float x : out) ASSERT_TRUE(std::isnan(x)) << "null k_cache";
}

}  // namespace
}  // namespace nibble::cpu
