#include "engine/core/quant_tensor.h"

#include <algorithm>

#include "kernels/common/fp16.h"

namespace nibble {

double Sidecar::Bits(int64_t rows) const {
  if (type == ValueType::kNone) return 0.0;
  const double value_bits = type == ValueType::kF16 ? 16.0 : 8.0;
  double bits = static_cast<double>(nnz()) * (16.0 + value_bits);
  bits += static_cast<double>(row_ptr.size()) * 32.0;
  bits += static_cast<double>(row_scale.size()) * 16.0;
  (void)rows;
  return bits;
}

double QuantTensor::BitsPerWeight() const {
  if (rows <= 0 || cols <= 0) return 0.0;
  double bits = 0.0;
  for (const QuantSegment& s : segments) bits += 8.0 * static_cast<double>(s.data.size());
  bits += sidecar.Bits(rows);
  return bits / (static_cast<double>(rows) * static_cast<double>(cols));
}

const QuantSegment& QuantTensor::SegmentOf(int64_t r) const {
  // Segments are few (usually one): a linear scan beats a binary search.
  for (const QuantSegment& s : segments)
    if (r >= s.row_begin && r < s.row_end) return s;
  return segments.back();
}

void QuantTensor::DequantizeRow(int64_t r, float* out) const {
  const QuantSegment& s = SegmentOf(r);
  const int64_t row_bytes = s.format.RowBytes(cols);
  fmt::DequantizeRowRef(s.format, s.data.data() + (r - s.row_begin) * row_bytes, cols, out);
  if (sidecar.empty()) return;
  const uint32_t b = sidecar.row_ptr[r], e = sidecar.row_ptr[r + 1];
  if (sidecar.type == Sidecar::ValueType::kF16) {
    for (uint32_t i = b; i < e; ++i) out[sidecar.col[i]] = Fp16ToFp32(sidecar.f16[i]);
  } else {
    const float scale = Fp16ToFp32(sidecar.row_scale[r]);
    for (uint32_t i = b; i < e; ++i) out[sidecar.col[i]] = scale * static_cast<float>(sidecar.i8[i]);
  }
}

}  // namespace nibble
