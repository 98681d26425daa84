#include "engine/model/model_loader.h"

#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "engine/core/huge_pages.h"
#include "engine/io/gguf_model.h"
#include "engine/io/hf_model.h"
#include "engine/io/llama2c.h"
#include "engine/io/nibble_file.h"
#include "engine/tokenizer/llama2c_vocab.h"

namespace nibble {
namespace fs = std::filesystem;

namespace {

enum class Format { kGguf, kHf, kLlama2c, kNibble, kUnknown };

absl::StatusOr<Format> Detect(const std::string& path) {
  std::error_code ec;
  if (fs::is_directory(path, ec)) return Format::kHf;
  if (!fs::exists(path, ec)) return absl::NotFoundError(absl::StrCat(path, ": no such file or directory"));
  if (absl::EndsWith(path, ".safetensors") || absl::EndsWith(path, "config.json")) return Format::kHf;
  std::ifstream in(path, std::ios::binary);
  unsigned char head[28] = {};
  in.read(reinterpret_cast<char*>(head), sizeof(head));
  const auto got = static_cast<size_t>(in.gcount());
  if (got >= 4 && std::string_view(reinterpret_cast<char*>(head), 4) == "GGUF") return Format::kGguf;
  if (io::LooksLikeNibbleFile(head, got)) return Format::kNibble;
  if (io::LooksLikeLlama2c(head, got)) return Format::kLlama2c;
  return Format::kUnknown;
}

// llama2.c keeps its tokenizer beside the checkpoint: try the usual names.
std::string FindLlama2cTokenizer(const std::string& model_path, int vocab_size) {
  const fs::path dir = fs::path(model_path).parent_path();
  for (const std::string& name : {absl::StrCat("tok", vocab_size, ".bin"), std::string("tokenizer.bin")}) {
    std::error_code ec;
    if (fs::is_regular_file(dir / name, ec)) return (dir / name).string();
  }
  return "";
}

}  // namespace

absl::Status LoadTokenizerFile(const std::string& path, int32_t vocab_size, VocabSpec* vocab) {
  std::error_code ec;
  if (!fs::is_regular_file(path, ec)) {
    return absl::NotFoundError(absl::StrCat(path, ": tokenizer file not found"));
  }
  std::ifstream in(path, std::ios::binary);
  unsigned char b0 = 0;
  in.read(reinterpret_cast<char*>(&b0), 1);
  // A SentencePiece ModelProto starts with field 1 (pieces), wire type 2: byte 0x0a.
  if (absl::EndsWith(path, ".model") || (b0 == 0x0a && !absl::EndsWith(path, ".bin"))) {
    VocabSpec v;
    v.kind = TokenizerKind::kSentencePieceModel;
    v.sp_model_path = path;
    *vocab = std::move(v);
    return absl::OkStatus();
  }
  return ReadLlama2cVocab(path, vocab_size, vocab);
}

absl::Status LoadTokenizerFile(const std::string& path, VocabSpec* vocab) {
  return LoadTokenizerFile(path, vocab->tokens.empty() ? 0 : static_cast<int32_t>(vocab->tokens.size()), vocab);
}

absl::StatusOr<LoadedModel> LoadModel(const std::string& path, const LoadOptions& opts) {
  auto format = Detect(path);
  if (!format.ok()) return format.status();
  absl::StatusOr<LoadedModel> m;
  switch (*format) {
    case Format::kGguf: m = io::LoadGgufModel(path, opts.keep_f16); break;
    case Format::kHf: m = io::LoadHfModel(path, opts.keep_f16); break;
    case Format::kLlama2c: m = io::LoadLlama2cModel(path); break;
    case Format::kNibble: m = io::LoadNibbleFile(path, {.verify_tensor_checksums = true, .keep_f16 = opts.keep_f16}); break;
    case Format::kUnknown:
      return absl::InvalidArgumentError(absl::StrCat(
          path, ": unrecognised model format (expected a nibble model file, a GGUF file, a llama2.c .bin "
                "checkpoint, or an HF directory with config.json and *.safetensors)"));
  }
  if (!m.ok()) return m.status();
  std::string tok = opts.tokenizer_path;
  if (tok.empty() && m->source_format == "llama2c") {
    tok = FindLlama2cTokenizer(path, m->config.vocab_size);
    if (tok.empty()) {
      return absl::InvalidArgumentError(absl::StrCat(
          path, ": llama2.c checkpoints carry no vocabulary; pass the tokenizer (--tokenizer tok*.bin)"));
    }
  }
  if (!tok.empty()) {
    VocabSpec v;
    if (auto s = LoadTokenizerFile(tok, m->config.vocab_size, &v); !s.ok()) return s;
    m->vocab = std::move(v);
  }
  if (m->vocab.kind == TokenizerKind::kNone) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": the model has no tokenizer; pass one with --tokenizer (.model or tok*.bin)"));
  }
  if (!m->vocab.tokens.empty() && static_cast<int>(m->vocab.tokens.size()) != m->config.vocab_size) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": tokenizer has ", m->vocab.tokens.size(),
                                                   " tokens but the model's vocabulary is ",
                                                   m->config.vocab_size));
  }
  if (opts.huge_pages && HugePagesAllowedByEnv()) {
    const size_t moved = MoveQuantizedToHugePages(&m->weights);
    if (moved > 0) m->metadata["load.huge_page_bytes"] = std::to_string(moved);
  }
  return m;
}

}  // namespace nibble
