#include "kernels/cpu/paged_attention.h"

#include <algorithm>
#include <cmath>

#include "kernels/cpu/ops.h"
#include "kernels/cpu/thread_pool.h"

namespace nibble::cpu {
namespace {

inline const float* Row(const PagedAttentionArgs& a, int64_t offset, int p) {
  const int64_t kv_dim = int64_t{a.n_kv_heads} * a.head_dim;
  return a.base + int64_t{a.block_table[p / a.block_size]} * a.block_stride + offset +
         int64_t{p % a.block_size} * kv_dim;
}

// One (query row, head) pair; `att` holds >= pos0 + t + 1 floats.
void OneHead(const PagedAttentionArgs& a, int t, int h, float scale, float* att) {
  const int group = a.n_heads / a.n_kv_heads;
  const int64_t q_width = int64_t{a.n_heads} * a.head_dim;
  const int64_t head_off = int64_t{h / group} * a.head_dim;
  const int n_keys = a.pos0 + t + 1;
  const float* q = a.q + t * q_width + int64_t{h} * a.head_dim;
  for (int p = 0; p < n_keys; ++p) att[p] = DotF32(q, Row(a, a.k_offset, p) + head_off, a.head_dim) * scale;
  Softmax(att, n_keys);
  float* o = a.out + t * q_width + int64_t{h} * a.head_dim;
  std::fill(o, o + a.head_dim, 0.0f);
  for (int p = 0; p < n_keys; ++p) {
    const float* v = Row(a, a.v_offset, p) + head_off;
    const float w = att[p];
    for (int d = 0; d < a.head_dim; ++d) o[d] += w * v[d];
  }
}

}  // namespace

void PagedAttention(const PagedAttentionArgs& a, ThreadPool* pool, std::vector<float>* scores) {
  if (a.n_tokens <= 0 || a.n_heads <= 0) return;
  const int total = a.pos0 + a.n_tokens;
  const float scale = 1.0f / std::sqrt(static_cast<float>(a.head_dim));
  const int64_t work = int64_t{a.n_tokens} * a.n_heads;
  // Small problems (decode over short contexts) are not worth a fork/join.
  const int64_t flops = work * total * a.head_dim;
  const int threads = pool != nullptr && flops >= (int64_t{1} << 18) ? pool->size() : 1;
  if (scores->size() < size_t(threads) * total) scores->resize(size_t(threads) * total);
  if (threads == 1) {
    for (int64_t i = 0; i < work; ++i)
      OneHead(a, static_cast<int>(i / a.n_heads), static_cast<int>(i % a.n_heads), scale, scores->data());
    return;
  }
  pool->ParallelFor(work, 1, [&](int thread, int64_t b, int64_t e) {
    float* att = scores->data() + int64_t{thread} * total;
    for (int64_t i = b; i < e; ++i)
      OneHead(a, static_cast<int>(i / a.n_heads), static_cast<int>(i % a.n_heads), scale, att);
  });
}

void PagedAttentionRef(const PagedAttentionArgs& a) {
  const int group = a.n_heads / a.n_kv_heads;
  const int64_t q_width = int64_t{a.n_heads} * a.head_dim;
  const double scale = 1.0 / std::sqrt(static_cast<double>(a.head_dim));
  std::vector<double> s, o(a.head_dim);
  for (int t = 0; t < a.n_tokens; ++t) {
    for (int h = 0; h < a.n_heads; ++h) {
      const int64_t head_off = int64_t{h / group} * a.head_dim;
      const int n_keys = a.pos0 + t + 1;
      const float* q = a.q + t * q_width + int64_t{h} * a.head_dim;
      s.assign(n_keys, 0.0);
      double mx = -1e300;
      for (int p = 0; p < n_keys; ++p) {
        const float* k = Row(a, a.k_offset, p) + head_off;
        double d = 0.0;
        for (int i = 0; i < a.head_dim; ++i) d += double{q[i]} * k[i];
        s[p] = d * scale;
        mx = std::max(mx, s[p]);
      }
      double z = 0.0;
      for (double& x : s) z += (x = std::exp(x - mx));
      std::fill(o.begin(), o.end(), 0.0);
      for (int p = 0; p < n_keys; ++p) {
        const float* v = Row(a, a.v_offset, p) + head_off;
        for (int i = 0; i < a.head_dim; ++i) o[i] += s[p] / z * v[i];
      }
      float* out = a.out + t * q_width + int64_t{h} * a.head_dim;
      for (int i = 0; i < a.head_dim; ++i) out[i] = static_cast<float>(o[i]);
    }
  }
}

}  // namespace nibble::cpu
