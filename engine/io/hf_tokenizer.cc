#include "engine/io/hf_tokenizer.h"

#include <algorithm>
#include <filesystem>
#include <map>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/io/mapped_file.h"
#include "engine/io/vocab_util.h"
#include "engine/util/log.h"
#include "nlohmann/json.hpp"

namespace nibble::io {
namespace {
namespace fs = std::filesystem;
using nlohmann::json;

constexpr int64_t kMaxVocab = 1 << 24;

// Parses `path` if it exists: OK with a null json when absent.
absl::StatusOr<json> ReadOptionalJson(const fs::path& path) {
  std::error_code ec;
  if (!fs::is_regular_file(path, ec)) return json();
  auto text = ReadFileToString(path.string());
  if (!text.ok()) return text.status();
  json j = json::parse(*text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(path.string(), ": not a valid JSON object"));
  }
  return j;
}

// tokenizer_config.json writes special tokens as "text" or {"content": "text", ...}.
std::string TokenText(const json& j, const char* key) {
  if (!j.is_object()) return "";
  auto it = j.find(key);
  if (it == j.end()) return "";
  if (it->is_string()) return it->get<std::string>();
  if (it->is_object()) {
    auto c = it->find("content");
    if (c != it->end() && c->is_string()) return c->get<std::string>();
  }
  return "";
}

// The ids in config.json's `key`: an integer or a list of integers.
std::vector<int32_t> ConfigIds(const json& config, const char* key) {
  std::vector<int32_t> out;
  if (!config.is_object()) return out;
  auto it = config.find(key);
  if (it == config.end()) return out;
  auto take = [&](const json& v) {
    if (v.is_number_integer() && v.get<int64_t>() >= 0 && v.get<int64_t>() < kMaxVocab) {
      out.push_back(static_cast<int32_t>(v.get<int64_t>()));
    }
  };
  if (it->is_array()) {
    for (const json& v : *it) take(v);
  } else {
    take(*it);
  }
  return out;
}

// j[key] if j is an object holding a bool there, else def (never throws).
bool BoolField(const json& j, const char* key, bool def) {
  if (!j.is_object()) return def;
  auto it = j.find(key);
  return it != j.end() && it->is_boolean() ? it->get<bool>() : def;
}

bool IsType(const json& j, const char* type) {
  if (!j.is_object()) return false;
  auto t = j.find("type");
  return t != j.end() && t->is_string() && t->get<std::string>() == type;
}

bool ContainsByteLevel(const json& j) {
  if (IsType(j, "ByteLevel")) return true;
  if (IsType(j, "Sequence")) {
    for (const char* k : {"pretokenizers", "decoders"}) {
      auto it = j.find(k);
      if (it != j.end() && it->is_array()) {
        for (const json& sub : *it) {
          if (ContainsByteLevel(sub)) return true;
        }
      }
    }
  }
  return false;
}

// Maps a tokenizers pre_tokenizer to a llama.cpp pre-tokenizer name.
std::string GuessPre(const json& pre, const std::string& file) {
  if (IsType(pre, "ByteLevel")) return "gpt2";
  if (IsType(pre, "Sequence")) {
    auto list = pre.find("pretokenizers");
    if (list != pre.end() && list->is_array()) {
      if (list->size() == 2 && IsType((*list)[0], "Digits") && IsType((*list)[1], "ByteLevel")) {
        auto digits = (*list)[0].find("individual_digits");
        if (digits != (*list)[0].end() && digits->is_boolean() && digits->get<bool>()) return "smollm";
      }
      for (const json& sub : *list) {
        if (!IsType(sub, "Split")) continue;
        const std::string dump = sub.dump();
        if (dump.find("\\\\p{N}{1,3}") != std::string::npos) return "llama3";
      }
    }
  }
  NIBBLE_LOG(WARNING) << file << ": unrecognised pre_tokenizer " << pre.dump().substr(0, 200)
                      << "; using the GPT-2 pre-tokenizer";
  return "gpt2";
}

absl::Status ReadTokenizerJson(const fs::path& path, const json& tok_config, const json& config, VocabSpec* v) {
  const std::string file = path.string();
  auto parsed = ReadOptionalJson(path);
  if (!parsed.ok()) return parsed.status();
  const json& j = *parsed;
  auto bad = [&](const std::string& what) { return absl::InvalidArgumentError(absl::StrCat(file, ": ", what)); };
  auto model = j.find("model");
  if (model == j.end() || !model->is_object()) return bad("no \"model\" object");
  const json pre = j.contains("pre_tokenizer") ? j["pre_tokenizer"] : json();
  const bool byte_level = ContainsByteLevel(pre) || ContainsByteLevel(j.contains("decoder") ? j["decoder"] : json());
  if (!IsType(*model, "BPE") || !byte_level) {
    NIBBLE_LOG(WARNING) << file << ": only byte-level BPE tokenizer.json is supported; no tokenizer loaded "
                        << "(pass one with --tokenizer)";
    return absl::OkStatus();
  }
  auto vocab = model->find("vocab");
  if (vocab == model->end() || !vocab->is_object()) return bad("model.vocab is not an object");
  std::map<int64_t, std::pair<std::string, TokenType>> by_id;
  for (auto it = vocab->begin(); it != vocab->end(); ++it) {
    if (!it->is_number_integer() || it->get<int64_t>() < 0 || it->get<int64_t>() >= kMaxVocab) {
      return bad(absl::StrCat("model.vocab entry '", it.key(), "' has an invalid id"));
    }
    by_id[it->get<int64_t>()] = {it.key(), TokenType::kNormal};
  }
  if (auto added = j.find("added_tokens"); added != j.end() && added->is_array()) {
    for (const json& a : *added) {
      auto id = a.find("id");
      auto content = a.find("content");
      if (!a.is_object() || id == a.end() || content == a.end() || !id->is_number_integer() ||
          !content->is_string() || id->get<int64_t>() < 0 || id->get<int64_t>() >= kMaxVocab) {
        return bad("malformed added_tokens entry");
      }
      const bool special = BoolField(a, "special", false);
      by_id[id->get<int64_t>()] = {content->get<std::string>(), special ? TokenType::kControl : TokenType::kUserDefined};
    }
  }
  if (by_id.empty()) return bad("empty vocabulary");
  const int64_t n = by_id.rbegin()->first + 1;
  v->tokens.assign(n, "");
  v->token_types.assign(n, TokenType::kUnused);
  for (int64_t i = 0; i < n; ++i) v->tokens[i] = absl::StrCat("[PAD", i, "]");  // holes, as llama.cpp names them
  for (auto& [id, entry] : by_id) {
    v->tokens[id] = std::move(entry.first);
    v->token_types[id] = entry.second;
  }
  auto merges = model->find("merges");
  if (merges == model->end() || !merges->is_array()) return bad("model.merges is not an array");
  v->merges.reserve(merges->size());
  for (const json& m : *merges) {
    if (m.is_string()) {
      v->merges.push_back(m.get<std::string>());
    } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
      v->merges.push_back(absl::StrCat(m[0].get<std::string>(), " ", m[1].get<std::string>()));
    } else {
      return bad("malformed model.merges entry");
    }
  }
  v->kind = TokenizerKind::kGpt2Bpe;
  v->pre = GuessPre(pre, file);
  v->add_space_prefix = false;
  v->strip_space_after_bos = false;
  // Special tokens: by text from tokenizer_config.json, else ids from config.json.
  std::map<std::string, int32_t> id_of;
  for (int64_t i = 0; i < n; ++i) id_of.emplace(v->tokens[i], static_cast<int32_t>(i));
  auto lookup = [&](const char* text_key, const char* id_key) -> int32_t {
    const std::string text = TokenText(tok_config, text_key);
    if (auto it = id_of.find(text); !text.empty() && it != id_of.end()) return it->second;
    std::vector<int32_t> ids = ConfigIds(config, id_key);
    return !ids.empty() && ids[0] < n ? ids[0] : -1;
  };
  v->bos_id = lookup("bos_token", "bos_token_id");
  v->eos_id = lookup("eos_token", "eos_token_id");
  v->unk_id = lookup("unk_token", "unk_token_id");
  v->pad_id = lookup("pad_token", "pad_token_id");
  v->add_bos = BoolField(tok_config, "add_bos_token", false);
  v->add_eos = BoolField(tok_config, "add_eos_token", false);
  for (const std::string& t : v->tokens) v->max_token_len = std::max<int>(v->max_token_len, static_cast<int>(t.size()));
  return absl::OkStatus();
}

}  // namespace

absl::Status ReadHfTokenizer(const std::string& dir_str, const std::string& config_json, VocabSpec* out,
                             std::string* chat_template) {
  const fs::path dir(dir_str);
  std::error_code ec;
  json config = json::parse(config_json, nullptr, /*allow_exceptions=*/false);
  if (config.is_discarded()) config = json();
  auto tok_config = ReadOptionalJson(dir / "tokenizer_config.json");
  if (!tok_config.ok()) return tok_config.status();

  VocabSpec v;
  if (fs::is_regular_file(dir / "tokenizer.model", ec)) {
    v.kind = TokenizerKind::kSentencePieceModel;
    v.sp_model_path = (dir / "tokenizer.model").string();
    std::vector<int32_t> bos = ConfigIds(config, "bos_token_id"), eos = ConfigIds(config, "eos_token_id");
    v.bos_id = bos.empty() ? 1 : bos[0];
    v.eos_id = eos.empty() ? 2 : eos[0];
    v.unk_id = 0;
    v.add_bos = BoolField(*tok_config, "add_bos_token", true);
    v.add_eos = BoolField(*tok_config, "add_eos_token", false);
  } else if (fs::is_regular_file(dir / "tokenizer.json", ec)) {
    if (auto s = ReadTokenizerJson(dir / "tokenizer.json", *tok_config, config, &v); !s.ok()) return s;
  } else {
    NIBBLE_LOG(INFO) << dir_str << ": no tokenizer.model or tokenizer.json; pass --tokenizer";
  }
  if (v.kind != TokenizerKind::kNone) {
    FillEogIds(&v);
    for (int32_t id : ConfigIds(config, "eos_token_id")) {  // config.json may list several
      if (std::find(v.eog_ids.begin(), v.eog_ids.end(), id) == v.eog_ids.end()) v.eog_ids.push_back(id);
    }
    std::sort(v.eog_ids.begin(), v.eog_ids.end());
  }
  *out = std::move(v);

  if (chat_template != nullptr) {
    chat_template->clear();
    if (tok_config->is_object()) {
      auto t = tok_config->find("chat_template");
      if (t != tok_config->end() && t->is_string()) {
        *chat_template = t->get<std::string>();
      } else if (t != tok_config->end() && t->is_array()) {  // [{"name": "default", "template": "..."}]
        for (const json& e : *t) {
          if (!e.is_object()) continue;
          auto name = e.find("name"), tmpl = e.find("template");
          if (name != e.end() && tmpl != e.end() && name->is_string() && tmpl->is_string() &&
              name->get<std::string>() == "default") {
            *chat_template = tmpl->get<std::string>();
          }
        }
      }
    }
    if (chat_template->empty() && fs::is_regular_file(dir / "chat_template.jinja", ec)) {
      auto text = ReadFileToString((dir / "chat_template.jinja").string());
      if (!text.ok()) return text.status();
      *chat_template = std::move(*text);
    }
  }
  return absl::OkStatus();
}

}  // namespace nibble::io
