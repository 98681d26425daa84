// AVX2 (+FMA, F16C) kernel of the packed-weight matmul (kernels/cpu/qmatmul.h).
// 32 weights (one activation block) per step: codes unpacked to u8 in a ymm,
// _mm256_maddubs_epi16 with the int8 activations (pairs of products, which
// cannot saturate for codes <= 15) then _mm256_madd_epi16 to int32 lanes.
// int8 codes use the signed code q - 128 (|.| <= 128 times |x| <= 127 per
// product, sign trick) and add 128 * (lane sum of x) back in int32, so the
// lane sums equal dpbusd's and the fp32 order is the canonical one
// (qmatmul_internal.h): results are bit-identical to the other ISAs. Up to 4 tokens share
// each unpacked block (prefill tiles).
#include <cmath>
#include <cstring>

#include "kernels/cpu/qmatmul_internal.h"

#if defined(__x86_64__)
#include <immintrin.h>

#define NIBBLE_AVX2 __attribute__((target("avx2,fma,f16c")))

namespace nibble::cpu::qmm {
namespace {

struct F16 {
  NIBBLE_AVX2 float operator()(const uint8_t* p) const {
    uint16_t h;
    std::memcpy(&h, p, 2);
    return _cvtsh_ss(h);
  }
};

NIBBLE_AVX2 inline __m256i Spread2(const uint8_t* p) {
  __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  v = _mm256_or_si256(_mm256_or_si256(v, _mm256_slli_epi32(v, 6)),
                      _mm256_or_si256(_mm256_slli_epi32(v, 12), _mm256_slli_epi32(v, 18)));
  return _mm256_and_si256(v, _mm256_set1_epi32(0x03030303));
}

// 32 sign bits -> 0xff / 0x00 per byte.
NIBBLE_AVX2 inline __m256i BitsToMask(const uint8_t* p) {
  uint32_t bits;
  std::memcpy(&bits, p, 4);
  const __m256i shuf = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3,
                                        3, 3, 3, 3, 3, 3);
  const __m256i bm = _mm256_set1_epi64x(static_cast<long long>(0x8040201008040201ull));
  const __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(bits)), shuf);
  return _mm256_cmpeq_epi8(_mm256_and_si256(v, bm), bm);
}

template <CodeKind C>
NIBBLE_AVX2 inline __m256i Unpack32(const uint8_t* codes, int group, int k, bool ternary) {
  if constexpr (C == CodeKind::kU8) {
    // Signed q - 128.
    return _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + 32 * k)),
                            _mm256_set1_epi8(static_cast<char>(0x80)));
  } else if constexpr (kIsNl<C>) {
    // nl: the signed level L[q] = (biased code) - 128, like int8's q - 128.
    const __m256i q = Unpack32<kRawCode<C>>(codes, group, k, false);
    return _mm256_shuffle_epi8(
        _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(kNlSignedLut<kNlBits<C>>.v))), q);
  } else if constexpr (C == CodeKind::kU4) {
    const __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + 16 * k)));
    return _mm256_or_si256(_mm256_and_si256(v, _mm256_set1_epi16(0x000f)),
                           _mm256_and_si256(_mm256_slli_epi16(v, 4), _mm256_set1_epi16(0x0f00)));
  } else if constexpr (C == CodeKind::kU2) {
    return Spread2(codes + 8 * k);
  } else if constexpr (C == CodeKind::kU1) {
    return _mm256_and_si256(BitsToMask(codes + 4 * k), _mm256_set1_epi8(1));
  } else if constexpr (C == CodeKind::kU3) {
    return _mm256_or_si256(Spread2(codes + 8 * k),
                           _mm256_and_si256(BitsToMask(codes + group / 4 + 4 * k), _mm256_set1_epi8(4)));
  } else {
    return ternary ? Spread2(codes + 8 * k) : _mm256_and_si256(BitsToMask(codes + 4 * k), _mm256_set1_epi8(1));
  }
}

// int32 lane sums of 4 products code * xq.
// Code layouts whose Unpack32 gives the signed code u - 128 (u: the u8 code
// the canonical lane sums use).
template <CodeKind C>
inline constexpr bool kSignedCodes = C == CodeKind::kU8 || kIsNl<C>;

template <CodeKind C>
NIBBLE_AVX2 inline __m256i Dot32(__m256i q, __m256i x) {
  __m256i p;
  if constexpr (kSignedCodes<C>) {
    p = _mm256_maddubs_epi16(_mm256_abs_epi8(q), _mm256_sign_epi8(x, q));
  } else {
    p = _mm256_maddubs_epi16(q, x);
  }
  return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
}

// Reduce16 (qmatmul_internal.h) of acc = [even-block lanes, odd-block lanes].
NIBBLE_AVX2 inline float Reduce(__m256 even, __m256 odd) {
  const __m256 v8 = _mm256_add_ps(even, odd);
  const __m128 v4 = _mm_add_ps(_mm256_castps256_ps128(v8), _mm256_extractf128_ps(v8, 1));
  const __m128 p = _mm_add_ps(v4, _mm_shuffle_ps(v4, v4, _MM_SHUFFLE(2, 3, 0, 1)));  // [v0+v1, ., v2+v3, .]
  return _mm_cvtss_f32(_mm_add_ss(p, _mm_movehl_ps(p, p)));
}

template <int T>
struct Acc256 {
  __m256 d[4][T];  // [block slot b % 4][token]: D lanes
  float m[4][T];   // M chains
};

// Block b (< nb_used) into slot P = b % 4. The header kind H and SPG =
// group / 32 are compile-time: no switch and no division per block.
// Int sym and ternary fold m = c d (int sym: c = SymMul(bits), canonical
// order of qmatmul_internal.h; ternary: c = -1, where fl(-d dx) = -fl(d dx)
// exactly): the M chain takes c S_b with D's scale product.
template <CodeKind C, HeaderKind H, int SPG, int T, int P>
NIBBLE_AVX2 inline void BlockStep(const FormatInfo& fi, const uint8_t* row, int64_t b, const QActs& a,
                                  const int8_t* const* xq, const float* const* dx, const int32_t* const* xs4,
                                  const float* const* xsum, Acc256<T>& acc) {
  constexpr bool kFold = H == HeaderKind::kIntSym || H == HeaderKind::kTernary;
  const GroupAffine ga = ParseGroup(H, fi.bits, row + (b / SPG) * fi.block_bytes, F16{});
  const __m256i q = Unpack32<C>(ga.codes, SPG * kBlock, static_cast<int>(b % SPG), ga.ternary);
  for (int t = 0; t < T; ++t) {
    const __m256i x = _mm256_load_si256(reinterpret_cast<const __m256i*>(xq[t] + b * kBlock));
    __m256i i = Dot32<C>(q, x);
    if constexpr (kSignedCodes<C>) {  // lanes of (q - 128) x: add back 128 * sum(x) per lane
      const __m256i l4 = _mm256_load_si256(reinterpret_cast<const __m256i*>(xs4[t] + b * 8));
      i = _mm256_add_epi32(i, _mm256_slli_epi32(l4, 7));
    }
    const float ds = ga.d * dx[t][b];
    acc.d[P][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), _mm256_set1_ps(ds), acc.d[P][t]);
    if constexpr (kFold) {
      const float c = H == HeaderKind::kIntSym ? SymMul(fi.bits) : -1.0f;
      acc.m[P][t] = std::fma(c * xsum[t][b], ds, acc.m[P][t]);
    } else {
      acc.m[P][t] = std::fma(xsum[t][b], ga.m * dx[t][b], acc.m[P][t]);
    }
  }
}

template <CodeKind C, HeaderKind H, int SPG, int T>
NIBBLE_AVX2 void RowT(const FormatInfo& fi, const uint8_t* row, int64_t nb_used, const QActs& a, int64_t t0,
                      float* out) {
  Acc256<T> acc;
  const int8_t* xq[T];
  const float* dx[T];
  const int32_t* xs4[T];
  const float* xsum[T];
  for (int t = 0; t < T; ++t) {
    for (int p = 0; p < 4; ++p) {
      acc.d[p][t] = _mm256_setzero_ps();
      acc.m[p][t] = 0.0f;
    }
    xq[t] = a.xq + (t0 + t) * a.nb * kBlock;
    dx[t] = a.dx + (t0 + t) * a.nb;
    xs4[t] = a.xs4 + (t0 + t) * a.nb * 8;
    xsum[t] = a.xsum + (t0 + t) * a.nb;
  }
  int64_t b = 0;
  for (; b + 4 <= nb_used; b += 4) {
    BlockStep<C, H, SPG, T, 0>(fi, row, b, a, xq, dx, xs4, xsum, acc);
    BlockStep<C, H, SPG, T, 1>(fi, row, b + 1, a, xq, dx, xs4, xsum, acc);
    BlockStep<C, H, SPG, T, 2>(fi, row, b + 2, a, xq, dx, xs4, xsum, acc);
    BlockStep<C, H, SPG, T, 3>(fi, row, b + 3, a, xq, dx, xs4, xsum, acc);
  }
  if (b < nb_used) BlockStep<C, H, SPG, T, 0>(fi, row, b, a, xq, dx, xs4, xsum, acc);
  if (b + 1 < nb_used) BlockStep<C, H, SPG, T, 1>(fi, row, b + 1, a, xq, dx, xs4, xsum, acc);
  if (b + 2 < nb_used) BlockStep<C, H, SPG, T, 2>(fi, row, b + 2, a, xq, dx, xs4, xsum, acc);
  for (int t = 0; t < T; ++t) {
    const float d = Reduce(_mm256_add_ps(acc.d[0][t], acc.d[2][t]), _mm256_add_ps(acc.d[1][t], acc.d[3][t]));
    out[t] = d + ((acc.m[0][t] + acc.m[1][t]) + (acc.m[2][t] + acc.m[3][t]));
  }
}

template <CodeKind C, HeaderKind H, int SPG, int T>
NIBBLE_AVX2 void RowsT(const FormatInfo& fi, const uint8_t* data, int64_t row_bytes, int64_t r_begin, int64_t r_end,
                       const QActs& a, int64_t t0, float* y, int64_t ldy) {
  const int64_t nb_used = (a.cols + kBlock - 1) / kBlock;
  float out[T];
  for (int64_t r = r_begin; r < r_end; ++r) {
    RowT<C, H, SPG, T>(fi, data + r * row_bytes, nb_used, a, t0, out);
    for (int t = 0; t < T; ++t) y[(t0 + t) * ldy + r] = out[t];
  }
}

template <CodeKind C, HeaderKind H, int SPG>
void RowsCodeFold(const FormatInfo& fi, const uint8_t* data, int64_t row_bytes, int64_t r_begin, int64_t r_end,
                  const QActs& a, int64_t t_begin, int64_t t_end, float* y, int64_t ldy) {
  for (int64_t t0 = t_begin; t0 < t_end;) {
    const int64_t n = t_end - t0;
    if (n >= 4) {
      RowsT<C, H, SPG, 4>(fi, data, row_bytes, r_begin, r_end, a, t0, y, ldy);
      t0 += 4;
    } else if (n == 3) {
      RowsT<C, H, SPG, 3>(fi, data, row_bytes, r_begin, r_end, a, t0, y, ldy);
      t0 += 3;
    } else if (n == 2) {
      RowsT<C, H, SPG, 2>(fi, data, row_bytes, r_begin, r_end, a, t0, y, ldy);
      t0 += 2;
    } else {
      RowsT<C, H, SPG, 1>(fi, data, row_bytes, r_begin, r_end, a, t0, y, ldy);
      t0 += 1;
    }
  }
}

// Groups of 32, 64, 128 columns (fmt::AllFormats()).
template <CodeKind C, HeaderKind H>
void RowsCodeSpg(const FormatInfo& fi, const uint8_t* data, int64_t row_bytes, int64_t r_begin, int64_t r_end,
                 const QActs& a, int64_t t_begin, int64_t t_end, float* y, int64_t ldy) {
  switch (fi.group / kBlock) {
    case 1: return RowsCodeFold<C, H, 1>(fi, data, row_bytes, r_begin, r_end, a, t_begin, t_end, y, ldy);
    case 2: return RowsCodeFold<C, H, 2>(fi, data, row_bytes, r_begin, r_end, a, t_begin, t_end, y, ldy);
    default: return RowsCodeFold<C, H, 4>(fi, data, row_bytes, r_begin, r_end, a, t_begin, t_end, y, ldy);
  }
}

template <CodeKind C>
void RowsCode(const FormatInfo& fi, const uint8_t* data, int64_t row_bytes, int64_t r_begin, int64_t r_end,
              const QActs& a, int64_t t_begin, int64_t t_end, float* y, int64_t ldy) {
  // The header kinds each code layout occurs with (fmt::AllFormats()).
  if constexpr (C == CodeKind::kU1) {
    RowsCodeSpg<C, HeaderKind::kBinary>(fi, data, row_bytes, r_begin, r_end, a, t_begin, t_end, y, ldy);
  } else if constexpr (C == CodeKind::kBinTern) {
    RowsCodeSpg<C, HeaderKind::kBinTern>(fi, data, row_bytes, r_begin, r_end, a, t_begin, t_end, y, ldy);
  } else {
    if constexpr (C == CodeKind::kU2) {
      if (fi.header == HeaderKind::kTernary)
        return RowsCodeSpg<C, HeaderKind::kTernary>(fi, data, row_bytes, r_begin, r_end, a, t_begin, t_end, y, ldy);
    }
    if (fi.header == HeaderKind::kIntSym)
      return RowsCodeSpg<C, HeaderKind::kIntSym>(fi, data, row_bytes, r_begin, r_end, a, t_begin, t_end, y, ldy);
    RowsCodeSpg<C, HeaderKind::kIntAsym>(fi, data, row_bytes, r_begin, r_end, a, t_begin, t_end, y, ldy);
  }
}

// 8 u8 codes (the low 8 bytes of q8) -> values by the group's DequantGroup
// mode (qmatmul_internal.h).
NIBBLE_AVX2 inline __m256 DequantValues8(__m128i q8, const DequantGroup& g, __m256 dv, __m256 mv, __m256 neg,
                                         __m256i offv) {
  const __m256i q = _mm256_cvtepu8_epi32(q8);
  if (g.mode == DequantGroup::kAffine) return _mm256_fmadd_ps(dv, _mm256_cvtepi32_ps(q), mv);
  if (g.mode == DequantGroup::kOffset) return _mm256_mul_ps(dv, _mm256_cvtepi32_ps(_mm256_sub_epi32(q, offv)));
  return _mm256_blendv_ps(dv, neg, _mm256_castsi256_ps(_mm256_cmpeq_epi32(q, _mm256_setzero_si256())));
}

// DequantRowAvx2 for one code layout (DequantRowAvx512's scheme at 8 lanes:
// the same formulas, so the same bits as fmt::DequantizeRowRef).
template <CodeKind C>
NIBBLE_AVX2 void DequantRowT(const FormatInfo& fi, const uint8_t* row, int64_t cols, float* out) {
  const int spg = fi.group / kBlock;
  const int64_t groups = (cols + fi.group - 1) / fi.group;
  for (int64_t g = 0; g < groups; ++g) {
    const DequantGroup dg = ParseDequantGroup(fi, row + g * fi.block_bytes, F16{});
    const __m256 dv = _mm256_set1_ps(dg.d), mv = _mm256_set1_ps(dg.m), neg = _mm256_set1_ps(-dg.d);
    const __m256i offv = _mm256_set1_epi32(dg.off);
    for (int k = 0; k < spg; ++k) {
      const int64_t c = g * fi.group + int64_t{kBlock} * k;
      if (c >= cols) break;
      __m256i q = Unpack32<C>(dg.codes, fi.group, k, dg.ternary);
      if constexpr (kSignedCodes<C>) q = _mm256_xor_si256(q, _mm256_set1_epi8(static_cast<char>(0x80)));  // unsigned
      const __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
      __m256 v[4] = {DequantValues8(lo, dg, dv, mv, neg, offv),
                     DequantValues8(_mm_unpackhi_epi64(lo, lo), dg, dv, mv, neg, offv),
                     DequantValues8(hi, dg, dv, mv, neg, offv),
                     DequantValues8(_mm_unpackhi_epi64(hi, hi), dg, dv, mv, neg, offv)};
      const int64_t n = cols - c;
      if (n >= kBlock) {
        for (int i = 0; i < 4; ++i) _mm256_storeu_ps(out + c + 8 * i, v[i]);
      } else {
        alignas(32) float tmp[kBlock];
        for (int i = 0; i < 4; ++i) _mm256_store_ps(tmp + 8 * i, v[i]);
        std::memcpy(out + c, tmp, static_cast<size_t>(n) * sizeof(float));
      }
    }
  }
}

}  // namespace

void DequantRowAvx2(const fmt::Format& f, const uint8_t* row, int64_t cols, float* out) {
  const FormatInfo fi = Describe(f);
  switch (fi.code) {
    case CodeKind::kU8: return DequantRowT<CodeKind::kU8>(fi, row, cols, out);
    case CodeKind::kU4: return DequantRowT<CodeKind::kU4>(fi, row, cols, out);
    case CodeKind::kU3: return DequantRowT<CodeKind::kU3>(fi, row, cols, out);
    case CodeKind::kU2: return DequantRowT<CodeKind::kU2>(fi, row, cols, out);
    case CodeKind::kU1: return DequantRowT<CodeKind::kU1>(fi, row, cols, out);
    case CodeKind::kBinTern: return DequantRowT<CodeKind::kBinTern>(fi, row, cols, out);
    case CodeKind::kNl4: return DequantRowT<CodeKind::kNl4>(fi, row, cols, out);
    case CodeKind::kNl3: return DequantRowT<CodeKind::kNl3>(fi, row, cols, out);
    case CodeKind::kNl2: return DequantRowT<CodeKind::kNl2>(fi, row, cols, out);
  }
}

void RowsAvx2(const fmt::Format& f, const uint8_t* data, int64_t r_begin, int64_t r_end, const QActs& a,
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
    case CodeKind::kNl4: return RowsCode<CodeKind::kNl4>(fi, data, rb, r_begin, r_end, a, t_begin, t_end, y, ldy);
    case CodeKind::kNl3: return RowsCode<CodeKind::kNl3>(fi, data, rb, r_begin, r_end, a, t_begin, t_end, y, ldy);
    case CodeKind::kNl2: return RowsCode<CodeKind::kNl2>(fi, data, rb, r_begin, r_end, a, t_begin, t_end, y, ldy);
  }
}

}  // namespace nibble::cpu::qmm

#else  // !__x86_64__

namespace nibble::cpu::qmm {
void RowsAvx2(const fmt::Format& f, const uint8_t* data, int64_t r_begin, int64_t r_end, const QActs& a,
              int64_t t_begin, int64_t t_end, float* y, int64_t ldy) {
  RowsScalar(f, data, r_begin, r_end, a, t_begin, t_end, y, ldy);
}
void DequantRowAvx2(const fmt::Format& f, const uint8_t* row, int64_t cols, float* out) {
  fmt::DequantizeRowRef(f, row, cols, out);
}
}  // namespace nibble::cpu::qmm

#endif
