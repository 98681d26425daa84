// AMX int8 prefill kernel of the packed-weight matmul (kernels/cpu/qmatmul.h,
// declarations at the end of kernels/cpu/qmatmul_internal.h).
//
// Goals: prefill (calls of n_tokens >= kAmxMinTokens = 8) on CPUs with
// AMX-INT8, for every format of fmt::AllFormats(), on the same exact int32
// block sums as the VNNI kernel, in a fixed fp32 order ("AMX order",
// qmatmul_internal.h) that qmm::RowsAmxOrderScalar reproduces bit for bit.
// Non-goals: decode (a GEMV cannot feed the tile unit; the VNNI 4-row kernel
// stays), bit-identity with the canonical fp32 order (impossible at a profit:
// see qmatmul.h Numerics), fp32/bf16 weights (AMX-BF16), load-time repacking.
//
// When it runs: QuantMatMul on the AVX-512 ISA for n_tokens >= 8 when
// AmxSupported() (CPUID.(7,0):EDX amx_tile (bit 24) + amx_int8 (bit 25),
// AVX-512 VNNI, and arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)
// granted: Linux >= 5.16 hands the 8 KiB tile state out per process on
// request; without it the first tile instruction raises SIGILL, so a refusal
// means the VNNI kernel) and NIBBLE_QMATMUL_AMX != "0". The permission is
// requested once per process (first AmxSupported() call, before any tile
// use); the tile configuration is per thread, so every RowsAmx call loads it
// (_tile_loadconfig, ~tens of ns) on the calling thread - the caller or a pool
// worker - and releases the tile state when done.
//
// Measured (1 thread, CPU time per call, min of 3, qmatmul_bench, shared
// 2-core VM whose load varies 2x between runs): int4_g32, 512 tokens:
// 576x576 12.7 -> 3.3 ms, 192x576 4.5 -> 0.96, 1536x576 33.8 -> 8.4,
// 576x1536 26.3 -> 6.6 (3.8-4.6x); all 10 benchmarked formats gain 3.0-7.4x
// at 512 tokens, 2.1-2.8x at 16 tokens (1536x576), 1.14-1.9x at 8; at 4
// tokens VNNI wins (int4_g32: 0.27 vs 0.44 ms: the strip unpack and a whole
// 16-token tile are paid for 4 tokens). So no format is gated off and the
// threshold is 8 tokens. End to end (nibble-bench -p 512 -n 0 -t 1, int4_g32
// SmolLM2-135M): pp512 105-109 -> 192-200 tok/s (process user time 14.3-15.5
// -> 8.1-8.5 s).
//
// Algorithm, per strip of 16 weight rows (one thread owns a strip):
//  1. Unpack once: the strip's u8 codes of every 32-column block b go to a
//     B tile image wb[b] (8 rows x 64 bytes, VNNI layout: row k holds, for
//     weight rows n = 0..15, the 4 codes of columns 4k..4k+3), and the
//     group parameters to d[g][16], m[g][16] (fp32, 0 for missing rows).
//     The image is reused by every 16-token tile (it stays in L1/L2).
//  2. Per 16-token tile and block b: A = the tokens' int8 activations of
//     block b (16 rows x 32 bytes, contiguous in AmxActs::xqt, which the
//     caller packs tile-major once per call), C = TDPBSUD(A, wb[b]) = the
//     exact int32 L_b[t][n]. Two blocks run per step in two C tiles (tmm4,
//     tmm5), stored to a 3-slot ring in L1; the fp32 epilogue of step i - 2
//     then reads its slot (software pipelining, see TokenTile):
//        acc[t] += float(C[t]) * (d[g] * dx_b[t])          (16 rows per zmm)
//        acc[t] += m[g] * sum_{b in g} dxs_b[t]            (once per group)
//     with the 16 accumulators in registers (named, see NIBBLE_REP16).
//  3. acc[t] is stored to y[t][strip rows] (masked for a row tail).
// Row tails are zero rows in the B image (d = m = 0); token tails read the
// zero padding tokens of AmxActs; a block-count tail reads one zero padding
// block (QActs::nb is even).
//
// Known gap: the fp32 epilogue's reads of the C tiles (TILESTORED to an L1
// ring, then vector loads) dominate. In one measurement window (int4_g32
// 576x576, 512 tokens) the call took 1.52 ms; 0.42 ms without the epilogue,
// and 0.48 ms with the epilogue reading a buffer that tiles never write.
// So reading back tile-stored lines costs ~2/3 of the call (C traffic is 4
// bytes per token x row x block: ~21 MB per such call). Things that did not
// help, within this shared VM's noise: an epilogue lag of 1, 2, 6 or 32
// steps (32 = all dot products of a token tile first), the epilogue ahead of
// the current step's stores, rotating 4 C tiles (tmm4-7), software
// prefetch of the ring. An isolated TDPBSUD takes ~10 ns here (the same
// with K = 32 and 64 bytes: the 32-column blocks use half the tile unit).
// No hardware counters in this VM to go further.
//
// Numerics: L_b is exact, so the result obeys the bound of qmatmul.h; only
// the fp32 summation order differs from the canonical one (per block, not
// per 4-column lane), so results differ from the VNNI path by fp32 rounding
// (qmatmul_test: <= 2e-6 of the sum of |terms|). Every fma/mul of the
// epilogue is an explicit intrinsic in the AMX order, and each output's
// order does not depend on its strip, token tile or thread, so the result
// equals RowsAmxOrderScalar bit for bit (asserted by qmatmul_test and, on
// 16 tokens, before timing by qmatmul_bench).
//
// Build: the file is compiled with -mamx-tile -mamx-int8 (kernels/
// CMakeLists.txt) so the tile intrinsics exist; AVX-512 is enabled per
// function (target attribute), not per file, so that inline functions of
// shared headers instantiated here are not emitted with AVX-512 code that
// the linker could pick for other translation units.
#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string_view>
#include <vector>

#include "kernels/cpu/aligned_scratch.h"
#include "kernels/cpu/qmatmul.h"
#include "kernels/cpu/qmatmul_internal.h"

#if defined(__x86_64__) && defined(__AMX_TILE__) && defined(__AMX_INT8__)
#define NIBBLE_HAVE_AMX 1
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace nibble::cpu::qmm {
namespace {

std::atomic<int> g_amx_mode{-1};
std::atomic<int64_t> g_amx_min_tokens{0};

// NIBBLE_QMATMUL_AMX=0 disables the AMX path (read once).
bool EnvAllowsAmx() {
  static const bool allowed = [] {
    const char* e = std::getenv("NIBBLE_QMATMUL_AMX");
    return !(e != nullptr && std::string_view(e) == "0");
  }();
  return allowed;
}

// NIBBLE_QMATMUL_AMX_MIN_TOKENS=N (N >= 1) overrides kAmxMinTokens (read
// once): N = 1 sends decode through the tiles too (whole-model tests).
int64_t EnvMinTokens() {
  static const int64_t n = [] {
    const char* e = std::getenv("NIBBLE_QMATMUL_AMX_MIN_TOKENS");
    const long v = e != nullptr ? std::strtol(e, nullptr, 10) : 0;
    return v >= 1 ? static_cast<int64_t>(v) : kAmxMinTokens;
  }();
  return n;
}

#if defined(NIBBLE_HAVE_AMX)
constexpr long kArchGetXcompPerm = 0x1022;
constexpr long kArchReqXcompPerm = 0x1023;
constexpr int kXfeatureXtiledata = 18;

bool ProbeAmx() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (__get_cpuid_count(7, 0, &a, &b, &c, &d) == 0) return false;
  const bool tile = (d >> 24) & 1u, int8 = (d >> 25) & 1u;
  if (!tile || !int8 || !QIsaSupported(QIsa::kAvx512)) return false;
  // Linux >= 5.16 hands out the 8 KiB tile state only on request (per
  // process); without it the first tile instruction raises SIGILL.
  if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) != 0) return false;
  unsigned long perm = 0;
  if (syscall(SYS_arch_prctl, kArchGetXcompPerm, &perm) != 0) return false;
  return (perm >> kXfeatureXtiledata) & 1u;
}
#endif

}  // namespace

bool AmxSupported() {
#if defined(NIBBLE_HAVE_AMX)
  static const bool ok = ProbeAmx();
  return ok;
#else
  return false;
#endif
}

bool AmxWanted(int64_t n_tokens) {
  const int mode = g_amx_mode.load(std::memory_order_relaxed);
  if (mode == 0 || (mode < 0 && !EnvAllowsAmx())) return false;
  if (!AmxSupported()) return false;
  const int64_t min_tokens = g_amx_min_tokens.load(std::memory_order_relaxed);
  return n_tokens >= (min_tokens > 0 ? min_tokens : EnvMinTokens());
}

void SetAmxForTesting(int mode, int64_t min_tokens) {
  g_amx_mode.store(mode < 0 ? -1 : mode > 0 ? 1 : 0, std::memory_order_relaxed);
  g_amx_min_tokens.store(std::max<int64_t>(0, min_tokens), std::memory_order_relaxed);
}

namespace {

// SetAmxUncoveredForTesting's format, as FormatKey (0: none).
std::atomic<uint32_t> g_amx_uncovered{0};

uint32_t FormatKey(const fmt::Format& f) {
  return 1u | static_cast<uint32_t>(f.kind) << 1 | static_cast<uint32_t>(f.bits) << 4 |
         static_cast<uint32_t>(f.symmetric) << 8 | static_cast<uint32_t>(f.group) << 9;
}

}  // namespace

void SetAmxUncoveredForTesting(const fmt::Format* f) {
  g_amx_uncovered.store(f != nullptr ? FormatKey(*f) : 0u, std::memory_order_relaxed);
}

bool AmxCovers(const fmt::Format& f) {
  const uint32_t off = g_amx_uncovered.load(std::memory_order_relaxed);
  if (off != 0 && off == FormatKey(f)) return false;
  return f.BlockBytes() > 0 && (f.group == 32 || f.group == 64 || f.group == 128);
}

#if defined(NIBBLE_HAVE_AMX)

#define NIBBLE_AMX_FN \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,f16c,fma,avx2,amx-tile,amx-int8")))
#define NIBBLE_AMX_INLINE NIBBLE_AMX_FN __attribute__((always_inline)) inline

// GCC 12's AVX-512 headers trip -W(maybe-)uninitialized in their own helpers.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace {

// Tile register roles: A (activations, 16 x 32 B) in tmm0/tmm2, B (weight
// codes, 8 x 64 B) in tmm1/tmm3, C (int32 16 x 16) in tmm4/tmm5.
struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};
static_assert(sizeof(TileConfig) == 64);

TileConfig MakeConfig() {
  TileConfig c;
  for (int a : {0, 2}) c.rows[a] = 16, c.colsb[a] = 32;
  for (int b : {1, 3}) c.rows[b] = 8, c.colsb[b] = 64;
  for (int o : {4, 5}) c.rows[o] = 16, c.colsb[o] = 64;
  return c;
}

struct F16 {
  NIBBLE_AMX_FN float operator()(const uint8_t* p) const {
    uint16_t h;
    std::memcpy(&h, p, 2);
    return _cvtsh_ss(h);
  }
};

NIBBLE_AMX_INLINE uint32_t Load32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// 8 bytes of a 2-bit stream -> 32 codes, one per byte (byte j of dword i is
// bits 2j..2j+1 of source byte i).
NIBBLE_AMX_INLINE __m256i Codes2(const uint8_t* p) {
  const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  const __m256i s = _mm256_or_si256(_mm256_or_si256(v, _mm256_slli_epi32(v, 6)),
                                    _mm256_or_si256(_mm256_slli_epi32(v, 12), _mm256_slli_epi32(v, 18)));
  return _mm256_and_si256(s, _mm256_set1_epi32(0x03030303));
}
// 4 bytes of a 1-bit stream -> 32 codes (0/1) times `one`.
NIBBLE_AMX_INLINE __m256i Codes1(const uint8_t* p, char one) { return _mm256_maskz_set1_epi8(Load32(p), one); }

// Codes of 32-column sub-block k of a group of `group` columns.
template <CodeKind C>
NIBBLE_AMX_INLINE __m256i SubBlockCodes(const uint8_t* codes, int group, int k, bool ternary) {
  if constexpr (C == CodeKind::kU8) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + 32 * k));
  } else if constexpr (kIsNl<C>) {
    // nl: the biased u8 codes L[q] + 128 (an int8 sym group, m = -128 d).
    return _mm256_shuffle_epi8(
        _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(kNlBiasedLut<kNlBits<C>>.v))),
        SubBlockCodes<kRawCode<C>>(codes, group, k, false));
  } else if constexpr (C == CodeKind::kU4) {
    // 16 bytes, two codes each (low nibble first): widen to 16-bit words
    // 0x00HL, then keep L in the low byte and H in the high byte.
    const __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + 16 * k)));
    const __m256i lo = _mm256_and_si256(v, _mm256_set1_epi16(0x000f));
    const __m256i hi = _mm256_and_si256(_mm256_slli_epi16(v, 4), _mm256_set1_epi16(0x0f00));
    return _mm256_or_si256(lo, hi);
  } else if constexpr (C == CodeKind::kU2) {
    return Codes2(codes + 8 * k);
  } else if constexpr (C == CodeKind::kU1) {
    return Codes1(codes + 4 * k, 1);
  } else if constexpr (C == CodeKind::kU3) {
    return _mm256_or_si256(Codes2(codes + 8 * k), Codes1(codes + group / 4 + 4 * k, 4));
  } else {
    return ternary ? Codes2(codes + 8 * k) : Codes1(codes + 4 * k, 1);
  }
}

// Per-thread strip buffers (no allocation once warm).
thread_local AlignedScratch<uint8_t> t_buf;

struct Strip {
  uint8_t* rows;  // [16][nbp * 32] row-major codes (unpack staging)
  uint8_t* wb;    // [nbp][8][64] B tile images
  float* d;       // [ngp][16]
  float* m;       // [ngp][16]
  int32_t* c;     // [kRing][2][16][16] C tiles for the epilogue
};

// Step 1: unpacks rows [0, n_rows) of the strip at row0 (missing rows zero).
template <CodeKind C>
NIBBLE_AMX_FN void UnpackStrip(const FormatInfo& fi, const uint8_t* row0, int64_t row_bytes, int n_rows,
                               int64_t nbu, int64_t nbp, int64_t ngp, const Strip& s) {
  const int spg = fi.group / kBlock;
  const int64_t rstride = nbp * kBlock;
  std::memset(s.d, 0, static_cast<size_t>(ngp) * 16 * sizeof(float));
  std::memset(s.m, 0, static_cast<size_t>(ngp) * 16 * sizeof(float));
  for (int n = 0; n < kAmxRowTile; ++n) {
    uint8_t* out = s.rows + n * rstride;
    if (n >= n_rows) {
      std::memset(out, 0, static_cast<size_t>(rstride));
      continue;
    }
    const uint8_t* row = row0 + n * row_bytes;
    for (int64_t g = 0; g * spg < nbu; ++g) {
      const GroupAffine ga = ParseGroup(fi.header, fi.bits, row + g * fi.block_bytes, F16{});
      s.d[g * 16 + n] = ga.d;
      s.m[g * 16 + n] = ga.m;
      const int kn = static_cast<int>(std::min<int64_t>(spg, nbu - g * spg));
      for (int k = 0; k < kn; ++k)
        _mm256_store_si256(reinterpret_cast<__m256i*>(out + (g * spg + k) * kBlock),
                           SubBlockCodes<C>(ga.codes, fi.group, k, ga.ternary));
    }
    for (int64_t b = nbu; b < nbp; ++b) _mm256_store_si256(reinterpret_cast<__m256i*>(out + b * kBlock), _mm256_setzero_si256());
  }
  // Transpose to the VNNI B layout: wb[b][k][n] = dword k of row n's block b.
  const __m512i idx = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                         _mm512_set1_epi32(static_cast<int>(rstride / 4)));
  for (int64_t b = 0; b < nbp; ++b) {
    for (int k = 0; k < 8; ++k) {
      const __m512i v = _mm512_i32gather_epi32(idx, s.rows + b * kBlock + 4 * k, 4);
      _mm512_store_si512(s.wb + b * 512 + k * 64, v);
    }
  }
}

using UnpackFn = void (*)(const FormatInfo&, const uint8_t*, int64_t, int, int64_t, int64_t, int64_t, const Strip&);
UnpackFn PickUnpack(CodeKind c) {
  switch (c) {
    case CodeKind::kU8: return UnpackStrip<CodeKind::kU8>;
    case CodeKind::kU4: return UnpackStrip<CodeKind::kU4>;
    case CodeKind::kU3: return UnpackStrip<CodeKind::kU3>;
    case CodeKind::kU2: return UnpackStrip<CodeKind::kU2>;
    case CodeKind::kU1: return UnpackStrip<CodeKind::kU1>;
    case CodeKind::kBinTern: return UnpackStrip<CodeKind::kBinTern>;
    case CodeKind::kNl4: return UnpackStrip<CodeKind::kNl4>;
    case CodeKind::kNl3: return UnpackStrip<CodeKind::kNl3>;
    case CodeKind::kNl2: return UnpackStrip<CodeKind::kNl2>;
  }
  return UnpackStrip<CodeKind::kU8>;
}

// acc[t] += float(C[t]) * (d_g * dx_b[t]) for the 16 tokens of one C tile.
// The 16 token accumulators are named variables (a0 .. a15), not an array:
// GCC keeps an array of them on the stack here (the tile stores clobber
// memory), which costs a load and a store per fma.
#define NIBBLE_REP16(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11) X(12) X(13) X(14) X(15)
#define NIBBLE_ACC_DECL(t) __m512 a##t = _mm512_setzero_ps();
// a_t += float(C[t]) * (d_g * dx_b[t]); c: the C tile, dv: d_g of the 16
// rows, dxp: the 16 tokens' dx_b (AmxActs::dxt).
#define NIBBLE_ACC_SCALE(t) \
  a##t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(c + (t) * 16)), \
                         _mm512_mul_ps(dv, _mm512_set1_ps(dxp[t])), a##t);
// a_t += m_g * (sum of dxs over group g)[t]; gdp: AmxActs::gdxs row.
#define NIBBLE_ACC_OFFSET(t) a##t = _mm512_fmadd_ps(mv, _mm512_set1_ps(gdp[t]), a##t);
#define NIBBLE_ACC_STORE(t) \
  if ((t) < nt) _mm512_mask_storeu_ps(y + (t0 + (t)) * ldy, row_mask, a##t);

#ifndef NIBBLE_AMX_LAG
#define NIBBLE_AMX_LAG 2
#endif
inline constexpr int64_t kLag = NIBBLE_AMX_LAG;  // epilogue lag in steps
inline constexpr int64_t kRing = kLag + 1;       // C slots (2 blocks, 2 KiB each)

// Step 2-3 for one strip (B images ready) and one 16-token tile at t0.
template <int SPG>
NIBBLE_AMX_FN void TokenTile(const QActs& a, const AmxActs& aa, const Strip& s, int64_t nbp, int64_t t0,
                             __mmask16 row_mask, float* y, int64_t ldy) {
  constexpr int kLog = SPG == 1 ? 0 : SPG == 2 ? 1 : 2;
  const int64_t nb = a.nb, ng = aa.ng[kLog];
  const int8_t* xa = aa.xqt + t0 * nb * kBlock;  // [nb][16][32]
  const float* dx = aa.dxt + t0 * nb;  // t0 = 16 * tile
  const float* gd = aa.gdxs[kLog] + t0 * ng;
  NIBBLE_REP16(NIBBLE_ACC_DECL)
  // The fp32 epilogue of step i (blocks 2i, 2i + 1) from its ring slot.
#define NIBBLE_EPILOGUE(i)                                                   \
  for (int h = 0; h < 2; ++h) {                                              \
    const int32_t* c = s.c + ((i) % kRing) * 512 + 256 * h;                  \
    const int64_t bb = 2 * (i) + h, g = bb / SPG;                            \
    const __m512 dv = _mm512_load_ps(s.d + g * 16);                          \
    const float* dxp = dx + bb * 16;                                         \
    NIBBLE_REP16(NIBBLE_ACC_SCALE)                                           \
    if ((bb + 1) % SPG == 0 || bb + 1 == nbp) {                              \
      const __m512 mv = _mm512_load_ps(s.m + g * 16);                        \
      const float* gdp = gd + g * 16;                                        \
      NIBBLE_REP16(NIBBLE_ACC_OFFSET)                                        \
    }                                                                        \
  }
  // Software pipeline: step i (blocks 2i, 2i + 1) stores its C tiles to
  // ring slot i % kRing; the epilogue of step i - kLag reads its slot. Reading
  // a tile store back at once stalls on store forwarding (measured ~6x
  // slower); kLag steps later the stores have left the store buffer.
  const int64_t steps = nbp / 2;
  for (int64_t i = 0; i < steps; ++i) {
    const int64_t b = 2 * i;
    int32_t* c = s.c + (i % kRing) * 512;
    _tile_loadd(0, xa + b * 512, kBlock);
    _tile_loadd(1, s.wb + b * 512, 64);
    _tile_zero(4);
    _tile_dpbsud(4, 0, 1);
    _tile_loadd(2, xa + (b + 1) * 512, kBlock);
    _tile_loadd(3, s.wb + (b + 1) * 512, 64);
    _tile_zero(5);
    _tile_dpbsud(5, 2, 3);
    _tile_stored(4, c, 64);
    _tile_stored(5, c + 256, 64);
    if (i >= kLag) { NIBBLE_EPILOGUE(i - kLag) }
  }
  for (int64_t i = std::max<int64_t>(0, steps - kLag); i < steps; ++i) {
    NIBBLE_EPILOGUE(i)
  }
#undef NIBBLE_EPILOGUE
  const int64_t nt = std::min<int64_t>(kAmxTokenTile, a.n_tokens - t0);
  NIBBLE_REP16(NIBBLE_ACC_STORE)
}

template <int SPG>
NIBBLE_AMX_FN void RowsAmxSpg(const FormatInfo& fi, const uint8_t* data, int64_t row_bytes, int64_t r_begin,
                              int64_t r_end, const QActs& a, const AmxActs& aa, float* y, int64_t ldy) {
  const int64_t nbu = (a.cols + kBlock - 1) / kBlock;
  const int64_t nbp = nbu + (nbu & 1);  // <= a.nb (even)
  const int64_t ngp = (nbp + SPG - 1) / SPG;
  const size_t rows_bytes = static_cast<size_t>(kAmxRowTile * nbp * kBlock);
  const size_t wb_bytes = static_cast<size_t>(nbp * 512);
  const size_t dm_bytes = static_cast<size_t>(ngp * 16 * sizeof(float));
  uint8_t* base = t_buf.Get(rows_bytes + wb_bytes + 2 * dm_bytes + 2048 * kRing);
  Strip s;
  s.rows = base;
  s.wb = base + rows_bytes;
  s.d = reinterpret_cast<float*>(s.wb + wb_bytes);
  s.m = reinterpret_cast<float*>(s.wb + wb_bytes + dm_bytes);
  s.c = reinterpret_cast<int32_t*>(s.wb + wb_bytes + 2 * dm_bytes);
  const UnpackFn unpack = PickUnpack(fi.code);
  static const TileConfig kConfig = MakeConfig();
  _tile_loadconfig(&kConfig);
  for (int64_t r0 = r_begin; r0 < r_end; r0 += kAmxRowTile) {
    const int n_rows = static_cast<int>(std::min<int64_t>(kAmxRowTile, r_end - r0));
    unpack(fi, data + r0 * row_bytes, row_bytes, n_rows, nbu, nbp, ngp, s);
    const __mmask16 mask = static_cast<__mmask16>((1u << n_rows) - 1u);
    for (int64_t t0 = 0; t0 < a.n_tokens; t0 += kAmxTokenTile) TokenTile<SPG>(a, aa, s, nbp, t0, mask, y + r0, ldy);
  }
  _tile_release();
}

}  // namespace

void RowsAmx(const fmt::Format& f, const uint8_t* data, int64_t r_begin, int64_t r_end, const QActs& a,
             const AmxActs& aa, float* y, int64_t ldy) {
  const FormatInfo fi = Describe(f);
  const int64_t rb = f.RowBytes(a.cols);
  switch (fi.group / kBlock) {
    case 1: RowsAmxSpg<1>(fi, data, rb, r_begin, r_end, a, aa, y, ldy); break;
    case 2: RowsAmxSpg<2>(fi, data, rb, r_begin, r_end, a, aa, y, ldy); break;
    default: RowsAmxSpg<4>(fi, data, rb, r_begin, r_end, a, aa, y, ldy); break;
  }
}

#else  // !NIBBLE_HAVE_AMX: AmxSupported() is false, so this is never called.

void RowsAmx(const fmt::Format& f, const uint8_t* data, int64_t r_begin, int64_t r_end, const QActs& a,
             const AmxActs&, float* y, int64_t ldy) {
  RowsScalar(f, data, r_begin, r_end, a, 0, a.n_tokens, y, ldy);
}

#endif

}  // namespace nibble::cpu::qmm
