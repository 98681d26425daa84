// kSentencePieceModel: a SentencePiece .model run through nibble's native
// SentencePiece implementation (sp_processor.h), plus ReadSentencePieceVocab().
//
// Encoding: special-token split first (special_tokens.h); each raw fragment is
// encoded by the model on its own, so it gets the model's dummy prefix, as
// llama.cpp does for fragments after a special token.
// Decoding: byte pieces give their byte, ▁ gives a space, control/unknown
// pieces give "" unless `special`.
#include <filesystem>
#include <system_error>

#include "absl/strings/str_cat.h"
#include "engine/io/mapped_file.h"
#include "engine/tokenizer/sentencepiece_vocab.h"
#include "engine/tokenizer/sp_processor.h"
#include "engine/tokenizer/special_tokens.h"
#include "engine/tokenizer/tokenizer_impl.h"

namespace nibble {
namespace {

constexpr std::string_view kSpaceMark = "\xE2\x96\x81";  // U+2581 "▁"

absl::StatusOr<std::unique_ptr<internal::SpProcessor>> LoadSp(const std::string& path,
                                                              const std::string& bytes = "") {
  std::string data = bytes;
  if (data.empty()) {
    if (path.empty()) {
      return absl::InvalidArgumentError("SentencePiece vocabulary: no .model path given");
    }
    std::error_code ec;
    if (!std::filesystem::is_regular_file(path, ec)) {
      return absl::NotFoundError(absl::StrCat(path, ": SentencePiece model file not found"));
    }
    auto file = io::ReadFileToString(path);
    if (!file.ok()) return file.status();
    data = std::move(*file);
  }
  auto sp = internal::SpProcessor::FromBytes(std::move(data));
  if (!sp.ok()) {
    const std::string where = bytes.empty() || path.empty() ? (path.empty() ? "embedded SentencePiece model" : path)
                                                            : absl::StrCat(path, " (embedded)");
    return absl::Status(sp.status().code(), absl::StrCat(where, ": not a usable SentencePiece model (",
                                                         sp.status().message(), ")"));
  }
  return sp;
}

// Fills tokens, scores, types, special ids and add_space_prefix from `sp`.
absl::Status FillFromModel(const internal::SpProcessor& sp, const std::string& path, VocabSpec* v) {
  const int n = sp.size();
  v->tokens.resize(n);
  v->scores.resize(n);
  v->token_types.resize(n);
  for (int i = 0; i < n; ++i) {
    v->tokens[i] = sp.Piece(i);
    v->scores[i] = sp.Score(i);
    TokenType t = TokenType::kNormal;
    if (sp.IsControl(i)) t = TokenType::kControl;
    else if (sp.IsUnknown(i)) t = TokenType::kUnknown;
    else if (sp.IsUnused(i)) t = TokenType::kUnused;
    else if (sp.IsByte(i)) t = TokenType::kByte;
    v->token_types[i] = t;
  }
  v->bos_id = sp.bos_id();
  v->eos_id = sp.eos_id();
  v->unk_id = sp.unk_id();
  v->pad_id = sp.pad_id();
  const std::vector<int> probe = sp.Encode("a");
  v->add_space_prefix = !probe.empty() && probe[0] >= 0 && probe[0] < n &&
                        sp.Piece(probe[0]).starts_with(kSpaceMark);
  return absl::OkStatus();
}

class SentencePieceTokenizer final : public Tokenizer {
 public:
  SentencePieceTokenizer(VocabSpec spec, std::unique_ptr<internal::SpProcessor> sp)
      : Tokenizer(std::move(spec)), sp_(std::move(sp)), splitter_(spec_) {}

  absl::StatusOr<std::vector<int32_t>> Encode(std::string_view text,
                                              const EncodeOptions& opts) const override {
    std::vector<int32_t> out;
    const bool add_special = opts.add_bos;
    if (add_special && ShouldAddBos()) out.push_back(spec_.bos_id);
    for (const TextFragment& f : splitter_.Split(text, opts.parse_special)) {
      if (f.token >= 0) {
        out.push_back(f.token);
        continue;
      }
      const std::vector<int> ids = sp_->Encode(f.text);
      out.insert(out.end(), ids.begin(), ids.end());
    }
    if (add_special && spec_.add_eos && spec_.eos_id >= 0) out.push_back(spec_.eos_id);
    return out;
  }

  std::string TokenBytes(int32_t id, bool special) const override {
    if (id < 0 || id >= vocab_size()) return "";
    const std::string& piece = sp_->Piece(id);
    if (sp_->IsControl(id) || sp_->IsUnknown(id)) return special ? piece : "";
    if (sp_->IsUnused(id)) return "";
    uint8_t b;
    if (sp_->IsByte(id) && internal::ParseBytePiece(piece, &b)) return std::string(1, static_cast<char>(b));
    return internal::ReplaceAll(piece, kSpaceMark, " ");
  }

  int32_t vocab_size() const override { return sp_->size(); }
  int32_t PieceToId(std::string_view piece) const override { return sp_->PieceToId(piece); }

 private:
  std::unique_ptr<internal::SpProcessor> sp_;
  SpecialTokenSplitter splitter_;
};

}  // namespace

absl::Status ReadSentencePieceVocab(const std::string& path, VocabSpec* out) {
  auto sp = LoadSp(path);
  if (!sp.ok()) return sp.status();
  VocabSpec v;
  v.kind = TokenizerKind::kSentencePieceModel;
  v.sp_model_path = path;
  v.sp_model_bytes = (*sp)->Serialized();
  if (absl::Status s = FillFromModel(**sp, path, &v); !s.ok()) return s;
  v.add_bos = v.bos_id >= 0;
  v.strip_space_after_bos = true;
  *out = std::move(v);
  return absl::OkStatus();
}

namespace internal {

absl::StatusOr<std::unique_ptr<Tokenizer>> CreateSentencePieceTokenizer(VocabSpec spec) {
  auto sp = LoadSp(spec.sp_model_path, spec.sp_model_bytes);
  if (!sp.ok()) return sp.status();
  if (spec.sp_model_bytes.empty()) spec.sp_model_bytes = (*sp)->Serialized();
  if (spec.tokens.empty()) {
    // Only kind + path given (e.g. a --tokenizer .model): take the rest from the model.
    if (absl::Status s = FillFromModel(**sp, spec.sp_model_path, &spec); !s.ok()) return s;
  } else if (spec.tokens.size() != static_cast<size_t>((*sp)->size())) {
    return absl::InvalidArgumentError(absl::StrCat(spec.sp_model_path, ": the model has ", (*sp)->size(),
                                                   " pieces but the vocabulary lists ", spec.tokens.size()));
  }
  if (absl::Status s = ValidateCommon(spec); !s.ok()) return s;
  return std::unique_ptr<Tokenizer>(new SentencePieceTokenizer(std::move(spec), std::move(*sp)));
}

}  // namespace internal
}  // namespace nibble
