// ggml tensor element types: their block layout and scalar dequantization.
//
// Goals: the type ids exactly as GGUF files store them (ggml's enum ggml_type),
// per-type block geometry for every known type (so a GGUF file holding any of
// them can be parsed and bounds-checked), and a clear, exact scalar
// dequantizer for the types a Llama checkpoint commonly uses:
//   F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K.
// Results are bit-identical to ggml's reference dequantizers (and to the
// Python `gguf` package's numpy ones): each value is computed with the same
// float32 operations in the same order.
// Non-goals: speed (no SIMD), quantization, the IQ*/TQ*/MXFP4 codebook types
// (DequantizeRow answers UNIMPLEMENTED for them).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace nibble::io {

// Values are ggml's enum ggml_type (gaps are retired ids).
enum class GgmlType : uint32_t {
  kF32 = 0,
  kF16 = 1,
  kQ4_0 = 2,
  kQ4_1 = 3,
  kQ5_0 = 6,
  kQ5_1 = 7,
  kQ8_0 = 8,
  kQ8_1 = 9,
  kQ2_K = 10,
  kQ3_K = 11,
  kQ4_K = 12,
  kQ5_K = 13,
  kQ6_K = 14,
  kQ8_K = 15,
  kIQ2_XXS = 16,
  kIQ2_XS = 17,
  kIQ3_XXS = 18,
  kIQ1_S = 19,
  kIQ4_NL = 20,
  kIQ3_S = 21,
  kIQ2_S = 22,
  kIQ4_XS = 23,
  kI8 = 24,
  kI16 = 25,
  kI32 = 26,
  kI64 = 27,
  kF64 = 28,
  kIQ1_M = 29,
  kBF16 = 30,
  kTQ1_0 = 34,
  kTQ2_0 = 35,
  kMXFP4 = 39,
};

struct GgmlTypeTraits {
  const char* name;    // ggml's name, e.g. "q4_K"
  int64_t block_size;  // elements per block (1 for plain types)
  int64_t type_size;   // bytes per block
  bool can_dequantize; // DequantizeRow supports it
};

// Traits of a raw type id as read from a file; nullptr for ids we don't know.
const GgmlTypeTraits* GetGgmlTypeTraits(uint32_t type);

// Name of a type id ("q4_0"), or "type#<id>" for unknown ids.
std::string GgmlTypeName(uint32_t type);

// Bytes that `n` elements of `type` occupy. INVALID_ARGUMENT if the type is
// unknown, n < 0, n is not a multiple of the block size, or the size overflows.
absl::StatusOr<uint64_t> GgmlRowBytes(GgmlType type, int64_t n);

// Dequantizes n elements (a whole number of blocks) from `src` to `dst`.
// REQUIRES: src holds GgmlRowBytes(type, n) readable bytes (any alignment);
// dst holds n floats. Returns UNIMPLEMENTED for types without a dequantizer
// and INVALID_ARGUMENT for unknown types or n not a multiple of the block size.
// Thread safety: pure function.
absl::Status DequantizeRow(GgmlType type, const void* src, float* dst, int64_t n);

}  // namespace nibble::io
