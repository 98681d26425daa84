// kSpmScores: score-ordered BPE over a piece list with <0xXX> byte fallback.
//
// Semantics are llama2.c run.c encode() (== llama.cpp's SPM tokenizer, == the
// SentencePiece library's BPE model for these vocabularies):
//   1. a dummy " " is prepended when add_space_prefix (llama.cpp: to every raw
//      fragment that starts the text or follows a special token);
//   2. in ▁-style vocabularies (GGUF / SentencePiece) spaces become U+2581;
//   3. each UTF-8 character that is a piece becomes one symbol; any other
//      character becomes its <0xXX> byte pieces, which never merge;
//   4. repeatedly the adjacent pair whose concatenation is a piece with the
//      highest score is merged (leftmost on ties).
// Step 4 is BpeMerge (bpe_merge.h): O(n log n), not llama2.c's O(n^2).
//
// Mergeable pieces are those typed normal, user-defined, unused or undefined
// (SentencePiece keeps control/unknown/byte pieces out of merges).
// Non-goals: re-segmenting "unused" pieces (SentencePiece does; no llama-family
// vocabulary has them).
#include <cmath>
#include <limits>
#include <algorithm>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "engine/tokenizer/bpe_merge.h"
#include "engine/tokenizer/special_tokens.h"
#include "engine/tokenizer/tokenizer_impl.h"
#include "engine/tokenizer/utf8.h"

namespace nibble::internal {
namespace {

constexpr std::string_view kSpaceMark = "\xE2\x96\x81";  // U+2581 "▁"

bool IsMergeable(TokenType t) {
  return t == TokenType::kNormal || t == TokenType::kUndefined || t == TokenType::kUserDefined ||
         t == TokenType::kUnused;
}

class SpmTokenizer final : public Tokenizer {
 public:
  explicit SpmTokenizer(VocabSpec spec) : Tokenizer(std::move(spec)), splitter_(spec_) {}

  absl::Status Init();

  absl::StatusOr<std::vector<int32_t>> Encode(std::string_view text,
                                              const EncodeOptions& opts) const override;
  std::string TokenBytes(int32_t id, bool special) const override;
  int32_t vocab_size() const override { return static_cast<int32_t>(spec_.tokens.size()); }
  int32_t PieceToId(std::string_view piece) const override {
    auto it = ids_.find(AsAbsl(piece));
    return it == ids_.end() ? -1 : it->second;
  }

 private:
  TokenType Type(int32_t id) const {
    return spec_.token_types.empty() ? TokenType::kNormal : spec_.token_types[id];
  }
  // Id of a mergeable piece with exactly this text, or -1.
  int32_t MergeableId(std::string_view text) const {
    auto it = ids_.find(AsAbsl(text));
    if (it == ids_.end() || !IsMergeable(Type(it->second))) return -1;
    return it->second;
  }
  void EncodeChunk(std::string_view s, std::vector<int32_t>* out) const;

  SpecialTokenSplitter splitter_;
  absl::flat_hash_map<std::string, int32_t> ids_;  // text -> first id with it
  std::vector<float> scores_;                      // NaN-free copy of spec_.scores
  int32_t byte_ids_[256];
  bool escape_spaces_ = false;
};

absl::Status SpmTokenizer::Init() {
  if (absl::Status s = ValidateCommon(spec_); !s.ok()) return s;
  const size_t n = spec_.tokens.size();
  if (n == 0) return absl::InvalidArgumentError("SPM vocabulary: no tokens");
  if (spec_.scores.size() != n) {
    return absl::InvalidArgumentError(
        absl::StrCat("SPM vocabulary: ", spec_.scores.size(), " scores for ", n, " tokens"));
  }
  scores_ = spec_.scores;
  for (float& s : scores_) {
    if (std::isnan(s)) s = -std::numeric_limits<float>::infinity();
  }
  ids_.reserve(n);
  size_t n_mark = 0, n_space = 0;
  for (size_t i = 0; i < n; ++i) {
    const std::string& t = spec_.tokens[i];
    ids_.try_emplace(t, static_cast<int32_t>(i));
    if (t.find(kSpaceMark) != std::string::npos) ++n_mark;
    if (t.find(' ') != std::string::npos) ++n_space;
  }
  escape_spaces_ = n_mark > n_space;
  FindBytePieces(spec_, byte_ids_);
  return absl::OkStatus();
}

absl::StatusOr<std::vector<int32_t>> SpmTokenizer::Encode(std::string_view text,
                                                          const EncodeOptions& opts) const {
  if (text.size() >= std::numeric_limits<uint32_t>::max() / 4) {
    return absl::InvalidArgumentError(absl::StrCat("text of ", text.size(), " bytes is too long to tokenize"));
  }
  std::vector<int32_t> out;
  out.reserve(text.size() / 3 + 4);
  const bool add_special = opts.add_bos;
  if (add_special && ShouldAddBos()) out.push_back(spec_.bos_id);
  bool prev_special = true;
  std::string chunk;
  for (const TextFragment& f : splitter_.Split(text, opts.parse_special)) {
    if (f.token >= 0) {
      out.push_back(f.token);
      prev_special = true;
      continue;
    }
    chunk.clear();
    if (spec_.add_space_prefix && prev_special) chunk.push_back(' ');
    chunk.append(f.text);
    if (escape_spaces_) chunk = ReplaceAll(chunk, " ", kSpaceMark);
    EncodeChunk(chunk, &out);
    prev_special = false;
  }
  if (add_special && spec_.add_eos && spec_.eos_id >= 0) out.push_back(spec_.eos_id);
  return out;
}

void SpmTokenizer::EncodeChunk(std::string_view s, std::vector<int32_t>* out) const {
  std::vector<BpeSymbol> sym;
  sym.reserve(s.size());
  for (size_t pos = 0; pos < s.size();) {
    const size_t n = std::min(utf8::LeadLength(static_cast<uint8_t>(s[pos])), s.size() - pos);
    if (MergeableId(s.substr(pos, n)) >= 0) {
      sym.push_back({.start = static_cast<uint32_t>(pos), .len = static_cast<uint32_t>(n)});
    } else {
      for (size_t i = 0; i < n; ++i) {
        int32_t id = byte_ids_[static_cast<uint8_t>(s[pos + i])];
        if (id < 0) id = spec_.unk_id;
        if (id < 0) continue;  // nothing can stand for this byte
        sym.push_back({.start = static_cast<uint32_t>(pos + i), .len = 1, .fixed = id});
      }
    }
    pos += n;
  }
  BpeMerge(
      s, sym,
      [&](std::string_view piece, float* score) {
        const int32_t id = MergeableId(piece);
        if (id < 0) return false;
        *score = scores_[id];
        return true;
      },
      [](uint32_t, uint32_t, uint32_t) {});
  for (int32_t i = sym.empty() ? -1 : 0; i >= 0; i = sym[i].next) {
    const BpeSymbol& x = sym[i];
    if (x.fixed >= 0) {
      out->push_back(x.fixed);
    } else {
      // A piece by construction (single characters were checked, merges are pieces).
      out->push_back(MergeableId(s.substr(x.start, x.len)));
    }
  }
}

std::string SpmTokenizer::TokenBytes(int32_t id, bool special) const {
  if (id < 0 || id >= vocab_size()) return "";
  const std::string& text = spec_.tokens[id];
  switch (Type(id)) {
    case TokenType::kControl:
    case TokenType::kUnknown:
      return special ? text : "";
    case TokenType::kUserDefined:
      return text;
    case TokenType::kByte: {
      uint8_t b;
      if (ParseBytePiece(text, &b)) return std::string(1, static_cast<char>(b));
      return text;
    }
    default:
      break;
  }
  uint8_t b;
  if (spec_.token_types.empty() && ParseBytePiece(text, &b)) return std::string(1, static_cast<char>(b));
  if (escape_spaces_) return ReplaceAll(text, kSpaceMark, " ");
  return text;
}

}  // namespace

absl::StatusOr<std::unique_ptr<Tokenizer>> CreateSpmTokenizer(VocabSpec spec) {
  auto tok = std::make_unique<SpmTokenizer>(std::move(spec));
  if (absl::Status s = tok->Init(); !s.ok()) return s;
  return std::unique_ptr<Tokenizer>(std::move(tok));
}

}  // namespace nibble::internal
