// End-to-end loss sensitivity by KLD probes: how much the model's next-token
// distribution moves when ONE tensor is quantized, the rest kept exact.
//
// Why: the bit allocator's layer-wise proxy tr(E H E^T) measures each layer's
// own output error on full-precision inputs; it does not see how much of that
// error survives (or grows through) the later layers and the head. A probe
// measures it: quantize tensor t alone to a probe format, run the model over a
// few hundred calibration tokens, and take the mean KL(p_ref || p_probe) over
// every position. The allocator then weighs t's proxy errors by
//   s_t = KLD_t / proxy_t       (KLD per unit of proxy error),
// which turns every block's estimated error into estimated KLD, a quantity
// that adds up across layers to first order (small, independent noises: the
// second-order expansion of KL in the logits is a sum of per-tensor terms plus
// cross terms that vanish in expectation for independent rounding noise).
// Tensors that are not linear layers (the token embedding / tied head) get
// their KLD measured directly for each candidate format.
//
// Cost: one forward pass over the probe tokens per probe (SmolLM2-135M, 256
// tokens, 2 threads: ~2 s; 210 linear tensors: a few minutes).
// Non-goals: gradients/Fisher information (no backward pass in the engine);
// interaction terms between tensors.
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <string>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/core/quant_tensor.h"
#include "engine/core/weights.h"
#include "engine/model/llama_model.h"
#include "kernels/formats/format.h"
#include "quantizers/bit_allocation.h"
#include "quantizers/calibration.h"
#include "quantizers/gptq.h"

namespace nibble {

// KL(p_ref || p_now) of a model against its own state at Create() time.
// Thread safety: not thread-safe; uses `model` exclusively while a call runs.
class KldProbe {
 public:
  // Runs `model` (its current weights are the reference) over every chunk
  // (each from position 0, a fresh context, at most LlamaModel::kMaxBatch
  // tokens) and keeps the log-probabilities of every position (n_positions *
  // vocab floats) and the residual stream entering every layer.
  // Errors: empty chunks, a forward-pass error (named).
  static absl::StatusOr<std::unique_ptr<KldProbe>> Create(LlamaModel* model,
                                                          std::vector<std::vector<int32_t>> chunks);

  // Mean over all probe positions of KL(p_ref || p) for the model as it is
  // now. first_layer > 0 promises that only layers >= first_layer (or the
  // head) differ from the reference, so the pass starts from the reference's
  // recorded residual stream at that layer (same result, less work).
  absl::StatusOr<double> Kld(int first_layer = 0);
  // Kld() with `t` (a tensor of model->mutable_loaded(), unquantized or not)
  // temporarily set to `q`; `t` is restored before returning. `layer`: the
  // decoder layer t belongs to (-1: the embedding / head, a full pass).
  absl::StatusOr<double> KldWith(HostTensor* t, std::shared_ptr<const QuantTensor> q, int layer = -1);

  int64_t n_positions() const { return n_positions_; }

 private:
  KldProbe(LlamaModel* model, std::vector<std::vector<int32_t>> chunks) : model_(model), chunks_(std::move(chunks)) {}

  LlamaModel* model_;
  std::vector<std::vector<int32_t>> chunks_;
  int64_t n_positions_ = 0;
  int max_len_ = 0;
  std::vector<float> ref_logp_;  // [n_positions, vocab] log-softmax of the reference
  std::vector<std::vector<float>> layer_inputs_;  // per chunk: [n_layers][len][dim] reference residual stream
  std::vector<float> logits_;    // scratch [max_len, vocab]
};

// Log-softmax of n values into out (may alias in).
void LogSoftmax(const float* in, int64_t n, float* out);
// KL(p || q) from log-probabilities of n outcomes, in nats (>= 0 up to rounding).
double KlDivergence(const float* logp, const float* logq, int64_t n);

using ProbeProgress = std::function<void(int done, int total, const std::string& what)>;

// Per (layer, LinearWeight) sensitivity s = KLD / proxy of the model's own
// fp32 matrices (model->mutable_loaded()), each quantized alone to
// `probe_format` by RTN (importance: the calibration Hessian diagonal), with
// proxy = sum of RowProxyErrors against `stats`' Hessian. A matrix whose probe
// has no proxy error gets 0. Errors: missing Hessians, probe failures (named).
absl::StatusOr<std::vector<std::array<double, 7>>> LinearSensitivities(KldProbe& probe, LlamaModel& model,
                                                                     const CalibrationStats& stats,
                                                                     const fmt::Format& probe_format,
                                                                     int n_threads,
                                                                     const ProbeProgress& progress = nullptr);

// Bits and measured KLD of the token embedding (or, with output = true, the
// separate output head) of `model` in each of `formats`: RTN (no importance),
// or GPTQ with `head_factor` (the factored Hessian of the head's input, with
// `gptq` options) when it is not null, as the tensor will be quantized.
absl::StatusOr<std::vector<KnapsackOption>> EmbeddingCosts(KldProbe& probe, LlamaModel& model,
                                                           const std::vector<fmt::Format>& formats, bool output,
                                                           int n_threads, const ProbeProgress& progress = nullptr,
                                                           const GptqFactor* head_factor = nullptr,
                                                           const GptqOptions& gptq = {});

}  // namespace nibble
