// Whole-model quantization: turns every linear layer (and the token embedding /
// output head) of a LoadedModel into packed QuantTensors with one method and
// format, and reports per-tensor error and the achieved bits per weight.
//
// Methods: "rtn" (round-to-nearest with per-group clipping search; uses the
// calibration Hessian's diagonal as importance when calibration text is given)
// and "gptq" (Hessians from calibration activations of the full-precision model,
// collected in one pass over the calibration text).
// "boa" (BoA, quantizers/boa.h: attention-aware Hessians for wq/wk/wv from the
// same calibration pass, GPTQ for the rest; not with bit allocation/outliers).
// Bit allocation: with target_bpw > 0 the linear layers get per-row-block
// formats chosen under a bits-per-weight budget (quantizers/bit_allocation.h);
// `format` is then ignored.
// Sequential (`sequential`, methods gptq and boa, also with bit allocation):
// each layer's Hessians are re-collected from the inputs produced by the
// already-quantized earlier layers (quantizers/sequential.h); with bit
// allocation the per-block formats are still chosen from the one-pass
// (full-precision) statistics, then applied sequentially.
// "dfmpc" (DF-MPC, quantizers/dfmpc.h): data-free; wv/w_up in `format`, wo/w_down
// compensated in closed form and quantized in dfmpc.high.
#pragma once

#include <functional>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/core/loaded_model.h"
#include "kernels/formats/format.h"
#include "quantizers/bit_allocation.h"
#include "quantizers/dfmpc.h"
#include "quantizers/gptq.h"
#include "quantizers/outliers.h"

namespace nibble {

struct QuantizeConfig {
  std::string method = "rtn";  // "rtn" | "gptq" | "boa" | "dfmpc"
  // Norm weights (1-D tensors) stored as fp16 (16 bits each) instead of fp32:
  // QuantizeModel first rounds them to fp16 in place, so calibration sees the
  // values the file will hold (write with NibbleWriteOptions::fp16_vectors),
  // and counts them at 16 bits (report, bit-allocation budget).
  bool norms_f16 = false;
  fmt::Format format;          // linear layers
  // Per-tensor formats over `format` (FineQuant-style per-tensor choice, e.g.
  // a group size that fits a row width): {pattern, format}; a linear matrix
  // named "blk.L.W" takes the last entry whose pattern is that name or its
  // weight name W ("w_down"). Not with bit allocation or dfmpc.
  std::vector<std::pair<std::string, fmt::Format>> tensor_formats;
  // Token embeddings (and the tied output head); nullopt keeps them fp32.
  std::optional<fmt::Format> embed_format = fmt::Format{fmt::Kind::kInt, 8, 32, false};
  // Separate output head, if the model has one; nullopt: same as embed_format.
  std::optional<fmt::Format> output_format;
  // How the output head is quantized (the tied embedding, or a separate
  // output matrix): "rtn", or "gptq" with the Hessian of the head's input
  // (the final-normed hidden states of the full-precision model over the
  // calibration text; needs calib_path). For a tied embedding the same matrix
  // also serves the token lookups, which the head Hessian does not see:
  // embed_percdamp (damping as a fraction of mean diag H) pulls GPTQ toward
  // plain weight error (large damping = RTN). An untied token embedding is
  // always RTN. "auto": gptq for methods gptq and boa, rtn otherwise.
  std::string embed_method = "auto";
  double embed_percdamp = 0.1;
  std::string calib_path;      // calibration text (required for gptq and boa)
  int calib_tokens = 8192;
  int calib_ctx = 256;
  GptqOptions gptq;
  // Sequential calibration (methods gptq/boa, quantizers/sequential.h):
  // layer l is calibrated on the outputs of the quantized layers 0..l-1, and
  // inside a layer q/k/v, o, gate/up, down each on the outputs of the
  // quantized sub-blocks before them. About one extra calibration forward.
  bool sequential = false;
  // Rotate the fp32 weights first (quantizers/rotation.h): residual stream and
  // value heads in an incoherent basis (a tied embedding stays tied and
  // unrotated; the engine rotates around it). Not with dfmpc.
  bool rotate = false;
  int n_threads = 0;
  // Outlier / salient side-car on the linear layers (quantizers/outliers.h):
  // the top outlier_fraction of each matrix's weights by outlier_saliency
  // kept as fp16 (GWQ/SpQR) or int8 (PB-LLM, with a binary_gN format).
  // 0 = none. kHessian saliency needs calibration text.
  double outlier_fraction = 0.0;  // [0, 1)
  Sidecar::ValueType outlier_type = Sidecar::ValueType::kF16;
  Saliency outlier_saliency = Saliency::kHessian;
  // > 0: allocate formats per (linear matrix, row block) so the whole model's
  // storage is at most target_bpw * params_all bits (embeddings/output in
  // embed_format/output_format and fp32 norms count as a fixed cost).
  // Needs calibration text; incompatible with outliers.
  double target_bpw = 0.0;
  BitAllocOptions alloc;
  // Method "dfmpc" (quantizers/dfmpc.h): `format` is the low format of wv/w_up,
  // these options the compensating high format of wo/w_down and the rest.
  DfmpcOptions dfmpc;
};

struct TensorReport {
  std::string name;
  std::string format;  // with bit allocation: the segment mix, "int3_g64:2,int4_g128:1"
  std::string method;  // what quantized this tensor: "rtn", "gptq" or "boa" (wq/wk/wv under method boa)
  int64_t rows = 0, cols = 0;
  double bpw = 0;         // storage bits per weight of this tensor
  double rel_error = 0;   // ||W - Q||_F / ||W||_F
  double proxy_error = -1;  // tr(E H E^T) / tr(W H W^T) with the calibration Hessian; -1 if none
  double seconds = 0;
};

struct QuantizeReport {
  std::string method, format;
  std::vector<TensorReport> tensors;
  int64_t params_all = 0;     // every weight of the model, norms included
  int64_t params_linear = 0;  // the quantized linear layers (embeddings/output excluded)
  double bpw_all = 0;         // storage bits / params_all, every scale, zero and side-car byte counted
  double bpw_linear = 0;
  int64_t calib_tokens = 0;
  double calib_seconds = 0;
  double seconds = 0;
  // Bit allocation (target_bpw > 0): the target, the linear budget in bits,
  // the segments per format over the model, the solver's estimated error
  // (sum of tr(E H E^T) of the chosen blocks) and its gap bound.
  double target_bpw = 0;
  double alloc_budget_bits = 0;
  std::string alloc_mix;
  double alloc_est_error = 0, alloc_gap_bound = 0;
  std::string alloc_embed;          // with embedding candidates: "token_embd:int4_g32"
  double sensitivity_seconds = 0;   // time spent in KLD sensitivity probes
  bool alloc_cache_hit = false;     // probes/estimates came from BitAllocOptions::cache_path
  // Method dfmpc: per layer, the relative composite errors of (wv, wo) and (w_up, w_down).
  std::vector<DfmpcLayerError> dfmpc_layers;
};

using QuantizeProgress = std::function<void(int done, int total, const std::string& tensor)>;

// Fills report's params_all/params_linear/bpw_all/bpw_linear from m's tensors
// as stored (every scale, zero and side-car byte counted; unquantized
// matrices 32 bits, 1-D tensors (norms) `vector_bits`: 32, or 16 when they
// are stored as fp16).
void AccountBits(const LoadedModel& m, QuantizeReport* report, int vector_bits = 32);

// Quantizes `m` in place (its fp32 matrices are replaced by QuantTensors) and
// records the settings in m->metadata. Errors name the tensor or file at fault.
absl::StatusOr<QuantizeReport> QuantizeModel(LoadedModel* m, const QuantizeConfig& cfg,
                                             const QuantizeProgress& progress = nullptr);

}  // namespace nibble
