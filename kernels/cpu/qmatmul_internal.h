// Private to kernels/cpu/qmatmul*.cc: the quantized-activation layout, the
// per-format code/affine description and the per-ISA kernel entry points.
// Not for use elsewhere (the public API is kernels/cpu/qmatmul.h).
#pragma once

#include <cstdint>

#include "kernels/formats/blocks.h"
#include "kernels/formats/format.h"

namespace nibble::cpu::qmm {

inline constexpr int kBlock = 32;  // activation block (columns)

// Activations of n_tokens rows quantized per 32-column block.
// Token t's arrays start at t * nb (blocks) / t * nb * 32 (codes); nb is even
// and covers cols rounded up to 64; padding blocks have xq = 0, dx = dxs = 0.
struct QActs {
  int64_t n_tokens = 0, cols = 0;
  int64_t nb = 0;             // blocks per token (even)
  const int8_t* xq = nullptr;  // [n_tokens][nb * 32], 64-byte aligned per token
  const float* dx = nullptr;   // [n_tokens][nb]
  const float* dxs = nullptr;  // [n_tokens][nb]: dx_b * sum(xq_b)
  const float* dx16 = nullptr; // [n_tokens][nb / 2][16]: dx of block 2p in lanes 0-7, 2p+1 in 8-15
  const int32_t* xs4 = nullptr; // [n_tokens][nb][8]: sums of xq over columns 4l..4l+3 of each block
  const float* xsum = nullptr;  // [n_tokens][nb]: S_b = sum of xq over block b, as float (exact)
  const float* x = nullptr;    // the fp32 activations [n_tokens][cols] (side-car)
};

// How a format's codes are stored and turned into w = d * q + m.
// kNl4/kNl3/kNl2: 4/3/2-bit codes (stored like kU4/kU3/kU2) looked up in the
// nl level table as biased u8 codes L[q] + 128, so that an nl group is an
// int8 sym group (w = d * (u - 128)).
enum class CodeKind : uint8_t { kU8, kU4, kU3, kU2, kU1, kBinTern, kNl4, kNl3, kNl2 };
template <CodeKind C>
inline constexpr bool kIsNl = C == CodeKind::kNl4 || C == CodeKind::kNl3 || C == CodeKind::kNl2;
// An nl layout's code bits, and the plain layout its codes are stored in.
template <CodeKind C>
inline constexpr int kNlBits = C == CodeKind::kNl4 ? 4 : C == CodeKind::kNl3 ? 3 : 2;
template <CodeKind C>
inline constexpr CodeKind kRawCode = C == CodeKind::kNl4   ? CodeKind::kU4
                                     : C == CodeKind::kNl3 ? CodeKind::kU3
                                     : C == CodeKind::kNl2 ? CodeKind::kU2
                                                           : C;
enum class HeaderKind : uint8_t { kIntAsym, kIntSym, kTernary, kBinary, kBinTern };

struct FormatInfo {
  CodeKind code;
  HeaderKind header;
  int bits;       // int bits (kInt), 2 ternary, 1 binary, 2 bintern, 8 nl4 (its biased u8 codes)
  int group;
  int block_bytes;
};
inline FormatInfo Describe(const fmt::Format& f) {
  FormatInfo i{};
  i.group = f.group;
  i.bits = f.bits;
  i.block_bytes = static_cast<int>(f.BlockBytes());
  switch (f.kind) {
    case fmt::Kind::kInt:
      i.header = f.symmetric ? HeaderKind::kIntSym : HeaderKind::kIntAsym;
      i.code = f.bits == 8 ? CodeKind::kU8 : f.bits == 4 ? CodeKind::kU4 : f.bits == 3 ? CodeKind::kU3 : CodeKind::kU2;
      break;
    case fmt::Kind::kTernary:
      i.header = HeaderKind::kTernary;
      i.code = CodeKind::kU2;
      break;
    case fmt::Kind::kBinary:
      i.header = HeaderKind::kBinary;
      i.code = CodeKind::kU1;
      break;
    case fmt::Kind::kBinTern:
      i.header = HeaderKind::kBinTern;
      i.code = CodeKind::kBinTern;
      break;
    case fmt::Kind::kNl:
      i.header = HeaderKind::kIntSym;
      i.code = f.bits == 4 ? CodeKind::kNl4 : f.bits == 3 ? CodeKind::kNl3 : CodeKind::kNl2;
      i.bits = 8;
      break;
  }
  return i;
}

// nl code q -> its biased u8 code L[q] + 128 (in [1, 255]), and 16-byte
// tables (indexed by the code; entries past 2^bits unused) for the
// byte-shuffle unpackers.
constexpr uint8_t NlBiased(int bits, int q) { return static_cast<uint8_t>(fmt::NlLevel(bits, q) + 128); }
struct alignas(16) NlLut {
  uint8_t v[16];
};
constexpr NlLut MakeNlLut(int bits, int bias) {
  NlLut t{};
  for (int q = 0; q < (1 << bits); ++q) t.v[q] = static_cast<uint8_t>(fmt::NlLevel(bits, q) + bias);
  return t;
}
template <int BITS>
inline constexpr NlLut kNlBiasedLut = MakeNlLut(BITS, 128);  // u8 L + 128
template <int BITS>
inline constexpr NlLut kNlSignedLut = MakeNlLut(BITS, 256);  // the int8 L as bytes

// int sym formats: m_g = SymMul(bits) * d_g (an exact power of two).
inline constexpr float SymMul(int bits) { return -static_cast<float>(1 << (bits - 1)); }

// One group's affine parameters and where its codes start. For kBinTern,
// ternary says which code layout the group uses (2-bit if true, 1-bit else).
struct GroupAffine {
  float d, m;
  const uint8_t* codes;
  bool ternary;
};
// `f16` converts an fp16 at a pointer (LoadF16 or an F16C version: same value).
// Always inlined: called from target("avx2"/"avx512") kernels, an out-of-line
// default-target copy would run legacy-SSE float code between AVX code
// (transition stalls measured at ~10x on some formats).
template <typename F16>
__attribute__((always_inline)) inline GroupAffine ParseGroup(HeaderKind h, int bits, const uint8_t* block, F16 f16) {
  const float a = f16(block);
  switch (h) {
    case HeaderKind::kIntAsym: return {a, f16(block + 2), block + 4, false};
    case HeaderKind::kIntSym: return {a, SymMul(bits) * a, block + 2, false};
    case HeaderKind::kTernary: return {a, -a, block + 2, true};
    case HeaderKind::kBinary: return {2.0f * a, -a, block + 2, false};
    case HeaderKind::kBinTern: {
      const bool t = fmt::BinTernIsTernary(block);
      return {t ? a : 2.0f * a, -a, block + fmt::kBinTernHeaderBytes, t};
    }
  }
  return {0.0f, 0.0f, block, false};
}

// Rows [r_begin, r_end) of one segment (data = its row 0), tokens
// [t_begin, t_end): y[t * ldy + r] = packed row r . x_t (no side-car).
using RowsKernel = void (*)(const fmt::Format& f, const uint8_t* data, int64_t r_begin, int64_t r_end,
                            const QActs& a, int64_t t_begin, int64_t t_end, float* y, int64_t ldy);

void RowsScalar(const fmt::Format& f, const uint8_t* data, int64_t r_begin, int64_t r_end, const QActs& a,
                int64_t t_begin, int64_t t_end, float* y, int64_t ldy);
void RowsAvx2(const fmt::Format& f, const uint8_t* data, int64_t r_begin, int64_t r_end, const QActs& a,
              int64_t t_begin, int64_t t_end, float* y, int64_t ldy);
void RowsAvx512(const fmt::Format& f, const uint8_t* data, int64_t r_begin, int64_t r_end, const QActs& a,
                int64_t t_begin, int64_t t_end, float* y, int64_t ldy);

// How the row dequantizers (DequantRowAvx512 / DequantRowAvx2) turn one
// group's codes into fp32 with the reference's exact operations (blocks.h):
// kAffine fma(d, q, m) (int asym: one rounding of d q + m), kOffset
// d * (q - off) (int sym, ternary: exact products, signed zeros included),
// kSign q ? d : -d (binary).
struct DequantGroup {
  enum Mode : int { kAffine = 0, kOffset = 1, kSign = 2 } mode = kOffset;
  float d = 0.0f, m = 0.0f;
  int off = 0;
  const uint8_t* codes = nullptr;
  bool ternary = false;
};
template <typename F16>
__attribute__((always_inline)) inline DequantGroup ParseDequantGroup(const FormatInfo& fi, const uint8_t* block,
                                                                     F16 f16) {
  DequantGroup g;
  g.d = f16(block);
  g.codes = block + 2;
  switch (fi.header) {
    case HeaderKind::kIntAsym: g.mode = DequantGroup::kAffine; g.m = f16(block + 2); g.codes = block + 4; break;
    case HeaderKind::kIntSym: g.off = 1 << (fi.bits - 1); break;
    case HeaderKind::kTernary: g.off = 1; g.ternary = true; break;
    case HeaderKind::kBinary: g.mode = DequantGroup::kSign; break;
    case HeaderKind::kBinTern:
      g.ternary = fmt::BinTernIsTernary(block);
      g.codes = block + fmt::kBinTernHeaderBytes;
      if (g.ternary) {
        g.off = 1;
      } else {
        g.mode = DequantGroup::kSign;
      }
      break;
  }
  return g;
}

// One packed row of `cols` weights in format f to fp32 (no side-car), bit for
// bit fmt::DequantizeRowRef: every kind's value is fma(d, q, m) with
// ParseGroup's exact factors. AVX-512 (F/BW/VL) twin of the reference for the
// fp32 prefill path (QuantMatMulDequantF32).
void DequantRowAvx512(const fmt::Format& f, const uint8_t* row, int64_t cols, float* out);
// The same with AVX2 (+FMA, F16C).
void DequantRowAvx2(const fmt::Format& f, const uint8_t* row, int64_t cols, float* out);

// Quantizes x [n_tokens][cols] into the buffers (sizes from QActs). The
// same bytes on every ISA (an AVX-512 twin of the scalar code, identical by
// construction; kernels/cpu/qmatmul_acts.cc), so all ISAs see identical
// quantized activations.
void QuantizeActs(const float* x, int64_t n_tokens, int64_t cols, int64_t nb, int8_t* xq, float* dx, float* dxs,
                  float* dx16, int32_t* xs4, float* xsum);
// The scalar reference QuantizeActs (which uses AVX-512 when the CPU has it;
// both write identical bytes, asserted in qmatmul_test).
void QuantizeActsScalar(const float* x, int64_t n_tokens, int64_t cols, int64_t nb, int8_t* xq, float* dx,
                        float* dxs, float* dx16, int32_t* xs4, float* xsum);


// The canonical fp32 order every ISA follows, so that all ISAs give
// bit-identical results (the int32 sums are exact in any order):
//  * lane sums L_b[l] = sum_{i<4} q[4l+i] * xq[4l+i] (l < 8) of block b, and
//    the block sum S_b = sum_{i<32} xq[i] (xsum, an exact float);
//  * 32 fp32 lanes D, for blocks b < ceil(cols/32) in order, lane
//    j = 8 (b % 4) + l:  D[j] = fma(float(L_b[l]), fl(d_g * dx_b), D[j]);
//  * 4 fp32 chains M_s, one per block slot s = b % 4, blocks in order:
//                        M_s = fma(S_b, fl(m_g * dx_b), M_s)
//    except for int sym (m_g = c d_g, c = SymMul(bits) = -2^(bits-1)), whose
//    chains reuse D's scale:  M_s = fma(c * S_b, fl(d_g * dx_b), M_s)
//    (c S_b is exact; the same value as the general form unless fl(d_g dx_b)
//    is subnormal or within a factor |c| of overflow). Ternary (m_g = -d_g)
//    may likewise use fma(-S_b, fl(d_g * dx_b), M_s): negation is exact, so
//    that is the general form's value bit for bit;
//    (SIMD padding blocks add fma(0, ., .) = no change);
//  * packed row . x = Reduce32(D) + ((M_0 + M_1) + (M_2 + M_3)).
// Four block slots keep independent fma chains (latency) in every ISA. The
// additive term needs one fma per block (not per lane): S_b is the sum of
// the lane sums X_b[l] (xs4), and the SIMD kernels keep one M lane per row
// and slot instead of spreading m_g dx_b over 8 lanes.
inline float Reduce16(const float* acc) {
  float v8[8], v4[4];
  for (int l = 0; l < 8; ++l) v8[l] = acc[l] + acc[l + 8];
  for (int l = 0; l < 4; ++l) v4[l] = v8[l] + v8[l + 4];
  return (v4[0] + v4[1]) + (v4[2] + v4[3]);
}
inline float Reduce32(const float* acc) {
  float v16[16];
  for (int l = 0; l < 16; ++l) v16[l] = acc[l] + acc[l + 16];
  return Reduce16(v16);
}

// ------------------------------------------------------------------ AMX ---
// The AMX int8 prefill kernel (kernels/cpu/qmatmul_amx.cc, design notes
// there). It computes the exact int32 block sums L_b = sum_{c in block b}
// q_c xq_c for 16 rows x 16 tokens per TDPBSUD (activations s8 as the A
// tile, weight codes u8 in the VNNI B layout). Its fp32 order ("AMX order",
// per output, blocks b < nb in order, group g = b / (group / 32)):
//    acc = +0
//    acc = fma(float(L_b), fl(d_g * dx_b), acc)          every block b
//    acc = fma(m_g, G_g, acc)   after the last block of group g (or of nb),
//          G_g = ((0 + dxs_b0) + dxs_b0+1) + ...  over the blocks of g (< nb)
//    packed row . x = acc
// Same exact integers as the canonical order above, different fp32 order:
// not bit-identical to it (the canonical order needs the 4-column lane sums
// L_b[l], which a tile dot product sums away), but RowsAmxOrderScalar
// follows the AMX order in scalar code, and RowsAmx equals it bit for bit.

inline constexpr int kAmxTokenTile = 16;  // tokens per AMX tile (A rows / C rows)
inline constexpr int kAmxRowTile = 16;    // weight rows per AMX tile (C columns)

// True when this CPU reports amx_tile + amx_int8 (+ the AVX-512 VNNI the
// rest of the path uses) and the kernel granted XTILEDATA
// (arch_prctl(ARCH_REQ_XCOMP_PERM), requested here once per process);
// probed once, thread-safe.
bool AmxSupported();
// True when QuantMatMul takes the AMX path for a call of n_tokens on the
// AVX-512 ISA: AmxSupported(), not disabled (NIBBLE_QMATMUL_AMX=0, read
// once, or SetAmxForTesting(0)), and n_tokens >= the threshold (kAmxMinTokens,
// NIBBLE_QMATMUL_AMX_MIN_TOKENS=N read once, or SetAmxForTesting).
bool AmxWanted(int64_t n_tokens);
// Threshold (tokens per call) at and above which the AMX path pays; see the
// measurements in qmatmul_amx.cc.
inline constexpr int64_t kAmxMinTokens = 8;
// Tests/benchmarks: mode -1 restores the environment's choice, 0 disables,
// 1 enables (when supported, whatever the environment says); min_tokens > 0
// overrides the threshold (0: the environment's or kAmxMinTokens). Not
// thread-safe against running matmuls.
void SetAmxForTesting(int mode, int64_t min_tokens);
// Whether the AMX kernel handles format f (segments of other formats run
// the AVX-512 VNNI kernel within the same call). Every format of
// fmt::AllFormats() (groups of 32, 64, 128 columns) pays at >= 8 tokens, so
// only SetAmxUncoveredForTesting makes this false for one of them.
bool AmxCovers(const fmt::Format& f);
// Tests: AmxCovers(*f) becomes false (nullptr: restores), to exercise the
// per-segment fallback. Not thread-safe against running matmuls.
void SetAmxUncoveredForTesting(const fmt::Format* f);

// The AMX order above in plain scalar code (any CPU): rows [r_begin, r_end)
// of one segment, tokens [t_begin, t_end), no side-car. The reference that
// RowsAmx must equal bit for bit. REQUIRES: AmxCovers(f).
void RowsAmxOrderScalar(const fmt::Format& f, const uint8_t* data, int64_t r_begin, int64_t r_end, const QActs& a,
                        int64_t t_begin, int64_t t_end, float* y, int64_t ldy);

// Per-call extras of the AMX kernel, token-transposed for its epilogue
// (16 tokens per zmm): for token tile i (tokens 16 i .. 16 i + 15),
// dxt[(i * nb + b) * 16 + j] = dx_b of token 16 i + j, and for group sizes of
// 2^s blocks (s = 0, 1, 2), gdxs[s][(i * ng[s] + g) * 16 + j] = sum of dxs_b
// of token 16 i + j over blocks b in [g 2^s, g 2^s + 2^s) (b < nb), with
// ng[s] = nb / 2^s rounded up. Padding tokens hold 0.
// xqt holds the int8 activations tile-major, so that each A tile is 512
// contiguous bytes: xqt[((i * nb + b) * 16 + j) * 32 + k] = xq of token
// 16 i + j, column 32 b + k.
struct AmxActs {
  const int8_t* xqt = nullptr;
  const float* dxt = nullptr;
  const float* gdxs[3] = {nullptr, nullptr, nullptr};
  int64_t ng[3] = {0, 0, 0};
};

// Rows [r_begin, r_end) of one segment for all tokens of `a`:
// y[t * ldy + r] = packed row r . x_t (no side-car).
// REQUIRES: AmxSupported(); AmxCovers(f); aa filled for `a` (padding
// tokens up to a multiple of 16 zero).
// Thread safety: uses thread-local unpack buffers and loads/releases the
// calling thread's tile configuration; safe on any number of threads.
void RowsAmx(const fmt::Format& f, const uint8_t* data, int64_t r_begin, int64_t r_end, const QActs& a,
             const AmxActs& aa, float* y, int64_t ldy);

}  // namespace nibble::cpu::qmm
