// Round-to-nearest (RTN) quantization of a weight matrix with the format's own
// per-group fit (fmt::QuantizeRowRef: clip/scale search, optionally weighted by
// per-column importance such as the calibration mean of x^2), and the helper
// that wraps packed rows into an owning QuantTensor.
//
// Goals: the baseline every calibrated quantizer is compared against; the
// packing/ownership convention all quantizers here share (one segment, bytes
// owned through QuantTensor::owners). Non-goals: mixed formats per tensor.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/core/quant_tensor.h"
#include "engine/core/weights.h"
#include "kernels/formats/format.h"

namespace nibble {

// Checks that w is an unquantized, finite [rows, cols] fp32 matrix; errors name w.name.
absl::Status CheckMatrix(const HostTensor& w, const char* who);
// Checks that f is one of fmt::AllFormats().
absl::Status CheckFormat(const fmt::Format& f, const char* who);

// A QuantTensor of `rows` x `cols` with one segment in format f owning `bytes`
// (rows * f.RowBytes(cols) bytes).
QuantTensor MakeOwnedQuantTensor(int64_t rows, int64_t cols, const fmt::Format& f, std::vector<uint8_t> bytes);

struct RtnOptions {
  int n_threads = 0;                           // <= 0: all cores
  float bintern_lambda = fmt::kBinTernLambda;  // kBinTern's binary/ternary rule
};

// Errors (naming w.name) for a quantized/malformed w, a format outside
// fmt::AllFormats(), or an importance span whose size is not cols.
// Empty importance = unweighted.
absl::StatusOr<QuantTensor> RtnQuantize(const HostTensor& w, std::span<const float> importance,
                                        const fmt::Format& f, const RtnOptions& opts = {});

}  // namespace nibble
