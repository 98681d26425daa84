#include "kernels/cpu/paged_attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string_view>

#include "kernels/cpu/ops.h"
#include "kernels/cpu/thread_pool.h"

#if defined(__x86_64__)
#include <immintrin.h>
// GCC 12's avx512fintrin.h trips -W(maybe-)uninitialized inside its own
// _mm512_reduce_* helpers when inlined; not our variables.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

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
inline I8Row RowI8(const PagedAttentionArgs& a, int64_t offset, int p, int kvh) {
  const uint8_t* sec = reinterpret_cast<const uint8_t*>(a.base) +
                       int64_t{a.block_table[p / a.block_size]} * a.block_stride + offset;
  const int slot = p % a.block_size;
  float scale;
  std::memcpy(&scale, sec + (int64_t{slot} * a.n_kv_heads + kvh) * 4, sizeof(float));
  const int8_t* codes = reinterpret_cast<const int8_t*>(sec + KvInt8Section::ScalesBytes(a.block_size, a.n_kv_heads)) +
                        (int64_t{slot} * a.n_kv_heads + kvh) * a.head_dim;
  return {scale, codes};
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

// ---- int8 K/V: fused dequantizing dot (q . codes) and axpy (o += coef * codes).

struct ScalarI8 {
  static float Dot(const float* q, const int8_t* c, int n) {
    float s = 0.0f;
    for (int i = 0; i < n; ++i) s += q[i] * static_cast<float>(c[i]);
    return s;
  }
  static void Axpy(float* o, const int8_t* c, float coef, int n) {
    for (int i = 0; i < n; ++i) o[i] += coef * static_cast<float>(c[i]);
  }
};

#if defined(__x86_64__)
#define NIBBLE_PA_AVX2 __attribute__((target("avx2,fma")))
#define NIBBLE_PA_AVX512 __attribute__((target("avx512f,avx2,fma")))

struct Avx2I8 {
  NIBBLE_PA_AVX2 static __m256 Load8(const int8_t* c) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(c))));
  }
  NIBBLE_PA_AVX2 static float Dot(const float* q, const int8_t* c, int n) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int i = 0;
    for (; i + 16 <= n; i += 16) {
      s0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), Load8(c + i), s0);
      s1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i + 8), Load8(c + i + 8), s1);
    }
    for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), Load8(c + i), s0);
    __m256 v = _mm256_add_ps(s0, s1);
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    float s = _mm_cvtss_f32(lo);
    for (; i < n; ++i) s += q[i] * static_cast<float>(c[i]);
    return s;
  }
  NIBBLE_PA_AVX2 static void Axpy(float* o, const int8_t* c, float coef, int n) {
    const __m256 k = _mm256_set1_ps(coef);
    int i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(o + i, _mm256_fmadd_ps(k, Load8(c + i), _mm256_loadu_ps(o + i)));
    for (; i < n; ++i) o[i] += coef * static_cast<float>(c[i]);
  }
};

struct Avx512I8 {
  NIBBLE_PA_AVX512 static __m512 Load16(const int8_t* c) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c))));
  }
  NIBBLE_PA_AVX512 static float Dot(const float* q, const int8_t* c, int n) {
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
    int i = 0;
    for (; i + 32 <= n; i += 32) {
      s0 = _mm512_fmadd_ps(_mm512_loadu_ps(q + i), Load16(c + i), s0);
      s1 = _mm512_fmadd_ps(_mm512_loadu_ps(q + i + 16), Load16(c + i + 16), s1);
    }
    for (; i + 16 <= n; i += 16) s0 = _mm512_fmadd_ps(_mm512_loadu_ps(q + i), Load16(c + i), s0);
    float s = _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
    for (; i < n; ++i) s += q[i] * static_cast<float>(c[i]);  // tail: never reads past the row
    return s;
  }
  NIBBLE_PA_AVX512 static void Axpy(float* o, const int8_t* c, float coef, int n) {
    const __m512 k = _mm512_set1_ps(coef);
    int i = 0;
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(o + i, _mm512_fmadd_ps(k, Load16(c + i), _mm512_loadu_ps(o + i)));
    for (; i < n; ++i) o[i] += coef * static_cast<float>(c[i]);
  }
};
#endif

// One (query row, head) pair over int8 K/V; `att` holds >= pos0 + t + 1 floats.
// score_p = (q . codes_k) * scale_k * 1/sqrt(d); out = sum_p (w_p * scale_v) * codes_v.
template <class Ops>
void OneHeadInt8(const PagedAttentionArgs& a, int t, int h, float scale, float* att) {
  const int group = a.n_heads / a.n_kv_heads;
  const int kvh = h / group;
  const int64_t q_width = int64_t{a.n_heads} * a.head_dim;
  const int n_keys = a.pos0 + t + 1;
  const float* q = a.q + t * q_width + int64_t{h} * a.head_dim;
  for (int p = 0; p < n_keys; ++p) {
    const I8Row k = RowI8(a, a.k_offset, p, kvh);
    att[p] = Ops::Dot(q, k.codes, a.head_dim) * (k.scale * scale);
  }
  Softmax(att, n_keys);
  float* o = a.out + t * q_width + int64_t{h} * a.head_dim;
  std::fill(o, o + a.head_dim, 0.0f);
  for (int p = 0; p < n_keys; ++p) {
    const I8Row v = RowI8(a, a.v_offset, p, kvh);
    Ops::Axpy(o, v.codes, att[p] * v.scale, a.head_dim);
  }
}

using HeadFn = void (*)(const PagedAttentionArgs&, int, int, float, float*);

enum class I8Isa { kScalar, kAvx2, kAvx512 };

HeadFn HeadFnFor(KvDtype dtype, I8Isa isa) {
  if (dtype == KvDtype::kF32) return OneHead;
#if defined(__x86_64__)
  if (isa == I8Isa::kAvx512) return OneHeadInt8<Avx512I8>;
  if (isa == I8Isa::kAvx2) return OneHeadInt8<Avx2I8>;
#endif
  (void)isa;
  return OneHeadInt8<ScalarI8>;
}

// The int8 level follows the fp32 ops' dispatch (ActiveIsa(), which honours
// NIBBLE_FORCE_ISA and ForceIsaForTesting).
I8Isa ActiveI8Isa() {
  const std::string_view s = ActiveIsa();
  return s == "avx512" ? I8Isa::kAvx512 : s == "avx2" ? I8Isa::kAvx2 : I8Isa::kScalar;
}

void Run(const PagedAttentionArgs& a, HeadFn fn, ThreadPool* pool, std::vector<float>* scores) {
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
      fn(a, static_cast<int>(i / a.n_heads), static_cast<int>(i % a.n_heads), scale, scores->data());
    return;
  }
  pool->ParallelFor(work, 1, [&](int thread, int64_t b, int64_t e) {
    float* att = scores->data() + int64_t{thread} * total;
    for (int64_t i = b; i < e; ++i) fn(a, static_cast<int>(i / a.n_heads), static_cast<int>(i % a.n_heads), scale, att);
  });
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
  Run(a, HeadFnFor(a.kv_dtype, a.kv_dtype == KvDtype::kInt8 ? ActiveI8Isa() : I8Isa::kScalar), pool, scores);
}

bool PagedAttentionInt8ForIsaForTesting(const PagedAttentionArgs& a, const char* isa, std::vector<float>* scores) {
  if (a.kv_dtype != KvDtype::kInt8) return false;
  const std::string_view s = isa;
  I8Isa want = I8Isa::kScalar;
  if (s == "avx512" || s == "avx2") {
#if defined(__x86_64__)
    __builtin_cpu_init();
    if (s == "avx512" && !__builtin_cpu_supports("avx512f")) return false;
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) return false;
    want = s == "avx512" ? I8Isa::kAvx512 : I8Isa::kAvx2;
#else
    return false;
#endif
  } else if (s != "scalar") {
    return false;
  }
  Run(a, HeadFnFor(KvDtype::kInt8, want), nullptr, scores);
  return true;
}

void PagedAttentionRef(const PagedAttentionArgs& a) {
  const int group = a.n_heads / a.n_kv_heads;
  const int64_t q_width = int64_t{a.n_heads} * a.head_dim;
  const double scale = 1.0 / std::sqrt(static_cast<double>(a.head_dim));
  const bool i8 = a.kv_dtype == KvDtype::kInt8;
  // Element i of the K (V) vector of kv head kvh at position p, dequantized for int8.
  auto elem = [&](int64_t offset, int p, int kvh, int i) -> double {
    if (!i8) return Row(a, offset, p)[int64_t{kvh} * a.head_dim + i];
    const I8Row r = RowI8(a, offset, p, kvh);
    return double{r.scale} * r.codes[i];
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
