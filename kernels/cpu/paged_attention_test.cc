#include "kernels/cpu/paged_attention.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <vector>

#include "gtest/gtest.h"
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

}  // namespace
}  // namespace nibble::cpu
