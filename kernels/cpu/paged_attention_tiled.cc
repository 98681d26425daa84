// Tiled (flash-style) attention: see paged_attention_tiled.h for the contract.
//
// Per work item (kv head kvh, query heads [h0, h1) of its group, tokens
// [t0, t1)) and per K/V tile [j0, j1):
//   1. gather the tile's row pointers (and int8 scales) through the block table;
//   2. for every query row at position P >= j0, over positions [j0, min(j1, P+1)):
//        s_j = (q . k_j) * 1/sqrt(d)              (int8: (q . codes_j) * (scale_k,j / sqrt(d)))
//        m' = max(m, max_j s_j), alpha = exp(m - m'), p_j = exp(s_j - m')
//        l  = l * alpha + sum_j p_j               (16-lane sum, fixed tree: see the .h)
//        acc = acc * alpha + sum_j p_j * v_j      (per element, fma in position order;
//                                                  int8: coefficient p_j * scale_v,j on the codes)
//   3. out = acc * (1 / l).
// Rows never interact, so any grouping of rows into items gives the same bits.
// Every ISA performs the same IEEE operations in the same order (the
// canonical order in paged_attention_tiled.h), so the bits do not depend on
// the SIMD level either.
#include "kernels/cpu/paged_attention_tiled.h"

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

#include "kernels/common/fp16.h"
#include "kernels/cpu/thread_pool.h"

// Bit identity across ISAs needs a * b + c to stay two roundings unless we
// ask for an fma. GCC does not contract in ISO mode (-std=c++20); clang would.
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#endif

#if defined(__x86_64__)
#include <immintrin.h>
// GCC 12's avx512fintrin.h trips -W(maybe-)uninitialized inside its own
// _mm512_reduce_* helpers when inlined; not our variables.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace nibble::cpu::internal {
namespace {

// Query tokens per work item (x the heads of the item = rows sharing each K/V tile).
constexpr int kTokTile = 16;

// An fp16 K/V element (IEEE binary16 bits); converts exactly to float.
struct Half {
  uint16_t bits;
  explicit operator float() const { return Fp16ToFp32(bits); }
};

// One K/V tile of one kv head: row pointers and, for int8, the scales.
struct TileRows {
  const void* k[kKvTile];
  const void* v[kKvTile];
  float ks[kKvTile];
  float vs[kKvTile];
};

void Gather(const TiledProblem& p, int kvh, int j0, int n, TileRows* t) {
  const KvSource& s = p.kv;
  int blk = j0 / s.block_size, slot = j0 % s.block_size;
  const int64_t kv_dim = int64_t{p.n_kv_heads} * p.head_dim;
  for (int j = 0; j < n; ++j) {
    const int64_t boff = int64_t{s.block_table[blk]} * s.block_stride;
    if (!s.int8) {
      const int64_t elem = s.f16 ? 2 : 4;
      const int64_t off = boff + (int64_t{slot} * kv_dim + int64_t{kvh} * p.head_dim) * elem;
      t->k[j] = s.kt != nullptr ? nullptr : s.k + off;
      t->v[j] = s.v + off;
    } else {
      const int64_t idx = int64_t{slot} * p.n_kv_heads + kvh;
      std::memcpy(&t->ks[j], s.k + boff + idx * 4, sizeof(float));
      std::memcpy(&t->vs[j], s.v + boff + idx * 4, sizeof(float));
      t->k[j] = s.kt != nullptr ? nullptr : s.k + boff + s.scales_bytes + idx * p.head_dim;
      t->v[j] = s.v + boff + s.scales_bytes + idx * p.head_dim;
    }
    if (++slot == s.block_size) {
      slot = 0;
      ++blk;
    }
  }
}

// K^T of positions [j0, j0 + 16 g) .. : the address of (dim 0, position j) of
// kv head kvh in a transposed-K source (KvSource::kt); row i is + i * kt_unit.
template <class KT>
inline const KT* KtAt(const TiledProblem& p, int kvh, int j) {
  const KvSource& s = p.kv;
  const int u = j / s.kt_unit;
  const int64_t unit = s.kt_table != nullptr ? s.kt_table[u] : u;
  return reinterpret_cast<const KT*>(s.kt + unit * s.kt_stride) + int64_t{kvh} * p.head_dim * s.kt_unit +
         (j - u * s.kt_unit);
}

// kt[i][j - j0] = K^T (i, j) for j in [j0, j1) from a transposed-K source
// (the layout Transpose produces from K rows): runs of positions inside one
// unit are row segments.
template <class KT>
void FillKt(const TiledProblem& p, int kvh, int j0, int j1, float* kt) {
  const int U = p.kv.kt_unit;
  for (int ja = j0; ja < j1;) {
    const int jb = std::min(j1, (ja / U + 1) * U);
    const KT* src = KtAt<KT>(p, kvh, ja);
    for (int i = 0; i < p.head_dim; ++i) {
      if constexpr (std::is_same_v<KT, float>) {
        std::memcpy(kt + int64_t{i} * kKvTile + (ja - j0), src + int64_t{i} * U, sizeof(float) * (jb - ja));
      } else {
        for (int j = ja; j < jb; ++j) kt[int64_t{i} * kKvTile + (j - j0)] = static_cast<float>(src[int64_t{i} * U + j - ja]);
      }
    }
    ja = jb;
  }
}

// ---- The canonical exp and reduction (paged_attention_tiled.h). The SIMD
// versions below perform exactly these operations lane by lane.

// exp(x) for x <= 0 (callers pass s - max and m_old - m_new): x = n ln2 + r
// with |r| <= ln2 / 2, e^r by a degree-7 polynomial (Cephes-style
// coefficients, all steps fma), 2^n built in the exponent field. x is clamped
// to [kLo, kHi] first: x below -87.3365 gives ~1e-38 (negligible against the
// sum's >= 1 term), n stays in [-126, 127] so 2^n is a normal float and the
// final product is one correctly rounded multiply on every ISA. NaN stays NaN.
struct ExpConst {
  static constexpr float kLog2e = 1.44269504088896341f;
  static constexpr float kLn2Hi = 0.693359375f;
  static constexpr float kLn2Lo = -2.12194440e-4f;
  static constexpr float kLo = -87.3365f;
  static constexpr float kHi = 88.0f;
  static constexpr float kP0 = 1.9875691500e-4f, kP1 = 1.3981999507e-3f, kP2 = 8.3334519073e-3f,
                         kP3 = 4.1665795894e-2f, kP4 = 1.6666665459e-1f, kP5 = 5.0000001201e-1f;
};

// Always inlined so that the AVX2 / AVX-512 wrappers (Exp1) compile the
// std::fma / std::nearbyint calls to single instructions (same results).
__attribute__((always_inline)) inline float ExpCanonical(float x) {
  using C = ExpConst;
  x = C::kHi < x ? C::kHi : x;  // = minps(kHi, x): NaN kept
  x = C::kLo > x ? C::kLo : x;  // = maxps(kLo, x)
  if (std::isnan(x)) return x;
  const float n = std::nearbyint(x * C::kLog2e);  // round to nearest even (default mode), as the SIMD round
  float r = std::fma(-n, C::kLn2Hi, x);           // fnmadd(n, c, x) = fma(-n, c, x) exactly
  r = std::fma(-n, C::kLn2Lo, r);
  float y = C::kP0;
  y = std::fma(y, r, C::kP1);
  y = std::fma(y, r, C::kP2);
  y = std::fma(y, r, C::kP3);
  y = std::fma(y, r, C::kP4);
  y = std::fma(y, r, C::kP5);
  y = std::fma(y, r * r, r + 1.0f);
  const uint32_t e = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &e, sizeof(float));
  return y * two_n;
}

// The canonical sum of 16 lanes: a halving tree (lane l + lane l + 8, then
// + 4, + 2, + 1), the order a 512 -> 256 -> 128 -> 64 -> 32-bit fold gives.
float Reduce16(const float* a) {
  float v8[8], v4[4];
  for (int l = 0; l < 8; ++l) v8[l] = a[l] + a[l + 8];
  for (int l = 0; l < 4; ++l) v4[l] = v8[l] + v8[l + 4];
  return (v4[0] + v4[2]) + (v4[1] + v4[3]);
}

// ---- Per-ISA primitives. Each must be a pure function of its arguments (no
// dependence on alignment or on neighbouring rows) for the bit-identity
// promise, and follow the canonical order exactly (cross-ISA identity).

struct ScalarOps {
  static constexpr bool kTransposed = false;
  static float Exp1(float x) { return ExpCanonical(x); }
  // s[j] = dot(q, k_j) * cs[j] for j < n; returns max_j s[j] (NaN scores skipped).
  template <class K>
  static float Scores(const float* q, const void* const* k, const float* kt, const float* cs, int hd, int n,
                      float* s) {
    float mx = -std::numeric_limits<float>::infinity();
    for (int j = 0; j < n; ++j) {
      const K* kj = static_cast<const K*>(k[j]);
      float d = 0.0f;
      if (kj == nullptr) {  // transposed-K source: the tile is in kt ([hd][kKvTile])
        for (int i = 0; i < hd; ++i) d = std::fma(q[i], kt[int64_t{i} * kKvTile + j], d);
      } else {
        for (int i = 0; i < hd; ++i) d = std::fma(q[i], static_cast<float>(kj[i]), d);
      }
      s[j] = d * cs[j];
      mx = s[j] > mx ? s[j] : mx;  // = maxps(s, mx): a NaN score is skipped
    }
    return mx;
  }
  // s[j] = exp(s[j] - m); returns the canonical sum of s[j]: lane j % 16
  // accumulates in j order from 0, then Reduce16.
  static float ExpSub(float* s, int n, float m) {
    float lane[16] = {};
    for (int j = 0; j < n; ++j) {
      s[j] = ExpCanonical(s[j] - m);
      lane[j % 16] += s[j];
    }
    return Reduce16(lane);
  }
  // acc[0, d) = acc * alpha + sum_j c[j] * v_j  (v_j fp32 or int8 codes).
  template <class V>
  static void Pv(float* acc, int d, float alpha, const float* c, const void* const* v, int n) {
    for (int i = 0; i < d; ++i) {
      float a = alpha == 1.0f ? acc[i] : acc[i] * alpha;
      for (int j = 0; j < n; ++j) a = std::fma(c[j], static_cast<float>(static_cast<const V*>(v[j])[i]), a);
      acc[i] = a;
    }
  }
};

#if defined(__x86_64__)
#define NIBBLE_TA_AVX2 __attribute__((target("avx2,fma,f16c")))
#define NIBBLE_TA_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))

struct Avx2Ops {
  NIBBLE_TA_AVX2 static float Exp1(float x) { return ExpCanonical(x); }
  // Reduce16 of lanes lo (0-7) and hi (8-15): the same adds in the same order.
  NIBBLE_TA_AVX2 static float Reduce16(__m256 lo, __m256 hi) {
    const __m256 v8 = _mm256_add_ps(lo, hi);                                              // v8[l] = a[l] + a[l + 8]
    __m128 v4 = _mm_add_ps(_mm256_castps256_ps128(v8), _mm256_extractf128_ps(v8, 1));  // v8[l] + v8[l + 4]
    v4 = _mm_add_ps(v4, _mm_movehl_ps(v4, v4));                                         // v4[l] + v4[l + 2]
    v4 = _mm_add_ss(v4, _mm_movehdup_ps(v4));                                           // (0 + 2) + (1 + 3)
    return _mm_cvtss_f32(v4);
  }
  NIBBLE_TA_AVX2 static __m256 Load8(const int8_t* c) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(c))));
  }
  NIBBLE_TA_AVX2 static __m256 Load8(const float* v) { return _mm256_loadu_ps(v); }
  NIBBLE_TA_AVX2 static __m256 Load8(const Half* v) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v)));
  }
  NIBBLE_TA_AVX2 static __m256 Exp(__m256 x) {
    using C = ExpConst;
    x = _mm256_min_ps(_mm256_set1_ps(C::kHi), x);  // second operand wins on NaN: NaN kept
    x = _mm256_max_ps(_mm256_set1_ps(C::kLo), x);
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(C::kLog2e)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(C::kLn2Hi), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(C::kLn2Lo), r);
    __m256 y = _mm256_set1_ps(C::kP0);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(C::kP1));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(C::kP2));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(C::kP3));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(C::kP4));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(C::kP5));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
  }
  // exp of 8 keys starting at s + jb (cnt of them), stored back; lanes past
  // cnt are returned as +0 (adding them changes no sum: lane sums are >= +0).
  NIBBLE_TA_AVX2 static __m256 Exp8(float* s, int jb, int cnt, __m256 mv) {
    if (cnt >= 8) {
      const __m256 e = Exp(_mm256_sub_ps(_mm256_loadu_ps(s + jb), mv));
      _mm256_storeu_ps(s + jb, e);
      return e;
    }
    alignas(32) float buf[8] = {};
    std::memcpy(buf, s + jb, sizeof(float) * cnt);
    const __m256 e = Exp(_mm256_sub_ps(_mm256_load_ps(buf), mv));
    _mm256_store_ps(buf, e);
    std::memcpy(s + jb, buf, sizeof(float) * cnt);
    const __m256 keep = _mm256_castsi256_ps(
        _mm256_cmpgt_epi32(_mm256_set1_epi32(cnt), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
    return _mm256_and_ps(e, keep);
  }
  // As ScalarOps::ExpSub: 16 canonical lanes as two ymm (j % 16 < 8: lo).
  NIBBLE_TA_AVX2 static float ExpSub(float* s, int n, float m) {
    const __m256 mv = _mm256_set1_ps(m);
    __m256 lo = _mm256_setzero_ps(), hi = lo;
    for (int j = 0; j < n; j += 16) {
      lo = _mm256_add_ps(lo, Exp8(s, j, std::min(8, n - j), mv));
      if (j + 8 < n) hi = _mm256_add_ps(hi, Exp8(s, j + 8, std::min(8, n - j - 8), mv));
    }
    return Reduce16(lo, hi);
  }
  // The K tile transposed so that scores for 8/16 keys are one fma chain over
  // i: kt[i][j] = k_j[i] as fp32 (int8: the code) for j < n, i < hd. 8x8
  // blocks are transposed in registers (pure data movement: same bytes as the
  // element loop), leftover keys/dims element by element.
  NIBBLE_TA_AVX2 static void Transpose8(__m256* r) {
    __m256 t[8], u[8];
    for (int x = 0; x < 8; x += 2) {
      t[x] = _mm256_unpacklo_ps(r[x], r[x + 1]);      // per 128-bit lane: a0 b0 a1 b1
      t[x + 1] = _mm256_unpackhi_ps(r[x], r[x + 1]);  // a2 b2 a3 b3
    }
    for (int x = 0; x < 8; x += 4) {
      u[x] = _mm256_shuffle_ps(t[x], t[x + 2], 0x44);  // a0 b0 c0 d0
      u[x + 1] = _mm256_shuffle_ps(t[x], t[x + 2], 0xEE);
      u[x + 2] = _mm256_shuffle_ps(t[x + 1], t[x + 3], 0x44);
      u[x + 3] = _mm256_shuffle_ps(t[x + 1], t[x + 3], 0xEE);
    }
    for (int x = 0; x < 4; ++x) {
      r[x] = _mm256_permute2f128_ps(u[x], u[x + 4], 0x20);
      r[x + 4] = _mm256_permute2f128_ps(u[x], u[x + 4], 0x31);
    }
  }
  template <class V>
  NIBBLE_TA_AVX2 static void Transpose(const void* const* k, int n, int hd, float* kt) {
    const int hd8 = hd / 8 * 8;
    int j = 0;
    for (; j + 8 <= n; j += 8) {
      for (int i = 0; i < hd8; i += 8) {
        __m256 r[8];
        for (int x = 0; x < 8; ++x) r[x] = Load8(static_cast<const V*>(k[j + x]) + i);
        Transpose8(r);
        for (int x = 0; x < 8; ++x) _mm256_storeu_ps(kt + int64_t{i + x} * kKvTile + j, r[x]);
      }
      for (int x = 0; x < 8; ++x)
        for (int i = hd8; i < hd; ++i) kt[int64_t{i} * kKvTile + j + x] = static_cast<float>(static_cast<const V*>(k[j + x])[i]);
    }
    for (; j < n; ++j)
      for (int i = 0; i < hd; ++i) kt[int64_t{i} * kKvTile + j] = static_cast<float>(static_cast<const V*>(k[j])[i]);
  }
  static constexpr bool kTransposed = true;
  // s[j] = (sum_i q_i kt[i][j]) * cs[j] for j < n, kt = the tile transposed
  // ([hd][kKvTile], fp32). Per lane: an fma chain over i in order. Returns
  // max_j s[j] (NaN scores skipped).
  NIBBLE_TA_AVX2 static float ScoresT(const float* q, const float* kt, const float* cs, int hd, int n, float* s) {
    __m256 mx = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
    for (int j = 0; j < n; j += 32) {  // 4 independent chains of 8 keys (kt is kKvTile wide: no overrun)
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int i = 0; i < hd; ++i) {
        const float* row = kt + int64_t{i} * kKvTile + j;
        const __m256 qi = _mm256_set1_ps(q[i]);
        a0 = _mm256_fmadd_ps(qi, _mm256_loadu_ps(row), a0);
        a1 = _mm256_fmadd_ps(qi, _mm256_loadu_ps(row + 8), a1);
        a2 = _mm256_fmadd_ps(qi, _mm256_loadu_ps(row + 16), a2);
        a3 = _mm256_fmadd_ps(qi, _mm256_loadu_ps(row + 24), a3);
      }
      const __m256 acc[4] = {a0, a1, a2, a3};
      for (int b = 0; b < 4 && j + 8 * b < n; ++b) {
        const int jb = j + 8 * b, cnt = std::min(8, n - jb);
        const __m256 v = _mm256_mul_ps(acc[b], _mm256_loadu_ps(cs + jb));
        const __m256 keep = _mm256_castsi256_ps(
            _mm256_cmpgt_epi32(_mm256_set1_epi32(cnt), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
        // Lanes past n: -inf (ignored by max); a NaN lane leaves mx unchanged.
        const __m256 vm = _mm256_blendv_ps(_mm256_set1_ps(-std::numeric_limits<float>::infinity()), v, keep);
        mx = _mm256_max_ps(vm, mx);
        alignas(32) float buf[8];
        _mm256_store_ps(buf, v);
        std::memcpy(s + jb, buf, sizeof(float) * cnt);
      }
    }
    alignas(32) float m8[8];
    _mm256_store_ps(m8, mx);
    float r = m8[0];
    for (int i = 1; i < 8; ++i) r = m8[i] > r ? m8[i] : r;
    return r;
  }
  template <class V>
  NIBBLE_TA_AVX2 static void Pv(float* acc, int d, float alpha, const float* c, const void* const* v, int n) {
    const __m256 al = _mm256_set1_ps(alpha);
    const bool scale = alpha != 1.0f;
    int i = 0;
    for (; i + 32 <= d; i += 32) {
      __m256 a0 = _mm256_loadu_ps(acc + i), a1 = _mm256_loadu_ps(acc + i + 8);
      __m256 a2 = _mm256_loadu_ps(acc + i + 16), a3 = _mm256_loadu_ps(acc + i + 24);
      if (scale) {
        a0 = _mm256_mul_ps(a0, al), a1 = _mm256_mul_ps(a1, al), a2 = _mm256_mul_ps(a2, al);
        a3 = _mm256_mul_ps(a3, al);
      }
      for (int j = 0; j < n; ++j) {
        const V* vj = static_cast<const V*>(v[j]) + i;
        const __m256 cj = _mm256_set1_ps(c[j]);
        a0 = _mm256_fmadd_ps(cj, Load8(vj), a0);
        a1 = _mm256_fmadd_ps(cj, Load8(vj + 8), a1);
        a2 = _mm256_fmadd_ps(cj, Load8(vj + 16), a2);
        a3 = _mm256_fmadd_ps(cj, Load8(vj + 24), a3);
      }
      _mm256_storeu_ps(acc + i, a0), _mm256_storeu_ps(acc + i + 8, a1);
      _mm256_storeu_ps(acc + i + 16, a2), _mm256_storeu_ps(acc + i + 24, a3);
    }
    for (; i + 8 <= d; i += 8) {
      __m256 a0 = _mm256_loadu_ps(acc + i);
      if (scale) a0 = _mm256_mul_ps(a0, al);
      for (int j = 0; j < n; ++j) a0 = _mm256_fmadd_ps(_mm256_set1_ps(c[j]), Load8(static_cast<const V*>(v[j]) + i), a0);
      _mm256_storeu_ps(acc + i, a0);
    }
    for (; i < d; ++i) {
      float a = scale ? acc[i] * alpha : acc[i];
      for (int j = 0; j < n; ++j) a = std::fma(c[j], static_cast<float>(static_cast<const V*>(v[j])[i]), a);
      acc[i] = a;
    }
  }
};

struct Avx512Ops {
  NIBBLE_TA_AVX512 static float Exp1(float x) { return ExpCanonical(x); }
  // Tails: the first min(cnt, 16) elements, the rest zero; never reads past them.
  NIBBLE_TA_AVX512 static __m512 Load16(const float* v, int /*cnt*/, __mmask16 m) { return _mm512_maskz_loadu_ps(m, v); }
  NIBBLE_TA_AVX512 static __m512 Load16(const int8_t* c, int cnt, __mmask16 /*m*/) {
    if (cnt >= 16) return Load16(c);
    alignas(16) int8_t buf[16] = {};
    std::memcpy(buf, c, cnt);
    return Load16(buf);
  }
  NIBBLE_TA_AVX512 static __m512 Load16(const float* v) { return _mm512_loadu_ps(v); }
  NIBBLE_TA_AVX512 static __m512 Load16(const Half* v) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v)));
  }
  NIBBLE_TA_AVX512 static __m512 Load16(const Half* v, int /*cnt*/, __mmask16 m) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, v));
  }
  NIBBLE_TA_AVX512 static __m512 Load16(const int8_t* c) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c))));
  }
  NIBBLE_TA_AVX512 static __m512 Exp(__m512 x) {
    using C = ExpConst;
    x = _mm512_min_ps(_mm512_set1_ps(C::kHi), x);  // second operand wins on NaN: NaN kept
    x = _mm512_max_ps(_mm512_set1_ps(C::kLo), x);
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(C::kLog2e)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(C::kLn2Hi), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(C::kLn2Lo), r);
    __m512 y = _mm512_set1_ps(C::kP0);
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(C::kP1));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(C::kP2));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(C::kP3));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(C::kP4));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(C::kP5));
    y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(y, _mm512_castsi512_ps(e));  // y * 2^n, as ExpCanonical
  }
  NIBBLE_TA_AVX512 static float ExpSub(float* s, int n, float m) {
    const __m512 mv = _mm512_set1_ps(m);
    __m512 sum = _mm512_setzero_ps();
    for (int j = 0; j < n; j += 16) {
      const __mmask16 k = n - j >= 16 ? __mmask16(0xffff) : static_cast<__mmask16>((1u << (n - j)) - 1);
      const __m512 e = Exp(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + j), mv));
      _mm512_mask_storeu_ps(s + j, k, e);
      sum = _mm512_mask_add_ps(sum, k, sum, e);  // lane l: keys l, l + 16, ... in order
    }
    return Avx2Ops::Reduce16(_mm512_castps512_ps256(sum),
                             _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(sum), 1)));
  }
  // As Avx2Ops::Transpose with 16x16 blocks.
  NIBBLE_TA_AVX512 static void Transpose16(__m512* r) {
    __m512 t[16];
    for (int x = 0; x < 16; x += 2) {
      t[x] = _mm512_unpacklo_ps(r[x], r[x + 1]);      // per 128-bit lane: a0 b0 a1 b1
      t[x + 1] = _mm512_unpackhi_ps(r[x], r[x + 1]);  // a2 b2 a3 b3
    }
    for (int x = 0; x < 16; x += 4) {  // rows x..x+3, per lane L: column 4L + c in r[x + c]
      r[x] = _mm512_shuffle_ps(t[x], t[x + 2], 0x44);
      r[x + 1] = _mm512_shuffle_ps(t[x], t[x + 2], 0xEE);
      r[x + 2] = _mm512_shuffle_ps(t[x + 1], t[x + 3], 0x44);
      r[x + 3] = _mm512_shuffle_ps(t[x + 1], t[x + 3], 0xEE);
    }
    for (int c = 0; c < 4; ++c) {  // gather lane L of the four row groups: column 4L + c
      const __m512 t0 = _mm512_shuffle_f32x4(r[c], r[4 + c], 0x44);   // A0 A1 B0 B1
      const __m512 t1 = _mm512_shuffle_f32x4(r[c], r[4 + c], 0xEE);   // A2 A3 B2 B3
      const __m512 t2 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0x44);
      const __m512 t3 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0xEE);
      t[c] = _mm512_shuffle_f32x4(t0, t2, 0x88);       // A0 B0 C0 D0
      t[4 + c] = _mm512_shuffle_f32x4(t0, t2, 0xDD);   // A1 B1 C1 D1
      t[8 + c] = _mm512_shuffle_f32x4(t1, t3, 0x88);
      t[12 + c] = _mm512_shuffle_f32x4(t1, t3, 0xDD);
    }
    for (int x = 0; x < 16; ++x) r[x] = t[x];
  }
  template <class V>
  NIBBLE_TA_AVX512 static void Transpose(const void* const* k, int n, int hd, float* kt) {
    const int hd16 = hd / 16 * 16;
    int j = 0;
    for (; j + 16 <= n; j += 16) {
      for (int i = 0; i < hd16; i += 16) {
        __m512 r[16];
        for (int x = 0; x < 16; ++x) r[x] = Load16(static_cast<const V*>(k[j + x]) + i);
        Transpose16(r);
        for (int x = 0; x < 16; ++x) _mm512_storeu_ps(kt + int64_t{i + x} * kKvTile + j, r[x]);
      }
      for (int x = 0; x < 16; ++x)
        for (int i = hd16; i < hd; ++i) kt[int64_t{i} * kKvTile + j + x] = static_cast<float>(static_cast<const V*>(k[j + x])[i]);
    }
    for (; j < n; ++j)
      for (int i = 0; i < hd; ++i) kt[int64_t{i} * kKvTile + j] = static_cast<float>(static_cast<const V*>(k[j])[i]);
  }
  static constexpr bool kTransposed = true;
  // As Avx2Ops::Pv, 16 lanes: the one-row case of PvRows below (scores: ScoresTRows<1>).
  template <class V>
  NIBBLE_TA_AVX512 static void Pv(float* acc, int d, float alpha, const float* c, const void* const* v, int n) {
    PvRows<V, 1>(&acc, d, &alpha, &c, v, n);
  }
  // NR query rows (heads of one kv group, same token) at once: each row gets
  // the same operations as alone (same chains, same order: the canonical
  // order of paged_attention_tiled.h), and every K^T / V load serves NR rows
  // (decode: the whole GQA group per tile).
  static constexpr int kMaxRows = 4;
  // The K^T tile (n <= kKvTile keys) is 4 groups of 16 keys: group g's
  // dimension i at kg[g] + i * ld (a group past n only has to be readable).
  template <int NR, class KT>
  NIBBLE_TA_AVX512 static void ScoresTRows(const float* const* q, const KT* const* kg, int64_t ld,
                                           const float* cs, int hd, int n, float* const* s, float* tmax) {
    __m512 mx[NR];
    for (int r = 0; r < NR; ++r) mx[r] = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    {  // n <= kKvTile: one tile of 4 key groups
      __m512 a[NR][4];
      for (int r = 0; r < NR; ++r) a[r][0] = a[r][1] = a[r][2] = a[r][3] = _mm512_setzero_ps();
      for (int i = 0; i < hd; ++i) {
        const int64_t o = int64_t{i} * ld;
        const __m512 k0 = Load16(kg[0] + o), k1 = Load16(kg[1] + o);
        const __m512 k2 = Load16(kg[2] + o), k3 = Load16(kg[3] + o);
        for (int r = 0; r < NR; ++r) {
          const __m512 qi = _mm512_set1_ps(q[r][i]);
          a[r][0] = _mm512_fmadd_ps(qi, k0, a[r][0]);
          a[r][1] = _mm512_fmadd_ps(qi, k1, a[r][1]);
          a[r][2] = _mm512_fmadd_ps(qi, k2, a[r][2]);
          a[r][3] = _mm512_fmadd_ps(qi, k3, a[r][3]);
        }
      }
      for (int b = 0; b < 4 && 16 * b < n; ++b) {
        const int jb = 16 * b;
        const __mmask16 k = n - jb >= 16 ? __mmask16(0xffff) : static_cast<__mmask16>((1u << (n - jb)) - 1);
        const __m512 c = _mm512_maskz_loadu_ps(k, cs + jb);
        for (int r = 0; r < NR; ++r) {
          const __m512 v = _mm512_mul_ps(a[r][b], c);
          mx[r] = _mm512_mask_max_ps(mx[r], k, v, mx[r]);  // NaN lane: keeps mx
          _mm512_mask_storeu_ps(s[r] + jb, k, v);
        }
      }
    }
    for (int r = 0; r < NR; ++r) tmax[r] = _mm512_reduce_max_ps(mx[r]);
  }
  template <class V, int NR>
  NIBBLE_TA_AVX512 static void PvRows(float* const* acc, int d, const float* alpha, const float* const* c,
                                      const void* const* v, int n) {
    int i = 0;
    for (; i + 64 <= d; i += 64) {
      __m512 a[NR][4];
      for (int r = 0; r < NR; ++r) {
        for (int u = 0; u < 4; ++u) a[r][u] = _mm512_loadu_ps(acc[r] + i + 16 * u);
        if (alpha[r] != 1.0f) {
          const __m512 al = _mm512_set1_ps(alpha[r]);
          for (int u = 0; u < 4; ++u) a[r][u] = _mm512_mul_ps(a[r][u], al);
        }
      }
      for (int j = 0; j < n; ++j) {
        const V* vj = static_cast<const V*>(v[j]) + i;
        const __m512 v0 = Load16(vj), v1 = Load16(vj + 16), v2 = Load16(vj + 32), v3 = Load16(vj + 48);
        for (int r = 0; r < NR; ++r) {
          const __m512 cj = _mm512_set1_ps(c[r][j]);
          a[r][0] = _mm512_fmadd_ps(cj, v0, a[r][0]);
          a[r][1] = _mm512_fmadd_ps(cj, v1, a[r][1]);
          a[r][2] = _mm512_fmadd_ps(cj, v2, a[r][2]);
          a[r][3] = _mm512_fmadd_ps(cj, v3, a[r][3]);
        }
      }
      for (int r = 0; r < NR; ++r)
        for (int u = 0; u < 4; ++u) _mm512_storeu_ps(acc[r] + i + 16 * u, a[r][u]);
    }
    if (i < d) {  // the columns past the last full 64: Pv's tail code per row
      for (int r = 0; r < NR; ++r) PvTail<V>(acc[r], i, d, alpha[r], c[r], v, n);
    }
  }
  template <class V>
  NIBBLE_TA_AVX512 static void PvTail(float* acc, int i, int d, float alpha, const float* c, const void* const* v,
                                      int n) {
    const __m512 al = _mm512_set1_ps(alpha);
    const bool scale = alpha != 1.0f;
    for (; i < d; i += 16) {
      const __mmask16 k = d - i >= 16 ? __mmask16(0xffff) : static_cast<__mmask16>((1u << (d - i)) - 1);
      __m512 a0 = _mm512_maskz_loadu_ps(k, acc + i);
      if (scale) a0 = _mm512_mul_ps(a0, al);
      for (int j = 0; j < n; ++j)
        a0 = _mm512_fmadd_ps(_mm512_set1_ps(c[j]), Load16(static_cast<const V*>(v[j]) + i, d - i, k), a0);
      _mm512_mask_storeu_ps(acc + i, k, a0);
    }
  }
};
#endif

// Floats of per-item scratch: acc [rows, head_dim], m [rows], l [rows],
// s [heads, kKvTile] (one score row per head of the item), cs [kKvTile],
// kt [head_dim, kKvTile].
int64_t ItemScratchFloats(int rows, int heads, int head_dim) {
  return int64_t{rows} * (head_dim + 2) + int64_t{heads + 1} * kKvTile + int64_t{head_dim} * kKvTile;
}

// Ops with multi-row primitives (ScoresTRows / PvRows for 2..kMaxRows rows).
template <class Ops>
constexpr bool kHasRows = requires { Ops::kMaxRows; };

// Work item: kv head `kvh`, query heads [h0, h1), tokens [t0, t1).
// kKind: 0 fp32, 1 int8, 2 fp16 K/V.
template <class Ops, int kKind>
void RunItem(const TiledProblem& p, int kvh, int h0, int h1, int t0, int t1, float* scratch) {
  constexpr bool kI8 = kKind == 1;
  using V = std::conditional_t<kKind == 1, int8_t, std::conditional_t<kKind == 2, Half, float>>;
  const int hd = p.head_dim, nh = h1 - h0, rows = nh * (t1 - t0);
  const int64_t q_width = int64_t{p.n_heads} * hd;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  float* acc = scratch;
  float* m = acc + int64_t{rows} * hd;
  float* l = m + rows;
  float* s = l + rows;        // [nh][kKvTile]
  float* cs = s + int64_t{nh} * kKvTile;  // per-key score factor: 1/sqrt(d) (int8: times the K scale)
  float* kt = cs + kKvTile;
  std::fill(acc, acc + int64_t{rows} * hd, 0.0f);
  std::fill(m, m + rows, -std::numeric_limits<float>::infinity());
  std::fill(l, l + rows, 0.0f);
  const int last = p.pos0 + t1 - 1;  // last position any row of the item sees
  TileRows tr;
  for (int j0 = 0; j0 <= last; j0 += kKvTile) {
    const int j1 = std::min(j0 + kKvTile, last + 1);
    Gather(p, kvh, j0, j1 - j0, &tr);
    for (int j = 0; j < j1 - j0; ++j) cs[j] = kI8 ? tr.ks[j] * scale : scale;
    // The K^T tile: read in place from a transposed-K source (AVX-512, units
    // of whole 16-key groups), else built in the kt scratch.
    // K^T element type: fp32, or fp16 read in place (AVX-512) / widened into kt.
    using KT = std::conditional_t<kKind == 2, Half, std::conditional_t<kKind == 1, int8_t, float>>;
    const KT* kg[4];
    int64_t ld = kKvTile;
    bool in_place = false;
    if (p.kv.kt != nullptr) {
      if (kHasRows<Ops> && p.kv.kt_unit % 16 == 0) {
        for (int g = 0; g < 4; ++g) kg[g] = KtAt<KT>(p, kvh, j0 + 16 * g < j1 ? j0 + 16 * g : j0);
        ld = p.kv.kt_unit;
        in_place = true;
      } else {
        FillKt<KT>(p, kvh, j0, j1, kt);
      }
    } else if constexpr (Ops::kTransposed) {
      Ops::template Transpose<V>(tr.k, j1 - j0, hd, kt);
    }
    const float* kf[4] = {kt, kt + 16, kt + 32, kt + 48};  // the scratch tile (fp32)
    // Scores of `nr` rows (1 .. kMaxRows) against the tile, from wherever it is.
    auto scores_rows = [&](auto nr_tag, const float* const* qs, float* const* ss, int n, float* tmax) {
      if constexpr (kHasRows<Ops>) {
        constexpr int kNr = decltype(nr_tag)::value;
        if (in_place) {
          Ops::template ScoresTRows<kNr, KT>(qs, kg, ld, cs, hd, n, ss, tmax);
        } else {
          Ops::template ScoresTRows<kNr, float>(qs, kf, kKvTile, cs, hd, n, ss, tmax);
        }
      }
    };
    for (int t = std::max(t0, j0 - p.pos0); t < t1; ++t) {
      const int n = std::min(j1, p.pos0 + t + 1) - j0;  // >= 1: pos0 + t >= j0
      if constexpr (kHasRows<Ops>) {
        if (nh >= 2 && nh <= Ops::kMaxRows) {
          // All heads of the item at once (the same operations per row as the loop below).
          const float* qs[Ops::kMaxRows];
          float* ss[Ops::kMaxRows];
          float* accs[Ops::kMaxRows];
          float tmax[Ops::kMaxRows], alpha[Ops::kMaxRows];
          for (int k = 0; k < nh; ++k) {
            qs[k] = p.q + t * q_width + int64_t{h0 + k} * hd;
            ss[k] = s + int64_t{k} * kKvTile;
            accs[k] = acc + int64_t{(t - t0) * nh + k} * hd;
          }
          switch (nh) {
            case 2: scores_rows(std::integral_constant<int, 2>{}, qs, ss, n, tmax); break;
            case 3: scores_rows(std::integral_constant<int, 3>{}, qs, ss, n, tmax); break;
            default: scores_rows(std::integral_constant<int, 4>{}, qs, ss, n, tmax); break;
          }
          for (int k = 0; k < nh; ++k) {
            const int r = (t - t0) * nh + k;
            const float m_new = std::max(m[r], tmax[k] + 0.0f);
            alpha[k] = m_new == m[r] ? 1.0f : Ops::Exp1(m[r] - m_new);
            m[r] = m_new;
            l[r] = l[r] * alpha[k] + Ops::ExpSub(ss[k], n, m_new);
            if constexpr (kI8) {
              for (int j = 0; j < n; ++j) ss[k][j] *= tr.vs[j];
            }
          }
          switch (nh) {
            case 2: Ops::template PvRows<V, 2>(accs, hd, alpha, ss, tr.v, n); break;
            case 3: Ops::template PvRows<V, 3>(accs, hd, alpha, ss, tr.v, n); break;
            default: Ops::template PvRows<V, 4>(accs, hd, alpha, ss, tr.v, n); break;
          }
          continue;
        }
      }
      for (int h = h0; h < h1; ++h) {
        const int r = (t - t0) * nh + (h - h0);
        const float* q = p.q + t * q_width + int64_t{h} * hd;
        float tmax;
        if constexpr (kHasRows<Ops>) {
          float* srow = s;
          scores_rows(std::integral_constant<int, 1>{}, &q, &srow, n, &tmax);
        } else if constexpr (Ops::kTransposed) {
          tmax = Ops::ScoresT(q, kt, cs, hd, n, s);
        } else {
          tmax = Ops::template Scores<V>(q, tr.k, kt, cs, hd, n, s);
        }
        // + 0: a -0 max becomes +0 (max's choice between +-0 is order-dependent).
        const float m_new = std::max(m[r], tmax + 0.0f);  // a NaN score is skipped here and poisons exp below
        const float alpha = m_new == m[r] ? 1.0f : Ops::Exp1(m[r] - m_new);
        m[r] = m_new;
        l[r] = l[r] * alpha + Ops::ExpSub(s, n, m_new);
        if constexpr (kI8) {
          for (int j = 0; j < n; ++j) s[j] *= tr.vs[j];
        }
        Ops::template Pv<V>(acc + int64_t{r} * hd, hd, alpha, s, tr.v, n);
      }
    }
  }
  for (int t = t0; t < t1; ++t)
    for (int h = h0; h < h1; ++h) {
      const int r = (t - t0) * nh + (h - h0);
      const float inv = 1.0f / l[r];
      const float* a = acc + int64_t{r} * hd;
      float* o = p.out + t * q_width + int64_t{h} * hd;
      for (int i = 0; i < hd; ++i) o[i] = a[i] * inv;
    }
}

using ItemFn = void (*)(const TiledProblem&, int, int, int, int, int, float*);

template <class Ops>
ItemFn ItemFor(int kind) {
  return kind == 1 ? RunItem<Ops, 1> : kind == 2 ? RunItem<Ops, 2> : RunItem<Ops, 0>;
}

ItemFn ItemFnFor(AttnIsa isa, int kind) {
#if defined(__x86_64__)
  if (isa == AttnIsa::kAvx512) return ItemFor<Avx512Ops>(kind);
  if (isa == AttnIsa::kAvx2) return ItemFor<Avx2Ops>(kind);
#endif
  (void)isa;
  return ItemFor<ScalarOps>(kind);
}

}  // namespace

void TiledAttention(const TiledProblem& p, AttnIsa isa, ThreadPool* pool, std::vector<float>* scratch) {
  if (p.n_tokens <= 0 || p.n_heads <= 0) return;
  const int group = p.n_heads / p.n_kv_heads;
  const int total = p.pos0 + p.n_tokens;
  // Small problems (decode over a few dozen positions) are not worth a
  // fork/join (~1-3 us). 2^15 = one token, 9 heads of 64 over ~57 positions
  // (SmolLM2): ~10 us of work at 1 thread; with 2^18 decode attention stayed
  // serial for the first ~450 positions, ~9% of a decode step at 1 thread.
  const int64_t flops = int64_t{p.n_tokens} * p.n_heads * total * p.head_dim;
  const int threads = pool != nullptr && flops >= (int64_t{1} << 15) ? pool->size() : 1;
  // Items: (kv head, token tile), all heads of the group sharing each K/V
  // tile; when that leaves threads idle (decode, short chunks) split the
  // group into single heads (same bits: rows are independent).
  const int tok_tile = std::min(kTokTile, p.n_tokens);
  const int n_tt = (p.n_tokens + tok_tile - 1) / tok_tile;
  const int heads_per_item = int64_t{p.n_kv_heads} * n_tt >= threads ? group : 1;
  const int splits = group / heads_per_item;
  const int64_t n_items = int64_t{p.n_kv_heads} * splits * n_tt;
  const int64_t per_thread = ItemScratchFloats(heads_per_item * tok_tile, heads_per_item, p.head_dim);
  if (scratch->size() < size_t(threads * per_thread)) scratch->resize(size_t(threads * per_thread));
  const ItemFn fn = ItemFnFor(isa, p.kv.int8 ? 1 : p.kv.f16 ? 2 : 0);
  // Item i: token tiles last-first (the causal tail is the costliest work).
  auto run = [&](int64_t i, float* sc) {
    const int tt = n_tt - 1 - static_cast<int>(i / (int64_t{p.n_kv_heads} * splits));
    const int rest = static_cast<int>(i % (int64_t{p.n_kv_heads} * splits));
    const int kvh = rest / splits, h0 = kvh * group + (rest % splits) * heads_per_item;
    const int t0 = tt * tok_tile, t1 = std::min(t0 + tok_tile, p.n_tokens);
    fn(p, kvh, h0, h0 + heads_per_item, t0, t1, sc);
  };
  if (threads == 1) {
    for (int64_t i = 0; i < n_items; ++i) run(i, scratch->data());
    return;
  }
  pool->ParallelFor(n_items, 1, [&](int thread, int64_t b, int64_t e) {
    float* sc = scratch->data() + thread * per_thread;
    for (int64_t i = b; i < e; ++i) run(i, sc);
  });
}

}  // namespace nibble::cpu::internal
