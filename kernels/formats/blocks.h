// Per-block byte layouts and code <-> value math of nibble's packed formats,
// written once for host and device (NIBBLE_HD, no std:: containers, no
// allocation, no exceptions).
//
// Goals: the single definition of where every byte and bit of a block lives
// (docs/FORMATS.md documents the same layouts) and of how a code becomes a
// value and a value becomes a code. The scalar references in format.cc & co.,
// the SIMD kernels and future CUDA kernels all decode through (or are tested
// against) these functions, so "QuantizeValueRef == dequantize(pack(w))"
// holds bit for bit.
// Non-goals: fitting group parameters (int_format.cc, ternary_format.cc,
// binary_format.cc), speed, validation of Format values (callers pass only
// formats from fmt::AllFormats()).
//
// Conventions: a block starts with its fp16 scale(s) (little-endian IEEE
// binary16), followed by its codes. Sub-byte codes are packed LSB first:
// weight i of a 1/2/4-bit stream lives in byte i*bits/8 at bit (i*bits)%8.
// 3-bit codes are two planes: the low 2 bits of every weight as a 2-bit
// stream (group/4 bytes), then the high bit of every weight as a 1-bit stream
// (group/8 bytes). Decoded values are fp32.
#pragma once

#include <math.h>
#include <stdint.h>

#include "kernels/common/fp16.h"

namespace nibble::fmt {

// ---------------------------------------------------------------- layout ---

// Largest group of any format; scratch arrays of this size hold one group.
inline constexpr int kMaxGroup = 128;

// Integer formats: asymmetric blocks are [fp16 d][fp16 m][codes], symmetric
// blocks are [fp16 d][codes].
NIBBLE_HD constexpr int IntHeaderBytes(bool symmetric) { return symmetric ? 2 : 4; }
NIBBLE_HD constexpr int IntBlockBytes(int bits, int group, bool symmetric) {
  return IntHeaderBytes(symmetric) + group * bits / 8;
}
// Ternary: [fp16 a][2-bit codes]; binary: [fp16 a][sign bits].
inline constexpr int kTernaryHeaderBytes = 2;
NIBBLE_HD constexpr int TernaryBlockBytes(int group) { return kTernaryHeaderBytes + group / 4; }
inline constexpr int kBinaryHeaderBytes = 2;
NIBBLE_HD constexpr int BinaryBlockBytes(int group) { return kBinaryHeaderBytes + group / 8; }
// Binary-or-ternary: [fp16 a][u8 flag][u8 reserved = 0][group/4 bytes of codes].
// flag 0: binary, the first group/8 code bytes are sign bits, the rest are 0.
// flag 1: ternary, 2-bit codes as in kTernary. Other flag values are never
// written; decoders treat any nonzero flag as ternary.
inline constexpr int kBinTernFlagOffset = 2;
inline constexpr int kBinTernHeaderBytes = 4;
NIBBLE_HD constexpr int BinTernBlockBytes(int group) { return kBinTernHeaderBytes + group / 4; }
// Non-uniform: [fp16 d][codes, `bits` each], the int{bits} sym layout (3-bit
// codes as two planes, like int3).
inline constexpr int kNlHeaderBytes = 2;
NIBBLE_HD constexpr int NlBlockBytes(int bits, int group) { return kNlHeaderBytes + group * bits / 8; }

// The nl level tables, ascending, as int8 (value = d * level). Each was
// fitted once by Lloyd iterations (alternating the per-group scale fit of
// nl_format.cc, both signs of d allowed, and the level update) on groups of
// weights of stories260K's and SmolLM2-135M's linear layers (32 per group for
// nl4, 64 for nl3 and nl2), rescaled to a largest magnitude of 127 and
// rounded; nl4's level nearest zero was then set to exactly 0. The tables
// are asymmetric on purpose: a negative d mirrors them, so each group picks
// the side with the longer tail. Part of the stored format: never changed.
// Relative squared error on those weights, against int sym / int asym:
//   nl4 g32 0.0043 (sym 0.0058, asym 0.0049)   nl3 g64 0.0286 (0.0335, 0.0306)
//   nl2 g64 0.113  (0.129, 0.118)
NIBBLE_HD constexpr int NlLevel(int bits, int q) {
  constexpr int8_t k4[16] = {-127, -100, -79, -63, -48, -34, -20, -7, 0, 13, 27, 42, 57, 73, 95, 126};
  constexpr int8_t k3[8] = {-104, -64, -34, -9, 14, 40, 73, 127};
  constexpr int8_t k2[4] = {-127, -39, 24, 100};
  return bits == 4 ? k4[q & 15] : bits == 3 ? k3[q & 7] : k2[q & 3];
}
// The code whose level is nearest 0 (unused weights of a partial last group).
NIBBLE_HD constexpr int NlZeroCode(int bits) { return bits == 4 ? 8 : bits == 3 ? 3 : 2; }

// ------------------------------------------------------------ bit access ---

NIBBLE_HD inline float LoadF16(const uint8_t* p) {
  return Fp16ToFp32(static_cast<uint16_t>(p[0] | (p[1] << 8)));
}
NIBBLE_HD inline void StoreF16(uint8_t* p, float v) {
  const uint16_t h = Fp32ToFp16(v);
  p[0] = static_cast<uint8_t>(h & 0xffu);
  p[1] = static_cast<uint8_t>(h >> 8);
}
// The fp32 value `v` becomes once stored as fp16 and loaded back.
NIBBLE_HD inline float RoundToF16(float v) { return Fp16ToFp32(Fp32ToFp16(v)); }

// Code i of a stream of `bits` in {1, 2, 4, 8} bits per code.
NIBBLE_HD inline int GetCode(const uint8_t* codes, int bits, int i) {
  const int bit = i * bits;
  return (codes[bit >> 3] >> (bit & 7)) & ((1 << bits) - 1);
}
// REQUIRES: the stream was zeroed first (codes are OR-ed in); 0 <= q < 2^bits.
NIBBLE_HD inline void PutCode(uint8_t* codes, int bits, int i, int q) {
  const int bit = i * bits;
  codes[bit >> 3] = static_cast<uint8_t>(codes[bit >> 3] | (q << (bit & 7)));
}
// 3-bit codes: low 2 bits in a 2-bit stream of group/4 bytes, then the high
// bits in a 1-bit stream.
NIBBLE_HD inline int GetCode3(const uint8_t* codes, int group, int i) {
  return GetCode(codes, 2, i) | (GetCode(codes + group / 4, 1, i) << 2);
}
NIBBLE_HD inline void PutCode3(uint8_t* codes, int group, int i, int q) {
  PutCode(codes, 2, i, q & 3);
  PutCode(codes + group / 4, 1, i, q >> 2);
}
// Integer code of weight i for any bits in {2, 3, 4, 8}.
NIBBLE_HD inline int GetIntCode(const uint8_t* codes, int bits, int group, int i) {
  return bits == 3 ? GetCode3(codes, group, i) : GetCode(codes, bits, i);
}
NIBBLE_HD inline void PutIntCode(uint8_t* codes, int bits, int group, int i, int q) {
  if (bits == 3) {
    PutCode3(codes, group, i, q);
  } else {
    PutCode(codes, bits, i, q);
  }
}

// --------------------------------------------------------- code -> value ---

// Asymmetric integer: w = d * q + m rounded once to fp32, i.e. exactly
// fmaf(d, q, m), so every host and device path gets the same bits.
// REQUIRES: d and m are fp16 values (as stored), 0 <= q < 256. Then d*q + m
// is a multiple of 2^-24 below 2^24 in magnitude, exact in double, and the
// host's double evaluation rounds once like fmaf without a libm call.
NIBBLE_HD inline float IntAsymValue(float d, float m, int q) {
#if defined(__CUDA_ARCH__)
  return fmaf(d, static_cast<float>(q), m);
#else
  return static_cast<float>(static_cast<double>(d) * q + static_cast<double>(m));
#endif
}
// Symmetric integer: w = d * (q - 2^(bits-1)); exact product, one rounding.
NIBBLE_HD inline float IntSymValue(float d, int bits, int q) {
  return d * static_cast<float>(q - (1 << (bits - 1)));
}
// Ternary 2-bit code: 0 -> -a, 1 -> 0, 2 -> +a. Code 3 is never written; it
// decodes as +2a (the same formula), so readers need no special case.
NIBBLE_HD inline float TernaryValue(float a, int q) { return a * static_cast<float>(q - 1); }
// nl: w = d * L[q]; an exact product (11 x 7 significant bits), one rounding.
NIBBLE_HD inline float NlValue(float d, int bits, int q) { return d * static_cast<float>(NlLevel(bits, q)); }
// Binary sign bit: 1 -> +a, 0 -> -a.
NIBBLE_HD inline float BinaryValue(float a, int bit) { return bit ? a : -a; }

// --------------------------------------------------------- value -> code ---
// Each returns the code a weight `w` is stored as; the parameters are the
// values as stored (already rounded to fp16). NaN weights give a valid code.

// Nearest asymmetric code, clamped to [0, 2^bits - 1]; d == 0 gives 0 (= m).
NIBBLE_HD inline int IntAsymCode(float d, float m, int bits, float w) {
  if (d == 0.0f) return 0;
  const float qmax = static_cast<float>((1 << bits) - 1);
  float q = rintf((w - m) / d);
  if (!(q >= 0.0f)) q = 0.0f;  // also maps NaN to 0
  if (q > qmax) q = qmax;
  return static_cast<int>(q);
}
// Nearest symmetric code (d may be negative), clamped; d == 0 gives the code
// of 0.
NIBBLE_HD inline int IntSymCode(float d, int bits, float w) {
  const int half = 1 << (bits - 1);
  if (d == 0.0f) return half;
  float q = rintf(w / d) + static_cast<float>(half);
  if (!(q >= 0.0f)) q = 0.0f;  // also maps NaN to 0
  if (q > static_cast<float>(2 * half - 1)) q = static_cast<float>(2 * half - 1);
  return static_cast<int>(q);
}
// Ternary with threshold t: |w| > t -> sign(w) a, else 0.
NIBBLE_HD inline int TernaryCode(float t, float w) {
  if (!(fabsf(w) > t)) return 1;
  return w > 0.0f ? 2 : 0;
}
// Binary: w >= 0 (and NaN) -> +a.
NIBBLE_HD inline int BinaryCode(float w) { return w < 0.0f ? 0 : 1; }
// nl: the code whose stored value d * L[q] is nearest w (ties: the lower
// code); d == 0 (or NaN w) gives the zero code.
NIBBLE_HD inline int NlCode(float d, int bits, float w) {
  if (d == 0.0f || !(w == w)) return NlZeroCode(bits);
  int best = 0;
  float best_err = fabsf(w - NlValue(d, bits, 0));
  for (int q = 1; q < (1 << bits); ++q) {
    const float e = fabsf(w - NlValue(d, bits, q));
    if (e < best_err) best_err = e, best = q;
  }
  return best;
}

// --------------------------------------------------------- block decode ---
// Each writes the first n (1 <= n <= group) values of one block to out[0, n).

NIBBLE_HD inline void DecodeIntBlock(const uint8_t* block, int bits, int group, bool symmetric, int n,
                                     float* out) {
  const float d = LoadF16(block);
  const uint8_t* codes = block + IntHeaderBytes(symmetric);
  if (symmetric) {
    for (int i = 0; i < n; ++i) out[i] = IntSymValue(d, bits, GetIntCode(codes, bits, group, i));
  } else {
    const float m = LoadF16(block + 2);
    for (int i = 0; i < n; ++i) out[i] = IntAsymValue(d, m, GetIntCode(codes, bits, group, i));
  }
}

NIBBLE_HD inline void DecodeTernaryBlock(const uint8_t* block, int n, float* out) {
  const float a = LoadF16(block);
  const uint8_t* codes = block + kTernaryHeaderBytes;
  for (int i = 0; i < n; ++i) out[i] = TernaryValue(a, GetCode(codes, 2, i));
}

NIBBLE_HD inline void DecodeBinaryBlock(const uint8_t* block, int n, float* out) {
  const float a = LoadF16(block);
  const uint8_t* bits = block + kBinaryHeaderBytes;
  for (int i = 0; i < n; ++i) out[i] = BinaryValue(a, GetCode(bits, 1, i));
}

NIBBLE_HD inline void DecodeNlBlock(const uint8_t* block, int bits, int group, int n, float* out) {
  const float d = LoadF16(block);
  const uint8_t* codes = block + kNlHeaderBytes;
  for (int i = 0; i < n; ++i) out[i] = NlValue(d, bits, GetIntCode(codes, bits, group, i));
}

NIBBLE_HD inline bool BinTernIsTernary(const uint8_t* block) { return block[kBinTernFlagOffset] != 0; }

NIBBLE_HD inline void DecodeBinTernBlock(const uint8_t* block, int n, float* out) {
  const float a = LoadF16(block);
  const uint8_t* codes = block + kBinTernHeaderBytes;
  if (BinTernIsTernary(block)) {
    for (int i = 0; i < n; ++i) out[i] = TernaryValue(a, GetCode(codes, 2, i));
  } else {
    for (int i = 0; i < n; ++i) out[i] = BinaryValue(a, GetCode(codes, 1, i));
  }
}

}  // namespace nibble::fmt
