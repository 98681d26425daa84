#include "engine/core/weights.h"

#include <cstring>
#include <memory>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/core/config.h"
#include "engine/core/quant_tensor.h"
#include "kernels/common/fp16.h"

namespace nibble {
namespace {

absl::Status Expect(const HostTensor& t, std::vector<int64_t> shape, const std::string& source,
                    const std::string& what) {
  const bool values_ok = t.quant != nullptr ? (t.shape.size() == 2 && t.quant->rows == t.rows() &&
                                                t.quant->cols == t.cols())
                         : t.is_f16() ? (t.shape.size() == 2 && t.data.empty() &&
                                         t.f16.size() == static_cast<size_t>(t.numel()))
                         : t.is_bf16() ? (t.shape.size() == 2 && t.data.empty() &&
                                          t.bf16.size() == static_cast<size_t>(t.numel()))
                                      : t.fp32_size() == static_cast<size_t>(t.numel());
  if (t.shape != shape || !values_ok) {
    return absl::InvalidArgumentError(absl::StrCat(
        source, ": tensor ", t.name.empty() ? what : t.name, " has shape [", absl::StrJoin(t.shape, ", "),
        "] (", t.is_f16() ? t.f16.size() : t.is_bf16() ? t.bf16.size() : t.fp32_size(), " values), expected [", absl::StrJoin(shape, ", "), "]"));
  }
  return absl::OkStatus();
}

}  // namespace

void HostTensor::WidenHalf() {
  if (!f16.empty()) {
    data.resize(f16.size());
    for (size_t i = 0; i < f16.size(); ++i) data[i] = Fp16ToFp32(f16[i]);
  } else if (!bf16.empty()) {
    data.resize(bf16.size());
    for (size_t i = 0; i < bf16.size(); ++i) data[i] = Bf16ToFp32(bf16[i]);
  } else {
    return;
  }
  f16 = {};
  bf16 = {};
  owner.reset();
}

void HostTensor::CopyHalf(const void* src, size_t n, bool is_bf16) {
  auto values = std::make_shared<std::vector<uint16_t>>(n);
  std::memcpy(values->data(), src, n * sizeof(uint16_t));
  (is_bf16 ? bf16 : f16) = {values->data(), values->size()};
  owner = std::move(values);
}

void ModelWeights::WidenHalf() {
  tok_embeddings.WidenHalf();
  output.WidenHalf();
  for (LayerWeights& l : layers)
    for (HostTensor* t : {&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down}) t->WidenHalf();
}

absl::Status ModelWeights::Validate(const ModelConfig& c, const std::string& source) const {
  const int64_t dim = c.dim, hid = c.hidden_dim, q = c.q_dim(), kv = c.kv_dim(), vocab = c.vocab_size;
  if (auto s = Expect(tok_embeddings, {vocab, dim}, source, "token_embd"); !s.ok()) return s;
  if (auto s = Expect(final_norm, {dim}, source, "output_norm"); !s.ok()) return s;
  if (!c.tied_embeddings) {
    if (auto s = Expect(output, {vocab, dim}, source, "output"); !s.ok()) return s;
  }
  if (layers.size() != static_cast<size_t>(c.n_layers)) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": has ", layers.size(), " layers, config says ", c.n_layers));
  }
  for (size_t i = 0; i < layers.size(); ++i) {
    const LayerWeights& l = layers[i];
    const std::string p = absl::StrCat("layer ", i, " ");
    for (auto [t, shape, n] : {std::tuple{&l.attn_norm, std::vector<int64_t>{dim}, "attn_norm"},
                               std::tuple{&l.ffn_norm, std::vector<int64_t>{dim}, "ffn_norm"},
                               std::tuple{&l.wq, std::vector<int64_t>{q, dim}, "wq"},
                               std::tuple{&l.wk, std::vector<int64_t>{kv, dim}, "wk"},
                               std::tuple{&l.wv, std::vector<int64_t>{kv, dim}, "wv"},
                               std::tuple{&l.wo, std::vector<int64_t>{dim, q}, "wo"},
                               std::tuple{&l.w_gate, std::vector<int64_t>{hid, dim}, "w_gate"},
                               std::tuple{&l.w_up, std::vector<int64_t>{hid, dim}, "w_up"},
                               std::tuple{&l.w_down, std::vector<int64_t>{dim, hid}, "w_down"}}) {
      if (auto s = Expect(*t, shape, source, p + n); !s.ok()) return s;
    }
  }
  return absl::OkStatus();
}

}  // namespace nibble
