#include "engine/io/hf_model.h"

#include <filesystem>
#include <map>
#include <cstring>
#include <memory>
#include <optional>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/io/hf_tokenizer.h"
#include "engine/io/mapped_file.h"
#include "engine/io/parallel.h"
#include "engine/core/config.h"
#include "engine/io/safetensors.h"
#include "engine/util/log.h"
#include "nlohmann/json.hpp"

namespace nibble::io {
namespace {
namespace fs = std::filesystem;
using nlohmann::json;

absl::StatusOr<json> ReadJsonFile(const std::string& path) {
  auto text = ReadFileToString(path);
  if (!text.ok()) return text.status();
  json j = json::parse(*text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a valid JSON object"));
  }
  return j;
}

// Reads an integer field. Absent or null -> `def` if given, else an error.
absl::Status GetInt(const json& j, const std::string& file, const char* key, int* out, std::optional<int> def) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) {
    if (def) {
      *out = *def;
      return absl::OkStatus();
    }
    return absl::InvalidArgumentError(absl::StrCat(file, ": missing integer field '", key, "'"));
  }
  if (!it->is_number_integer() || it->get<int64_t>() < -(1LL << 31) || it->get<int64_t>() >= (1LL << 31)) {
    return absl::InvalidArgumentError(absl::StrCat(file, ": field '", key, "' is not a 32-bit integer"));
  }
  *out = static_cast<int>(it->get<int64_t>());
  return absl::OkStatus();
}

absl::Status GetFloat(const json& j, const std::string& file, const char* key, float* out, float def) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) {
    *out = def;
    return absl::OkStatus();
  }
  if (!it->is_number()) return absl::InvalidArgumentError(absl::StrCat(file, ": field '", key, "' is not a number"));
  *out = static_cast<float>(it->get<double>());
  return absl::OkStatus();
}

bool GetBool(const json& j, const char* key, bool def) {
  auto it = j.find(key);
  return it != j.end() && it->is_boolean() ? it->get<bool>() : def;
}

absl::Status ReadConfig(const json& j, const std::string& file, ModelConfig* c) {
  auto mt = j.find("model_type");
  const std::string model_type = mt != j.end() && mt->is_string() ? mt->get<std::string>() : "";
  if (model_type != "llama" && model_type != "mistral") {
    return absl::UnimplementedError(absl::StrCat(file, ": model_type '", model_type,
                                                 "' is not supported (only 'llama' and 'mistral')"));
  }
  if (GetBool(j, "attention_bias", false) || GetBool(j, "mlp_bias", false)) {
    return absl::UnimplementedError(absl::StrCat(file, ": attention_bias / mlp_bias are not supported"));
  }
  if (auto act = j.find("hidden_act"); act != j.end() && act->is_string() && act->get<std::string>() != "silu") {
    return absl::UnimplementedError(
        absl::StrCat(file, ": hidden_act '", act->get<std::string>(), "' is not supported (only silu)"));
  }
  if (auto rs = j.find("rope_scaling"); rs != j.end() && !rs->is_null()) {
    NIBBLE_LOG(WARNING) << file << ": rope_scaling is not supported; ignored";
  }
  for (auto [key, dst] : {std::pair{"hidden_size", &c->dim}, std::pair{"intermediate_size", &c->hidden_dim},
                          std::pair{"num_hidden_layers", &c->n_layers},
                          std::pair{"num_attention_heads", &c->n_heads}, std::pair{"vocab_size", &c->vocab_size}}) {
    if (auto s = GetInt(j, file, key, dst, std::nullopt); !s.ok()) return s;
  }
  if (auto s = GetInt(j, file, "num_key_value_heads", &c->n_kv_heads, c->n_heads); !s.ok()) return s;
  if (auto s = GetInt(j, file, "max_position_embeddings", &c->max_seq_len, 2048); !s.ok()) return s;
  const int default_head_dim = c->n_heads > 0 ? c->dim / c->n_heads : 0;
  if (auto s = GetInt(j, file, "head_dim", &c->head_dim, default_head_dim); !s.ok()) return s;
  if (auto s = GetFloat(j, file, "rms_norm_eps", &c->norm_eps, 1e-6f); !s.ok()) return s;
  if (auto s = GetFloat(j, file, "rope_theta", &c->rope_theta, 10000.0f); !s.ok()) return s;
  if (auto sw = j.find("sliding_window"); sw != j.end() && sw->is_number_integer() &&
                                             sw->get<int64_t>() < c->max_seq_len) {
    NIBBLE_LOG(WARNING) << file << ": sliding_window " << sw->get<int64_t>()
                        << " is not supported; attention is full-context (exact up to that many tokens)";
  }
  c->tied_embeddings = GetBool(j, "tie_word_embeddings", false);
  c->architecture = "llama";
  c->rope_dim = c->head_dim;
  c->rope_style = RopeStyle::kHalf;
  return c->Validate(file);
}

// The checkpoint's safetensors files and which one holds each tensor.
struct Shards {
  std::vector<std::unique_ptr<SafetensorsFile>> files;
  std::map<std::string, const SafetensorsFile*> owner;  // sharded: from weight_map
  std::string index_path;                               // empty when not sharded

  // The tensor and its file; errors name the file where it should have been.
  absl::StatusOr<std::pair<const SafetensorsFile*, const SafetensorsTensor*>> Find(const std::string& name) const {
    if (index_path.empty()) {
      const SafetensorsTensor* t = files[0]->Find(name);
      if (t == nullptr) return absl::NotFoundError(absl::StrCat(files[0]->path(), ": missing tensor '", name, "'"));
      return std::pair{files[0].get(), t};
    }
    auto it = owner.find(name);
    if (it == owner.end()) {
      return absl::NotFoundError(absl::StrCat(index_path, ": weight_map has no tensor '", name, "'"));
    }
    const SafetensorsTensor* t = it->second->Find(name);
    if (t == nullptr) {
      return absl::NotFoundError(absl::StrCat(it->second->path(), ": missing tensor '", name, "' (listed in ",
                                              index_path, ")"));
    }
    return std::pair{it->second, t};
  }
};

absl::StatusOr<Shards> OpenShards(const fs::path& dir, const fs::path& given_file) {
  Shards shards;
  std::error_code ec;
  const fs::path index = dir / "model.safetensors.index.json";
  if (fs::is_regular_file(index, ec)) {
    shards.index_path = index.string();
    auto j = ReadJsonFile(shards.index_path);
    if (!j.ok()) return j.status();
    auto wm = j->find("weight_map");
    if (wm == j->end() || !wm->is_object()) {
      return absl::InvalidArgumentError(absl::StrCat(shards.index_path, ": no \"weight_map\" object"));
    }
    std::map<std::string, const SafetensorsFile*> by_file;
    for (auto it = wm->begin(); it != wm->end(); ++it) {
      if (!it.value().is_string()) {
        return absl::InvalidArgumentError(
            absl::StrCat(shards.index_path, ": weight_map entry '", it.key(), "' is not a file name"));
      }
      const std::string file = it.value().get<std::string>();
      if (file.empty() || file.find('/') != std::string::npos || file == "." || file == "..") {
        return absl::InvalidArgumentError(
            absl::StrCat(shards.index_path, ": weight_map file name '", file, "' is not a plain file name"));
      }
      auto f = by_file.find(file);
      if (f == by_file.end()) {
        auto opened = SafetensorsFile::Open((dir / file).string());
        if (!opened.ok()) return opened.status();
        f = by_file.emplace(file, opened->get()).first;
        shards.files.push_back(std::move(*opened));
      }
      shards.owner[it.key()] = f->second;
    }
    if (shards.files.empty()) return absl::InvalidArgumentError(absl::StrCat(shards.index_path, ": empty weight_map"));
    return shards;
  }
  fs::path single = dir / "model.safetensors";
  if (!given_file.empty() && given_file.extension() == ".safetensors") single = given_file;
  if (!fs::is_regular_file(single, ec)) {
    return absl::NotFoundError(absl::StrCat(dir.string(), ": no model.safetensors or model.safetensors.index.json"));
  }
  auto opened = SafetensorsFile::Open(single.string());
  if (!opened.ok()) return opened.status();
  shards.files.push_back(std::move(*opened));
  return shards;
}

struct Job {
  std::string name;
  HostTensor* dst;
  std::vector<int64_t> shape;
};

using Found = std::pair<const SafetensorsFile*, const SafetensorsTensor*>;

// Checks a tensor's presence, shape and dtype before any conversion.
absl::StatusOr<Found> CheckTensor(const Shards& shards, const Job& job, bool tied) {
  auto found = shards.Find(job.name);
  if (!found.ok()) {
    if (job.name == "lm_head.weight" && !tied) {
      return absl::NotFoundError(
          absl::StrCat(found.status().message(), " (config.json has tie_word_embeddings false)"));
    }
    return found.status();
  }
  const auto [file, t] = *found;
  if (t->shape != job.shape) {
    return absl::InvalidArgumentError(absl::StrCat(file->path(), ": tensor '", job.name, "' has shape [",
                                                   absl::StrJoin(t->shape, ", "), "], expected [",
                                                   absl::StrJoin(job.shape, ", "), "] from config.json"));
  }
  if (t->dtype != "F32" && t->dtype != "F16" && t->dtype != "BF16") {
    return absl::InvalidArgumentError(absl::StrCat(file->path(), ": tensor '", job.name, "' has dtype ", t->dtype,
                                                   "; only F32, F16 and BF16 weights are supported"));
  }
  return *found;
}

absl::Status ReadWeights(const Shards& shards, const ModelConfig& c, bool keep_16bit, ModelWeights* w) {
  const int64_t dim = c.dim, hid = c.hidden_dim, q = c.q_dim(), kv = c.kv_dim(), vocab = c.vocab_size;
  std::vector<Job> jobs;
  jobs.push_back({"model.embed_tokens.weight", &w->tok_embeddings, {vocab, dim}});
  jobs.push_back({"model.norm.weight", &w->final_norm, {dim}});
  if (!c.tied_embeddings) jobs.push_back({"lm_head.weight", &w->output, {vocab, dim}});
  w->layers.resize(c.n_layers);
  for (int i = 0; i < c.n_layers; ++i) {
    LayerWeights& l = w->layers[i];
    auto n = [i](const char* s) { return absl::StrCat("model.layers.", i, ".", s, ".weight"); };
    jobs.push_back({n("input_layernorm"), &l.attn_norm, {dim}});
    jobs.push_back({n("self_attn.q_proj"), &l.wq, {q, dim}});
    jobs.push_back({n("self_attn.k_proj"), &l.wk, {kv, dim}});
    jobs.push_back({n("self_attn.v_proj"), &l.wv, {kv, dim}});
    jobs.push_back({n("self_attn.o_proj"), &l.wo, {dim, q}});
    jobs.push_back({n("post_attention_layernorm"), &l.ffn_norm, {dim}});
    jobs.push_back({n("mlp.gate_proj"), &l.w_gate, {hid, dim}});
    jobs.push_back({n("mlp.up_proj"), &l.w_up, {hid, dim}});
    jobs.push_back({n("mlp.down_proj"), &l.w_down, {dim, hid}});
  }
  std::vector<Found> found;
  for (const Job& j : jobs) {
    auto f = CheckTensor(shards, j, c.tied_embeddings);
    if (!f.ok()) return f.status();
    found.push_back(*f);
  }
  auto load = [&](size_t i) {
    jobs[i].dst->name = jobs[i].name;
    jobs[i].dst->shape = jobs[i].shape;
    const SafetensorsTensor& t = *found[i].second;
    if (keep_16bit && (t.dtype == "F16" || t.dtype == "BF16") && jobs[i].shape.size() == 2) {
      // The parser checked the byte size against the shape and dtype.
      jobs[i].dst->CopyHalf(t.data, static_cast<size_t>(t.numel), t.dtype == "BF16");
      return absl::OkStatus();
    }
    return found[i].first->ReadF32(t, &jobs[i].dst->data);
  };
  if (auto s = ParallelFor(jobs.size(), load); !s.ok()) return s;
  return absl::OkStatus();  // every tensor was checked against the config above
}

}  // namespace

absl::StatusOr<LoadedModel> LoadHfModel(const std::string& path, bool keep_16bit) {
  std::error_code ec;
  const fs::path p(path);
  if (!fs::exists(p, ec)) return absl::NotFoundError(absl::StrCat(path, ": no such file or directory"));
  const bool is_dir = fs::is_directory(p, ec);
  fs::path dir = is_dir ? p : p.parent_path();
  if (dir.empty()) dir = ".";
  const std::string config_path = (dir / "config.json").string();
  if (!fs::is_regular_file(config_path, ec)) {
    return absl::NotFoundError(absl::StrCat(config_path, ": missing (a Hugging Face checkpoint needs config.json)"));
  }
  auto config_text = ReadFileToString(config_path);
  if (!config_text.ok()) return config_text.status();
  json config = json::parse(*config_text, nullptr, /*allow_exceptions=*/false);
  if (config.is_discarded() || !config.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(config_path, ": not a valid JSON object"));
  }
  LoadedModel m;
  m.source_path = path;
  m.source_format = "hf";
  if (auto s = ReadConfig(config, config_path, &m.config); !s.ok()) return s;
  for (auto it = config.begin(); it != config.end(); ++it) {
    if (it->is_string()) {
      m.metadata[it.key()] = it->get<std::string>();
    } else if (it->is_number() || it->is_boolean()) {
      m.metadata[it.key()] = it->dump();
    }
  }
  auto shards = OpenShards(dir, is_dir ? fs::path() : p);
  if (!shards.ok()) return shards.status();
  if (auto s = ReadHfTokenizer(dir.string(), *config_text, &m.vocab, &m.chat_template); !s.ok()) return s;
  if (auto s = ReadWeights(*shards, m.config, keep_16bit, &m.weights); !s.ok()) return s;
  return m;
}

}  // namespace nibble::io
