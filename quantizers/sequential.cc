#include "quantizers/sequential.h"

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "engine/core/quant_tensor.h"

namespace nibble {

namespace {

using Part = LlamaModel::LayerPart;

const char* PartName(Part p) {
  switch (p) {
    case Part::kAttnNorm: return "attn_norm";
    case Part::kAttention: return "attention";
    case Part::kAttnOut: return "attn_out";
    case Part::kFfn: return "ffn";
    case Part::kFfnOut: return "ffn_out";
  }
  return "?";
}

Part NextPart(Part p) { return static_cast<Part>(static_cast<int>(p) + 1); }

struct ObserverGuard {
  LlamaModel& m;
  ~ObserverGuard() { m.SetObserver(nullptr); }
};

// Forwards only the selected linear inputs (and every attention) to `inner`.
class InputFilter : public ActivationObserver {
 public:
  InputFilter(ActivationObserver* inner, std::vector<LinearInput> only) : inner_(inner), only_(std::move(only)) {}
  void OnLinearInput(int layer, LinearInput which, const float* x, int n_tokens, int width) override {
    if (std::find(only_.begin(), only_.end(), which) != only_.end())
      inner_->OnLinearInput(layer, which, x, n_tokens, width);
  }
  void OnAttention(int layer, const AttentionObservation& a) override { inner_->OnAttention(layer, a); }

 private:
  ActivationObserver* inner_;
  std::vector<LinearInput> only_;
};

}  // namespace

absl::StatusOr<LayerStates> LayerStates::Create(LlamaModel& model,
                                                const std::vector<std::vector<int32_t>>& chunks) {
  const ModelConfig& c = model.config();
  if (chunks.empty()) return absl::InvalidArgumentError("sequential calibration: no calibration chunks");
  LayerStates s;
  const size_t dim = static_cast<size_t>(c.dim);
  for (const auto& ch : chunks) {
    if (ch.empty()) return absl::InvalidArgumentError("sequential calibration: empty calibration chunk");
    Chunk k;
    k.len = static_cast<int>(ch.size());
    k.x.resize(ch.size() * dim);
    for (size_t t = 0; t < ch.size(); ++t) {
      const int32_t id = ch[t];
      if (id < 0 || id >= c.vocab_size)
        return absl::InvalidArgumentError(
            absl::StrCat("sequential calibration: token id ", id, " is not in [0, ", c.vocab_size, ")"));
    }
    model.Embed(ch, k.x.data());  // as LlamaModel::Forward embeds (rotated for a rotated model)
    k.xb.resize(ch.size() * dim);
    k.att.resize(ch.size() * static_cast<size_t>(c.q_dim()));
    k.h.resize(ch.size() * static_cast<size_t>(c.hidden_dim));
    s.max_len_ = std::max(s.max_len_, k.len);
    s.n_tokens_ += k.len;
    s.chunks_.push_back(std::move(k));
  }
  s.cache_ = model.NewKVCache(s.max_len_);
  return s;
}

absl::Status LayerStates::Run(LlamaModel& model, Part first, Part last, ActivationObserver* observer) {
  const ModelConfig& c = model.config();
  if (layer_ >= c.n_layers)
    return absl::OutOfRangeError(
        absl::StrCat("sequential calibration: layer ", layer_, " is past the last layer (", c.n_layers, ")"));
  if (first < resume_ || first > next_ || last < first)
    return absl::FailedPreconditionError(absl::StrCat("sequential calibration, layer ", layer_, ": parts ",
                                                      PartName(first), "..", PartName(last),
                                                      " out of order (next part ", PartName(next_), ")"));
  ObserverGuard guard{model};
  model.SetObserver(observer);
  const size_t dim = static_cast<size_t>(c.dim), qd = static_cast<size_t>(c.q_dim()),
               hid = static_cast<size_t>(c.hidden_dim);
  for (Chunk& ch : chunks_) {
    // Same sub-batches at the same positions as LlamaModel::Forward.
    for (int b = 0; b < ch.len; b += LlamaModel::kMaxBatch) {
      const int n = std::min(LlamaModel::kMaxBatch, ch.len - b);
      const size_t r = static_cast<size_t>(b);
      const LlamaModel::LayerRows rows{ch.x.data() + r * dim, ch.xb.data() + r * dim, ch.att.data() + r * qd,
                                       ch.h.data() + r * hid};
      for (Part p = first;; p = NextPart(p)) {
        if (auto s = model.ForwardLayerPart(layer_, p, rows, n, b, cache_.get()); !s.ok())
          return absl::Status(s.code(), absl::StrCat("sequential calibration, layer ", layer_, " part ",
                                                     PartName(p), ": ", s.message()));
        if (p == last) break;
      }
    }
  }
  // Which parts can run next: x changes in kAttnOut and kFfnOut, xb in both.
  if (last == Part::kFfnOut) {
    ++layer_;
    resume_ = next_ = Part::kAttnNorm;
  } else {
    if (last >= Part::kAttnOut) resume_ = Part::kFfn;
    next_ = NextPart(last);
  }
  return absl::OkStatus();
}

std::vector<SequentialStage> SequentialStages(bool boa) {
  using W = LinearWeight;
  return {{{W::kWq, W::kWk, W::kWv}, Part::kAttnNorm, boa ? Part::kAttention : Part::kAttnNorm},
          {{W::kWo}, Part::kAttention, Part::kAttention},
          {{W::kGate, W::kUp}, Part::kAttnOut, Part::kAttnOut},
          {{W::kDown}, Part::kFfn, Part::kFfn}};
}

absl::StatusOr<SequentialRun> QuantizeSequentially(LlamaModel& model,
                                                   const std::vector<std::vector<int32_t>>& chunks,
                                                   const SequentialOptions& opts,
                                                   const SequentialQuantizeFn& quantize) {
  auto states = LayerStates::Create(model, chunks);
  if (!states.ok()) return states.status();
  const int n_layers = model.config().n_layers;
  const std::vector<SequentialStage> stages = SequentialStages(opts.boa);
  for (int l = 0; l < n_layers; ++l) {
    for (const SequentialStage& stage : stages) {
      CollectorOptions co;
      co.n_threads = opts.n_threads;
      co.layer_begin = l;
      co.layer_end = l + 1;
      std::vector<LinearInput> inputs;
      for (LinearWeight w : stage.weights)
        if (std::find(inputs.begin(), inputs.end(), InputOf(w)) == inputs.end()) inputs.push_back(InputOf(w));
      const bool with_boa = opts.boa && stage.last == Part::kAttention && stage.first == Part::kAttnNorm;
      CalibrationStats stats;
      BoaLayerStats boa_layer;
      if (with_boa) {
        BoaCollector collector(model.config(), co);
        InputFilter filter(&collector, inputs);
        if (auto s = states->Run(model, stage.first, stage.last, &filter); !s.ok()) return s;
        auto bs = collector.Finish();
        if (!bs.ok()) return bs.status();
        stats = std::move(bs->plain);
        if (l < static_cast<int>(bs->layers.size())) boa_layer = std::move(bs->layers[l]);
      } else {
        HessianCollector collector(co);
        InputFilter filter(&collector, inputs);
        if (auto s = states->Run(model, stage.first, stage.last, &filter); !s.ok()) return s;
        auto hs = collector.Finish();
        if (!hs.ok()) return hs.status();
        stats = *std::move(hs);
      }
      for (LinearWeight w : stage.weights) {
        const Hessian* h = stats.Get(l, w);
        if (h == nullptr)
          return absl::InternalError(absl::StrCat("sequential calibration: no Hessian observed for blk.", l, ".",
                                                  LinearWeightName(w)));
        auto q = quantize(l, w, *h, with_boa ? &boa_layer : nullptr);
        if (!q.ok()) return q.status();
        // The calibration model computes through the quantized weight from now on.
        MutableWeightOf(model.mutable_loaded().weights.layers[l], w) = *std::move(q);
      }
    }
    if (auto s = states->FinishLayer(model); !s.ok()) return s;
  }
  return SequentialRun{states->n_tokens(), states->n_chunks()};
}

}  // namespace nibble
