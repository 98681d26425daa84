// GPTQ (Frantar et al., 2022): quantize a weight matrix column by column,
// compensating each column's rounding error on the not-yet-quantized columns
// through the inverse calibration Hessian, for every group-wise fmt::Format.
//
// Algorithm (per row; rows are independent given H and run in parallel):
//   1. Dead inputs (H_ii == 0): H_ii := 1 and the weight column := 0.
//   2. act_order: process columns by descending diag(H) (stable); otherwise in order.
//   3. Damping: H += percdamp * mean(diag H) * I (retried x10, up to 4 times,
//      if H is still not positive definite).
//   4. U = upper Cholesky factor of H^-1 (in processing order).
//   5. Columns in blocks of `block_size` (lazy batch updates): for column i,
//      q = Q(w_i); err = (w_i - q) / U_ii; w_j -= err * U_ij for the later
//      columns of the block; the rest of the row is updated once per block.
// Groups are always the packed layout's groups: `group` consecutive columns
// in the ORIGINAL order. A group's parameters are fitted (fmt::FitGroupRef)
// when the first of its columns is processed, on the CURRENT error-
// compensated values of all its columns (pending lazy updates of the current
// block are applied to the copies used for fitting, so the fit is exact, not
// stale as in the reference code). With act_order this is the reference's
// "static groups" idea done lazily: a group's later columns keep the params
// fitted at its first processed column. Every value is then fake-quantized
// with fmt::QuantizeValueRef and finally packed with fmt::PackGroupRef from
// the very values that were quantized, with the same params, so the packed
// tensor decodes to exactly what GPTQ chose.
//
// Non-goals: activation quantization; sequential (layer-by-layer recalibrated)
// quantization, which the caller can build on these functions.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/core/quant_tensor.h"
#include "engine/core/weights.h"
#include "kernels/formats/format.h"
#include "quantizers/hessian.h"
#include "quantizers/quant_error.h"
#include "quantizers/rtn.h"

namespace nibble {

struct GptqOptions {
  double percdamp = 0.01;  // damping as a fraction of mean(diag H)
  bool act_order = false;  // process columns by descending diag(H)
  int block_size = 128;    // lazy-batch width in columns (>= 1)
  // Pass diag(H) + damp of the group's columns as importance to FitGroupRef
  // (so the per-group clip search minimises the diagonal part of the output
  // error); false passes none (plain weight error).
  bool weighted_fit = true;
  float bintern_lambda = fmt::kBinTernLambda;  // kBinTern's binary/ternary rule
  // After the column sweep, refit every group's scale (and minimum, int asym)
  // of a row jointly by least squares on the output error with the codes
  // GPTQ chose held fixed: minimise (w - v)^T H (w - v) (H undamped) over the
  // group parameters (v linear in them), rounded to fp16; kept only where it
  // lowers that error. Rows with a side-car (kept weights) are left as swept.
  bool refit_scales = false;
  // After the column sweep (before any refit), this many passes of greedy
  // coordinate descent on the row's chosen values with the group parameters
  // fixed (as QuantEase/QuIP's greedy refinement): for each column j, move
  // v_j to the format's level nearest the 1-D optimum v_j + g_j / A_jj of
  // (w - v)^T A (w - v), g = A (w - v), and keep it only if that error drops;
  // A = H + cd_percdamp * mean(diag H) * I (undamped H plus a ridge toward the
  // original weights). Stops early when a pass changes nothing. Rows with a
  // side-car are left as swept. 0: off (nibble-quantize's --cd-passes defaults to 4).
  int cd_passes = 0;
  double cd_percdamp = 0.5;
  int n_threads = 0;       // <= 0: all cores
};

// What GPTQ needs from H, shared by every weight that reads the same input
// (wq/wk/wv; w_gate/w_up): factor once, quantize many.
struct GptqFactor {
  int64_t cols = 0;
  std::vector<int32_t> order;   // order[k]: original column processed k-th
  std::vector<float> u;         // [cols, cols] upper: (H + damp I)^-1 = U^T U, processing order
  std::vector<uint8_t> dead;    // [cols] by original column: H_ii was 0
  std::vector<float> importance;  // [cols] original order: diag(H) + damp (dead: damp)
  double damp = 0.0;            // damping actually added to the diagonal
  std::vector<float> h;         // [cols, cols] original order: H undamped, dead rows/columns 0 (diagonal 1); refit/cd only
  double mean_diag = 0.0;       // mean of diag(H) after dead columns got 1 (cd's ridge unit)
};

// Errors: INVALID_ARGUMENT for a malformed/non-finite H, FAILED_PRECONDITION if
// H stays indefinite after all damping retries.
absl::StatusOr<GptqFactor> FactorHessian(const Hessian& h, const GptqOptions& opts);

// Quantizes w ([rows, cols] fp32, unquantized) to one-segment QuantTensor in
// format f. If `chosen` is not null it receives the [rows, cols] values GPTQ
// selected (what the packed tensor decodes to). Errors name w.name.
absl::StatusOr<QuantTensor> GptqQuantize(const HostTensor& w, const GptqFactor& factor, const fmt::Format& f,
                                         const GptqOptions& opts, std::vector<float>* chosen = nullptr);
absl::StatusOr<QuantTensor> GptqQuantize(const HostTensor& w, const Hessian& h, const fmt::Format& f,
                                         const GptqOptions& opts, std::vector<float>* chosen = nullptr);

// Weights kept outside the packed format (SpQR/GWQ outliers in fp16, PB-LLM
// salient weights in int8; quantizers/outliers.h builds the side-car). A kept
// weight is "quantized" to KeptValue() of its CURRENT (error-compensated)
// value, so its own error is only the fp16/int8 rounding, which GPTQ then
// compensates like any other; it is excluded from its group's fit
// (importance 0, and its value clamped into the range of the group's other
// weights so it cannot stretch a min/max grid). The packed code at a kept
// position is meaningless (the side-car overrides it); `chosen` holds the
// kept value there.
struct GptqKeep {
  std::span<const uint8_t> mask;    // [rows * cols], original column order, != 0: kept; empty: none
  std::span<const float> i8_scale;  // empty: fp16 values; else [rows] per-row int8 step (see KeptValue)
};

// The value a kept weight x is stored as: fp16(x) if i8_scale is null, else
// s * clamp(rint(x / s), -127, 127) with s = *i8_scale (s == 0 or not finite
// gives 0). KeptCodeI8 is that int8 code.
float KeptValue(float x, const float* i8_scale);
int8_t KeptCodeI8(float x, float s);

// One group's fit inputs with kept weights excluded: imp_out[c] = 0 where
// kept[c] != 0, else imp[c] (1 if imp is null); kept entries of vals[n] are
// clamped into [min, max] of the group's other values (0 if all are kept).
void ExcludeKept(const uint8_t* kept, int64_t n, const float* imp, float* vals, float* imp_out);

// GptqQuantize with kept weights. An empty keep.mask is exactly the overload
// above (bit for bit). Errors: mask/i8_scale sizes that do not fit w.
absl::StatusOr<QuantTensor> GptqQuantize(const HostTensor& w, const GptqFactor& factor, const fmt::Format& f,
                                         const GptqOptions& opts, const GptqKeep& keep,
                                         std::vector<float>* chosen = nullptr);

}  // namespace nibble
