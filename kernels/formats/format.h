// nibble's packed weight formats: one descriptor type, one registry.
//
// Goals: every quantized weight format is described by a `Format` value with a
// stable stored name (written into model files, never renamed), a fixed block
// layout per group of `group` consecutive input columns of one row, and scalar
// reference kernels (quantize / dequantize / dot) that define its numerics.
// SIMD and CUDA kernels are tested against these references. Tests, the
// quantizer, the model file and docs iterate AllFormats().
// Non-goals: speed (kernels/cpu has the fast paths); activation quantization.
//
// Row layout: a row of `cols` weights is ceil(cols / group) blocks of
// BlockBytes() each; the last block of a row whose cols is not a multiple of
// group is stored whole with its unused weights packed as the code the value
// 0.0 gets (the code nearest zero), so odd sizes such as 172 are handled, not
// rejected. Blocks are byte-aligned and little-endian; scales are IEEE fp16.
// Byte layouts: kernels/formats/blocks.h and docs/FORMATS.md.
//
// Outliers / salient weights (GWQ, SpQR, PB-LLM) are not part of a Format:
// they live in a sparse side-car attached to a quantized tensor
// (engine/core/quant_tensor.h) and override the packed values they cover.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "kernels/common/fp16.h"

namespace nibble::fmt {

enum class Kind : uint8_t {
  // Group-wise integer, `bits` in {2, 3, 4, 8}. Asymmetric: w = d * q + m,
  // q in [0, 2^bits - 1], fp16 d and m per group. Symmetric: w = d * (q - 2^(bits-1)),
  // fp16 d per group.
  kInt = 1,
  // Ternary {-a, 0, +a} per group (Hyperspherical Quantization): threshold and a
  // chosen to maximise cosine similarity with the fp weights. 2-bit codes.
  kTernary = 2,
  // Binary {-a, +a} per group with fp16 a (sign bits) — PB-LLM's non-salient part.
  kBinary = 3,
  // Per group binary or ternary, chosen by an error-vs-bits criterion (Smart
  // Quantization). Every block reserves room for ternary codes: BitsPerWeight
  // reports that storage, EffectiveBitsRef the groups' actual depth.
  kBinTern = 4,
  // Non-uniform ("nl2", "nl3", "nl4"): w = d * L_bits[q], q in [0, 2^bits),
  // one fp16 d per group (either sign), L_bits a fixed int8 level table of
  // blocks.h (NlLevel), denser near zero than the uniform grid. Same block
  // bytes as int{bits} sym.
  kNl = 5,
};

struct Format {
  Kind kind = Kind::kInt;
  uint8_t bits = 4;      // code bits per weight (kTernary: 2, kBinary: 1, kBinTern: 2 reserved, kNl: 2, 3, 4)
  uint16_t group = 64;   // weights per group (32, 64, 128)
  bool symmetric = false;

  // Stable names: "int4_g64" (asym), "int4_g64_sym", "ternary_g64", "binary_g128", "bintern_g64",
  // "nl3_g64".
  std::string Name() const;
  static std::optional<Format> Parse(std::string_view name);

  // Bytes of one packed group (scales + codes).
  int64_t BlockBytes() const;
  int64_t BlocksPerRow(int64_t cols) const { return (cols + group - 1) / group; }
  int64_t RowBytes(int64_t cols) const { return BlocksPerRow(cols) * BlockBytes(); }
  // Storage bits per weight for a [rows, cols] tensor, counting every scale/zero
  // byte and the padding of a partial last group.
  double BitsPerWeight(int64_t cols) const;

  friend bool operator==(const Format&, const Format&) = default;
};

// Every supported format, in a stable order (docs/FORMATS.md, "Names").
// A Format not in this list (only constructible by hand; Parse never returns
// one) has BlockBytes() == 0 and the group/row *Ref functions below leave
// their output untouched / return 0 for it; QuantizeValueRef (called per
// weight, so unchecked) and BlocksPerRow (group > 0) REQUIRE a listed format.
const std::vector<Format>& AllFormats();

// Per-group parameters a quantizer fits and then applies column by column (GPTQ).
struct GroupParams {
  float scale = 0.0f;  // d (kInt, kNl), a (kTernary/kBinary/kBinTern)
  float zero = 0.0f;   // m (kInt asym); threshold (kTernary); 0/1 = binary/ternary (kBinTern)
  // kTernary codes |w| > threshold as sign(w) * a; kBinTern's ternary groups
  // use the nearest level (threshold a / 2). Scale and m are rounded to fp16
  // wherever they are used, so any values are accepted.
};

// Fits one group's parameters to n <= group weights, minimising the
// importance-weighted squared error (importance may be null = all ones), with
// a clipping/scale search for kInt. The scale is rounded to fp16 exactly as stored.
GroupParams FitGroupRef(const Format& f, const float* w, int n, const float* importance);

// kBinTern's decision rule: a group is stored ternary iff
// err_binary - err_ternary > lambda * err_binary (importance-weighted squared
// errors with the stored fp16 scales), i.e. the extra bit per weight must cut
// the error by more than the fraction lambda. Default 0.25.
inline constexpr float kBinTernLambda = 0.25f;
// As above with an explicit lambda (used by kBinTern only; others ignore it).
GroupParams FitGroupRef(const Format& f, const float* w, int n, const float* importance,
                        float bintern_lambda);

// The value `w` becomes after quantization with `p` (fake quantization).
float QuantizeValueRef(const Format& f, const GroupParams& p, float w);

// Packs n <= group weights with params p into one block (BlockBytes() bytes).
void PackGroupRef(const Format& f, const GroupParams& p, const float* w, int n, uint8_t* block);

// One row: quantize (fit + pack every group), dequantize, and dot with x.
void QuantizeRowRef(const Format& f, const float* w, int64_t cols, const float* importance, uint8_t* out);
void QuantizeRowRef(const Format& f, const float* w, int64_t cols, const float* importance, uint8_t* out,
                    float bintern_lambda);
void DequantizeRowRef(const Format& f, const uint8_t* row, int64_t cols, float* out);
// Order of the fp32 arithmetic (SIMD kernels are tested against it with an
// accumulation tolerance): per group, acc_g = sum_i value_i * x_i in index
// order starting from 0; the result is sum_g acc_g in group order from 0.
float DotRowRef(const Format& f, const uint8_t* row, const float* x, int64_t cols);

// Information bits per weight of one packed row (denominator: cols, like
// BitsPerWeight). kBinTern counts each group as 16 (scale) + 1 (flag) +
// group * (1 if binary else 2) bits, i.e. what a variable-length encoding of
// the same row would take; every other format returns BitsPerWeight(cols)
// (its storage is already exact). REQUIRES: row holds RowBytes(cols) bytes
// (may be null for formats other than kBinTern).
double EffectiveBitsRef(const Format& f, const uint8_t* row, int64_t cols);

}  // namespace nibble::fmt
