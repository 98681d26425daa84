#include "quantizers/sensitivity.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "quantizers/quant_error.h"
#include "quantizers/rtn.h"

namespace nibble {

void LogSoftmax(const float* in, int64_t n, float* out) {
  float mx = -INFINITY;
  for (int64_t i = 0; i < n; ++i) mx = std::max(mx, in[i]);
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += std::exp(static_cast<double>(in[i] - mx));
  const float lse = mx + static_cast<float>(std::log(sum));
  for (int64_t i = 0; i < n; ++i) out[i] = in[i] - lse;
}

double KlDivergence(const float* logp, const float* logq, int64_t n) {
  double kl = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double lp = logp[i];
    if (lp < -80.0) continue;  // p < 2e-35: contributes nothing representable
    kl += std::exp(lp) * (lp - static_cast<double>(logq[i]));
  }
  return kl;
}

absl::StatusOr<std::unique_ptr<KldProbe>> KldProbe::Create(LlamaModel* model,
                                                           std::vector<std::vector<int32_t>> chunks) {
  if (model == nullptr) return absl::InvalidArgumentError("KldProbe: no model");
  std::unique_ptr<KldProbe> p(new KldProbe(model, std::move(chunks)));
  const ModelConfig& c = model->config();
  for (const auto& ch : p->chunks_) {
    if (static_cast<int>(ch.size()) > LlamaModel::kMaxBatch)
      return absl::InvalidArgumentError(absl::StrCat("KldProbe: a chunk of ", ch.size(), " tokens exceeds ",
                                                     LlamaModel::kMaxBatch));
    for (int32_t t : ch)
      if (t < 0 || t >= c.vocab_size) return absl::InvalidArgumentError(absl::StrCat("KldProbe: bad token id ", t));
    p->n_positions_ += static_cast<int64_t>(ch.size());
    p->max_len_ = std::max(p->max_len_, static_cast<int>(ch.size()));
  }
  if (p->n_positions_ == 0) return absl::InvalidArgumentError("KldProbe: no probe tokens");
  const int64_t vocab = c.vocab_size;
  p->ref_logp_.resize(static_cast<size_t>(p->n_positions_ * vocab));
  p->logits_.resize(static_cast<size_t>(int64_t{p->max_len_} * vocab));
  auto cache = model->NewKVCache(p->max_len_);
  int64_t at = 0;
  std::vector<float> x;
  for (const auto& ch : p->chunks_) {
    auto& trace = p->layer_inputs_.emplace_back(static_cast<size_t>(c.n_layers) * ch.size() * c.dim);
    if (ch.empty()) continue;
    const int n = static_cast<int>(ch.size());
    x.resize(static_cast<size_t>(n) * c.dim);
    model->Embed(ch, x.data());
    std::span<float> out(p->logits_.data(), ch.size() * static_cast<size_t>(vocab));
    if (auto s = model->ForwardFromLayer(0, x, n, cache.get(), out, trace.data()); !s.ok())
      return absl::Status(s.code(), absl::StrCat("KLD probe reference pass: ", s.message()));
    for (size_t t = 0; t < ch.size(); ++t, ++at)
      LogSoftmax(&p->logits_[t * vocab], vocab, &p->ref_logp_[static_cast<size_t>(at * vocab)]);
  }
  return p;
}

absl::StatusOr<double> KldProbe::Kld(int first_layer) {
  const ModelConfig& c = model_->config();
  if (first_layer < 0 || first_layer > c.n_layers)
    return absl::InvalidArgumentError(absl::StrCat("KldProbe: layer ", first_layer, " out of range"));
  const int64_t vocab = c.vocab_size;
  auto cache = model_->NewKVCache(max_len_);
  std::vector<float> logq(static_cast<size_t>(vocab));
  std::vector<float> x;
  double sum = 0;
  int64_t at = 0;
  for (size_t i = 0; i < chunks_.size(); ++i) {
    const auto& ch = chunks_[i];
    if (ch.empty()) continue;
    const int n = static_cast<int>(ch.size());
    const size_t len = static_cast<size_t>(n) * c.dim;
    std::span<const float> in;
    if (first_layer == 0) {
      x.resize(len);
      model_->Embed(ch, x.data());
      in = x;
    } else {
      in = std::span<const float>(layer_inputs_[i].data() + static_cast<size_t>(first_layer) * len, len);
    }
    std::span<float> out(logits_.data(), ch.size() * static_cast<size_t>(vocab));
    if (auto s = model_->ForwardFromLayer(first_layer, in, n, cache.get(), out); !s.ok())
      return absl::Status(s.code(), absl::StrCat("KLD probe pass: ", s.message()));
    for (size_t t = 0; t < ch.size(); ++t, ++at) {
      LogSoftmax(&logits_[t * vocab], vocab, logq.data());
      sum += KlDivergence(&ref_logp_[static_cast<size_t>(at * vocab)], logq.data(), vocab);
    }
  }
  return std::max(0.0, sum / static_cast<double>(n_positions_));
}

absl::StatusOr<double> KldProbe::KldWith(HostTensor* t, std::shared_ptr<const QuantTensor> q, int layer) {
  if (t == nullptr) return absl::InvalidArgumentError("KldProbe: no tensor");
  std::shared_ptr<const QuantTensor> saved = std::move(t->quant);
  t->quant = std::move(q);
  auto r = Kld(layer < 0 ? 0 : layer);
  t->quant = std::move(saved);
  return r;
}

absl::StatusOr<std::vector<std::array<double, 7>>> LinearSensitivities(KldProbe& probe, LlamaModel& model,
                                                                     const CalibrationStats& stats,
                                                                     const fmt::Format& probe_format,
                                                                     int n_threads, const ProbeProgress& progress) {
  LoadedModel& lm = model.mutable_loaded();
  const int n_layers = static_cast<int>(lm.weights.layers.size());
  std::vector<std::array<double, 7>> out(static_cast<size_t>(n_layers));
  const int total = n_layers * static_cast<int>(kAllLinearWeights.size());
  int done = 0;
  RtnOptions ro;
  ro.n_threads = n_threads;
  for (int l = 0; l < n_layers; ++l) {
    for (size_t k = 0; k < kAllLinearWeights.size(); ++k) {
      const LinearWeight lw = kAllLinearWeights[k];
      const std::string name = absl::StrCat("blk.", l, ".", LinearWeightName(lw));
      if (progress) progress(done, total, name);
      HostTensor& w = MutableWeightOf(lm.weights.layers[l], lw);
      const Hessian* h = stats.Get(l, lw);
      if (h == nullptr || h->dim != w.cols() || w.data.size() != static_cast<size_t>(w.numel()))
        return absl::FailedPreconditionError(absl::StrCat(name, ": sensitivity probe needs fp32 weights and the "
                                                          "calibration Hessian of their input"));
      auto q = RtnQuantize(w, h->mean_sq, probe_format, ro);
      if (!q.ok()) return absl::Status(q.status().code(), absl::StrCat(name, ": ", q.status().message()));
      auto d = DequantizeAll(*q);
      if (!d.ok()) return absl::Status(d.status().code(), absl::StrCat(name, ": ", d.status().message()));
      double proxy = 0;
      for (double e : RowProxyErrors(w.data.data(), d->data(), w.rows(), w.cols(), *h, n_threads)) proxy += e;
      auto kld = probe.KldWith(&w, std::make_shared<const QuantTensor>(*std::move(q)), l);
      if (!kld.ok()) return absl::Status(kld.status().code(), absl::StrCat(name, ": ", kld.status().message()));
      out[l][k] = proxy > 0 ? *kld / proxy : 0.0;
      ++done;
    }
  }
  if (progress) progress(total, total, "");
  return out;
}

absl::StatusOr<std::vector<KnapsackOption>> EmbeddingCosts(KldProbe& probe, LlamaModel& model,
                                                           const std::vector<fmt::Format>& formats, bool output,
                                                           int n_threads, const ProbeProgress& progress,
                                                           const GptqFactor* head_factor, const GptqOptions& gptq) {
  LoadedModel& lm = model.mutable_loaded();
  HostTensor& w = output ? lm.weights.output : lm.weights.tok_embeddings;
  const char* name = output ? "output" : "token_embd";
  if (w.shape.size() != 2 || w.data.size() != static_cast<size_t>(w.numel()))
    return absl::FailedPreconditionError(absl::StrCat(name, ": sensitivity probe needs fp32 weights"));
  RtnOptions ro;
  ro.n_threads = n_threads;
  std::vector<KnapsackOption> out;
  for (size_t i = 0; i < formats.size(); ++i) {
    if (progress) progress(static_cast<int>(i), static_cast<int>(formats.size()), absl::StrCat(name, " ", formats[i].Name()));
    absl::StatusOr<QuantTensor> q;
    if (head_factor != nullptr) {
      GptqOptions go = gptq;
      go.n_threads = n_threads;
      q = GptqQuantize(w, *head_factor, formats[i], go);
    } else {
      q = RtnQuantize(w, {}, formats[i], ro);
    }
    if (!q.ok()) return absl::Status(q.status().code(), absl::StrCat(name, ": ", q.status().message()));
    KnapsackOption o;
    o.bits = q->BitsPerWeight() * static_cast<double>(w.numel());
    auto kld = probe.KldWith(&w, std::make_shared<const QuantTensor>(*std::move(q)));
    if (!kld.ok()) return absl::Status(kld.status().code(), absl::StrCat(name, ": ", kld.status().message()));
    o.err = *kld;
    out.push_back(o);
  }
  if (progress) progress(static_cast<int>(formats.size()), static_cast<int>(formats.size()), "");
  return out;
}

}  // namespace nibble
