#include "kernels/cpu/paged_attention.h"

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <string_view>

#include "kernels/common/fp16.h"
#include "kernels/cpu/ops.h"
#include "kernels/cpu/paged_attention_tiled.h"
#include "kernels/cpu/thread_pool.h"

namespace nibble::cpu {
namespace {

inline const float* Row(const PagedAttentionArgs& a, int64_t offset, int p) {
  const int64_t kv_dim = int64_t{a.n_kv_heads} * a.head_dim;
  return a.base + int64_t{a.block_table[p / a.block_size]} * a.block_stride + offset +
         int64_t{p % a.block_size} * kv_dim;
}

// int8 rows: the (scale, codes) of kv head `kvh` at position p in the section at `offset` (bytes).
struct I8Row {
  float scale;
  const int8_t* codes;
};
// (k_transposed K sections: codes[kvh][dim][slot]; `codes` then points at
// dimension 0 of this slot and the dimension stride is block_size.)
inline I8Row RowI8(const PagedAttentionArgs& a, int64_t offset, int p, int kvh) {
  const uint8_t* sec = reinterpret_cast<const uint8_t*>(a.base) +
                       int64_t{a.block_table[p / a.block_size]} * a.block_stride + offset;
  const int slot = p % a.block_size;
  float scale;
  std::memcpy(&scale, sec + (int64_t{slot} * a.n_kv_heads + kvh) * 4, sizeof(float));
  const int8_t* base = reinterpret_cast<const int8_t*>(sec + KvInt8Section::ScalesBytes(a.block_size, a.n_kv_heads));
  const int8_t* codes = a.k_transposed && offset == a.k_offset
                            ? base + int64_t{kvh} * a.head_dim * a.block_size + slot
                            : base + (int64_t{slot} * a.n_kv_heads + kvh) * a.head_dim;
  return {scale, codes};
}

using internal::AttnIsa;

// The fp32 / int8 level follows the fp32 ops' dispatch (ActiveIsa(), which
// honours NIBBLE_FORCE_ISA and ForceIsaForTesting).
AttnIsa ActiveAttnIsa() {
  const std::string_view s = ActiveIsa();
  return s == "avx512" ? AttnIsa::kAvx512 : s == "avx2" ? AttnIsa::kAvx2 : AttnIsa::kScalar;
}

bool ParseIsa(const char* isa, AttnIsa* out) {
  const std::string_view s = isa;
  if (s == "scalar") {
    *out = AttnIsa::kScalar;
    return true;
  }
#if defined(__x86_64__)
  if (s == "avx512" || s == "avx2") {
    __builtin_cpu_init();
    if (s == "avx512" && !(__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw"))) return false;
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) return false;
    *out = s == "avx512" ? AttnIsa::kAvx512 : AttnIsa::kAvx2;
    return true;
  }
#endif
  return false;
}

void FillNan(float* out, int n_tokens, int n_heads, int head_dim) {
  if (out == nullptr || n_tokens <= 0 || n_heads <= 0 || head_dim <= 0) return;
  std::fill(out, out + int64_t{n_tokens} * n_heads * head_dim, std::nanf(""));
}

// Shape checks shared by both layouts (REQUIRES of the kernel).
bool ShapesOk(int n_tokens, int pos0, int n_heads, int n_kv_heads, int head_dim) {
  return n_tokens >= 0 && pos0 >= 0 && n_heads > 0 && n_kv_heads > 0 && head_dim > 0 &&
         n_heads % n_kv_heads == 0 && int64_t{pos0} + n_tokens <= INT32_MAX;
}

// Validates `a` and builds the kernel's problem; false: `a` is malformed.
bool PagedProblem(const PagedAttentionArgs& a, internal::TiledProblem* p) {
  if (!ShapesOk(a.n_tokens, a.pos0, a.n_heads, a.n_kv_heads, a.head_dim) || a.block_size <= 0 ||
      a.n_blocks < 0 || a.base == nullptr || a.block_table == nullptr ||
      int64_t{a.n_blocks} * a.block_size < int64_t{a.pos0} + a.n_tokens)
    return false;
  const bool i8 = a.kv_dtype == KvDtype::kInt8, f16 = a.kv_dtype == KvDtype::kF16;
  if (f16 && !a.k_transposed) return false;
  if (a.kv_dtype != KvDtype::kF32 && !i8 && !f16) return false;
  const uint8_t* base = reinterpret_cast<const uint8_t*>(a.base);
  const int64_t unit = i8 || f16 ? 1 : int64_t{sizeof(float)};  // offsets are floats (fp32) or bytes
  p->q = a.q;
  p->out = a.out;
  p->n_tokens = a.n_tokens;
  p->pos0 = a.pos0;
  p->n_heads = a.n_heads;
  p->n_kv_heads = a.n_kv_heads;
  p->head_dim = a.head_dim;
  p->kv.k = base + a.k_offset * unit;
  p->kv.v = base + a.v_offset * unit;
  p->kv.block_stride = a.block_stride * unit;
  p->kv.block_size = a.block_size;
  p->kv.block_table = a.block_table;
  p->kv.int8 = i8;
  p->kv.f16 = f16;
  p->kv.scales_bytes = i8 ? KvInt8Section::ScalesBytes(a.block_size, a.n_kv_heads) : 0;
  if (a.k_transposed && i8) {
    // Scales stay at the section start (read through kv.k), the codes follow transposed.
    p->kv.kt = p->kv.k + p->kv.scales_bytes;
    p->kv.kt_unit = a.block_size;
    p->kv.kt_stride = p->kv.block_stride;
    p->kv.kt_table = a.block_table;
  } else if (a.k_transposed) {
    p->kv.kt = p->kv.k;
    p->kv.k = nullptr;
    p->kv.kt_unit = a.block_size;
    p->kv.kt_stride = p->kv.block_stride;
    p->kv.kt_table = a.block_table;
  }
  return true;
}

// A contiguous cache as the kernel sees it: one block holding every position.
internal::TiledProblem ContiguousProblem(const float* q, float* out, int n_tokens, int pos0, int n_heads,
                                         int n_kv_heads, int head_dim) {
  static constexpr int32_t kOneBlock[1] = {0};
  internal::TiledProblem p;
  p.q = q;
  p.out = out;
  p.n_tokens = n_tokens;
  p.pos0 = pos0;
  p.n_heads = n_heads;
  p.n_kv_heads = n_kv_heads;
  p.head_dim = head_dim;
  p.kv.block_stride = 0;
  p.kv.block_size = INT32_MAX;  // every position in block 0
  p.kv.block_table = kOneBlock;
  return p;
}

}  // namespace

void QuantizeKvRowInt8(const float* x, int n_kv_heads, int head_dim, int8_t* codes, float* scales) {
  for (int h = 0; h < n_kv_heads; ++h) {
    const float* xh = x + int64_t{h} * head_dim;
    int8_t* ch = codes + int64_t{h} * head_dim;
    float amax = 0.0f;
    bool finite = true;
    for (int i = 0; i < head_dim; ++i) {
      finite = finite && std::isfinite(xh[i]);
      amax = std::max(amax, std::fabs(xh[i]));
    }
    if (!finite) {
      scales[h] = std::nanf("");
      std::fill(ch, ch + head_dim, int8_t{0});
      continue;
    }
    scales[h] = amax / 127.0f;
    const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    for (int i = 0; i < head_dim; ++i) {
      const float r = std::nearbyint(xh[i] * inv);
      ch[i] = static_cast<int8_t>(std::clamp(r, -127.0f, 127.0f));
    }
  }
}

void PagedAttention(const PagedAttentionArgs& a, ThreadPool* pool, std::vector<float>* scores) {
  internal::TiledProblem p;
  if (!PagedProblem(a, &p)) return FillNan(a.out, a.n_tokens, a.n_heads, a.head_dim);
  internal::TiledAttention(p, ActiveAttnIsa(), pool, scores);
}

void WriteContiguousKt(const float* k_rows, int n, int pos0, int n_kv_heads, int head_dim, float* k_t) {
  for (int t = 0; t < n; ++t)
    for (int h = 0; h < n_kv_heads; ++h) {
      const float* src = k_rows + (int64_t{t} * n_kv_heads + h) * head_dim;
      float* dst = k_t + ContiguousKtIndex(n_kv_heads, head_dim, h, 0, pos0 + t);
      for (int i = 0; i < head_dim; ++i) dst[int64_t{i} * kContiguousKtUnit] = src[i];
    }
}

void WriteContiguousF16(const float* k_rows, const float* v_rows, int n, int pos0, int n_kv_heads, int head_dim,
                        uint16_t* k_t, uint16_t* v) {
  const int64_t kv_dim = int64_t{n_kv_heads} * head_dim;
  for (int t = 0; t < n; ++t) {
    for (int h = 0; h < n_kv_heads; ++h) {
      const float* src = k_rows + t * kv_dim + int64_t{h} * head_dim;
      uint16_t* dst = k_t + ContiguousKtIndex(n_kv_heads, head_dim, h, 0, pos0 + t);
      for (int i = 0; i < head_dim; ++i) dst[int64_t{i} * kContiguousKtUnit] = Fp32ToFp16(src[i]);
    }
    for (int64_t e = 0; e < kv_dim; ++e) v[(int64_t{pos0} + t) * kv_dim + e] = Fp32ToFp16(v_rows[t * kv_dim + e]);
  }
}

void ContiguousAttentionF16(const float* q, const uint16_t* k_t, const uint16_t* v, float* out, int n_tokens,
                            int pos0, int n_heads, int n_kv_heads, int head_dim, ThreadPool* pool,
                            std::vector<float>* scores) {
  if (!ShapesOk(n_tokens, pos0, n_heads, n_kv_heads, head_dim) || k_t == nullptr || v == nullptr)
    return FillNan(out, n_tokens, n_heads, head_dim);
  internal::TiledProblem p = ContiguousProblem(q, out, n_tokens, pos0, n_heads, n_kv_heads, head_dim);
  p.kv.v = reinterpret_cast<const uint8_t*>(v);
  p.kv.f16 = true;
  p.kv.kt = reinterpret_cast<const uint8_t*>(k_t);
  p.kv.kt_unit = kContiguousKtUnit;
  p.kv.kt_stride = int64_t{kContiguousKtUnit} * n_kv_heads * head_dim * 2;
  internal::TiledAttention(p, ActiveAttnIsa(), pool, scores);
}

void ContiguousAttention(const float* q, const float* k_cache, const float* v_cache, float* out, int n_tokens,
                         int pos0, int n_heads, int n_kv_heads, int head_dim, ThreadPool* pool,
                         std::vector<float>* scores, const float* k_t) {
  if (!ShapesOk(n_tokens, pos0, n_heads, n_kv_heads, head_dim) || (k_cache == nullptr && k_t == nullptr) ||
      v_cache == nullptr)
    return FillNan(out, n_tokens, n_heads, head_dim);
  internal::TiledProblem p = ContiguousProblem(q, out, n_tokens, pos0, n_heads, n_kv_heads, head_dim);
  p.kv.k = reinterpret_cast<const uint8_t*>(k_cache);
  p.kv.v = reinterpret_cast<const uint8_t*>(v_cache);
  if (k_t != nullptr) {
    p.kv.k = nullptr;
    p.kv.kt = reinterpret_cast<const uint8_t*>(k_t);
    p.kv.kt_unit = kContiguousKtUnit;
    p.kv.kt_stride = int64_t{kContiguousKtUnit} * n_kv_heads * head_dim * int64_t{sizeof(float)};
  }
  internal::TiledAttention(p, ActiveAttnIsa(), pool, scores);
}

bool PagedAttentionForIsaForTesting(const PagedAttentionArgs& a, const char* isa, ThreadPool* pool,
                                    std::vector<float>* scores) {
  AttnIsa want;
  internal::TiledProblem p;
  if (!ParseIsa(isa, &want) || !PagedProblem(a, &p)) return false;
  internal::TiledAttention(p, want, pool, scores);
  return true;
}

bool PagedAttentionInt8ForIsaForTesting(const PagedAttentionArgs& a, const char* isa, std::vector<float>* scores) {
  if (a.kv_dtype != KvDtype::kInt8) return false;
  return PagedAttentionForIsaForTesting(a, isa, nullptr, scores);
}

void PagedAttentionRef(const PagedAttentionArgs& a) {
  const int group = a.n_heads / a.n_kv_heads;
  const int64_t q_width = int64_t{a.n_heads} * a.head_dim;
  const double scale = 1.0 / std::sqrt(static_cast<double>(a.head_dim));
  const bool i8 = a.kv_dtype == KvDtype::kInt8;
  // Element i of the K (V) vector of kv head kvh at position p, dequantized for int8.
  auto elem = [&](int64_t offset, int p, int kvh, int i) -> double {
    if (a.kv_dtype == KvDtype::kF16) {
      const uint8_t* sec = reinterpret_cast<const uint8_t*>(a.base) +
                           int64_t{a.block_table[p / a.block_size]} * a.block_stride + offset;
      const int64_t e = offset == a.k_offset
                            ? (int64_t{kvh} * a.head_dim + i) * a.block_size + p % a.block_size
                            : int64_t{p % a.block_size} * a.n_kv_heads * a.head_dim + int64_t{kvh} * a.head_dim + i;
      uint16_t h;
      std::memcpy(&h, sec + 2 * e, 2);
      return Fp16ToFp32(h);
    }
    if (!i8 && a.k_transposed && offset == a.k_offset)
      return a.base[int64_t{a.block_table[p / a.block_size]} * a.block_stride + offset +
                    (int64_t{kvh} * a.head_dim + i) * a.block_size + p % a.block_size];
    if (!i8) return Row(a, offset, p)[int64_t{kvh} * a.head_dim + i];
    const I8Row r = RowI8(a, offset, p, kvh);
    const int64_t stride = a.k_transposed && offset == a.k_offset ? a.block_size : 1;
    return double{r.scale} * r.codes[i * stride];
  };
  std::vector<double> s, o(a.head_dim);
  for (int t = 0; t < a.n_tokens; ++t) {
    for (int h = 0; h < a.n_heads; ++h) {
      const int kvh = h / group;
      const int n_keys = a.pos0 + t + 1;
      const float* q = a.q + t * q_width + int64_t{h} * a.head_dim;
      s.assign(n_keys, 0.0);
      double mx = -1e300;
      for (int p = 0; p < n_keys; ++p) {
        double d = 0.0;
        for (int i = 0; i < a.head_dim; ++i) d += double{q[i]} * elem(a.k_offset, p, kvh, i);
        s[p] = d * scale;
        mx = std::max(mx, s[p]);
      }
      double z = 0.0;
      for (double& x : s) z += (x = std::exp(x - mx));
      std::fill(o.begin(), o.end(), 0.0);
      for (int p = 0; p < n_keys; ++p)
        for (int i = 0; i < a.head_dim; ++i) o[i] += s[p] / z * elem(a.v_offset, p, kvh, i);
      float* out = a.out + t * q_width + int64_t{h} * a.head_dim;
      for (int i = 0; i < a.head_dim; ++i) out[i] = static_cast<float>(o[i]);
    }
  }
}

}  // namespace nibble::cpu
