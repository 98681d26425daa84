// Error measures of a quantized weight matrix against its fp32 original.
//
//   RelativeWeightError = ||W - Q||_F / ||W||_F
//   ProxyOutputError    = tr((W-Q) H (W-Q)^T) / tr(W H W^T)
// The proxy is GPTQ's objective: with H = (2/N) X^T X it is the relative
// squared error of the layer outputs on the calibration inputs.
//
// Goals: decode packed tensors with the format's reference kernels
// (fmt::DequantizeRowRef), independent of the engine's fast paths.
// Non-goals: side-cars (rejected with an error here).
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/core/quant_tensor.h"
#include "engine/core/weights.h"
#include "quantizers/hessian.h"

namespace nibble {

// The [rows, cols] values q decodes to. Errors: malformed segments (coverage,
// byte counts) or a non-empty side-car.
absl::StatusOr<std::vector<float>> DequantizeAll(const QuantTensor& q);

// Both measures on raw [rows, cols] arrays. Returns 0 when W (resp. W H W^T) is 0
// and W == Q. REQUIRES: h.dim == cols, arrays of rows * cols floats.
double RelativeWeightError(const float* w, const float* q, int64_t rows, int64_t cols);
double ProxyOutputError(const float* w, const float* q, int64_t rows, int64_t cols, const Hessian& h);

// Same, decoding `q`; errors if shapes disagree or q cannot be decoded.
absl::StatusOr<double> RelativeWeightError(const HostTensor& w, const QuantTensor& q);
absl::StatusOr<double> ProxyOutputError(const HostTensor& w, const QuantTensor& q, const Hessian& h);

}  // namespace nibble
