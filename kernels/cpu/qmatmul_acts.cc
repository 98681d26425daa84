// Activation quantization for the packed-weight matmul (qmm::QuantizeActs,
// declared in qmatmul_internal.h): the scalar reference and an AVX-512 twin.
//
// Goals: the AVX-512 version produces the SAME BYTES as the scalar one (so all
// ISAs keep seeing identical quantized activations and stay bit-identical):
// every value is computed by the same IEEE operations (|x| max, 127 / amax,
// x * inv, +/- 1.5 * 2^23 rounding, clamp, exact int sums), only several lanes
// at a time. Blocks holding a NaN or an infinity take the scalar code. The
// scalar code is compiled without fma contraction (-std=c++20 in GCC), as the
// vector code uses separate mul / add.
// Non-goals: other activation formats; AVX2 (the scalar loop is a few % of
// prefill there).
//
// Thread safety: reentrant (pure function of its arguments).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "kernels/cpu/qmatmul_internal.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace nibble::cpu::qmm {
namespace {

// One 32-wide block b of token row xt (cols valid columns): writes q[32],
// *dx, *dxs, l4[8], *xsum. Scalar reference.
inline void BlockScalar(const float* xt, int64_t cols, int64_t b, int8_t* q, float* dx, float* dxs, int32_t* l4,
                        float* xsum) {
  const int64_t c0 = b * kBlock;
  const int n = static_cast<int>(std::clamp<int64_t>(cols - c0, 0, kBlock));
  float amax = 0.0f;
  for (int i = 0; i < n; ++i) amax = std::max(amax, std::fabs(xt[c0 + i]));
  int sum = 0;
  // !(amax > 0) also catches NaN: the block then contributes 0.
  if (!(amax > 0.0f) || !std::isfinite(amax)) {
    std::memset(q, 0, kBlock);
    *dx = 0.0f;
  } else {
    const float inv = 127.0f / amax;
    for (int i = 0; i < n; ++i) {
      // Round half to even as nearbyint in the default mode: |x * inv|
      // <= 127 (+ulps) < 2^22, where adding and removing 1.5 * 2^23 rounds
      // exactly (and vectorizes, unlike the libm call). A NaN element (amax
      // skips it) is clamped to 0 by the explicit test, never cast.
      const float r = (xt[c0 + i] * inv + 12582912.0f) - 12582912.0f;
      const float v = r == r ? std::clamp(r, -127.0f, 127.0f) : 0.0f;
      q[i] = static_cast<int8_t>(v);
      sum += q[i];
    }
    for (int i = n; i < kBlock; ++i) q[i] = 0;
    *dx = amax / 127.0f;
  }
  *dxs = *dx * static_cast<float>(sum);
  *xsum = static_cast<float>(sum);
  for (int l = 0; l < 8; ++l) l4[l] = q[4 * l] + q[4 * l + 1] + q[4 * l + 2] + q[4 * l + 3];
}

inline void PairScales(const float* dxt, int64_t nb, float* d16) {
  for (int64_t p = 0; p < nb / 2; ++p)
    for (int l = 0; l < 16; ++l) d16[p * 16 + l] = dxt[2 * p + l / 8];
}

#if defined(__x86_64__)
#define NIBBLE_ACTS_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))

// Quantizes one finite-checked full or partial block; returns false (nothing
// written) when the block holds a non-finite value, for the scalar fallback.
NIBBLE_ACTS_AVX512 inline bool BlockAvx512(const float* xt, int64_t cols, int64_t b, int8_t* q, float* dx, float* dxs,
                                           int32_t* l4, float* xsum) {
  const int64_t c0 = b * kBlock;
  const int n = static_cast<int>(std::clamp<int64_t>(cols - c0, 0, kBlock));
  const __mmask16 m0 = n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1);
  const __mmask16 m1 = n >= 32 ? __mmask16(0xFFFF) : n <= 16 ? __mmask16(0) : __mmask16((1u << (n - 16)) - 1);
  const __m512 x0 = _mm512_maskz_loadu_ps(m0, xt + c0);
  const __m512 x1 = _mm512_maskz_loadu_ps(m1, xt + c0 + 16);
  const __m512 a0 = _mm512_abs_ps(x0), a1 = _mm512_abs_ps(x1);
  // Non-finite: exponent all ones (|x| >= +inf or NaN) -> scalar path.
  const __m512 inf = _mm512_set1_ps(INFINITY);
  if (_mm512_cmp_ps_mask(a0, inf, _CMP_NLT_UQ) | _mm512_cmp_ps_mask(a1, inf, _CMP_NLT_UQ)) return false;
  const float amax = _mm512_reduce_max_ps(_mm512_max_ps(a0, a1));
  if (!(amax > 0.0f)) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), _mm256_setzero_si256());
    *dx = 0.0f;
    *dxs = 0.0f;
    *xsum = 0.0f;
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(l4), _mm256_setzero_si256());
    return true;
  }
  const __m512 inv = _mm512_set1_ps(127.0f / amax);
  const __m512 magic = _mm512_set1_ps(12582912.0f);
  const __m512 lo = _mm512_set1_ps(-127.0f), hi = _mm512_set1_ps(127.0f);
  const __m512 r0 = _mm512_sub_ps(_mm512_add_ps(_mm512_mul_ps(x0, inv), magic), magic);
  const __m512 r1 = _mm512_sub_ps(_mm512_add_ps(_mm512_mul_ps(x1, inv), magic), magic);
  // Code 0 for lanes past n and for NaN products (0 * inv when amax is so
  // small that inv = 127 / amax overflows), as the scalar code does.
  const __mmask16 k0 = m0 & _mm512_cmp_ps_mask(r0, r0, _CMP_ORD_Q);
  const __mmask16 k1 = m1 & _mm512_cmp_ps_mask(r1, r1, _CMP_ORD_Q);
  const __m512i i0 = _mm512_maskz_cvttps_epi32(k0, _mm512_min_ps(_mm512_max_ps(r0, lo), hi));
  const __m512i i1 = _mm512_maskz_cvttps_epi32(k1, _mm512_min_ps(_mm512_max_ps(r1, lo), hi));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm512_cvtepi32_epi8(i0));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16), _mm512_cvtepi32_epi8(i1));
  // Sums of 4 consecutive codes: lanes 4l..4l+3 -> l (l < 4 from i0, 4..7 from i1).
  const __m512i idx = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 1, 5, 9, 13, 17, 21, 25, 29);
  const __m512i idx2 = _mm512_add_epi32(idx, _mm512_set1_epi32(2));
  const __m512i s01 = _mm512_add_epi32(_mm512_permutex2var_epi32(i0, idx, i1), _mm512_permutex2var_epi32(i0, idx2, i1));
  // s01 lane k (k < 8): q[4k] + q[4k+2]; lane 8 + k: q[4k+1] + q[4k+3].
  const __m256i s4 = _mm256_add_epi32(_mm512_castsi512_si256(s01), _mm512_extracti64x4_epi64(s01, 1));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(l4), s4);
  const int sum = _mm512_reduce_add_epi32(_mm512_add_epi32(i0, i1));
  *dx = amax / 127.0f;
  *dxs = *dx * static_cast<float>(sum);
  *xsum = static_cast<float>(sum);
  return true;
}

NIBBLE_ACTS_AVX512 void QuantizeActsAvx512(const float* x, int64_t n_tokens, int64_t cols, int64_t nb, int8_t* xq,
                                           float* dx, float* dxs, float* dx16, int32_t* xs4, float* xsum) {
  for (int64_t t = 0; t < n_tokens; ++t) {
    const float* xt = x + t * cols;
    float* dxt = dx + t * nb;
    for (int64_t b = 0; b < nb; ++b) {
      int8_t* q = xq + (t * nb + b) * kBlock;
      int32_t* l4 = xs4 + (t * nb + b) * 8;
      float* s = xsum + t * nb + b;
      if (!BlockAvx512(xt, cols, b, q, dxt + b, dxs + t * nb + b, l4, s))
        BlockScalar(xt, cols, b, q, dxt + b, dxs + t * nb + b, l4, s);
    }
    PairScales(dxt, nb, dx16 + t * nb * 8);
  }
}

bool HasAvx512() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  }();
  return has;
}
#endif

}  // namespace

void QuantizeActsScalar(const float* x, int64_t n_tokens, int64_t cols, int64_t nb, int8_t* xq, float* dx,
                        float* dxs, float* dx16, int32_t* xs4, float* xsum) {
  for (int64_t t = 0; t < n_tokens; ++t) {
    const float* xt = x + t * cols;
    float* dxt = dx + t * nb;
    for (int64_t b = 0; b < nb; ++b)
      BlockScalar(xt, cols, b, xq + (t * nb + b) * kBlock, dxt + b, dxs + t * nb + b, xs4 + (t * nb + b) * 8,
                  xsum + t * nb + b);
    PairScales(dxt, nb, dx16 + t * nb * 8);
  }
}

void QuantizeActs(const float* x, int64_t n_tokens, int64_t cols, int64_t nb, int8_t* xq, float* dx, float* dxs,
                  float* dx16, int32_t* xs4, float* xsum) {
#if defined(__x86_64__)
  if (HasAvx512()) return QuantizeActsAvx512(x, n_tokens, cols, nb, xq, dx, dxs, dx16, xs4, xsum);
#endif
  QuantizeActsScalar(x, n_tokens, cols, nb, xq, dx, dxs, dx16, xs4, xsum);
}

}  // namespace nibble::cpu::qmm
