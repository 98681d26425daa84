#include "engine/io/llama2c.h"

#include <cstring>

#include "absl/strings/str_cat.h"
#include "engine/io/byte_reader.h"
#include "engine/io/mapped_file.h"

namespace nibble::io {
namespace {

struct Header {
  int32_t dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len;
};

bool Plausible(const Header& h) {
  auto in = [](int32_t v, int32_t lo, int32_t hi) { return v >= lo && v <= hi; };
  const int32_t vocab = h.vocab_size < 0 ? -h.vocab_size : h.vocab_size;
  return in(h.dim, 1, 1 << 16) && in(h.hidden_dim, 1, 1 << 18) && in(h.n_layers, 1, 1024) &&
         in(h.n_heads, 1, 1024) && in(h.n_kv_heads, 1, h.n_heads) && h.n_heads > 0 &&
         h.n_heads % h.n_kv_heads == 0 && h.dim % h.n_heads == 0 && in(vocab, 1, 1 << 22) &&
         in(h.seq_len, 1, 1 << 22) && h.vocab_size != INT32_MIN;
}

}  // namespace

bool LooksLikeLlama2c(const uint8_t* data, size_t size) {
  if (size < sizeof(Header)) return false;
  Header h;
  std::memcpy(&h, data, sizeof(h));
  return Plausible(h);
}

absl::StatusOr<LoadedModel> LoadLlama2cModel(const std::string& path) {
  auto file_or = MappedFile::Open(path);
  if (!file_or.ok()) return file_or.status();
  const MappedFile& file = **file_or;
  ByteReader r(file.data(), file.size(), path);
  if (file.size() >= 4 && std::memcmp(file.data(), "ak42", 4) == 0) {
    return absl::UnimplementedError(
        absl::StrCat(path, ": llama2.c versioned export (magic 'ak42') is not supported; use the legacy export"));
  }
  auto hdr = r.Read<Header>("llama2.c header");
  if (!hdr.ok()) return hdr.status();
  const Header h = *hdr;
  if (!Plausible(h)) {
    return absl::InvalidArgumentError(absl::StrCat(
        path, ": not a llama2.c checkpoint (implausible header: dim=", h.dim, " hidden_dim=", h.hidden_dim,
        " n_layers=", h.n_layers, " n_heads=", h.n_heads, " n_kv_heads=", h.n_kv_heads,
        " vocab_size=", h.vocab_size, " seq_len=", h.seq_len, ")"));
  }
  LoadedModel m;
  m.source_path = path;
  m.source_format = "llama2c";
  ModelConfig& c = m.config;
  c.architecture = "llama";
  c.dim = h.dim;
  c.hidden_dim = h.hidden_dim;
  c.n_layers = h.n_layers;
  c.n_heads = h.n_heads;
  c.n_kv_heads = h.n_kv_heads;
  c.head_dim = h.dim / h.n_heads;
  c.rope_dim = c.head_dim;
  c.vocab_size = h.vocab_size < 0 ? -h.vocab_size : h.vocab_size;
  c.max_seq_len = h.seq_len;
  c.norm_eps = 1e-5f;
  c.rope_theta = 10000.0f;
  c.rope_style = RopeStyle::kInterleaved;
  c.tied_embeddings = h.vocab_size > 0;
  if (auto s = c.Validate(path); !s.ok()) return s;

  const int64_t L = c.n_layers, dim = c.dim, kv = c.kv_dim(), hid = c.hidden_dim, vocab = c.vocab_size;
  const int64_t head = c.head_dim;
  // Expected size first, so a truncated file is reported as such before any copy.
  int64_t floats = vocab * dim + L * dim * 2 + L * dim * dim * 2 + L * kv * dim * 2 + L * hid * dim * 3 + dim +
                   int64_t{c.max_seq_len} * head;
  if (!c.tied_embeddings) floats += vocab * dim;
  const int64_t expected = static_cast<int64_t>(sizeof(Header)) + floats * 4;
  if (static_cast<int64_t>(file.size()) < expected) {
    return absl::DataLossError(absl::StrCat(path, ": truncated llama2.c checkpoint: header implies ", expected,
                                            " bytes, file has ", file.size()));
  }
  absl::Status st;
  auto read = [&](const char* name, std::vector<int64_t> shape) -> HostTensor {
    HostTensor t;
    t.name = name;
    t.shape = std::move(shape);
    const int64_t count = t.numel();
    auto bytes = r.ReadBytes(count * 4, name);
    if (!bytes.ok()) {
      if (st.ok()) st = bytes.status();
      return t;
    }
    t.data.resize(count);
    std::memcpy(t.data.data(), bytes->data(), count * 4);
    return t;
  };
  // The file stores each kind of tensor for all layers contiguously.
  m.weights.tok_embeddings = read("token_embedding", {vocab, dim});
  m.weights.layers.resize(L);
  auto per_layer = [&](const char* name, std::vector<int64_t> shape, HostTensor LayerWeights::*field) {
    for (int64_t l = 0; l < L; ++l) {
      m.weights.layers[l].*field = read(name, shape);
      (m.weights.layers[l].*field).name = absl::StrCat(name, ".", l);
    }
  };
  per_layer("rms_att", {dim}, &LayerWeights::attn_norm);
  per_layer("wq", {c.q_dim(), dim}, &LayerWeights::wq);
  per_layer("wk", {kv, dim}, &LayerWeights::wk);
  per_layer("wv", {kv, dim}, &LayerWeights::wv);
  per_layer("wo", {dim, c.q_dim()}, &LayerWeights::wo);
  per_layer("rms_ffn", {dim}, &LayerWeights::ffn_norm);
  per_layer("w1", {hid, dim}, &LayerWeights::w_gate);
  per_layer("w2", {dim, hid}, &LayerWeights::w_down);
  per_layer("w3", {hid, dim}, &LayerWeights::w_up);
  m.weights.final_norm = read("rms_final", {dim});
  if (st.ok()) st = r.Skip(uint64_t(c.max_seq_len) * head * 4, "freq_cis_real/imag");
  if (!c.tied_embeddings) m.weights.output = read("wcls", {vocab, dim});
  if (!st.ok()) return st;
  m.metadata["llama2c.seq_len"] = absl::StrCat(h.seq_len);
  return m;
}

}  // namespace nibble::io
