#include "engine/io/gguf_model.h"

#include <algorithm>
#include <cstring>
#include <memory>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/io/parallel.h"
#include "engine/core/config.h"
#include "engine/io/vocab_util.h"
#include "engine/util/log.h"

namespace nibble::io {
namespace {

absl::Status ReadConfig(const GgufFile& f, ModelConfig* c) {
  const std::string p = "llama.";
  auto req = [&](const char* key, int* out) -> absl::Status {
    auto v = f.GetI32(p + key);
    if (!v.ok()) return v.status();
    *out = *v;
    return absl::OkStatus();
  };
  if (auto s = req("embedding_length", &c->dim); !s.ok()) return s;
  if (auto s = req("feed_forward_length", &c->hidden_dim); !s.ok()) return s;
  if (auto s = req("block_count", &c->n_layers); !s.ok()) return s;
  if (auto s = req("attention.head_count", &c->n_heads); !s.ok()) return s;
  if (auto s = req("context_length", &c->max_seq_len); !s.ok()) return s;
  auto kv_heads = f.GetI32Or(p + "attention.head_count_kv", c->n_heads);
  if (!kv_heads.ok()) return kv_heads.status();
  c->n_kv_heads = *kv_heads;
  auto eps = f.GetF32Or(p + "attention.layer_norm_rms_epsilon", 1e-5f);
  if (!eps.ok()) return eps.status();
  c->norm_eps = *eps;
  auto theta = f.GetF32Or(p + "rope.freq_base", 10000.0f);
  if (!theta.ok()) return theta.status();
  c->rope_theta = *theta;
  auto head_dim = f.GetI32Or(p + "attention.key_length", c->n_heads > 0 ? c->dim / c->n_heads : 0);
  if (!head_dim.ok()) return head_dim.status();
  c->head_dim = *head_dim;
  auto value_len = f.GetI32Or(p + "attention.value_length", c->head_dim);
  if (!value_len.ok()) return value_len.status();
  if (*value_len != c->head_dim) {
    return absl::InvalidArgumentError(absl::StrCat(f.path(), ": attention.value_length ", *value_len,
                                                   " differs from key_length ", c->head_dim, " (unsupported)"));
  }
  auto rope_dim = f.GetI32Or(p + "rope.dimension_count", c->head_dim);
  if (!rope_dim.ok()) return rope_dim.status();
  c->rope_dim = *rope_dim;
  // Vocabulary size: explicit key, else the token list, else the embedding rows.
  if (f.Has(p + "vocab_size")) {
    if (auto s = req("vocab_size", &c->vocab_size); !s.ok()) return s;
  } else if (const GgufValue* t = f.Find("tokenizer.ggml.tokens"); t != nullptr && t->type == GgufType::kArray) {
    c->vocab_size = static_cast<int>(std::min<uint64_t>(t->count, 1 << 30));
  } else if (const GgufTensorInfo* e = f.FindTensor("token_embd.weight"); e != nullptr && e->ne.size() == 2) {
    c->vocab_size = static_cast<int>(std::min<int64_t>(e->ne[1], 1 << 30));
  }
  auto scaling = f.GetStringOr(p + "rope.scaling.type", "none");
  if (scaling.ok() && *scaling != "none" && !scaling->empty()) {
    NIBBLE_LOG(WARNING) << f.path() << ": RoPE scaling '" << *scaling << "' is not supported; ignored";
  }
  if (f.FindTensor("rope_freqs.weight") != nullptr) {
    NIBBLE_LOG(WARNING) << f.path() << ": rope_freqs.weight (RoPE frequency factors) is not supported; ignored";
  }
  c->architecture = "llama";
  c->rope_style = RopeStyle::kInterleaved;
  return c->Validate(f.path());
}

// One tensor to read: its GGUF name, the destination and the expected shape
// ({rows, cols} for matrices, i.e. {ne[1], ne[0]}).
struct Job {
  std::string name;
  HostTensor* dst;
  std::vector<int64_t> shape;
};

// Checks a tensor's presence, shape and type before any dequantization.
absl::StatusOr<const GgufTensorInfo*> CheckTensor(const GgufFile& f, const Job& job) {
  const GgufTensorInfo* t = f.FindTensor(job.name);
  if (t == nullptr) return absl::NotFoundError(absl::StrCat(f.path(), ": missing tensor '", job.name, "'"));
  std::vector<int64_t> shape(t->ne.rbegin(), t->ne.rend());
  // Drop outer size-1 dims GGUF may carry (e.g. ne = {576, 1}).
  while (shape.size() > job.shape.size() && shape.front() == 1) shape.erase(shape.begin());
  if (shape != job.shape) {
    return absl::InvalidArgumentError(absl::StrCat(f.path(), ": tensor '", job.name, "' has shape [",
                                                   absl::StrJoin(shape, ", "), "], expected [",
                                                   absl::StrJoin(job.shape, ", "), "] from the model config"));
  }
  const GgmlTypeTraits* traits = GetGgmlTypeTraits(static_cast<uint32_t>(t->type));
  if (traits == nullptr || !traits->can_dequantize) {
    return absl::UnimplementedError(absl::StrCat(f.path(), ": tensor '", job.name, "' has type ",
                                                 GgmlTypeName(static_cast<uint32_t>(t->type)),
                                                 ", which this reader cannot dequantize"));
  }
  return t;
}

absl::Status ReadWeights(const GgufFile& f, const ModelConfig& c, bool keep_f16, ModelWeights* w) {
  const int64_t dim = c.dim, hid = c.hidden_dim, q = c.q_dim(), kv = c.kv_dim(), vocab = c.vocab_size;
  std::vector<Job> jobs;
  jobs.push_back({"token_embd.weight", &w->tok_embeddings, {vocab, dim}});
  jobs.push_back({"output_norm.weight", &w->final_norm, {dim}});
  if (!c.tied_embeddings) jobs.push_back({"output.weight", &w->output, {vocab, dim}});
  w->layers.resize(c.n_layers);
  for (int i = 0; i < c.n_layers; ++i) {
    LayerWeights& l = w->layers[i];
    auto n = [i](const char* s) { return absl::StrCat("blk.", i, ".", s, ".weight"); };
    jobs.push_back({n("attn_norm"), &l.attn_norm, {dim}});
    jobs.push_back({n("attn_q"), &l.wq, {q, dim}});
    jobs.push_back({n("attn_k"), &l.wk, {kv, dim}});
    jobs.push_back({n("attn_v"), &l.wv, {kv, dim}});
    jobs.push_back({n("attn_output"), &l.wo, {dim, q}});
    jobs.push_back({n("ffn_norm"), &l.ffn_norm, {dim}});
    jobs.push_back({n("ffn_gate"), &l.w_gate, {hid, dim}});
    jobs.push_back({n("ffn_up"), &l.w_up, {hid, dim}});
    jobs.push_back({n("ffn_down"), &l.w_down, {dim, hid}});
  }
  // Check everything before spending time dequantizing.
  std::vector<const GgufTensorInfo*> infos;
  for (const Job& j : jobs) {
    auto t = CheckTensor(f, j);
    if (!t.ok()) return t.status();
    infos.push_back(*t);
  }
  auto load = [&](size_t i) {
    jobs[i].dst->name = jobs[i].name;
    jobs[i].dst->shape = jobs[i].shape;
    const GgufTensorInfo& t = *infos[i];
    if (keep_f16 && (t.type == GgmlType::kF16 || t.type == GgmlType::kBF16) && jobs[i].shape.size() == 2) {
      // n_bytes was checked against the shape and type by the parser.
      jobs[i].dst->CopyHalf(t.data, static_cast<size_t>(t.numel), t.type == GgmlType::kBF16);
      return absl::OkStatus();
    }
    return f.DequantizeTensor(t, &jobs[i].dst->data);
  };
  if (auto s = ParallelFor(jobs.size(), load); !s.ok()) return s;
  return absl::OkStatus();  // every tensor was checked against the config above
}

// A token id key: absent -> def; out of range -> -1 with a warning.
absl::StatusOr<int32_t> TokenId(const GgufFile& f, const std::string& key, int32_t def, size_t n_tokens) {
  if (!f.Has(key)) return def < static_cast<int64_t>(n_tokens) ? def : -1;
  auto v = f.GetI64(key);
  if (!v.ok()) return v.status();
  if (*v < 0 || *v >= static_cast<int64_t>(n_tokens)) {
    if (*v != -1 && *v != 0xffffffffLL) {
      NIBBLE_LOG(WARNING) << f.path() << ": " << key << " = " << *v << " is outside the vocabulary of " << n_tokens
                          << " tokens; ignored";
    }
    return -1;
  }
  return static_cast<int32_t>(*v);
}

}  // namespace

absl::Status ReadGgufVocab(const GgufFile& f, VocabSpec* out) {
  VocabSpec v;
  if (!f.Has("tokenizer.ggml.model")) {
    *out = std::move(v);
    return absl::OkStatus();
  }
  auto model = f.GetString("tokenizer.ggml.model");
  if (!model.ok()) return model.status();
  if (*model == "llama") {
    v.kind = TokenizerKind::kSpmScores;
  } else if (*model == "gpt2") {
    v.kind = TokenizerKind::kGpt2Bpe;
  } else if (*model == "none" || model->empty()) {
    *out = std::move(v);
    return absl::OkStatus();
  } else {
    return absl::UnimplementedError(
        absl::StrCat(f.path(), ": tokenizer model '", *model, "' is not supported (only 'llama' and 'gpt2')"));
  }
  auto tokens = f.GetStringArray("tokenizer.ggml.tokens");
  if (!tokens.ok()) return tokens.status();
  v.tokens = std::move(*tokens);
  const size_t n = v.tokens.size();
  if (n == 0) return absl::InvalidArgumentError(absl::StrCat(f.path(), ": tokenizer.ggml.tokens is empty"));
  if (f.Has("tokenizer.ggml.scores")) {
    auto scores = f.GetF32Array("tokenizer.ggml.scores");
    if (!scores.ok()) return scores.status();
    if (scores->size() != n) {
      return absl::InvalidArgumentError(absl::StrCat(f.path(), ": tokenizer.ggml.scores has ", scores->size(),
                                                     " entries for ", n, " tokens"));
    }
    v.scores = std::move(*scores);
  } else if (v.kind == TokenizerKind::kSpmScores) {
    v.scores.assign(n, 0.0f);
  }
  if (f.Has("tokenizer.ggml.token_type")) {
    auto types = f.GetI32Array("tokenizer.ggml.token_type");
    if (!types.ok()) return types.status();
    if (types->size() != n) {
      return absl::InvalidArgumentError(absl::StrCat(f.path(), ": tokenizer.ggml.token_type has ", types->size(),
                                                     " entries for ", n, " tokens"));
    }
    v.token_types.reserve(n);
    for (size_t i = 0; i < n; ++i) {
      const int32_t t = (*types)[i];
      if (t < 0 || t > static_cast<int32_t>(TokenType::kByte)) {
        return absl::InvalidArgumentError(
            absl::StrCat(f.path(), ": tokenizer.ggml.token_type[", i, "] = ", t, " is not a valid token type"));
      }
      v.token_types.push_back(static_cast<TokenType>(t));
    }
  }
  const bool spm = v.kind == TokenizerKind::kSpmScores;
  if (!spm) {
    auto merges = f.GetStringArray("tokenizer.ggml.merges");
    if (!merges.ok()) return merges.status();
    v.merges = std::move(*merges);
    auto pre = f.GetStringOr("tokenizer.ggml.pre", "default");
    if (!pre.ok()) return pre.status();
    v.pre = *pre;
  }
  // Special ids: llama.cpp's SentencePiece defaults are unk=0, bos=1, eos=2.
  struct {
    const char* key;
    int32_t* dst;
    int32_t def;
  } ids[] = {{"tokenizer.ggml.bos_token_id", &v.bos_id, spm ? 1 : -1},
             {"tokenizer.ggml.eos_token_id", &v.eos_id, spm ? 2 : -1},
             {"tokenizer.ggml.unknown_token_id", &v.unk_id, spm ? 0 : -1},
             {"tokenizer.ggml.padding_token_id", &v.pad_id, -1}};
  for (auto& id : ids) {
    auto got = TokenId(f, id.key, id.def, n);
    if (!got.ok()) return got.status();
    *id.dst = *got;
  }
  auto add_bos = f.GetBoolOr("tokenizer.ggml.add_bos_token", spm);
  if (!add_bos.ok()) return add_bos.status();
  v.add_bos = *add_bos;
  auto add_eos = f.GetBoolOr("tokenizer.ggml.add_eos_token", false);
  if (!add_eos.ok()) return add_eos.status();
  v.add_eos = *add_eos;
  auto prefix = f.GetBoolOr("tokenizer.ggml.add_space_prefix", spm);
  if (!prefix.ok()) return prefix.status();
  v.add_space_prefix = *prefix;
  v.strip_space_after_bos = spm && v.add_space_prefix;
  for (const std::string& t : v.tokens) v.max_token_len = std::max<int>(v.max_token_len, static_cast<int>(t.size()));
  FillEogIds(&v);
  *out = std::move(v);
  return absl::OkStatus();
}

absl::StatusOr<LoadedModel> LoadGgufModel(const std::string& path, bool keep_f16) {
  auto file = GgufFile::Open(path);
  if (!file.ok()) return file.status();
  const GgufFile& f = **file;
  auto arch = f.GetString("general.architecture");
  if (!arch.ok()) return arch.status();
  if (*arch != "llama") {
    return absl::UnimplementedError(
        absl::StrCat(path, ": model architecture '", *arch, "' is not supported (only 'llama')"));
  }
  LoadedModel m;
  m.source_path = path;
  m.source_format = "gguf";
  m.config.tied_embeddings = f.FindTensor("output.weight") == nullptr;
  if (auto s = ReadConfig(f, &m.config); !s.ok()) return s;
  if (auto s = ReadGgufVocab(f, &m.vocab); !s.ok()) return s;
  auto tmpl = f.GetStringOr("tokenizer.chat_template", "");
  if (!tmpl.ok()) return tmpl.status();
  m.chat_template = std::move(*tmpl);
  for (const auto& [key, value] : f.metadata()) {
    if (value.type != GgufType::kArray && key != "tokenizer.chat_template") m.metadata[key] = value.ToString();
  }
  m.metadata["gguf.version"] = absl::StrCat(f.version());
  if (auto s = ReadWeights(f, m.config, keep_f16, &m.weights); !s.ok()) return s;
  return m;
}

}  // namespace nibble::io
