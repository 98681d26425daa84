#include "kernels/cpu/ops.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string_view>
#include <type_traits>
#include <vector>

#include "kernels/common/fp16.h"
#include "kernels/cpu/aligned_scratch.h"
#include "kernels/cpu/thread_pool.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace nibble::cpu {
namespace {

enum class Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

Isa DetectIsa() {
  Isa best = Isa::kScalar;
#if defined(__x86_64__)
  __builtin_cpu_init();
  // F16C comes with every AVX2 CPU; checked because the fp16-weight kernels use it.
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    best = Isa::kAvx2;
  if (best == Isa::kAvx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl"))
    best = Isa::kAvx512;
#endif
  if (const char* f = std::getenv("NIBBLE_FORCE_ISA")) {
    std::string_view s(f);
    Isa cap = s == "scalar" ? Isa::kScalar : s == "avx2" ? Isa::kAvx2 : Isa::kAvx512;
    best = std::min(best, cap);
  }
  return best;
}

Isa MaxIsa() {
  static const Isa isa = DetectIsa();
  return isa;
}

std::atomic<int> g_isa_override{-1};

Isa GetIsa() {
  const int o = g_isa_override.load(std::memory_order_relaxed);
  return o >= 0 ? static_cast<Isa>(o) : MaxIsa();
}

// bfloat16 weights: the upper 16 bits of an fp32 (widening is a shift, exact).
struct Bf16 {
  uint16_t bits;
};

float DotRef(const float* a, const float* b, int64_t n) {
  float s = 0.0f;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

#if defined(__x86_64__)
__attribute__((target("avx2,fma"))) inline float Hsum256(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

// s + a[0]*b[0] + ... in order, each product rounded (no FMA contraction:
// compiled for the baseline ISA, out of line so that every caller gets the
// same code): the AVX2 dot products' tails.
__attribute__((noinline)) float AddProductsInOrder(float s, const float* a, const float* b, int64_t n) {
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

inline float WidenOne(uint16_t h) { return Fp16ToFp32(h); }
inline float WidenOne(Bf16 b) { return Bf16ToFp32(b.bits); }

// Weight loads for the dot products below: fp32 as it is, fp16 / bf16 widened
// (exactly) in registers. W = float or uint16_t (IEEE fp16 bits).
template <class W>
__attribute__((target("avx2,fma,f16c"), always_inline)) inline __m256 LoadW8(const W* p) {
  if constexpr (std::is_same_v<W, float>) {
    return _mm256_loadu_ps(p);
  } else if constexpr (std::is_same_v<W, Bf16>) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  } else {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
}
template <class W>
__attribute__((target("avx512f,avx512bw,avx512vl"), always_inline)) inline __m512 LoadW16(const W* p) {
  if constexpr (std::is_same_v<W, float>) {
    return _mm512_loadu_ps(p);
  } else if constexpr (std::is_same_v<W, Bf16>) {
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  } else {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
}
template <class W>
__attribute__((target("avx512f,avx512bw,avx512vl"), always_inline)) inline __m512 MaskLoadW16(__mmask16 m,
                                                                                              const W* p) {
  if constexpr (std::is_same_v<W, float>) {
    return _mm512_maskz_loadu_ps(m, p);
  } else if constexpr (std::is_same_v<W, Bf16>) {
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  } else {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
  }
}

// AVX2 dot product: two 8-lane chains over 16-column steps, an 8-column step
// into the first, the horizontal sum, then the < 8 column tail in order.
template <class W>
__attribute__((target("avx2,fma,f16c"))) float DotAvx2T(const W* a, const float* b, int64_t n) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    s0 = _mm256_fmadd_ps(LoadW8(a + i), _mm256_loadu_ps(b + i), s0);
    s1 = _mm256_fmadd_ps(LoadW8(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
  }
  for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(LoadW8(a + i), _mm256_loadu_ps(b + i), s0);
  const float s = Hsum256(_mm256_add_ps(s0, s1));
  if constexpr (std::is_same_v<W, float>) {
    return AddProductsInOrder(s, a + i, b + i, n - i);
  } else {
    float tail[8];
    for (int64_t j = i; j < n; ++j) tail[j - i] = WidenOne(a[j]);
    return AddProductsInOrder(s, tail, b + i, n - i);
  }
}

// AVX-512 dot product: two 16-lane chains over 32-column steps, a 16-column
// step into the first, the masked tail into the second, one reduction.
template <class W>
__attribute__((target("avx512f,avx512bw,avx512vl"))) float DotAvx512T(const W* a, const float* b, int64_t n) {
  __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    s0 = _mm512_fmadd_ps(LoadW16(a + i), _mm512_loadu_ps(b + i), s0);
    s1 = _mm512_fmadd_ps(LoadW16(a + i + 16), _mm512_loadu_ps(b + i + 16), s1);
  }
  for (; i + 16 <= n; i += 16) s0 = _mm512_fmadd_ps(LoadW16(a + i), _mm512_loadu_ps(b + i), s0);
  if (i < n) {
    const __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1);
    s1 = _mm512_fmadd_ps(MaskLoadW16(m, a + i), _mm512_maskz_loadu_ps(m, b + i), s1);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
}

float DotAvx2(const float* a, const float* b, int64_t n) { return DotAvx2T(a, b, n); }
float DotAvx512(const float* a, const float* b, int64_t n) { return DotAvx512T(a, b, n); }

// DotAvx512T of 4 consecutive rows (stride cols) with one x, each row's
// result bit for bit DotAvx512T's (same two accumulator chains, tail and
// reduction): the x loads are shared, 8 independent FMA chains are in flight,
// and the rows pf_rows further on are prefetched (decode GEMV).
template <class W>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void Dot4RowsAvx512T(const W* w, int64_t cols, const float* x,
                                                                             int64_t pf_rows, float* out) {
  __m512 s0[4], s1[4];
  for (int r = 0; r < 4; ++r) s0[r] = s1[r] = _mm512_setzero_ps();
  const W* next = w + pf_rows * cols;
  int64_t i = 0;
  for (; i + 32 <= cols; i += 32) {
    const __m512 x0 = _mm512_loadu_ps(x + i), x1 = _mm512_loadu_ps(x + i + 16);
    for (int r = 0; r < 4; ++r) {
      for (size_t o = 0; o < 32 * sizeof(W); o += 64)
        _mm_prefetch(reinterpret_cast<const char*>(next + r * cols + i) + o, _MM_HINT_T0);
      s0[r] = _mm512_fmadd_ps(LoadW16(w + r * cols + i), x0, s0[r]);
      s1[r] = _mm512_fmadd_ps(LoadW16(w + r * cols + i + 16), x1, s1[r]);
    }
  }
  for (; i + 16 <= cols; i += 16) {
    const __m512 x0 = _mm512_loadu_ps(x + i);
    for (int r = 0; r < 4; ++r) s0[r] = _mm512_fmadd_ps(LoadW16(w + r * cols + i), x0, s0[r]);
  }
  if (i < cols) {
    const __mmask16 m = static_cast<__mmask16>((1u << (cols - i)) - 1);
    const __m512 x0 = _mm512_maskz_loadu_ps(m, x + i);
    for (int r = 0; r < 4; ++r) s1[r] = _mm512_fmadd_ps(MaskLoadW16(m, w + r * cols + i), x0, s1[r]);
  }
  for (int r = 0; r < 4; ++r) out[r] = _mm512_reduce_add_ps(_mm512_add_ps(s0[r], s1[r]));
}

// One k-step of the 4x4 tile (masked for the tail).
__attribute__((target("avx512f"), always_inline)) inline void Tile4x4Step(const float* w, int64_t cols,
                                                                          const float* x, int64_t k, __mmask16 m,
                                                                          __m512 (&acc)[4][4]) {
  __m512 wv[4], xv[4];
  for (int r = 0; r < 4; ++r) wv[r] = _mm512_maskz_loadu_ps(m, w + r * cols + k);
  for (int t = 0; t < 4; ++t) xv[t] = _mm512_maskz_loadu_ps(m, x + t * cols + k);
  for (int t = 0; t < 4; ++t)
    for (int r = 0; r < 4; ++r) acc[t][r] = _mm512_fmadd_ps(wv[r], xv[t], acc[t][r]);
}

// 4 weight rows x 4 tokens register tile: each k step loads 8 vectors for 16 FMAs.
__attribute__((target("avx512f"))) void Tile4x4Avx512(const float* w, int64_t cols, const float* x,
                                                      float* out /*[4 tokens][4 rows]*/) {
  __m512 acc[4][4];
  for (auto& r : acc)
    for (auto& v : r) v = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= cols; k += 16) Tile4x4Step(w, cols, x, k, 0xffff, acc);
  if (k < cols) Tile4x4Step(w, cols, x, k, static_cast<__mmask16>((1u << (cols - k)) - 1), acc);
  for (int t = 0; t < 4; ++t)
    for (int r = 0; r < 4; ++r) out[t * 4 + r] = _mm512_reduce_add_ps(acc[t][r]);
}
#endif

// ---------------------------------------------------------------------------
// 16-bit weights (W = uint16_t: IEEE fp16 bits, or Bf16). Every kernel below
// is its fp32 twin run on the widened row (both widenings are exact): same
// accumulator chains, tails and reductions, so DotHalf(w, x) ==
// DotF32(widen(w), x) bit for bit per ISA.

template <class W>
float DotHalfRef(const W* a, const float* b, int64_t n) {
  float s = 0.0f;
  for (int64_t i = 0; i < n; ++i) s += WidenOne(a[i]) * b[i];
  return s;
}

#if defined(__x86_64__)
template <class W>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void WidenAvx512(const W* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(dst + i, LoadW16(src + i));
  if (i < n) {
    const __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1);
    _mm512_mask_storeu_ps(dst + i, m, MaskLoadW16(m, src + i));
  }
}

template <class W>
__attribute__((target("avx2,fma,f16c"))) void WidenAvx2(const W* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, LoadW8(src + i));
  for (; i < n; ++i) dst[i] = WidenOne(src[i]);
}
#endif

template <class W>
float DotHalf(Isa isa, const W* a, const float* b, int64_t n) {
#if defined(__x86_64__)
  if (isa == Isa::kAvx512) return DotAvx512T(a, b, n);
  if (isa == Isa::kAvx2) return DotAvx2T(a, b, n);
#endif
  return DotHalfRef(a, b, n);
}

template <class W>
void Widen(Isa isa, const W* src, float* dst, int64_t n) {
#if defined(__x86_64__)
  if (isa == Isa::kAvx512) return WidenAvx512(src, dst, n);
  if (isa == Isa::kAvx2) return WidenAvx2(src, dst, n);
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = WidenOne(src[i]);
}

// Rows [r0, r1) of a 16-bit matrix times n_tokens (< kMatMulF32PackedMinTokens,
// or any count at the scalar ISA): every output is DotHalf's.
template <class W>
void MatMulHalfRows(Isa isa, const W* w, int64_t rows, int64_t cols, const float* x, int64_t n_tokens, float* y,
                    int64_t r0, int64_t r1) {
  int64_t r = r0;
#if defined(__x86_64__)
  if (isa == Isa::kAvx512) {
    // Prefetch about 4 KiB of rows ahead (at least the next 4 rows).
    const int64_t pf_rows = std::max<int64_t>(4, (4096 / std::max<int64_t>(1, 2 * cols) + 3) / 4 * 4);
    float out[4];
    for (; r + 4 <= r1; r += 4)
      for (int64_t t = 0; t < n_tokens; ++t) {
        Dot4RowsAvx512T(w + r * cols, cols, x + t * cols, r + 4 + pf_rows <= r1 ? pf_rows : 4, out);
        for (int rr = 0; rr < 4; ++rr) y[t * rows + r + rr] = out[rr];
      }
  }
#endif
  for (; r < r1; ++r)
    for (int64_t t = 0; t < n_tokens; ++t) y[t * rows + r] = DotHalf(isa, w + r * cols, x + t * cols, cols);
}

float Dot(Isa isa, const float* a, const float* b, int64_t n) {
#if defined(__x86_64__)
  if (isa == Isa::kAvx512) return DotAvx512(a, b, n);
  if (isa == Isa::kAvx2) return DotAvx2(a, b, n);
#endif
  return DotRef(a, b, n);
}

// ---------------------------------------------------------------------------
// Packed-panel matmul for prefill (n_tokens >= kMatMulF32PackedMinTokens, AVX2/AVX-512).
//
// Goal: keep both FMA ports busy on [n_tokens x cols] x [cols x rows] products
// with n_tokens in the tens to hundreds (prefill), where the dot-product tiles
// above are bound by L2 traffic and horizontal reductions. Rows are taken in
// panels of P (32 for AVX-512, 16 for AVX2); each panel (P contiguous rows of w,
// read sequentially) is packed k-major (for every k, the P row values
// contiguous, zero-padded past the last row) into a thread-local grow-only
// buffer, then walked in blocks of kKc columns (the block in use stays in L1
// across all token tiles). A register-blocked kernel keeps P rows x NT tokens of
// y in registers (AVX-512: 32 x 8 = 16 zmm; AVX2: 16 x 6 = 12 ymm): per k, P/16
// (P/8) loads of the panel, one broadcast of x[t][k] per token and P/16 (P/8)
// FMAs per token. y[t][r..r+P) is contiguous, so results are stored (masked on
// the row tail) with no horizontal reduction; later column blocks reload y and
// continue the same chains.
//
// Numerics: every output is one sequential FMA chain over k = 0 .. cols-1
// starting from 0 (y = fma(w[r][k], x[t][k], y)); panels, column blocks, token
// tiles and vector lanes never split or reorder a chain. So for n_tokens >=
// kMatMulF32PackedMinTokens an output depends only on its w row and x row: not
// on the thread count or row split, not on n_tokens or where a token falls in a
// tile, and AVX2 and AVX-512 give the same bytes (MatMulF32PackedOrderRef spells
// the order out in scalar code; ops_test compares bit for bit). Below the
// threshold the Dot / 4x4 tile paths above apply (another order), so a token's
// output can differ by rounding between a batch of < kMatMulF32PackedMinTokens
// tokens and a larger one. The scalar ISA always takes the Dot path.
//
// Threshold 8 (ops.h): at 8 tokens packing (~0.4 cycle per weight) is already
// repaid (1536x576: ~45 GFLOP/s packed vs ~35 for the 4x4 tiles at 4..7 tokens).
// Non-goals: L2/L3 blocking of x, packing shared between threads (each thread
// packs the panels of its own rows), reuse of packed panels across calls.

constexpr int64_t kKc = 256;

// dst[k * P + r] = w[r * cols + k] for r < nr, k < kc; 0 for nr <= r < P.
template <int P>
void PackPanelScalar(const float* w, int64_t cols, int64_t nr, int64_t kc, float* dst) {
  for (int64_t k = 0; k < kc; ++k) {
    float* d = dst + k * P;
    for (int64_t r = 0; r < nr; ++r) d[r] = w[r * cols + k];
    for (int64_t r = nr; r < P; ++r) d[r] = 0.0f;
  }
}

// Calls Kernel<nt> for the runtime token count n in [1, NT] (one instantiation each).
template <int NT, class F>
void WithTokenCount(int64_t n, F&& f) {
  if constexpr (NT >= 1) {
    if (n == NT) {
      f(std::integral_constant<int, NT>{});
      return;
    }
    WithTokenCount<NT - 1>(n, f);
  }
}

// Per-thread packed panel (no allocation once warm).
thread_local AlignedScratch<float> t_panel;

// One packed panel (nr <= Arch::kP rows from row r) times every token.
template <class Arch>
void PanelTimesTokens(const float* panel, int64_t rows, int64_t cols, const float* x, int64_t n_tokens, float* y,
                    int64_t r, int64_t nr) {
  for (int64_t k0 = 0; k0 < cols; k0 += kKc) {
    const int64_t kc = std::min(kKc, cols - k0);
    const float* pk = panel + k0 * Arch::kP;
    const bool accumulate = k0 > 0;
    int64_t t = 0;
    for (; t + Arch::kNt <= n_tokens; t += Arch::kNt)
      Arch::template Kernel<Arch::kNt>(pk, kc, x + t * cols + k0, cols, y + t * rows + r, rows, nr, accumulate);
    if (t < n_tokens)
      WithTokenCount<Arch::kNt - 1>(n_tokens - t, [&](auto nt) {
        Arch::template Kernel<decltype(nt)::value>(pk, kc, x + t * cols + k0, cols, y + t * rows + r, rows, nr,
                                                   accumulate);
      });
  }
}

// Rows [r0, r1) for all tokens via Arch (panel width Arch::kP, token tile Arch::kNt).
// Each panel is packed whole (its rows are one contiguous stretch of w, read
// sequentially); the kKc-column block in use is what stays hot in L1.
template <class Arch>
void MatMulPackedRows(const float* w, int64_t rows, int64_t cols, const float* x, int64_t n_tokens, float* y,
                      int64_t r0, int64_t r1) {
  float* panel = t_panel.Get(static_cast<size_t>(Arch::kP * cols));
  for (int64_t r = r0; r < r1; r += Arch::kP) {
    const int64_t nr = std::min<int64_t>(Arch::kP, r1 - r);
    Arch::Pack(w + r * cols, cols, nr, cols, panel);
    PanelTimesTokens<Arch>(panel, rows, cols, x, n_tokens, y, r, nr);
  }
}

// Per-thread rows written by a RowFill before packing (no allocation once warm).
thread_local AlignedScratch<float> t_filled;

// MatMulPackedRows with the rows produced by `fill` panel by panel.
template <class Arch>
void MatMulPackedFilledRows(const RowFill& fill, int64_t rows, int64_t cols, const float* x, int64_t n_tokens,
                            float* y, int64_t r0, int64_t r1) {
  float* panel = t_panel.Get(static_cast<size_t>(Arch::kP * cols));
  float* src = t_filled.Get(static_cast<size_t>(Arch::kP * cols));
  for (int64_t r = r0; r < r1; r += Arch::kP) {
    const int64_t nr = std::min<int64_t>(Arch::kP, r1 - r);
    fill(r, nr, src);
    Arch::Pack(src, cols, nr, cols, panel);
    PanelTimesTokens<Arch>(panel, rows, cols, x, n_tokens, y, r, nr);
  }
}

#if defined(__x86_64__)
// In-register transpose: on return v[c] holds element c of the 16 input rows.
__attribute__((target("avx512f"), always_inline)) inline void Transpose16x16(__m512 (&v)[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]);
  }
  // Now s[4i + j], 128-bit lane l = rows 4i..4i+3 of column 4l + j.
  __m512 s[16];
  for (int i = 0; i < 4; ++i) {
    s[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    s[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    s[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    s[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  // Column 4l + j = lane l of s[j], s[4 + j], s[8 + j], s[12 + j].
  for (int j = 0; j < 4; ++j) {
    const __m512 u0 = _mm512_shuffle_f32x4(s[j], s[4 + j], 0x44), u1 = _mm512_shuffle_f32x4(s[j], s[4 + j], 0xEE);
    const __m512 u2 = _mm512_shuffle_f32x4(s[8 + j], s[12 + j], 0x44), u3 = _mm512_shuffle_f32x4(s[8 + j], s[12 + j], 0xEE);
    v[j] = _mm512_shuffle_f32x4(u0, u2, 0x88);
    v[4 + j] = _mm512_shuffle_f32x4(u0, u2, 0xDD);
    v[8 + j] = _mm512_shuffle_f32x4(u1, u3, 0x88);
    v[12 + j] = _mm512_shuffle_f32x4(u1, u3, 0xDD);
  }
}

struct PackedAvx512 {
  static constexpr int kP = 32;
  static constexpr int kNt = 8;

  // PackPanelScalar<32> via 16x16 register transposes.
  __attribute__((target("avx512f"))) static void Pack(const float* w, int64_t cols, int64_t nr, int64_t kc,
                                                      float* dst) {
    for (int64_t k = 0; k < kc; k += 16) {
      const int64_t nk = std::min<int64_t>(16, kc - k);
      const __mmask16 km = static_cast<__mmask16>((1u << nk) - 1);
      for (int g = 0; g < 2; ++g) {
        if (g * 16 >= nr) {
          for (int64_t c = 0; c < nk; ++c) _mm512_store_ps(dst + (k + c) * kP + g * 16, _mm512_setzero_ps());
          continue;
        }
        __m512 v[16];
        for (int i = 0; i < 16; ++i) {
          const int64_t r = g * 16 + i;
          if (r < nr) _mm_prefetch(reinterpret_cast<const char*>(w + r * cols + k + 128), _MM_HINT_T0);
          v[i] = r < nr ? _mm512_maskz_loadu_ps(km, w + r * cols + k) : _mm512_setzero_ps();
        }
        Transpose16x16(v);
        for (int64_t c = 0; c < nk; ++c) _mm512_store_ps(dst + (k + c) * kP + g * 16, v[c]);
      }
    }
  }

  template <int NT>
  __attribute__((target("avx512f"))) static void Kernel(const float* pk, int64_t kc, const float* x, int64_t ldx,
                                                        float* y, int64_t ldy, int64_t nr, bool accumulate) {
    const __mmask16 m0 = nr >= 16 ? 0xffff : static_cast<__mmask16>((1u << nr) - 1);
    const __mmask16 m1 = nr >= 32 ? 0xffff : nr <= 16 ? 0 : static_cast<__mmask16>((1u << (nr - 16)) - 1);
    __m512 a0[NT], a1[NT];
#pragma GCC unroll 16
    for (int t = 0; t < NT; ++t) {
      a0[t] = accumulate ? _mm512_maskz_loadu_ps(m0, y + t * ldy) : _mm512_setzero_ps();
      a1[t] = accumulate ? _mm512_maskz_loadu_ps(m1, y + t * ldy + 16) : _mm512_setzero_ps();
    }
    for (int64_t k = 0; k < kc; ++k) {
      const __m512 w0 = _mm512_load_ps(pk + k * kP), w1 = _mm512_load_ps(pk + k * kP + 16);
#pragma GCC unroll 16
      for (int t = 0; t < NT; ++t) {
        const __m512 b = _mm512_set1_ps(x[t * ldx + k]);
        a0[t] = _mm512_fmadd_ps(w0, b, a0[t]);
        a1[t] = _mm512_fmadd_ps(w1, b, a1[t]);
      }
    }
#pragma GCC unroll 16
    for (int t = 0; t < NT; ++t) {
      _mm512_mask_storeu_ps(y + t * ldy, m0, a0[t]);
      _mm512_mask_storeu_ps(y + t * ldy + 16, m1, a1[t]);
    }
  }
};

struct PackedAvx2 {
  static constexpr int kP = 16;
  static constexpr int kNt = 6;

  static void Pack(const float* w, int64_t cols, int64_t nr, int64_t kc, float* dst) {
    PackPanelScalar<kP>(w, cols, nr, kc, dst);
  }

  template <int NT>
  __attribute__((target("avx2,fma"))) static void Kernel(const float* pk, int64_t kc, const float* x, int64_t ldx,
                                                         float* y, int64_t ldy, int64_t nr, bool accumulate) {
    __m256 a0[NT], a1[NT];
    if (nr == kP) {
#pragma GCC unroll 16
      for (int t = 0; t < NT; ++t) {
        a0[t] = accumulate ? _mm256_loadu_ps(y + t * ldy) : _mm256_setzero_ps();
        a1[t] = accumulate ? _mm256_loadu_ps(y + t * ldy + 8) : _mm256_setzero_ps();
      }
    } else {
      // Row tail: go through a full-width buffer (AVX2 has no cheap masked float I/O for both halves).
      alignas(32) float tmp[NT][kP] = {};
      if (accumulate)
        for (int t = 0; t < NT; ++t) std::memcpy(tmp[t], y + t * ldy, nr * sizeof(float));
#pragma GCC unroll 16
      for (int t = 0; t < NT; ++t) {
        a0[t] = _mm256_load_ps(tmp[t]);
        a1[t] = _mm256_load_ps(tmp[t] + 8);
      }
    }
    for (int64_t k = 0; k < kc; ++k) {
      const __m256 w0 = _mm256_load_ps(pk + k * kP), w1 = _mm256_load_ps(pk + k * kP + 8);
#pragma GCC unroll 16
      for (int t = 0; t < NT; ++t) {
        const __m256 b = _mm256_broadcast_ss(x + t * ldx + k);
        a0[t] = _mm256_fmadd_ps(w0, b, a0[t]);
        a1[t] = _mm256_fmadd_ps(w1, b, a1[t]);
      }
    }
    if (nr == kP) {
#pragma GCC unroll 16
      for (int t = 0; t < NT; ++t) {
        _mm256_storeu_ps(y + t * ldy, a0[t]);
        _mm256_storeu_ps(y + t * ldy + 8, a1[t]);
      }
    } else {
      alignas(32) float tmp[NT][kP];
#pragma GCC unroll 16
      for (int t = 0; t < NT; ++t) {
        _mm256_store_ps(tmp[t], a0[t]);
        _mm256_store_ps(tmp[t] + 8, a1[t]);
        std::memcpy(y + t * ldy, tmp[t], nr * sizeof(float));
      }
    }
  }
};
#endif

// Rows [r0, r1) of the product for all tokens.
void MatMulRows(Isa isa, const float* w, int64_t rows, int64_t cols, const float* x, int64_t n_tokens,
                float* y, int64_t r0, int64_t r1) {
  int64_t r = r0;
#if defined(__x86_64__)
  if (n_tokens >= kMatMulF32PackedMinTokens && isa == Isa::kAvx512)
    return MatMulPackedRows<PackedAvx512>(w, rows, cols, x, n_tokens, y, r0, r1);
  if (n_tokens >= kMatMulF32PackedMinTokens && isa == Isa::kAvx2)
    return MatMulPackedRows<PackedAvx2>(w, rows, cols, x, n_tokens, y, r0, r1);
  if (isa == Isa::kAvx512 && n_tokens >= 4) {
    float tile[16];
    for (; r + 4 <= r1; r += 4) {
      int64_t t = 0;
      for (; t + 4 <= n_tokens; t += 4) {
        Tile4x4Avx512(w + r * cols, cols, x + t * cols, tile);
        for (int tt = 0; tt < 4; ++tt)
          for (int rr = 0; rr < 4; ++rr) y[(t + tt) * rows + r + rr] = tile[tt * 4 + rr];
      }
      for (; t < n_tokens; ++t)
        for (int rr = 0; rr < 4; ++rr) y[t * rows + r + rr] = Dot(isa, w + (r + rr) * cols, x + t * cols, cols);
    }
  }
  if (isa == Isa::kAvx512 && n_tokens < 4) {
    // Decode: 4 rows per pass, each output exactly Dot's.
    float out[4];
    for (; r + 4 <= r1; r += 4)
      for (int64_t t = 0; t < n_tokens; ++t) {
        Dot4RowsAvx512T(w + r * cols, cols, x + t * cols, 4, out);
        for (int rr = 0; rr < 4; ++rr) y[t * rows + r + rr] = out[rr];
      }
  }
#endif
  for (; r < r1; ++r) {
    for (int64_t t = 0; t < n_tokens; ++t) y[t * rows + r] = Dot(isa, w + r * cols, x + t * cols, cols);
  }
}

}  // namespace

const char* ActiveIsa() {
  switch (GetIsa()) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "scalar";
  }
}

bool ForceIsaForTesting(std::string_view isa) {
  if (isa.empty()) {
    g_isa_override.store(-1);
    return true;
  }
  const Isa want = isa == "scalar" ? Isa::kScalar : isa == "avx2" ? Isa::kAvx2 : isa == "avx512" ? Isa::kAvx512 : MaxIsa();
  if (want > MaxIsa()) return false;
  g_isa_override.store(static_cast<int>(want));
  return true;
}

float DotF32(const float* a, const float* b, int64_t n) { return Dot(GetIsa(), a, b, n); }

void MatMulF32Filled(const RowFill& fill, int64_t rows, int64_t cols, const float* x, int64_t n_tokens, float* y,
                     ThreadPool* pool) {
  const Isa isa = GetIsa();
  auto run = [&](int64_t b, int64_t e) {
#if defined(__x86_64__)
    if (n_tokens >= kMatMulF32PackedMinTokens && isa == Isa::kAvx512)
      return MatMulPackedFilledRows<PackedAvx512>(fill, rows, cols, x, n_tokens, y, b, e);
    if (n_tokens >= kMatMulF32PackedMinTokens && isa == Isa::kAvx2)
      return MatMulPackedFilledRows<PackedAvx2>(fill, rows, cols, x, n_tokens, y, b, e);
#endif
    // Other ISAs / few tokens: 16 rows at a time through MatMulRows (its order).
    float* src = t_filled.Get(static_cast<size_t>(16 * cols));
    for (int64_t r = b; r < e; r += 16) {
      const int64_t nr = std::min<int64_t>(16, e - r);
      fill(r, nr, src);
      for (int64_t t = 0; t < n_tokens; ++t)
        for (int64_t i = 0; i < nr; ++i) y[t * rows + r + i] = Dot(isa, src + i * cols, x + t * cols, cols);
    }
  };
  if (pool == nullptr || pool->size() == 1) {
    run(0, rows);
    return;
  }
  pool->ParallelFor(rows, 32, [&](int, int64_t b, int64_t e) { run(b, e); });
}

void MatMulF32PackedOrderRef(const float* w, int64_t rows, int64_t cols, const float* x, int64_t n_tokens, float* y) {
  for (int64_t t = 0; t < n_tokens; ++t)
    for (int64_t r = 0; r < rows; ++r) {
      float s = 0.0f;
      for (int64_t c = 0; c < cols; ++c) s = std::fma(w[r * cols + c], x[t * cols + c], s);
      y[t * rows + r] = s;
    }
}

void MatMulF32Ref(const float* w, int64_t rows, int64_t cols, const float* x, int64_t n_tokens, float* y) {
  for (int64_t t = 0; t < n_tokens; ++t)
    for (int64_t r = 0; r < rows; ++r) y[t * rows + r] = DotRef(w + r * cols, x + t * cols, cols);
}

void MatMulF32(const float* w, int64_t rows, int64_t cols, const float* x, int64_t n_tokens, float* y,
               ThreadPool* pool) {
  const Isa isa = GetIsa();
  // 16 rows per grain keeps each thread's output columns on separate cache lines;
  // the packed path takes 32 so that only the last chunk has a partial panel.
  if (pool == nullptr || pool->size() == 1 || rows * cols * n_tokens < 32768) {
    MatMulRows(isa, w, rows, cols, x, n_tokens, y, 0, rows);
    return;
  }
  const int64_t grain = n_tokens >= kMatMulF32PackedMinTokens && isa != Isa::kScalar ? 32 : 16;
  pool->ParallelFor(rows, grain, [&](int, int64_t b, int64_t e) { MatMulRows(isa, w, rows, cols, x, n_tokens, y, b, e); });
}

namespace {

template <class W>
void MatMulHalf(const W* w, int64_t rows, int64_t cols, const float* x, int64_t n_tokens, float* y,
                ThreadPool* pool) {
  const Isa isa = GetIsa();
  if (n_tokens >= kMatMulF32PackedMinTokens && isa != Isa::kScalar) {
    // Prefill: rows widened panel by panel into the packed fp32 GEMM.
    const RowFill fill = [&](int64_t r0, int64_t nr, float* dst) { Widen(isa, w + r0 * cols, dst, nr * cols); };
    MatMulF32Filled(fill, rows, cols, x, n_tokens, y, pool);
    return;
  }
  if (pool == nullptr || pool->size() == 1 || rows * cols * n_tokens < 32768) {
    MatMulHalfRows(isa, w, rows, cols, x, n_tokens, y, 0, rows);
    return;
  }
  pool->ParallelFor(rows, 16, [&](int, int64_t b, int64_t e) { MatMulHalfRows(isa, w, rows, cols, x, n_tokens, y, b, e); });
}

template <class W>
void MatMulHalfRef(const W* w, int64_t rows, int64_t cols, const float* x, int64_t n_tokens, float* y) {
  for (int64_t t = 0; t < n_tokens; ++t)
    for (int64_t r = 0; r < rows; ++r) y[t * rows + r] = DotHalfRef(w + r * cols, x + t * cols, cols);
}

const Bf16* AsBf16(const uint16_t* p) { return reinterpret_cast<const Bf16*>(p); }

}  // namespace

float DotF16(const uint16_t* w, const float* x, int64_t n) { return DotHalf(GetIsa(), w, x, n); }
void WidenF16(const uint16_t* src, float* dst, int64_t n) { Widen(GetIsa(), src, dst, n); }
void MatMulF16(const uint16_t* w, int64_t rows, int64_t cols, const float* x, int64_t n_tokens, float* y,
               ThreadPool* pool) {
  MatMulHalf(w, rows, cols, x, n_tokens, y, pool);
}
void MatMulF16Ref(const uint16_t* w, int64_t rows, int64_t cols, const float* x, int64_t n_tokens, float* y) {
  MatMulHalfRef(w, rows, cols, x, n_tokens, y);
}

float DotBF16(const uint16_t* w, const float* x, int64_t n) { return DotHalf(GetIsa(), AsBf16(w), x, n); }
void WidenBF16(const uint16_t* src, float* dst, int64_t n) { Widen(GetIsa(), AsBf16(src), dst, n); }
void MatMulBF16(const uint16_t* w, int64_t rows, int64_t cols, const float* x, int64_t n_tokens, float* y,
                ThreadPool* pool) {
  MatMulHalf(AsBf16(w), rows, cols, x, n_tokens, y, pool);
}
void MatMulBF16Ref(const uint16_t* w, int64_t rows, int64_t cols, const float* x, int64_t n_tokens, float* y) {
  MatMulHalfRef(AsBf16(w), rows, cols, x, n_tokens, y);
}

// RmsNorm: the sum of squares in one canonical order on every ISA: 16 lane
// chains, element i into lane i % 16 in index order, each step an fma
// (acc = fma(x, x, acc)); then the lanes reduced pairwise (l + 8, l + 4,
// l + 2, l + 1). The rest is elementwise: out = w * (s * x).
namespace {

inline float RmsScale(float ss, int64_t n, float eps) {
  ss /= static_cast<float>(n);
  ss += eps;
  return 1.0f / std::sqrt(ss);
}

inline float Reduce16Lanes(float* a) {
  for (int w = 8; w >= 1; w /= 2)
    for (int l = 0; l < w; ++l) a[l] = a[l] + a[l + w];
  return a[0];
}

void RmsNormScalar(const float* x, const float* weight, int64_t n, float eps, float* out) {
  float acc[16] = {};
  for (int64_t i = 0; i < n; ++i) acc[i % 16] = std::fma(x[i], x[i], acc[i % 16]);
  const float s = RmsScale(Reduce16Lanes(acc), n, eps);
  for (int64_t i = 0; i < n; ++i) out[i] = weight[i] * (s * x[i]);
}

#if defined(__x86_64__)
__attribute__((target("avx2,fma"))) void RmsNormAvx2(const float* x, const float* weight, int64_t n, float eps,
                                                       float* out) {
  __m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();  // lanes 0-7, 8-15
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256 a = _mm256_loadu_ps(x + i), b = _mm256_loadu_ps(x + i + 8);
    lo = _mm256_fmadd_ps(a, a, lo);
    hi = _mm256_fmadd_ps(b, b, hi);
  }
  alignas(32) float acc[16];
  _mm256_store_ps(acc, lo);
  _mm256_store_ps(acc + 8, hi);
  for (; i < n; ++i) acc[i % 16] = std::fma(x[i], x[i], acc[i % 16]);
  const __m256 s = _mm256_set1_ps(RmsScale(Reduce16Lanes(acc), n, eps));
  i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_loadu_ps(weight + i), _mm256_mul_ps(s, _mm256_loadu_ps(x + i))));
  const float sf = _mm256_cvtss_f32(s);
  for (; i < n; ++i) out[i] = weight[i] * (sf * x[i]);
}

__attribute__((target("avx512f"))) void RmsNormAvx512(const float* x, const float* weight, int64_t n, float eps,
                                                       float* out) {
  __m512 a = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    a = _mm512_fmadd_ps(v, v, a);
  }
  alignas(64) float acc[16];
  _mm512_store_ps(acc, a);
  for (; i < n; ++i) acc[i % 16] = std::fma(x[i], x[i], acc[i % 16]);
  const __m512 s = _mm512_set1_ps(RmsScale(Reduce16Lanes(acc), n, eps));
  i = 0;
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_loadu_ps(weight + i), _mm512_mul_ps(s, _mm512_loadu_ps(x + i))));
  const float sf = _mm512_cvtss_f32(s);
  for (; i < n; ++i) out[i] = weight[i] * (sf * x[i]);
}
#endif

}  // namespace

void RmsNorm(const float* x, const float* weight, int64_t n, float eps, float* out) {
#if defined(__x86_64__)
  switch (GetIsa()) {
    case Isa::kAvx512: return RmsNormAvx512(x, weight, n, eps, out);
    case Isa::kAvx2: return RmsNormAvx2(x, weight, n, eps, out);
    default: break;
  }
#endif
  RmsNormScalar(x, weight, n, eps, out);
}

void Rope(float* v, int n_heads, int head_dim, int rope_dim, int pos, float theta, RopeStyle style) {
  const int half = rope_dim / 2;
  // cos/sin of each pair's angle, once for all heads (the same float
  // expressions as llama2.c: freq = theta^(-2i/d), angle = pos * freq).
  constexpr int kMaxHalf = 512;
  float cs[2 * kMaxHalf];
  const auto angle_of = [&](int i) {
    const float freq = 1.0f / std::pow(theta, static_cast<float>(2 * i) / static_cast<float>(rope_dim));
    return static_cast<float>(pos) * freq;
  };
  const bool cached = half <= kMaxHalf;
  if (cached)
    for (int i = 0; i < half; ++i) {
      const float angle = angle_of(i);
      cs[2 * i] = std::cos(angle);
      cs[2 * i + 1] = std::sin(angle);
    }
  for (int h = 0; h < n_heads; ++h) {
    float* p = v + static_cast<int64_t>(h) * head_dim;
    for (int i = 0; i < half; ++i) {
      float c, s;
      if (cached) {
        c = cs[2 * i];
        s = cs[2 * i + 1];
      } else {
        const float angle = angle_of(i);
        c = std::cos(angle);
        s = std::sin(angle);
      }
      float* a;
      float* b;
      if (style == RopeStyle::kInterleaved) {
        a = p + 2 * i;
        b = p + 2 * i + 1;
      } else {
        a = p + i;
        b = p + i + half;
      }
      const float x0 = *a, x1 = *b;
      *a = x0 * c - x1 * s;
      *b = x0 * s + x1 * c;
    }
  }
}

void Softmax(float* x, int64_t n) {
  if (n <= 0) return;
  float mx = x[0];
  for (int64_t i = 1; i < n; ++i) mx = std::max(mx, x[i]);
  float sum = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    x[i] = std::exp(x[i] - mx);
    sum += x[i];
  }
  const float inv = 1.0f / sum;
  for (int64_t i = 0; i < n; ++i) x[i] *= inv;
}

// SwiGLU: gate = g / (1 + e^-g) * up with e^-g from one fixed sequence of
// IEEE operations, the same in the scalar reference and the SIMD loops (so
// every ISA gives the same bits; within a few ulp of std::exp's SiLU):
//   t = clamp(-g, -87, 88)     (as min(t, 88) then max(., -87), SSE semantics)
//   n = rint(t * log2 e)       (round half to even; |n| <= 127)
//   r = fma(n, -ln2_hi, t); r = fma(n, -ln2_lo, r)
//   p = Horner of the degree-7 Taylor series of e^r, each step an fma
//   e = p * 2^n                (2^n built in the exponent field: a normal float),
//       or +inf where -g > 88 (SiLU underflows there: g / inf = +-0)
// then g / (1 + e) * up. No other multiply-add appears, so no FP contraction
// can differ between the compilations.
namespace {

constexpr float kSwiLog2e = 1.44269504088896341f;
constexpr float kSwiLn2Hi = 0.693145751953125f;        // 12 significant bits: n * hi is exact
constexpr float kSwiLn2Lo = 1.428606765330187045e-06f;  // ln 2 - hi
constexpr float kSwiC[8] = {1.0f, 1.0f, 0.5f, 1.0f / 6, 1.0f / 24, 1.0f / 120, 1.0f / 720, 1.0f / 5040};

inline float SwiGluRef(float g, float u) {
  float t = -g;
  t = t < 88.0f ? t : 88.0f;
  t = t > -87.0f ? t : -87.0f;
  const float n = std::nearbyint(t * kSwiLog2e);
  float r = std::fma(n, -kSwiLn2Hi, t);
  r = std::fma(n, -kSwiLn2Lo, r);
  float p = kSwiC[7];
  for (int k = 6; k >= 0; --k) p = std::fma(p, r, kSwiC[k]);
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  float pow2;
  std::memcpy(&pow2, &bits, 4);
  // Past the clamp (g < -88) SiLU underflows to 0: e = inf gives g / inf = +-0.
  const float e = -g > 88.0f ? INFINITY : p * pow2;
  return g / (1.0f + e) * u;
}

void SwiGluScalar(float* gate, const float* up, int64_t n) {
  for (int64_t i = 0; i < n; ++i) gate[i] = SwiGluRef(gate[i], up[i]);
}

#if defined(__x86_64__)
__attribute__((target("avx2,fma"))) void SwiGluAvx2(float* gate, const float* up, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 g = _mm256_loadu_ps(gate + i);
    __m256 t = _mm256_sub_ps(_mm256_setzero_ps(), g);
    t = _mm256_max_ps(_mm256_min_ps(t, _mm256_set1_ps(88.0f)), _mm256_set1_ps(-87.0f));
    const __m256 nf =
        _mm256_round_ps(_mm256_mul_ps(t, _mm256_set1_ps(kSwiLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fmadd_ps(nf, _mm256_set1_ps(-kSwiLn2Hi), t);
    r = _mm256_fmadd_ps(nf, _mm256_set1_ps(-kSwiLn2Lo), r);
    __m256 p = _mm256_set1_ps(kSwiC[7]);
    for (int k = 6; k >= 0; --k) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kSwiC[k]));
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(nf), _mm256_set1_epi32(127)), 23);
    __m256 e = _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
    e = _mm256_blendv_ps(e, _mm256_set1_ps(INFINITY),
                         _mm256_cmp_ps(_mm256_sub_ps(_mm256_setzero_ps(), g), _mm256_set1_ps(88.0f), _CMP_GT_OQ));
    const __m256 s = _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
    _mm256_storeu_ps(gate + i, _mm256_mul_ps(s, _mm256_loadu_ps(up + i)));
  }
  for (; i < n; ++i) gate[i] = SwiGluRef(gate[i], up[i]);
}

__attribute__((target("avx512f"))) void SwiGluAvx512(float* gate, const float* up, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 g = _mm512_loadu_ps(gate + i);
    __m512 t = _mm512_sub_ps(_mm512_setzero_ps(), g);
    t = _mm512_max_ps(_mm512_min_ps(t, _mm512_set1_ps(88.0f)), _mm512_set1_ps(-87.0f));
    const __m512 nf = _mm512_roundscale_ps(_mm512_mul_ps(t, _mm512_set1_ps(kSwiLog2e)),
                                           _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fmadd_ps(nf, _mm512_set1_ps(-kSwiLn2Hi), t);
    r = _mm512_fmadd_ps(nf, _mm512_set1_ps(-kSwiLn2Lo), r);
    __m512 p = _mm512_set1_ps(kSwiC[7]);
    for (int k = 6; k >= 0; --k) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kSwiC[k]));
    const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(nf), _mm512_set1_epi32(127)), 23);
    __m512 e = _mm512_mul_ps(p, _mm512_castsi512_ps(bits));
    e = _mm512_mask_blend_ps(
        _mm512_cmp_ps_mask(_mm512_sub_ps(_mm512_setzero_ps(), g), _mm512_set1_ps(88.0f), _CMP_GT_OQ), e,
        _mm512_set1_ps(INFINITY));
    const __m512 s = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
    _mm512_storeu_ps(gate + i, _mm512_mul_ps(s, _mm512_loadu_ps(up + i)));
  }
  for (; i < n; ++i) gate[i] = SwiGluRef(gate[i], up[i]);
}
#endif

}  // namespace

void SwiGLU(float* gate, const float* up, int64_t n) {
#if defined(__x86_64__)
  switch (GetIsa()) {
    case Isa::kAvx512: return SwiGluAvx512(gate, up, n);
    case Isa::kAvx2: return SwiGluAvx2(gate, up, n);
    default: break;
  }
#endif
  SwiGluScalar(gate, up, n);
}

}  // namespace nibble::cpu
