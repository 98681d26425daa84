// Sequential (layer-by-layer re-calibrated) GPTQ-style quantization: layer
// l's Hessians come from the inputs produced by layers 0..l-1 AFTER they were
// quantized (the GPTQ reference implementation; AutoGPTQ's "true
// sequential"), and inside a layer sub-block by sub-block: q/k/v, then o
// (its input through the quantized q/k/v), then gate/up, then down.
//
// Goals: cost of about ONE calibration forward in total (without the output
// head). The activations of every calibration chunk at the current point of
// the current layer are kept in memory (LayerStates: the residual stream plus
// the normalized stream, attention output and FFN activation of the layer
// being quantized), and the layer is advanced part by part
// (LlamaModel::ForwardLayerPart): each part runs once, through the weights
// quantized so far, and its observer sees exactly the input of the next
// weights to quantize. Memory: calibration tokens x (2 dim + q_dim +
// hidden_dim) floats (8192 tokens of SmolLM2-135M: 107 MB). With nothing
// quantized the statistics equal the one-pass Calibrate()'s bit for bit
// (same chunks, same sub-batches, same kernels). Results do not depend on the
// thread count (the forward kernels and the accumulators are deterministic).
// BoA: the q/k/v stage also needs the attention of the unquantized q/k/v, so
// the attention part runs twice per layer (before and after q/k/v are
// quantized).
// Non-goals: models calibrated in several passes for memory (the one-pass
// Calibrate() has layer ranges for that); choosing formats (bit allocation
// decides them beforehand from the one-pass statistics).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/core/weights.h"
#include "engine/model/kv_cache.h"
#include "engine/model/llama_model.h"
#include "quantizers/boa.h"
#include "quantizers/calibration.h"

namespace nibble {

// The activations of a set of calibration chunks inside one decoder layer.
// Parts run in LlamaModel::LayerPart order; a part may be re-run while its
// inputs are intact (kAttnNorm and kAttention until kAttnOut has run, kFfn
// until kFfnOut), and running kFfnOut moves on to the next layer.
// Thread safety: none; the model must not be forwarded concurrently.
class LayerStates {
 public:
  using Part = LlamaModel::LayerPart;

  // Embeds `chunks` (each a fresh context at position 0, as Calibrate() runs
  // them) with `model`'s token embedding as stored now (quantized or not):
  // the states entering layer 0. Errors: no or empty chunks, a bad token id.
  static absl::StatusOr<LayerStates> Create(LlamaModel& model,
                                            const std::vector<std::vector<int32_t>>& chunks);

  int layer() const { return layer_; }  // the layer the states are in
  Part next_part() const { return next_; }
  int64_t n_tokens() const { return n_tokens_; }
  int64_t n_chunks() const { return static_cast<int64_t>(chunks_.size()); }
  // The residual stream of chunk c ([chunk length, dim] row-major): entering
  // layer() until its kAttnOut ran.
  const std::vector<float>& residual(int c) const { return chunks_[c].x; }

  // Runs parts [first, last] of layer() over every chunk (each chunk in
  // Forward()'s sub-batches of kMaxBatch at its positions; per sub-batch the
  // parts in order) with `observer` installed (may be null; removed
  // afterwards). Errors: a part out of order (see the class comment), past
  // the last layer, a forward error.
  absl::Status Run(LlamaModel& model, Part first, Part last, ActivationObserver* observer);
  absl::Status Run(LlamaModel& model, Part part, ActivationObserver* observer) {
    return Run(model, part, part, observer);
  }
  // Runs the rest of layer() (next_part() .. kFfnOut), unobserved.
  absl::Status FinishLayer(LlamaModel& model) { return Run(model, next_, Part::kFfnOut, nullptr); }

 private:
  struct Chunk {
    std::vector<float> x, xb, att, h;
    int len = 0;
  };
  LayerStates() = default;

  std::vector<Chunk> chunks_;
  int layer_ = 0;
  Part resume_ = Part::kAttnNorm;  // earliest part whose inputs are intact
  Part next_ = Part::kAttnNorm;    // the part after the last one run
  int max_len_ = 0;
  int64_t n_tokens_ = 0;
  std::unique_ptr<KVCache> cache_;
};

// One stage of a layer: the weights quantized together, from the statistics
// of parts [first, last] run with the earlier stages already quantized.
struct SequentialStage {
  std::vector<LinearWeight> weights;
  LlamaModel::LayerPart first, last;
};
// The stages of one layer: {wq, wk, wv} (parts kAttnNorm..kAttnNorm, or
// ..kAttention for BoA, which needs the unquantized attention), {wo}
// (kAttention), {w_gate, w_up} (kAttnOut), {w_down} (kFfn).
std::vector<SequentialStage> SequentialStages(bool boa);

// Quantizes `weight` of `layer` given its Hessian (and, method BoA, the
// layer's attention statistics for wq/wk/wv; null otherwise) and returns the
// quantized tensor, which the driver installs in the calibration model.
using SequentialQuantizeFn = std::function<absl::StatusOr<HostTensor>(
    int layer, LinearWeight weight, const Hessian& hessian, const BoaLayerStats* boa)>;

struct SequentialOptions {
  int n_threads = 0;  // Hessian / BoA accumulation threads (<= 0: all cores)
  bool boa = false;   // collect BoA attention statistics for the q/k/v stage
};

struct SequentialRun {
  int64_t n_tokens = 0, n_chunks = 0;
};

// Sequential quantization of every decoder layer of `model` (the calibration
// model: its weights are replaced by what `quantize` returns, so later stages
// see them) over `chunks` (see CalibrationChunks()), stage by stage
// (SequentialStages), calling `quantize` once per linear weight in layer
// order. The token embedding is used as stored in `model` when called.
// Errors: from the forward passes, the collectors (naming layer and input),
// or `quantize` (returned as is).
absl::StatusOr<SequentialRun> QuantizeSequentially(LlamaModel& model,
                                                   const std::vector<std::vector<int32_t>>& chunks,
                                                   const SequentialOptions& opts,
                                                   const SequentialQuantizeFn& quantize);

}  // namespace nibble
