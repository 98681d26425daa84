// A quantized weight matrix: packed rows in one or more formats plus an
// optional sparse side-car of exactly kept weights.
//
// Mixed precision: the rows of a matrix are split into segments of contiguous
// rows, each in its own fmt::Format (a bit allocator may give every block of
// rows its own depth). Salient/outlier weights (PB-LLM, GWQ/SpQR) sit in the
// side-car in CSR form and replace the packed value at their position.
// Storage may be owned (after quantizing) or a view into a mapped file.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "kernels/formats/format.h"

namespace nibble {

struct QuantSegment {
  int64_t row_begin = 0, row_end = 0;  // rows [row_begin, row_end)
  fmt::Format format;
  std::span<const uint8_t> data;       // (row_end - row_begin) * format.RowBytes(cols) bytes
};

// CSR over rows: entries row_ptr[r] .. row_ptr[r+1]-1 belong to row r.
struct Sidecar {
  enum class ValueType : uint8_t { kNone = 0, kF16 = 1, kI8 = 2 };
  ValueType type = ValueType::kNone;
  std::span<const uint32_t> row_ptr;   // rows + 1 entries
  std::span<const uint16_t> col;       // column of each kept weight
  std::span<const uint16_t> f16;       // kF16: the value as fp16
  std::span<const int8_t> i8;          // kI8: value = row_scale[r] * i8
  std::span<const uint16_t> row_scale; // kI8: fp16 per row

  size_t nnz() const { return col.size(); }
  bool empty() const { return type == ValueType::kNone || col.empty(); }
  // Storage bits: indices (16) + values (16 or 8) + row pointers + row scales.
  double Bits(int64_t rows) const;
};

struct QuantTensor {
  int64_t rows = 0, cols = 0;
  std::vector<QuantSegment> segments;
  Sidecar sidecar;
  // Keeps the bytes the spans point into alive (owned buffers or the mapped file).
  std::vector<std::shared_ptr<const void>> owners;

  // Total storage bits / (rows * cols).
  double BitsPerWeight() const;
  // Dequantizes row r (REQUIRES r < rows) into out[cols], side-car applied.
  void DequantizeRow(int64_t r, float* out) const;
  // The segment holding row r.
  const QuantSegment& SegmentOf(int64_t r) const;
};

}  // namespace nibble
