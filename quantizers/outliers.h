// Outlier / salient-weight side-cars on top of any packed format:
//   * GWQ / SpQR style: the top p% weights by saliency kept (nearly) exactly
//     as fp16 in the CSR side-car, the rest group-wise int4/int3/int2;
//   * PB-LLM: a salient fraction kept as int8 (per-row absmax fp16 scale),
//     the rest binarized (binary_gN) with a per-group scale.
// The base format quantizes every weight with the kept ones excluded from the
// group fits (importance 0, value clamped into the group's range); with GPTQ
// the kept weights are "quantized" to their own fp16/int8 value, so their
// (tiny) rounding error is compensated exactly like any other column's.
//
// Saliency (selection is global over the tensor: the top k = round(fraction *
// rows * cols) weights overall, not per row; ties go to the lower row-major
// index, so selection is deterministic):
//   kMagnitude: |w|.
//   kHessian:   w^2 * c_j with a per-column weight c_j chosen by the caller.
//               QuantizeWithOutliers passes c_j = 1 / [(H + damp)^-1]_jj for
//               GPTQ (the exact OBS saliency, from the GptqFactor) and
//               c_j = H_jj for RTN (the diagonal of the proxy error, which is
//               what an uncompensated rounding error costs).
//
// Storage ("mask" cost of PB-LLM included): the side-car is CSR, counted by
// QuantTensor::BitsPerWeight as 16 bits of column index + 16 (f16) or 8 (i8)
// value bits per kept weight, 32 bits per row pointer (rows + 1 of them) and,
// for i8, a 16-bit scale per row. A bitmap mask would instead cost 1 bit per
// weight (plus the values); CSR's index is cheaper while 16 * fraction +
// 32 / cols < 1, i.e. below ~6% kept weights. At PB-LLM's 10% a bitmap would
// save ~0.6 bit/weight; the nibble file stores only CSR.
//
// Non-goals: per-row/per-group selection budgets, the SpQR second-level
// quantization of scales/outliers, fused kernels (the engine applies the
// side-car in QuantTensor::DequantizeRow).
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/core/quant_tensor.h"
#include "engine/core/weights.h"
#include "kernels/formats/format.h"
#include "quantizers/gptq.h"
#include "quantizers/hessian.h"

namespace nibble {

enum class Saliency : uint8_t { kMagnitude = 0, kHessian = 1 };
const char* SaliencyName(Saliency s);  // "magnitude" | "hessian"
std::optional<Saliency> ParseSaliency(std::string_view name);
const char* SidecarTypeName(Sidecar::ValueType t);  // "none" | "f16" | "i8"
std::optional<Sidecar::ValueType> ParseSidecarType(std::string_view name);  // "f16" | "i8"

// The kept positions of a [rows, cols] matrix in CSR form.
struct SalientSet {
  int64_t rows = 0, cols = 0;
  std::vector<uint32_t> row_ptr;  // rows + 1 entries
  std::vector<uint16_t> col;      // ascending within each row
  size_t nnz() const { return col.size(); }
  std::vector<uint8_t> Mask() const;  // [rows * cols], 1 = kept
};

// The top round(fraction * rows * cols) weights of w by `kind` (see above).
// col_weight: [cols] finite, >= 0; REQUIRED for kHessian, ignored for
// kMagnitude. Errors: fraction not in [0, 1), w not an fp32 matrix, more than
// 65536 columns (16-bit column index), bad col_weight.
absl::StatusOr<SalientSet> SelectSalient(const HostTensor& w, std::span<const float> col_weight, double fraction,
                                         Saliency kind);

// Per-row int8 steps s_r = fp16(max_{kept c} |values[r, c]| / 127) (as float,
// exactly representable in fp16); 0 for rows without kept weights.
// REQUIRES: values holds set.rows * set.cols floats.
std::vector<float> I8RowScales(const SalientSet& set, std::span<const float> values);

// An owned side-car: `view` points into `owner`.
struct OwnedSidecar {
  Sidecar view;
  std::shared_ptr<const void> owner;
};

// The side-car for `set` with values[r * cols + c] ([rows, cols]): kF16 stores
// fp16(value); kI8 stores KeptCodeI8(value, s_r) with s_r = i8_scale[r] rounded
// to fp16 (i8_scale empty: I8RowScales(set, values)). Errors: type kNone,
// sizes that do not fit.
absl::StatusOr<OwnedSidecar> BuildSidecar(const SalientSet& set, std::span<const float> values,
                                          Sidecar::ValueType type, std::span<const float> i8_scale = {});

struct OutlierOptions {
  double fraction = 0.0;                               // [0, 1)
  Saliency saliency = Saliency::kHessian;              // kHessian needs a Hessian (or factor for gptq)
  Sidecar::ValueType type = Sidecar::ValueType::kF16;  // kF16 (GWQ/SpQR) | kI8 (PB-LLM)
  std::string method = "rtn";                          // "rtn" | "gptq"
  GptqOptions gptq;                                    // gptq only
  int n_threads = 0;                                   // <= 0: all cores
};

// Quantizes w in format f with the top `fraction` weights kept in a side-car.
// h: calibration Hessian of w's input or null. RTN uses h->mean_sq as column
// importance (as RtnQuantize does in the model driver). GPTQ uses `factor` if
// given (REQUIRES: factored from h with o.gptq) else factors h. fraction 0 (or
// a fraction that rounds to 0 weights) returns exactly the plain quantizer's
// tensor (RtnQuantize / GptqQuantize), with no side-car. `chosen` (optional)
// receives the [rows, cols] values the result decodes to.
// Errors name w.name: bad fraction/type/method, gptq or kHessian without a
// Hessian, any error of the quantizers.
absl::StatusOr<QuantTensor> QuantizeWithOutliers(const HostTensor& w, const Hessian* h, const GptqFactor* factor,
                                                 const fmt::Format& f, const OutlierOptions& o,
                                                 std::vector<float>* chosen = nullptr);

// diag((H + damp)^-1) in original column order, from the factor's U.
std::vector<float> InverseHessianDiag(const GptqFactor& factor);

// Structural checks of q's side-car (sizes, monotone row pointers, columns in
// range, value arrays matching the type) so DequantizeRow cannot read out of bounds.
absl::Status ValidateSidecar(const QuantTensor& q);
// The [rows, cols] values q decodes to, side-car applied (QuantTensor::DequantizeRow).
absl::StatusOr<std::vector<float>> DequantizeWithSidecar(const QuantTensor& q);

}  // namespace nibble
