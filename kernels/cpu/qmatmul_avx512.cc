// AVX-512 (F/BW/VL/DQ + VNNI) kernel of the packed-weight matmul
// (kernels/cpu/qmatmul.h). 64 weights per step: two 32-column blocks are
// unpacked to u8 codes in one zmm and multiplied with the int8 activations
// by _mm512_dpbusd_epi32 (exact int32 lane sums of 4 products), converted to
// fp32 and scaled by d_g * dx_b per 8-lane half; the additive term is one
// fma(S_b, m_g * dx_b) per block on the block sum of the activations (one
// lane per row in the decode tile, 8 replicated lanes in Tile). Kernels are
// templates on (code layout, header kind, group / 32), so the per-step header
// parse has no switch and the group index no division. Decode: 4-row x
// 1-token tiles (activation loads shared, one joint reduction, prefetch ~6 KiB
// of rows ahead); on AVX512_VBMI CPUs DecodeTile (scales of 4 rows per step
// converted jointly, vpermb / vpmultishiftqb unpacking; see its section),
// elsewhere (and with NIBBLE_QMM_NO_VBMI set) Tile<4, 1>. Prefill: 1-row x up-to-6-token tiles (each unpacked step
// serves 6 tokens). fp32 order: the canonical one of qmatmul_internal.h
// (bit-identical to the scalar and AVX2 kernels; qmatmul_test asserts it).
#include <algorithm>
#include <cstdlib>
#include <cstring>

// Decode prefetch distance: about this many bytes of rows ahead, at least 2
// 4-row tiles (override with -DNIBBLE_QMM_PF_BYTES=N). Measured with huge
// pages on the AMD EPYC, SmolLM2 tg128 at 1 thread, 2 / 4 / 8 tiles ahead:
// int2_g64 (720-byte tiles) 284 / 312 / 329 tok/s, int4_g64_sym (1,224 B)
// 264 / 290 / 307, int4_g32 (1,440 B) 301 / 301 / 287, and at 2 threads
// int4_g32 lost 5-8% at 4 tiles: the best distance is about constant in
// bytes. 4 KiB (int4_g32 2 tiles, int4_g64_sym 3, int2_g64 5) against the
// fixed 2 tiles: int2_g64 278 -> 321 (1 thread), 415 -> 426 (2);
// int4_g64_sym 268 -> 279, 358 -> 384.
#ifndef NIBBLE_QMM_PF_BYTES
#define NIBBLE_QMM_PF_BYTES 4096
#endif

#include "kernels/cpu/qmatmul_internal.h"

#if defined(__x86_64__)
#include <immintrin.h>

// GCC 12's avx512fintrin.h trips -W(maybe-)uninitialized in its own
// _mm512_undefined_* helpers when inlined here; not our variables.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#define NIBBLE_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,f16c,fma,avx2")))
// Helpers of the hot loop must inline into their (target-attributed) callers.
#define NIBBLE_AVX512_INLINE NIBBLE_AVX512 __attribute__((always_inline)) inline

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
NIBBLE_AVX512_INLINE float Reduce(__m512 acc) {
  const __m256 v8 = _mm256_add_ps(_mm512_castps512_ps256(acc), _mm512_extractf32x8_ps(acc, 1));
  const __m128 v4 = _mm_add_ps(_mm256_castps256_ps128(v8), _mm256_extractf128_ps(v8, 1));
  const __m128 p = _mm_add_ps(v4, _mm_shuffle_ps(v4, v4, _MM_SHUFFLE(2, 3, 0, 1)));  // [v0+v1, ., v2+v3, .]
  return _mm_cvtss_f32(_mm_add_ss(p, _mm_movehl_ps(p, p)));
}

template <typename T, int N>
struct alignas(64) Table {
  T v[N];
};
// vpermps: lane `lane` -> lanes 0-7, lane + 1 -> lanes 8-15 (decode: row r's d / m products of
// blocks b, b + 1; kSpread[0] also spreads an [S_b, S_b+1] pair).
constexpr Table<int32_t, 16> MakeSpread(int lane) {
  Table<int32_t, 16> t{};
  for (int i = 0; i < 16; ++i) t.v[i] = lane + i / 8;
  return t;
}
inline constexpr Table<int32_t, 16> kSpread[4] = {MakeSpread(0), MakeSpread(2), MakeSpread(4), MakeSpread(6)};

// [p[0], p[1]] in every lane pair (p 8-byte aligned: an even block of a
// per-token array whose token stride is even).
NIBBLE_AVX512_INLINE __m512 PairBroadcast(const float* p) {
  return _mm512_castpd_ps(_mm512_set1_pd(*reinterpret_cast<const double*>(p)));
}

// The canonical M term (M_0 + M_1) + (M_2 + M_3) of one output from its two
// slot-pair accumulators (M_2P in lanes 0-7, M_2P+1 in 8-15; lane 0 and 8 used).
NIBBLE_AVX512_INLINE float MChains(__m512 p0, __m512 p1) {
  const __m128 a = _mm_add_ss(_mm512_castps512_ps128(p0), _mm512_extractf32x4_ps(p0, 2));
  const __m128 b = _mm_add_ss(_mm512_castps512_ps128(p1), _mm512_extractf32x4_ps(p1, 2));
  return _mm_cvtss_f32(_mm_add_ss(a, b));
}

// Four rows' Reduce32 of their D lanes at once (d[r]: slots 0-1 + 2-3
// added = the 16 v16 values of row r), with exactly the pairwise adds of
// Reduce32/Reduce16 (qmatmul_internal.h; fp32 addition is commutative, so
// operand order within an add does not matter) done on several rows per
// instruction. Returns [D_0, D_1, D_2, D_3].
NIBBLE_AVX512_INLINE __m128 Reduce4RowsD(const __m512* d) {
  // v8[l] = a[l] + a[l + 8]: two rows per zmm (row A in lanes 0-7, B in 8-15).
  auto half = [](__m512 a, __m512 b) NIBBLE_AVX512 {
    return _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xee));
  };
  const __m512 d01 = half(d[0], d[1]), d23 = half(d[2], d[3]);
  // v4[l] = v8[l] + v8[l + 4]: four rows per zmm (row r in 128-bit lane r).
  const __m512 v4 = _mm512_add_ps(_mm512_shuffle_f32x4(d01, d23, 0x88), _mm512_shuffle_f32x4(d01, d23, 0xdd));
  // (v4[0] + v4[1]) + (v4[2] + v4[3]) per 128-bit lane, in its lane 0.
  const __m512 w = _mm512_add_ps(v4, _mm512_permute_ps(v4, _MM_SHUFFLE(2, 3, 0, 1)));
  const __m512 z = _mm512_add_ps(w, _mm512_permute_ps(w, _MM_SHUFFLE(1, 0, 3, 2)));
  return _mm512_castps512_ps128(
      _mm512_permutexvar_ps(_mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 12, 8, 4, 0), z));
}

// 2-bit stream -> one code per byte: each dword (one source byte) spreads
// its 4 codes over its 4 bytes.
NIBBLE_AVX512_INLINE __m256i Spread2x32(const uint8_t* p) {
  __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  v = _mm256_or_si256(_mm256_or_si256(v, _mm256_slli_epi32(v, 6)),
                      _mm256_or_si256(_mm256_slli_epi32(v, 12), _mm256_slli_epi32(v, 18)));
  return _mm256_and_si256(v, _mm256_set1_epi32(0x03030303));
}
NIBBLE_AVX512_INLINE __m512i Spread2x64(const uint8_t* p) {
  const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m512i t = _mm512_ternarylogic_epi32(v, _mm512_slli_epi32(v, 6), _mm512_slli_epi32(v, 12), 0xfe);  // a|b|c
  return _mm512_ternarylogic_epi32(t, _mm512_slli_epi32(v, 18), _mm512_set1_epi32(0x03030303), 0xa8);  // (a|b)&c
}

// nl: codes (one per byte) -> biased u8 codes L[q] + 128.
template <int BITS>
NIBBLE_AVX512_INLINE __m512i NlLookup(__m512i q) {
  return _mm512_shuffle_epi8(
      _mm512_broadcast_i32x4(_mm_load_si128(reinterpret_cast<const __m128i*>(kNlBiasedLut<BITS>.v))), q);
}
template <int BITS>
NIBBLE_AVX512_INLINE __m256i NlLookup(__m256i q) {
  return _mm256_shuffle_epi8(
      _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(kNlBiasedLut<BITS>.v))), q);
}

// Codes of sub-block k (32 weights) of a group, one u8 per weight.
template <CodeKind C>
NIBBLE_AVX512_INLINE __m256i Unpack32(const uint8_t* codes, int group, int k, bool ternary) {
  if constexpr (C == CodeKind::kU8) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + 32 * k));
  } else if constexpr (kIsNl<C>) {
    return NlLookup<kNlBits<C>>(Unpack32<kRawCode<C>>(codes, group, k, false));
  } else if constexpr (C == CodeKind::kU4) {
    // Word i = 0x00HL -> bytes L, H: (v | v << 4) & 0x0f0f in one ternlog.
    const __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + 16 * k)));
    return _mm256_ternarylogic_epi32(v, _mm256_slli_epi16(v, 4), _mm256_set1_epi16(0x0f0f), 0xa8);
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
NIBBLE_AVX512_INLINE __m512i Unpack64(const uint8_t* codes, int group, int k, bool ternary) {
  if constexpr (C == CodeKind::kU8) {
    return _mm512_loadu_si512(codes + 32 * k);
  } else if constexpr (kIsNl<C>) {
    return NlLookup<kNlBits<C>>(Unpack64<kRawCode<C>>(codes, group, k, false));
  } else if constexpr (C == CodeKind::kU4) {
    const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + 16 * k)));
    return _mm512_ternarylogic_epi32(v, _mm512_slli_epi16(v, 4), _mm512_set1_epi16(0x0f0f), 0xa8);
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

// One pair step's weights for one row: u8 codes of blocks b, b + 1 in one
// zmm, d_g and m_g per 8-lane half (block b in lanes 0-7, b + 1 in 8-15).
// H and SPG (= group / 32) are compile-time, so the header parse and the
// group/sub-block index need no switch and no division. `two` is false only
// for the last pair of a row with an odd block count (SPG == 1).
template <CodeKind C, HeaderKind H, int SPG>
NIBBLE_AVX512_INLINE void LoadPair(const FormatInfo& fi, const uint8_t* row, int64_t b, bool two, __m512i& q,
                                   __m512& dv, __m512& mv) {
  if constexpr (SPG == 1) {
    const uint8_t* p0 = row + b * fi.block_bytes;
    const uint8_t* p1 = p0 + fi.block_bytes;
    if constexpr (H == HeaderKind::kIntAsym) {
      if (two) {
        // [d0 m0 d1 m1] in one conversion, then per-half broadcasts.
        const __m128 h = _mm_cvtph_ps(_mm_insert_epi32(_mm_cvtsi32_si128(static_cast<int>(Load32(p0))),
                                                       static_cast<int>(Load32(p1)), 1));
        const __m512 h4 = _mm512_castps128_ps512(h);
        dv = _mm512_permutexvar_ps(_mm512_set_epi32(2, 2, 2, 2, 2, 2, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0), h4);
        mv = _mm512_permutexvar_ps(_mm512_set_epi32(3, 3, 3, 3, 3, 3, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1), h4);
        q = _mm512_inserti64x4(_mm512_castsi256_si512(Unpack32<C>(p0 + 4, 32, 0, false)),
                               Unpack32<C>(p1 + 4, 32, 0, false), 1);
        return;
      }
    }
    const GroupAffine g0 = ParseGroup(H, fi.bits, p0, F16{});
    if (two) {
      const GroupAffine g1 = ParseGroup(H, fi.bits, p1, F16{});
      q = _mm512_inserti64x4(_mm512_castsi256_si512(Unpack32<C>(g0.codes, 32, 0, g0.ternary)),
                             Unpack32<C>(g1.codes, 32, 0, g1.ternary), 1);
      dv = _mm512_mask_blend_ps(0xff00, _mm512_set1_ps(g0.d), _mm512_set1_ps(g1.d));
      mv = _mm512_mask_blend_ps(0xff00, _mm512_set1_ps(g0.m), _mm512_set1_ps(g1.m));
    } else {
      q = _mm512_zextsi256_si512(Unpack32<C>(g0.codes, 32, 0, g0.ternary));
      dv = _mm512_maskz_mov_ps(0x00ff, _mm512_set1_ps(g0.d));
      mv = _mm512_maskz_mov_ps(0x00ff, _mm512_set1_ps(g0.m));
    }
  } else {
    // Both sub-blocks lie in this group's block (SPG even); a sub-block past
    // cols meets zero activations (xq, dx, xs4 of padding blocks are 0).
    const GroupAffine ga = ParseGroup(H, fi.bits, row + (b / SPG) * fi.block_bytes, F16{});
    q = Unpack64<C>(ga.codes, SPG * kBlock, static_cast<int>(b % SPG), ga.ternary);
    dv = _mm512_set1_ps(ga.d);
    mv = _mm512_set1_ps(ga.m);
  }
}

// Header kinds whose m is an exact multiple of d (int sym: SymMul(bits) d;
// ternary: -d): their M lanes take FoldMul * X with D's scale product.
template <HeaderKind H>
inline constexpr bool kFoldM = H == HeaderKind::kIntSym || H == HeaderKind::kTernary;
constexpr float FoldMul(HeaderKind h, int bits) { return h == HeaderKind::kIntSym ? SymMul(bits) : -1.0f; }

// R rows x T tokens: accumulators [slot pair][row][token] (canonical lane
// order of qmatmul_internal.h: a zmm holds block slots 2P, 2P + 1; an M zmm
// holds the chains M_2P in lanes 0-7 and M_2P+1 in 8-15, 8 copies each).
template <int R, int T>
struct Acc512 {
  __m512 d[2][R][T], m[2][R][T];
};

// Blocks b, b + 1 (b even, b < nb_used) of R rows into slot pair P.
template <CodeKind C, HeaderKind H, int SPG, int R, int T, int P>
NIBBLE_AVX512_INLINE void TileStep(const FormatInfo& fi, const uint8_t* row0, int64_t row_bytes, int64_t b,
                                   bool two, const int8_t* const* xq, const float* const* d16,
                                   const float* const* xsum, Acc512<R, T>& acc) {
  __m512i x[T];
  __m512 dx[T], xs[T];
  for (int t = 0; t < T; ++t) {
    x[t] = _mm512_load_si512(xq[t] + b * kBlock);
    dx[t] = _mm512_load_ps(d16[t] + b * 8);
    // [S_b x 8 | S_b+1 x 8]: each M chain runs replicated in 8 lanes.
    xs[t] = _mm512_permutexvar_ps(_mm512_load_si512(kSpread[0].v), PairBroadcast(xsum[t] + b));
    // m = c d (int sym: c = SymMul, canonical order of qmatmul_internal.h; ternary: c = -1, where
    // fl(-d dx) = -fl(d dx) exactly): the M chains take c S_b with D's scale.
    if constexpr (kFoldM<H>) xs[t] = _mm512_mul_ps(xs[t], _mm512_set1_ps(FoldMul(H, fi.bits)));
  }
  for (int r = 0; r < R; ++r) {
    __m512i q;
    __m512 dv, mv;
    LoadPair<C, H, SPG>(fi, row0 + r * row_bytes, b, two, q, dv, mv);
    for (int t = 0; t < T; ++t) {
      const __m512i i = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q, x[t]);
      const __m512 ds = _mm512_mul_ps(dv, dx[t]);
      acc.d[P][r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i), ds, acc.d[P][r][t]);
      acc.m[P][r][t] = _mm512_fmadd_ps(xs[t], kFoldM<H> ? ds : _mm512_mul_ps(mv, dx[t]), acc.m[P][r][t]);
    }
  }
}

// R rows from row0 x tokens t0 .. t0 + T - 1; out[t * ldy + r].
template <CodeKind C, HeaderKind H, int SPG, int R, int T>
NIBBLE_AVX512 void Tile(const FormatInfo& fi, const uint8_t* row0, int64_t row_bytes, int64_t nb_used,
                        const QActs& a, int64_t t0, float* out, int64_t ldy) {
  Acc512<R, T> acc;
  const int8_t* xq[T];
  const float* d16[T];
  const float* xsum[T];
  for (int t = 0; t < T; ++t) {
    for (int p = 0; p < 2; ++p)
      for (int r = 0; r < R; ++r) acc.d[p][r][t] = acc.m[p][r][t] = _mm512_setzero_ps();
    xq[t] = a.xq + (t0 + t) * a.nb * kBlock;
    d16[t] = a.dx16 + (t0 + t) * a.nb * 8;
    xsum[t] = a.xsum + (t0 + t) * a.nb;
  }
  // Full groups of 4 blocks, then the tail (1 to 3 blocks).
  const int64_t full = nb_used & ~int64_t{3};
  for (int64_t b = 0; b < full; b += 4) {
    TileStep<C, H, SPG, R, T, 0>(fi, row0, row_bytes, b, true, xq, d16, xsum, acc);
    TileStep<C, H, SPG, R, T, 1>(fi, row0, row_bytes, b + 2, true, xq, d16, xsum, acc);
  }
  if (full < nb_used) {
    TileStep<C, H, SPG, R, T, 0>(fi, row0, row_bytes, full, full + 1 < nb_used, xq, d16, xsum, acc);
    if (full + 2 < nb_used)
      TileStep<C, H, SPG, R, T, 1>(fi, row0, row_bytes, full + 2, full + 3 < nb_used, xq, d16, xsum, acc);
  }
  if constexpr (R == 4) {
    for (int t = 0; t < T; ++t) {
      __m512 d[4];
      for (int r = 0; r < 4; ++r) d[r] = _mm512_add_ps(acc.d[0][r][t], acc.d[1][r][t]);
      const __m128 m = _mm_setr_ps(MChains(acc.m[0][0][t], acc.m[1][0][t]), MChains(acc.m[0][1][t], acc.m[1][1][t]),
                                   MChains(acc.m[0][2][t], acc.m[1][2][t]), MChains(acc.m[0][3][t], acc.m[1][3][t]));
      _mm_storeu_ps(out + t * ldy, _mm_add_ps(Reduce4RowsD(d), m));
    }
  } else {
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < T; ++t)
        out[t * ldy + r] = Reduce(_mm512_add_ps(acc.d[0][r][t], acc.d[1][r][t])) +
                           MChains(acc.m[0][r][t], acc.m[1][r][t]);
  }
}

inline constexpr int64_t kPrefetchBytes = NIBBLE_QMM_PF_BYTES;

// ------------------------------------------------------- decode (VBMI) ---
// The 4-row GEMV tile with fewer instructions per pair step (2 blocks x 4
// rows) than Tile<4, 1>:
//  * scales: the 4 rows' headers of the step go through 2 vpermt2w + 1 insert
//    into 16 fp16 values [d_b, d_b+1, m_b, m_b+1] per row, ONE conversion and
//    ONE multiply by [dx_b, dx_b+1] (a broadcast load) give all 16 products
//    fl(d_g dx_b), fl(m_g dx_b), and one vpermps per term and row spreads a
//    row's pair over the two 8-lane halves (was: per row a scalar header
//    parse, conversion, 2 permutes and 2 multiplies);
//  * codes: int4 at group 32 (two 16-byte code runs one header apart) in one
//    masked load + vpermb (was 2 loads, 2 zero-extends and an insert); 2-bit
//    codes by vpmultishiftqb (3 ops per 64 codes, was 6).
// The products and fma chains are exactly the canonical ones
// (qmatmul_internal.h): results stay bit-identical to the scalar kernel.
// Needs AVX512_VBMI (Ice Lake and later, Zen 4); other CPUs keep Tile<4, 1>.

#define NIBBLE_AVX512VBMI \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512vbmi,f16c,fma,avx2")))
#define NIBBLE_VBMI_INLINE NIBBLE_AVX512VBMI __attribute__((always_inline)) inline
#define NIBBLE_VBMI_INLINE_LAMBDA NIBBLE_AVX512VBMI __attribute__((always_inline))

template <CodeKind C>
constexpr int kCodeBits = C == CodeKind::kU8                          ? 8
                          : C == CodeKind::kU4 || C == CodeKind::kNl4 ? 4
                          : C == CodeKind::kNl3                       ? 3
                          : C == CodeKind::kNl2                       ? 2
                          : C == CodeKind::kU3                        ? 3
                          : C == CodeKind::kU2                        ? 2
                                                                      : 1;
// The bits of the u8 codes the dot products see (FormatInfo::bits: nl4's biased codes are 8-bit).
template <CodeKind C>
constexpr int kSymBits = kIsNl<C> ? 8 : kCodeBits<C>;
template <HeaderKind H>
constexpr int kHeaderBytes = H == HeaderKind::kIntAsym ? 4 : 2;  // int, ternary, binary (not bintern)
// Block bytes of the formats the decode tile handles (RowsAvx512 checks it).
template <CodeKind C, HeaderKind H, int SPG>
constexpr int kDecodeBlockBytes = kHeaderBytes<H> + SPG * kBlock * kCodeBits<C> / 8;

// vpermt2w: header words of rows A (first table) and B (second) -> words
// [d_b, d_b+1, m_b, m_b+1] of A (0-3) and of B (4-7). Kinds without a stored
// m take d there (binary: scaled by kBinaryScaleMul; int sym and ternary do
// not read them). SPG > 1: blocks b, b + 1 share one header.
template <CodeKind C, HeaderKind H, int SPG>
constexpr Table<int16_t, 32> MakeHeaderIdx() {
  constexpr int bb = kDecodeBlockBytes<C, H, SPG>;
  constexpr int next = SPG == 1 ? bb / 2 : 0;  // word of block b + 1's header
  constexpr int m = H == HeaderKind::kIntAsym ? 1 : 0;
  Table<int16_t, 32> t{};
  for (int j = 0; j < 2; ++j) {
    t.v[4 * j + 0] = static_cast<int16_t>(32 * j);
    t.v[4 * j + 1] = static_cast<int16_t>(32 * j + next);
    t.v[4 * j + 2] = static_cast<int16_t>(32 * j + m);
    t.v[4 * j + 3] = static_cast<int16_t>(32 * j + next + m);
  }
  return t;
}
template <CodeKind C, HeaderKind H, int SPG>
inline constexpr Table<int16_t, 32> kHeaderIdx = MakeHeaderIdx<C, H, SPG>();
// Binary: [d, d, m, m] = [2a, 2a, -a, -a] per row from the header's a
// (ParseGroup's exact factors). Int sym and ternary use only the d words
// (kFoldM); int asym has both stored.
constexpr Table<float, 16> MakeBinaryScaleMul() {
  Table<float, 16> t{};
  for (int r = 0; r < 4; ++r) t.v[4 * r] = t.v[4 * r + 1] = 2.0f, t.v[4 * r + 2] = t.v[4 * r + 3] = -1.0f;
  return t;
}
inline constexpr Table<float, 16> kBinaryScaleMul = MakeBinaryScaleMul();
// int4 at group 32 (bb = header + 16): word i < 16 takes code byte i, word
// 16 + i byte bb + i of the next block (offsets from the codes' start).
template <HeaderKind H>
constexpr Table<int8_t, 64> MakeU4Idx() {
  Table<int8_t, 64> t{};
  for (int i = 0; i < 32; ++i) t.v[2 * i] = static_cast<int8_t>(kHeaderBytes<H> + (i < 16 ? i : kHeaderBytes<H> + i));
  return t;
}
template <HeaderKind H>
inline constexpr Table<int8_t, 64> kU4Idx = MakeU4Idx<H>();
// 2-bit codes: output byte j of qword k takes bits 16 (k % 4) + 2 j of its
// qword, which holds the 8 code bytes of cols 32 (k / 4) .. + 31.
constexpr Table<int8_t, 64> MakeU2Ctrl() {
  Table<int8_t, 64> t{};
  for (int i = 0; i < 64; ++i) t.v[i] = static_cast<int8_t>(16 * ((i / 8) % 4) + 2 * (i % 8));
  return t;
}
inline constexpr Table<int8_t, 64> kU2Ctrl = MakeU2Ctrl();

NIBBLE_VBMI_INLINE __m512i U2Pair(const uint8_t* q0, const uint8_t* q1, bool two) {
  const __m256i lo = _mm256_set1_epi64x(static_cast<long long>(Load64(q0)));
  const __m512i v = two ? _mm512_inserti64x4(_mm512_castsi256_si512(lo),
                                             _mm256_set1_epi64x(static_cast<long long>(Load64(q1))), 1)
                        : _mm512_zextsi256_si512(lo);
  return _mm512_and_si512(_mm512_multishift_epi64_epi8(_mm512_load_si512(kU2Ctrl.v), v), _mm512_set1_epi8(3));
}

// U2Pair for two contiguous 8-byte code runs (blocks b, b + 1 of one group):
// one 16-byte load and one qword permute instead of two broadcasts and an
// insert; the same bytes as U2Pair(p, p + 8, true).
NIBBLE_VBMI_INLINE __m512i U2PairContiguous(const uint8_t* p) {
  const __m512i v = _mm512_permutexvar_epi64(_mm512_set_epi64(1, 1, 1, 1, 0, 0, 0, 0),
                                             _mm512_castsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  return _mm512_and_si512(_mm512_multishift_epi64_epi8(_mm512_load_si512(kU2Ctrl.v), v), _mm512_set1_epi8(3));
}

// One row's pair step input: the bytes holding its header(s) (hdr; for int4 at
// group 32 also the codes) and the u8 codes of blocks b, b + 1. `two` is false
// only for a last pair with an odd block count at SPG == 1 (block b + 1 does
// not exist: nothing of it is read, its half of q is zero).
template <CodeKind C, HeaderKind H, int SPG>
NIBBLE_VBMI_INLINE void LoadRowPair(const uint8_t* row, int64_t b, bool two, __m512i& hdr, __m512i& q) {
  constexpr int bb = kDecodeBlockBytes<C, H, SPG>;
  constexpr int hb = kHeaderBytes<H>;
  if constexpr (kIsNl<C>) {
    // nl: the plain layout's load and unpack, then the level lookup (a
    // missing block b + 1 keeps a zero half).
    LoadRowPair<kRawCode<C>, H, SPG>(row, b, two, hdr, q);
    q = _mm512_maskz_mov_epi64(two ? 0xff : 0x0f, NlLookup<kNlBits<C>>(q));
    return;
  }
  if constexpr (SPG == 1) {
    const uint8_t* p0 = row + b * bb;
    if constexpr (C == CodeKind::kU4) {
      // Both blocks whole (2 bb <= 40 bytes) in one masked load.
      hdr = _mm512_maskz_loadu_epi8(two ? (__mmask64{1} << (2 * bb)) - 1 : (__mmask64{1} << bb) - 1, p0);
      const __m512i w = _mm512_maskz_permutexvar_epi8(__mmask64{0x5555555555555555ull},
                                                      _mm512_load_si512(kU4Idx<H>.v), hdr);
      q = _mm512_ternarylogic_epi32(w, _mm512_slli_epi16(w, 4), _mm512_set1_epi16(0x0f0f), 0xa8);
      q = _mm512_maskz_mov_epi64(two ? 0xff : 0x0f, q);
      return;
    }
    hdr = _mm512_maskz_loadu_epi8(two ? (__mmask64{1} << (bb + hb)) - 1 : (__mmask64{1} << hb) - 1, p0);
    const uint8_t* c0 = p0 + hb;
    const uint8_t* c1 = c0 + bb;
    if constexpr (C == CodeKind::kU8) {
      const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c0));
      q = _mm512_inserti64x4(_mm512_castsi256_si512(lo), _mm256_maskz_loadu_epi8(two ? ~__mmask32{0} : 0, c1), 1);
    } else if constexpr (C == CodeKind::kU2) {
      q = U2Pair(c0, c1, two);
    } else {
      const __m256i lo = Unpack32<C>(c0, kBlock, 0, false);
      q = two ? _mm512_inserti64x4(_mm512_castsi256_si512(lo), Unpack32<C>(c1, kBlock, 0, false), 1)
              : _mm512_zextsi256_si512(lo);
    }
  } else {
    // Both sub-blocks lie in this group's block; a sub-block past cols meets
    // zero activations and a zero dx (padding blocks).
    const uint8_t* blk = row + (b / SPG) * bb;
    const uint8_t* codes = blk + hb;
    const int k = static_cast<int>(b % SPG);
    hdr = _mm512_castsi128_si512(_mm_cvtsi32_si128(static_cast<int>(Load32(blk))));  // blocks >= 4 bytes
    if constexpr (C == CodeKind::kU2) {
      q = U2PairContiguous(codes + 8 * k);
    } else {
      q = Unpack64<C>(codes, SPG * kBlock, k, false);
    }
  }
}

// Blocks b, b + 1 of two rows (rowa, rowa + row_bytes) into their D
// accumulators of one slot pair (canonical lanes) and their M chains
// (mc: row A's M_s, M_s+1 in lanes 2, 3, row B's in 6, 7; other lanes
// unused). dxv = [dx_b, dx_b+1] per lane pair; x: the pair's activations;
// sv = [S_b, S_b+1] per lane pair (times FoldMul for kFoldM kinds).
template <CodeKind C, HeaderKind H, int SPG>
NIBBLE_VBMI_INLINE void DecodeHalf(const uint8_t* rowa, int64_t row_bytes, int64_t b, bool two, __m512 dxv, __m512i x,
                                   __m512 sv, __m512& da, __m512& db, __m512& mc) {
  __m512i hdr0, hdr1, q0, q1;
  LoadRowPair<C, H, SPG>(rowa, b, two, hdr0, q0);
  LoadRowPair<C, H, SPG>(rowa + row_bytes, b, two, hdr1, q1);
  // 8 fp16 [d_b, d_b+1, m_b, m_b+1] of the two rows -> 8 products (upper lanes 0).
  const __m512i hw = _mm512_permutex2var_epi16(hdr0, _mm512_load_si512(kHeaderIdx<C, H, SPG>.v), hdr1);
  __m512 f = _mm512_zextps256_ps512(_mm256_cvtph_ps(_mm512_castsi512_si128(hw)));
  if constexpr (H == HeaderKind::kBinary) f = _mm512_mul_ps(f, _mm512_load_ps(kBinaryScaleMul.v));
  const __m512 sc = _mm512_mul_ps(f, dxv);
  const __m512i i0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q0, x);
  const __m512i i1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q1, x);
  da = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i0), _mm512_permutexvar_ps(_mm512_load_si512(kSpread[0].v), sc), da);
  db = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i1), _mm512_permutexvar_ps(_mm512_load_si512(kSpread[2].v), sc), db);
  // The m lanes of sc hold fl(m_g dx_b) (kFoldM kinds: fl(d_g dx_b), sv scaled): one fma for 2 rows x 2 blocks.
  mc = _mm512_fmadd_ps(sv, sc, mc);
}

// One slot pair's pass over a 4-row tile: steps b = b0, b0 + 4, ... (b0 = 0
// or 2), each blocks b, b + 1. The accumulators are plain locals (arrays or a
// shared 16-accumulator struct made GCC keep them in memory, stored every step).
template <CodeKind C, HeaderKind H, int SPG>
NIBBLE_VBMI_INLINE void DecodePass(const uint8_t* row0, int64_t row_bytes, int64_t nb_used, int64_t b0,
                                   const int8_t* xq, const float* dx, const float* xsum, __m512* d, __m512* mc) {
  __m512 d0 = _mm512_setzero_ps(), d1 = d0, d2 = d0, d3 = d0, m01 = d0, m23 = d0;
  auto step = [&](int64_t b, bool two) NIBBLE_VBMI_INLINE_LAMBDA {
    // [dx_b, dx_b+1] and [S_b, S_b+1] in every lane pair (nb >= b + 2 entries).
    const __m512 dxv = PairBroadcast(dx + b);
    const __m512i x = _mm512_load_si512(xq + b * kBlock);
    __m512 sv = PairBroadcast(xsum + b);
    if constexpr (kFoldM<H>) sv = _mm512_mul_ps(sv, _mm512_set1_ps(FoldMul(H, kSymBits<C>)));
    DecodeHalf<C, H, SPG>(row0, row_bytes, b, two, dxv, x, sv, d0, d1, m01);
    DecodeHalf<C, H, SPG>(row0 + 2 * row_bytes, row_bytes, b, two, dxv, x, sv, d2, d3, m23);
  };
  int64_t b = b0;
  for (; b + 2 <= nb_used; b += 4) step(b, true);
  if (b < nb_used) step(b, false);  // a last odd block
  d[0] = d0, d[1] = d1, d[2] = d2, d[3] = d3;
  mc[0] = m01, mc[1] = m23;
}

// Rows row0 .. row0 + 3, token t: out[0 .. 3].
template <CodeKind C, HeaderKind H, int SPG>
NIBBLE_AVX512VBMI void DecodeTile(const uint8_t* row0, int64_t row_bytes, int64_t nb_used, const QActs& a, int64_t t,
                                  float* out) {
  const int8_t* xq = a.xq + t * a.nb * kBlock;
  const float* dx = a.dx + t * a.nb;
  const float* xsum = a.xsum + t * a.nb;
  // Slot pair 0 (blocks b % 4 < 2) over the whole row, then slot pair 1:
  // each pass keeps 6 accumulators live. Each lane's fma chain still runs
  // over its blocks in order (canonical).
  __m512 d[4], mc[2], d1[4], mc1[2];
  DecodePass<C, H, SPG>(row0, row_bytes, nb_used, 0, xq, dx, xsum, d, mc);
  DecodePass<C, H, SPG>(row0, row_bytes, nb_used, 2, xq, dx, xsum, d1, mc1);
  for (int r = 0; r < 4; ++r) d[r] = _mm512_add_ps(d[r], d1[r]);
  // (M_0 + M_1) + (M_2 + M_3): pair sums within each pass (lanes 2 and 6), then the passes.
  __m512 m[2];
  for (int i = 0; i < 2; ++i)
    m[i] = _mm512_add_ps(_mm512_add_ps(mc[i], _mm512_permute_ps(mc[i], _MM_SHUFFLE(2, 3, 0, 1))),
                         _mm512_add_ps(mc1[i], _mm512_permute_ps(mc1[i], _MM_SHUFFLE(2, 3, 0, 1))));
  const __m128 mv = _mm512_castps512_ps128(
      _mm512_permutex2var_ps(m[0], _mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 22, 18, 6, 2), m[1]));
  _mm_storeu_ps(out, _mm_add_ps(Reduce4RowsD(d), mv));
}

template <CodeKind C, HeaderKind H, int SPG, bool FAST>
NIBBLE_AVX512 void RowsFmt(const FormatInfo& fi, const uint8_t* data, int64_t row_bytes, int64_t r_begin,
                           int64_t r_end, const QActs& a, int64_t t_begin, int64_t t_end, float* y, int64_t ldy) {
  const int64_t nb_used = (a.cols + kBlock - 1) / kBlock;
  for (int64_t t0 = t_begin; t0 < t_end;) {
    const int64_t n = t_end - t0;
    float* yt = y + t0 * ldy;
    if (n >= 6) {
      for (int64_t r = r_begin; r < r_end; ++r)
        Tile<C, H, SPG, 1, 6>(fi, data + r * row_bytes, row_bytes, nb_used, a, t0, yt + r, ldy);
      t0 += 6;
    } else if (n >= 4) {
      for (int64_t r = r_begin; r < r_end; ++r)
        Tile<C, H, SPG, 1, 4>(fi, data + r * row_bytes, row_bytes, nb_used, a, t0, yt + r, ldy);
      t0 += 4;
    } else if (n == 3) {
      for (int64_t r = r_begin; r < r_end; ++r)
        Tile<C, H, SPG, 1, 3>(fi, data + r * row_bytes, row_bytes, nb_used, a, t0, yt + r, ldy);
      t0 += 3;
    } else if (n == 2) {
      for (int64_t r = r_begin; r < r_end; ++r)
        Tile<C, H, SPG, 1, 2>(fi, data + r * row_bytes, row_bytes, nb_used, a, t0, yt + r, ldy);
      t0 += 2;
    } else {
      // Decode: 4-row micro-tiles (shared activation loads, one joint
      // reduction), then single rows.
      int64_t r = r_begin;
      const int64_t pf_tiles = std::max<int64_t>(2, kPrefetchBytes / (4 * row_bytes));
      for (; r + 4 <= r_end; r += 4) {
        // Software prefetch of the tile pf_tiles ahead (its rows are
        // contiguous): the GEMV is bound by the weight stream, and the
        // hardware prefetcher alone leaves load stalls (perf annotate).
        const int64_t pb = std::min(r + 4 * pf_tiles, r_end), pe = std::min(pb + 4, r_end);
        for (const uint8_t *p = data + pb * row_bytes, *e = data + pe * row_bytes; p < e; p += 64)
          _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0);
        if constexpr (FAST)
          DecodeTile<C, H, SPG>(data + r * row_bytes, row_bytes, nb_used, a, t0, yt + r);
        else
          Tile<C, H, SPG, 4, 1>(fi, data + r * row_bytes, row_bytes, nb_used, a, t0, yt + r, ldy);
      }
      for (; r < r_end; ++r)
        Tile<C, H, SPG, 1, 1>(fi, data + r * row_bytes, row_bytes, nb_used, a, t0, yt + r, ldy);
      t0 += 1;
    }
  }
}

using FmtKernel = void (*)(const FormatInfo&, const uint8_t*, int64_t, int64_t, int64_t, const QActs&, int64_t,
                           int64_t, float*, int64_t);

template <CodeKind C, HeaderKind H, int SPG>
FmtKernel PickFast(int64_t block_bytes, bool fast) {
  if constexpr (C == CodeKind::kBinTern) {
    return RowsFmt<C, H, SPG, false>;  // per-group code layout: Tile<4, 1> only
  } else {
    return fast && block_bytes == kDecodeBlockBytes<C, H, SPG> ? RowsFmt<C, H, SPG, true> : RowsFmt<C, H, SPG, false>;
  }
}

template <CodeKind C, HeaderKind H>
FmtKernel PickSpg(int spg, int64_t block_bytes, bool fast) {
  switch (spg) {
    case 1: return PickFast<C, H, 1>(block_bytes, fast);
    case 2: return PickFast<C, H, 2>(block_bytes, fast);
    default: return PickFast<C, H, 4>(block_bytes, fast);
  }
}

// Code layouts occurring per header kind (fmt::AllFormats()).
template <CodeKind C>
FmtKernel PickHeader(HeaderKind h, int spg, int64_t bb, bool fast) {
  if constexpr (kIsNl<C>) {
    return PickSpg<C, HeaderKind::kIntSym>(spg, bb, fast);
  } else if constexpr (C == CodeKind::kU8 || C == CodeKind::kU4 || C == CodeKind::kU3) {
    return h == HeaderKind::kIntSym ? PickSpg<C, HeaderKind::kIntSym>(spg, bb, fast)
                                    : PickSpg<C, HeaderKind::kIntAsym>(spg, bb, fast);
  } else if constexpr (C == CodeKind::kU2) {
    switch (h) {
      case HeaderKind::kIntSym: return PickSpg<C, HeaderKind::kIntSym>(spg, bb, fast);
      case HeaderKind::kTernary: return PickSpg<C, HeaderKind::kTernary>(spg, bb, fast);
      default: return PickSpg<C, HeaderKind::kIntAsym>(spg, bb, fast);
    }
  } else if constexpr (C == CodeKind::kU1) {
    return PickSpg<C, HeaderKind::kBinary>(spg, bb, fast);
  } else {
    return PickSpg<C, HeaderKind::kBinTern>(spg, bb, fast);
  }
}

// The VBMI decode path: on CPUs that have it, unless NIBBLE_QMM_NO_VBMI is set
// (A/B runs, and tests of the Tile<4, 1> path on such CPUs). Read once.
bool UseVbmiDecode() {
  static const bool use = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512vbmi") && std::getenv("NIBBLE_QMM_NO_VBMI") == nullptr;
  }();
  return use;
}

// ------------------------------------------------------------- dequant ---
// 16 u8 codes -> values by the group's DequantGroup mode (qmatmul_internal.h).
NIBBLE_AVX512_INLINE __m512 DequantValues(__m128i q16, const DequantGroup& g, __m512 dv, __m512 mv, __m512 neg,
                                          __m512i offv) {
  const __m512i q = _mm512_cvtepu8_epi32(q16);
  if (g.mode == DequantGroup::kAffine) return _mm512_fmadd_ps(dv, _mm512_cvtepi32_ps(q), mv);
  if (g.mode == DequantGroup::kOffset) return _mm512_mul_ps(dv, _mm512_cvtepi32_ps(_mm512_sub_epi32(q, offv)));
  return _mm512_mask_blend_ps(_mm512_test_epi32_mask(q, q), neg, dv);
}

// DequantRowAvx512 for one code layout: per 32-weight sub-block the u8 codes
// (Unpack32) widened to int32, then the group's reference formula in the same
// fp32 operations (DequantGroup). The row tail (cols % 32) is stored under a
// mask; sub-blocks past cols are skipped.
template <CodeKind C>
NIBBLE_AVX512 void DequantRowT(const FormatInfo& fi, const uint8_t* row, int64_t cols, float* out) {
  const int spg = fi.group / kBlock;
  const int64_t groups = (cols + fi.group - 1) / fi.group;
  for (int64_t g = 0; g < groups; ++g) {
    const DequantGroup dg = ParseDequantGroup(fi, row + g * fi.block_bytes, F16{});
    const __m512 dv = _mm512_set1_ps(dg.d), mv = _mm512_set1_ps(dg.m), neg = _mm512_set1_ps(-dg.d);
    const __m512i offv = _mm512_set1_epi32(dg.off);
    for (int k = 0; k < spg; ++k) {
      const int64_t c = g * fi.group + int64_t{kBlock} * k;
      if (c >= cols) break;
      const __m256i q = Unpack32<C>(dg.codes, fi.group, k, dg.ternary);
      const __m512 v0 = DequantValues(_mm256_castsi256_si128(q), dg, dv, mv, neg, offv);
      const __m512 v1 = DequantValues(_mm256_extracti128_si256(q, 1), dg, dv, mv, neg, offv);
      const int64_t n = cols - c;
      if (n >= kBlock) {
        _mm512_storeu_ps(out + c, v0);
        _mm512_storeu_ps(out + c + 16, v1);
      } else {
        const __mmask16 k0 = n >= 16 ? 0xffff : static_cast<__mmask16>((1u << n) - 1);
        const __mmask16 k1 = n <= 16 ? 0 : static_cast<__mmask16>((1u << (n - 16)) - 1);
        _mm512_mask_storeu_ps(out + c, k0, v0);
        _mm512_mask_storeu_ps(out + c + 16, k1, v1);
      }
    }
  }
}

}  // namespace

void DequantRowAvx512(const fmt::Format& f, const uint8_t* row, int64_t cols, float* out) {
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

void RowsAvx512(const fmt::Format& f, const uint8_t* data, int64_t r_begin, int64_t r_end, const QActs& a,
                int64_t t_begin, int64_t t_end, float* y, int64_t ldy) {
  const FormatInfo fi = Describe(f);
  const int64_t groups = (a.cols + fi.group - 1) / fi.group;
  const int64_t rb = groups * fi.block_bytes;  // f.RowBytes(a.cols) without a second format lookup
  const int spg = fi.group / kBlock;  // 1, 2 or 4 (groups 32, 64, 128)
  const bool fast = UseVbmiDecode();
  FmtKernel k = nullptr;
  switch (fi.code) {
    case CodeKind::kU8: k = PickHeader<CodeKind::kU8>(fi.header, spg, fi.block_bytes, fast); break;
    case CodeKind::kU4: k = PickHeader<CodeKind::kU4>(fi.header, spg, fi.block_bytes, fast); break;
    case CodeKind::kU3: k = PickHeader<CodeKind::kU3>(fi.header, spg, fi.block_bytes, fast); break;
    case CodeKind::kU2: k = PickHeader<CodeKind::kU2>(fi.header, spg, fi.block_bytes, fast); break;
    case CodeKind::kU1: k = PickHeader<CodeKind::kU1>(fi.header, spg, fi.block_bytes, fast); break;
    case CodeKind::kBinTern: k = PickHeader<CodeKind::kBinTern>(fi.header, spg, fi.block_bytes, fast); break;
    case CodeKind::kNl4: k = PickHeader<CodeKind::kNl4>(fi.header, spg, fi.block_bytes, fast); break;
    case CodeKind::kNl3: k = PickHeader<CodeKind::kNl3>(fi.header, spg, fi.block_bytes, fast); break;
    case CodeKind::kNl2: k = PickHeader<CodeKind::kNl2>(fi.header, spg, fi.block_bytes, fast); break;
  }
  k(fi, data, rb, r_begin, r_end, a, t_begin, t_end, y, ldy);
}

}  // namespace nibble::cpu::qmm

#else  // !__x86_64__

namespace nibble::cpu::qmm {
void RowsAvx512(const fmt::Format& f, const uint8_t* data, int64_t r_begin, int64_t r_end, const QActs& a,
                int64_t t_begin, int64_t t_end, float* y, int64_t ldy) {
  RowsScalar(f, data, r_begin, r_end, a, t_begin, t_end, y, ldy);
}
void DequantRowAvx512(const fmt::Format& f, const uint8_t* row, int64_t cols, float* out) {
  fmt::DequantizeRowRef(f, row, cols, out);
}
}  // namespace nibble::cpu::qmm

#endif
