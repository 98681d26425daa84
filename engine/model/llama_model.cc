#include "engine/model/llama_model.h"

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "engine/core/quant_tensor.h"
#include "engine/core/rotation.h"
#include "kernels/cpu/ops.h"

namespace nibble {

absl::StatusOr<std::unique_ptr<LlamaModel>> LlamaModel::Create(LoadedModel model, int n_threads) {
  if (auto s = model.config.Validate(model.source_path); !s.ok()) return s;
  if (auto s = model.weights.Validate(model.config, model.source_path); !s.ok()) return s;
  auto backend = MakeCpuBackend(n_threads);
  return std::unique_ptr<LlamaModel>(new LlamaModel(std::move(model), std::move(backend)));
}

LlamaModel::LlamaModel(LoadedModel m, std::unique_ptr<Backend> backend)
    : m_(std::move(m)), backend_(std::move(backend)) {
  const ModelConfig& c = m_.config;
  if (c.ffn_rotation != 0) ffn_rot_ = std::make_unique<FastRotation>(c.hidden_dim, c.ffn_rotation);
  if (c.residual_rotation != 0) {
    const int64_t d = c.dim;
    rot_.name = "residual_rotation";
    rot_.shape = {d, d};
    rot_.data = StructuredRotation(c.dim, c.residual_rotation);
    rot_t_.name = "residual_rotation_t";
    rot_t_.shape = {d, d};
    rot_t_.data.resize(rot_.data.size());
    for (int64_t i = 0; i < d; ++i)
      for (int64_t j = 0; j < d; ++j) rot_t_.data[j * d + i] = rot_.data[i * d + j];
  }
}

void LlamaModel::Embed(std::span<const int32_t> tokens, float* out) {
  const ModelConfig& c = m_.config;
  const HostTensor& e = m_.weights.tok_embeddings;
  const size_t dim = static_cast<size_t>(c.dim);
  const bool rotate = c.residual_rotation != 0;
  for (size_t b = 0; b < tokens.size(); b += kMaxBatch) {
    const int n = static_cast<int>(std::min<size_t>(kMaxBatch, tokens.size() - b));
    EnsureScratch(n);
    float* dst = rotate ? rot_buf_.data() : out + b * dim;
    for (int t = 0; t < n; ++t) {
      const int32_t id = tokens[b + t];
      if (e.quant != nullptr) {
        e.quant->DequantizeRow(id, dst + t * dim);
      } else if (e.is_f16()) {
        cpu::WidenF16(e.f16.data() + size_t(id) * dim, dst + t * dim, static_cast<int64_t>(dim));
      } else if (e.is_bf16()) {
        cpu::WidenBF16(e.bf16.data() + size_t(id) * dim, dst + t * dim, static_cast<int64_t>(dim));
      } else {
        std::memcpy(dst + t * dim, e.fp32() + size_t(id) * dim, dim * sizeof(float));
      }
    }
    if (rotate) backend_->MatMul(rot_, dst, n, out + b * dim);
  }
}

const float* LlamaModel::Unrotate(const float* x, int n) {
  if (m_.config.residual_rotation == 0) return x;
  backend_->MatMul(rot_t_, x, n, rot_buf_.data());
  return rot_buf_.data();
}

std::unique_ptr<KVCache> LlamaModel::NewKVCache(int capacity, KvDtype dtype) const {
  if (capacity <= 0) capacity = m_.config.max_seq_len;
  return std::make_unique<KVCache>(m_.config, capacity, dtype);
}

void LlamaModel::EnsureScratch(int n) {
  if (n <= scratch_tokens_) return;
  const ModelConfig& c = m_.config;
  const size_t t = static_cast<size_t>(n);
  x_.resize(t * c.dim);
  if (c.residual_rotation != 0) rot_buf_.resize(t * c.dim);
  xb_.resize(t * std::max(c.dim, c.q_dim()));
  q_.resize(t * c.q_dim());
  k_.resize(t * c.kv_dim());
  v_.resize(t * c.kv_dim());
  att_.resize(t * c.q_dim());
  h1_.resize(t * c.hidden_dim);
  h3_.resize(t * c.hidden_dim);
  scratch_tokens_ = n;
}

absl::Status LlamaModel::CheckObservable(const KVCache* cache, const char* what) const {
  if (observer_ != nullptr && cache != nullptr && cache->f16())
    return absl::FailedPreconditionError(absl::StrCat(
        what, ": an observer reads fp32 K/V rows, and this KV cache is fp16 (use an fp32 cache for observed runs)"));
  return absl::OkStatus();
}

absl::Status LlamaModel::Forward(std::span<const int32_t> tokens, int pos, KVCache* cache,
                                 std::span<float> logits, bool all_logits) {
  const ModelConfig& c = m_.config;
  const int64_t n = static_cast<int64_t>(tokens.size());
  if (n == 0) return absl::InvalidArgumentError("Forward: no tokens");
  if (auto s = CheckObservable(cache, "Forward"); !s.ok()) return s;
  if (pos < 0 || pos + n > cache->capacity()) {
    return absl::OutOfRangeError(absl::StrCat("Forward: positions [", pos, ", ", pos + n,
                                              ") exceed the KV cache capacity ", cache->capacity()));
  }
  for (int64_t i = 0; i < n; ++i) {
    if (tokens[i] < 0 || tokens[i] >= c.vocab_size)
      return absl::InvalidArgumentError(absl::StrCat("Forward: token id ", tokens[i], " at index ", i,
                                                     " is outside the vocabulary [0, ", c.vocab_size, ")"));
  }
  const size_t need = static_cast<size_t>(all_logits ? n : 1) * c.vocab_size;
  if (logits.size() < need)
    return absl::InvalidArgumentError(absl::StrCat("Forward: logits buffer holds ", logits.size(),
                                                   " floats, need ", need));
  for (int64_t b = 0; b < n; b += kMaxBatch) {
    const int len = static_cast<int>(std::min<int64_t>(kMaxBatch, n - b));
    const bool last_chunk = b + len == n;
    float* out = all_logits ? logits.data() + b * c.vocab_size : (last_chunk ? logits.data() : nullptr);
    ForwardBatch(tokens.data() + b, len, pos + static_cast<int>(b), cache, out, all_logits);
  }
  return absl::OkStatus();
}

absl::Status LlamaModel::ForwardFromLayer(int first_layer, std::span<const float> x, int n, KVCache* cache,
                                          std::span<float> logits, float* layer_inputs) {
  const ModelConfig& c = m_.config;
  if (first_layer < 0 || first_layer > c.n_layers)
    return absl::InvalidArgumentError(absl::StrCat("ForwardFromLayer: layer ", first_layer, " is not in [0, ",
                                                   c.n_layers, "]"));
  if (n <= 0 || n > kMaxBatch)
    return absl::InvalidArgumentError(absl::StrCat("ForwardFromLayer: ", n, " tokens is not in [1, ", kMaxBatch, "]"));
  if (n > cache->capacity())
    return absl::OutOfRangeError(absl::StrCat("ForwardFromLayer: ", n, " tokens exceed the KV cache capacity ",
                                              cache->capacity()));
  if (auto s = CheckObservable(cache, "ForwardFromLayer"); !s.ok()) return s;
  if (x.size() != static_cast<size_t>(n) * c.dim)
    return absl::InvalidArgumentError(absl::StrCat("ForwardFromLayer: input holds ", x.size(), " floats, need ",
                                                   static_cast<size_t>(n) * c.dim));
  if (logits.size() < static_cast<size_t>(n) * c.vocab_size)
    return absl::InvalidArgumentError(absl::StrCat("ForwardFromLayer: logits buffer holds ", logits.size(),
                                                   " floats, need ", static_cast<size_t>(n) * c.vocab_size));
  EnsureScratch(n);
  std::memcpy(x_.data(), x.data(), x.size() * sizeof(float));
  ForwardBatch(nullptr, n, 0, cache, logits.data(), /*all_logits=*/true, first_layer, layer_inputs);
  return absl::OkStatus();
}

absl::Status LlamaModel::ForwardLayerPart(int layer, LayerPart part, const LayerRows& rows, int n, int pos,
                                          KVCache* cache) {
  const ModelConfig& c = m_.config;
  if (layer < 0 || layer >= c.n_layers)
    return absl::InvalidArgumentError(
        absl::StrCat("ForwardLayerPart: layer ", layer, " is not in [0, ", c.n_layers, ")"));
  if (n <= 0 || n > kMaxBatch)
    return absl::InvalidArgumentError(absl::StrCat("ForwardLayerPart: ", n, " tokens is not in [1, ", kMaxBatch, "]"));
  bool ok = false;
  switch (part) {
    case LayerPart::kAttnNorm: ok = rows.x && rows.xb; break;
    case LayerPart::kAttention: ok = rows.xb && rows.att && cache != nullptr; break;
    case LayerPart::kAttnOut: ok = rows.x && rows.xb && rows.att; break;
    case LayerPart::kFfn: ok = rows.xb && rows.h; break;
    case LayerPart::kFfnOut: ok = rows.x && rows.xb && rows.h; break;
  }
  if (!ok)
    return absl::InvalidArgumentError(
        absl::StrCat("ForwardLayerPart: part ", static_cast<int>(part), " of layer ", layer, " lacks a buffer"));
  if (part == LayerPart::kAttention) {
    if (auto s = CheckObservable(cache, "ForwardLayerPart"); !s.ok()) return s;
  }
  if (part == LayerPart::kAttention && (pos < 0 || pos + n > cache->capacity()))
    return absl::OutOfRangeError(absl::StrCat("ForwardLayerPart: positions [", pos, ", ", pos + n,
                                              ") exceed the KV cache capacity ", cache->capacity()));
  EnsureScratch(n);
  RunLayerPart(layer, part, rows, n, pos, cache);
  return absl::OkStatus();
}

void LlamaModel::RunLayer(int l, int n, int pos, KVCache* cache) {
  const LayerRows r{x_.data(), xb_.data(), att_.data(), h1_.data()};
  for (LayerPart p : {LayerPart::kAttnNorm, LayerPart::kAttention, LayerPart::kAttnOut, LayerPart::kFfn,
                      LayerPart::kFfnOut})
    RunLayerPart(l, p, r, n, pos, cache);
}

void LlamaModel::RunLayerPart(int l, LayerPart part, const LayerRows& r, int n, int pos, KVCache* cache) {
  const ModelConfig& c = m_.config;
  Backend& be = *backend_;
  const int dim = c.dim, qd = c.q_dim(), kvd = c.kv_dim(), hid = c.hidden_dim;
  const LayerWeights& lw = m_.weights.layers[l];
  switch (part) {
    case LayerPart::kAttnNorm:
      be.RmsNorm(r.x, lw.attn_norm.data.data(), n, dim, c.norm_eps, r.xb);
      if (observer_) observer_->OnLinearInput(l, LinearInput::kAttnIn, r.xb, n, dim);
      break;
    case LayerPart::kAttention: {
      {
        const HostTensor* w[] = {&lw.wq, &lw.wk, &lw.wv};
        float* y[] = {q_.data(), k_.data(), v_.data()};
        be.MatMulMany(w, r.xb, n, y);
      }
      be.Rope(q_.data(), n, pos, c.n_heads, c);
      be.Rope(k_.data(), n, pos, c.n_kv_heads, c);
      if (cache->f16()) {
        cpu::WriteContiguousF16(k_.data(), v_.data(), n, pos, c.n_kv_heads, c.head_dim, cache->k_t16(l),
                                cache->v16(l));
        AttentionArgs a{q_.data(), nullptr, nullptr, r.att, n, pos, c.n_heads, c.n_kv_heads, c.head_dim};
        a.k_t16 = cache->k_t16(l);
        a.v16 = cache->v16(l);
        be.Attention(a);
        // (An observer needs fp32 K/V rows: CheckObservable refuses observed runs on an fp16 cache.)
        if (observer_) observer_->OnLinearInput(l, LinearInput::kAttnOut, r.att, n, qd);
        break;
      }
      float* kc = cache->k(l);
      float* vc = cache->v(l);
      std::memcpy(kc + size_t(pos) * kvd, k_.data(), size_t(n) * kvd * sizeof(float));
      std::memcpy(vc + size_t(pos) * kvd, v_.data(), size_t(n) * kvd * sizeof(float));
      cpu::WriteContiguousKt(k_.data(), n, pos, c.n_kv_heads, c.head_dim, cache->k_t(l));
      be.Attention({q_.data(), kc, vc, r.att, n, pos, c.n_heads, c.n_kv_heads, c.head_dim, cache->k_t(l)});
      if (observer_) observer_->OnAttention(l, {q_.data(), kc, vc, n, pos, c.n_heads, c.n_kv_heads, c.head_dim});
      if (observer_) observer_->OnLinearInput(l, LinearInput::kAttnOut, r.att, n, qd);
      break;
    }
    case LayerPart::kAttnOut:
      be.MatMul(lw.wo, r.att, n, r.xb);
      for (size_t i = 0; i < size_t(n) * dim; ++i) r.x[i] += r.xb[i];
      be.RmsNorm(r.x, lw.ffn_norm.data.data(), n, dim, c.norm_eps, r.xb);
      if (observer_) observer_->OnLinearInput(l, LinearInput::kFfnIn, r.xb, n, dim);
      break;
    case LayerPart::kFfn:
      {
        const HostTensor* w[] = {&lw.w_gate, &lw.w_up};
        float* y[] = {r.h, h3_.data()};
        be.MatMulMany(w, r.xb, n, y);
      }
      be.SwiGLU(r.h, h3_.data(), int64_t{n} * hid);
      if (ffn_rot_) ffn_rot_->Apply(r.h, n);
      if (observer_) observer_->OnLinearInput(l, LinearInput::kFfnMid, r.h, n, hid);
      break;
    case LayerPart::kFfnOut:
      be.MatMul(lw.w_down, r.h, n, r.xb);
      for (size_t i = 0; i < size_t(n) * dim; ++i) r.x[i] += r.xb[i];
      break;
  }
}

void LlamaModel::ForwardBatch(const int32_t* tokens, int n, int pos, KVCache* cache, float* logits,
                              bool all_logits, int first_layer, float* layer_inputs) {
  const ModelConfig& c = m_.config;
  const ModelWeights& w = m_.weights;
  Backend& be = *backend_;
  EnsureScratch(n);
  const int dim = c.dim;

  if (tokens != nullptr) Embed(std::span<const int32_t>(tokens, size_t(n)), x_.data());

  for (int l = first_layer; l < c.n_layers; ++l) {
    if (layer_inputs != nullptr)
      std::memcpy(layer_inputs + size_t(l) * n * dim, x_.data(), size_t(n) * dim * sizeof(float));
    RunLayer(l, n, pos, cache);
  }
  if (observer_) {
    // The output head's input for every token (calibration of the head / tied
    // embedding), whether or not logits are wanted.
    be.RmsNorm(Unrotate(x_.data(), n), w.final_norm.data.data(), n, dim, c.norm_eps, xb_.data());
    observer_->OnLinearInput(c.n_layers, LinearInput::kHeadIn, xb_.data(), n, dim);
    if (logits != nullptr) {
      const float* in = all_logits ? xb_.data() : xb_.data() + size_t(n - 1) * dim;
      be.MatMul(c.tied_embeddings ? w.tok_embeddings : w.output, in, all_logits ? n : 1, logits);
    }
    return;
  }
  if (logits == nullptr) return;
  const HostTensor& head = c.tied_embeddings ? w.tok_embeddings : w.output;
  if (all_logits) {
    be.RmsNorm(Unrotate(x_.data(), n), w.final_norm.data.data(), n, dim, c.norm_eps, xb_.data());
    be.MatMul(head, xb_.data(), n, logits);
  } else {
    be.RmsNorm(Unrotate(x_.data() + size_t(n - 1) * dim, 1), w.final_norm.data.data(), 1, dim, c.norm_eps,
               xb_.data());
    be.MatMul(head, xb_.data(), 1, logits);
  }
}

}  // namespace nibble
