// AVX-512 (F/BW/VL/DQ + VNNI) kernel of the packed-weight matmul
// (kernels/cpu/qmatmul.h). 64 weights per step: two 32-column blocks are
// unpacked to u8 codes in one zmm and multiplied with the int8 activations
// by _mm512_dpbusd_epi32 (exact int32 lane sums of 4 products), converted to
// fp32 and scaled by d_g * dx_b per 8-lane half; the additive term is
// fma(xs4, m_g * dx_b) on the lane sums of the activations. Up to 4 tokens
// share each unpacked step (prefill tiles). fp32 order: the canonical one of
// qmatmul_internal.h (bit-identical to the scalar and AVX2 kernels).
#include <cstring>

#include "kernels/cpu/qmatmul_internal.h"

#if defined(__x86_64__)
#include <immintrin.h>

// GCC 12's avx512fintrin.h trips -W(maybe-)uninitialized in its own
// _mm512_undefined_* helpers when inlined here; not our variables.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#define NIBBLE_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,f16c,fma,avx2")))

namespace nibble::cpu::qmm {
namespace {

struct F16 {
  NIBBLE_AVX512 float operator()(const uint8_t* p) const {
    uint16_t h;
    std::memcpy(&h, p, 2);
    return _cvtsh_ss(h);
  }
};
NIBBLE_AVX512 inline uint32_t Load32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}
NIBBLE_AVX512 inline uint64_t Load64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}

// Reduce16 (qmatmul_internal.h) in registers, same order.
NIBBLE_AVX512 inline float Reduce(__m512 acc) {
  const __m256 v8 = _mm256_add_ps(_mm512_castps512_ps256(acc), _mm512_extractf32x8_ps(acc, 1));
  const __m128 v4 = _mm_add_ps(_mm256_castps256_ps128(v8), _mm256_extractf128_ps(v8, 1));
  const __m128 p = _mm_add_ps(v4, _mm_shuffle_ps(v4, v4, _MM_SHUFFLE(2, 3, 0, 1)));  // [v0+v1, ., v2+v3, .]
  return _mm_cvtss_f32(_mm_add_ss(p, _mm_movehl_ps(p, p)));
}

// 2-bit stream -> one code per byte: each dword (one source byte) spreads
// its 4 codes over its 4 bytes.
NIBBLE_AVX512 inline __m256i Spread2x32(const uint8_t* p) {
  __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  v = _mm256_or_si256(_mm256_or_si256(v, _mm256_slli_epi32(v, 6)),
                      _mm256_or_si256(_mm256_slli_epi32(v, 12), _mm256_slli_epi32(v, 18)));
  return _mm256_and_si256(v, _mm256_set1_epi32(0x03030303));
}
NIBBLE_AVX512 inline __m512i Spread2x64(const uint8_t* p) {
  __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  v = _mm512_or_si512(_mm512_or_si512(v, _mm512_slli_epi32(v, 6)),
                      _mm512_or_si512(_mm512_slli_epi32(v, 12), _mm512_slli_epi32(v, 18)));
  return _mm512_and_si512(v, _mm512_set1_epi32(0x03030303));
}

// Codes of sub-block k (32 weights) of a group, one u8 per weight.
template <CodeKind C>
NIBBLE_AVX512 inline __m256i Unpack32(const uint8_t* codes, int group, int k, bool ternary) {
  if constexpr (C == CodeKind::kU8) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + 32 * k));
  } else if constexpr (C == CodeKind::kU4) {
    const __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + 16 * k)));
    return _mm256_or_si256(_mm256_and_si256(v, _mm256_set1_epi16(0x000f)),
                           _mm256_and_si256(_mm256_slli_epi16(v, 4), _mm256_set1_epi16(0x0f00)));
  } else if constexpr (C == CodeKind::kU2) {
    return Spread2x32(codes + 8 * k);
  } else if constexpr (C == CodeKind::kU1) {
    return _mm256_maskz_set1_epi8(Load32(codes + 4 * k), 1);
  } else if constexpr (C == CodeKind::kU3) {
    return _mm256_or_si256(Spread2x32(codes + 8 * k), _mm256_maskz_set1_epi8(Load32(codes + group / 4 + 4 * k), 4));
  } else {
    return ternary ? Spread2x32(codes + 8 * k) : _mm256_maskz_set1_epi8(Load32(codes + 4 * k), 1);
  }
}

// Codes of sub-blocks k, k + 1 of one group (k even, both inside the block).
template <CodeKind C>
NIBBLE_AVX512 inline __m512i Unpack64(const uint8_t* codes, int group, int k, bool ternary) {
  if constexpr (C == CodeKind::kU8) {
    return _mm512_loadu_si512(codes + 32 * k);
  } else if constexpr (C == CodeKind::kU4) {
    const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + 16 * k)));
    return _mm512_or_si512(_mm512_and_si512(v, _mm512_set1_epi16(0x000f)),
                           _mm512_and_si512(_mm512_slli_epi16(v, 4), _mm512_set1_epi16(0x0f00)));
  } else if constexpr (C == CodeKind::kU2) {
    return Spread2x64(codes + 8 * k);
  } else if constexpr (C == CodeKind::kU1) {
    return _mm512_maskz_set1_epi8(Load64(codes + 4 * k), 1);
  } else if constexpr (C == CodeKind::kU3) {
    return _mm512_or_si512(Spread2x64(codes + 8 * k), _mm512_maskz_set1_epi8(Load64(codes + group / 4 + 4 * k), 4));
  } else {
    return ternary ? Spread2x64(codes + 8 * k) : _mm512_maskz_set1_epi8(Load64(codes + 4 * k), 1);
  }
}

// Accumulators of one row x T tokens: D and M lane sets (canonical order in
// qmatmul_internal.h), [pair parity][token]; a zmm holds block slots 2P, 2P+1.
template <int T>
struct Acc512 {
  __m512 d[2][T], m[2][T];
};

// Blocks b, b + 1 (b even, b < nb_used) into slot pair P.
template <CodeKind C, int T, int P>
NIBBLE_AVX512 inline void PairStep(const FormatInfo& fi, const uint8_t* row, int64_t b, int64_t nb_used,
                                   const int8_t* const* xq, const float* const* d16, const float* const* x4,
                                   Acc512<T>& acc) {
  const int group = fi.group;
  __m512i q;
  __m512 dv, mv;
  if (group == kBlock) {
    const GroupAffine g0 = ParseGroup(fi.header, fi.bits, row + b * fi.block_bytes, F16{});
    if (b + 1 < nb_used) {
      const GroupAffine g1 = ParseGroup(fi.header, fi.bits, row + (b + 1) * fi.block_bytes, F16{});
      q = _mm512_inserti64x4(_mm512_castsi256_si512(Unpack32<C>(g0.codes, group, 0, g0.ternary)),
                             Unpack32<C>(g1.codes, group, 0, g1.ternary), 1);
      dv = _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_set1_ps(g0.d)), _mm256_set1_ps(g1.d), 1);
      mv = _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_set1_ps(g0.m)), _mm256_set1_ps(g1.m), 1);
    } else {
      q = _mm512_zextsi256_si512(Unpack32<C>(g0.codes, group, 0, g0.ternary));
      dv = _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_set1_ps(g0.d)), _mm256_setzero_ps(), 1);
      mv = _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_set1_ps(g0.m)), _mm256_setzero_ps(), 1);
    }
  } else {
    const int spg = group / kBlock;
    const GroupAffine ga = ParseGroup(fi.header, fi.bits, row + (b / spg) * fi.block_bytes, F16{});
    // Both sub-blocks lie in this group's block (spg even); a sub-block past
    // cols meets zero activations (xq, dx, xs4 of padding blocks are 0).
    q = Unpack64<C>(ga.codes, group, static_cast<int>(b % spg), ga.ternary);
    dv = _mm512_set1_ps(ga.d);
    mv = _mm512_set1_ps(ga.m);
  }
  for (int t = 0; t < T; ++t) {
    const __m512i x = _mm512_load_si512(xq[t] + b * kBlock);
    const __m512i i = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q, x);
    const __m512 dx = _mm512_load_ps(d16[t] + b * 8);
    acc.d[P][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i), _mm512_mul_ps(dv, dx), acc.d[P][t]);
    acc.m[P][t] = _mm512_fmadd_ps(_mm512_load_ps(x4[t] + b * 8), _mm512_mul_ps(mv, dx), acc.m[P][t]);
  }
}

// One row x T tokens (t0 .. t0 + T - 1).
template <CodeKind C, int T>
NIBBLE_AVX512 void RowT(const FormatInfo& fi, const uint8_t* row, int64_t nb_used, const QActs& a, int64_t t0,
                        float* out /*[T]*/) {
  Acc512<T> acc;
  const int8_t* xq[T];
  const float* d16[T];
  const float* x4[T];
  for (int t = 0; t < T; ++t) {
    for (int p = 0; p < 2; ++p) acc.d[p][t] = acc.m[p][t] = _mm512_setzero_ps();
    xq[t] = a.xq + (t0 + t) * a.nb * kBlock;
    d16[t] = a.dx16 + (t0 + t) * a.nb * 8;
    x4[t] = a.xs4f + (t0 + t) * a.nb * 8;
  }
  for (int64_t b = 0; b < nb_used; b += 4) {
    PairStep<C, T, 0>(fi, row, b, nb_used, xq, d16, x4, acc);
    if (b + 2 < nb_used) PairStep<C, T, 1>(fi, row, b + 2, nb_used, xq, d16, x4, acc);
  }
  for (int t = 0; t < T; ++t)
    out[t] = Reduce(_mm512_add_ps(acc.d[0][t], acc.d[1][t])) + Reduce(_mm512_add_ps(acc.m[0][t], acc.m[1][t]));
}

template <CodeKind C, int T>
NIBBLE_AVX512 void RowsT(const FormatInfo& fi, const uint8_t* data, int64_t row_bytes, int64_t r_begin,
                         int64_t r_end, const QActs& a, int64_t t0, float* y, int64_t ldy) {
  const int64_t nb_used = (a.cols + kBlock - 1) / kBlock;
  float out[T];
  for (int64_t r = r_begin; r < r_end; ++r) {
    RowT<C, T>(fi, data + r * row_bytes, nb_used, a, t0, out);
    for (int t = 0; t < T; ++t) y[(t0 + t) * ldy + r] = out[t];
  }
}

template <CodeKind C>
void RowsCode(const FormatInfo& fi, const uint8_t* data, int64_t row_bytes, int64_t r_begin, int64_t r_end,
              const QActs& a, int64_t t_begin, int64_t t_end, float* y, int64_t ldy) {
  for (int64_t t0 = t_begin; t0 < t_end;) {
    const int64_t n = t_end - t0;
    if (n >= 4) {
      RowsT<C, 4>(fi, data, row_bytes, r_begin, r_end, a, t0, y, ldy);
      t0 += 4;
    } else if (n == 3) {
      RowsT<C, 3>(fi, data, row_bytes, r_begin, r_end, a, t0, y, ldy);
      t0 += 3;
    } else if (n == 2) {
      RowsT<C, 2>(fi, data, row_bytes, r_begin, r_end, a, t0, y, ldy);
      t0 += 2;
    } else {
      RowsT<C, 1>(fi, data, row_bytes, r_begin, r_end, a, t0, y, ldy);
      t0 += 1;
    }
  }
}

}  // namespace

void RowsAvx512(const fmt::Format& f, const uint8_t* data, int64_t r_begin, int64_t r_end, const QActs& a,
                int64_t t_begin, int64_t t_end, float* y, int64_t ldy) {
  const FormatInfo fi = Describe(f);
  const int64_t rb = f.RowBytes(a.cols);
  switch (fi.code) {
    case CodeKind::kU8: return RowsCode<CodeKind::kU8>(fi, data, rb, r_begin, r_end, a, t_begin, t_end, y, ldy);
    case CodeKind::kU4: return RowsCode<CodeKind::kU4>(fi, data, rb, r_begin, r_end, a, t_begin, t_end, y, ldy);
    case CodeKind::kU3: return RowsCode<CodeKind::kU3>(fi, data, rb, r_begin, r_end, a, t_begin, t_end, y, ldy);
    case CodeKind::kU2: return RowsCode<CodeKind::kU2>(fi, data, rb, r_begin, r_end, a, t_begin, t_end, y, ldy);
    case CodeKind::kU1: return RowsCode<CodeKind::kU1>(fi, data, rb, r_begin, r_end, a, t_begin, t_end, y, ldy);
    case CodeKind::kBinTern:
      return RowsCode<CodeKind::kBinTern>(fi, data, rb, r_begin, r_end, a, t_begin, t_end, y, ldy);
  }
}

}  // namespace nibble::cpu::qmm

#else  // !__x86_64__

namespace nibble::cpu::qmm {
void RowsAvx512(const fmt::Format& f, const uint8_t* data, int64_t r_begin, int64_t r_end, const QActs& a,
                int64_t t_begin, int64_t t_end, float* y, int64_t ldy) {
  RowsScalar(f, data, r_begin, r_end, a, t_begin, t_end, y, ldy);
}
}  // namespace nibble::cpu::qmm

#endif
