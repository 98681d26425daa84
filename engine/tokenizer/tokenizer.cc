#include "engine/tokenizer/tokenizer.h"

#include <algorithm>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "engine/tokenizer/tokenizer_impl.h"
#include "engine/tokenizer/utf8.h"

namespace nibble {
namespace internal {

absl::Status ValidateCommon(const VocabSpec& spec) {
  const size_t n = spec.tokens.size();
  if (n > static_cast<size_t>(INT32_MAX)) {
    return absl::InvalidArgumentError(absl::StrCat("vocabulary: ", n, " tokens is too many"));
  }
  if (!spec.scores.empty() && spec.scores.size() != n) {
    return absl::InvalidArgumentError(
        absl::StrCat("vocabulary: ", spec.scores.size(), " scores for ", n, " tokens"));
  }
  if (!spec.token_types.empty() && spec.token_types.size() != n) {
    return absl::InvalidArgumentError(
        absl::StrCat("vocabulary: ", spec.token_types.size(), " token types for ", n, " tokens"));
  }
  auto check_id = [&](int32_t id, const char* name) -> absl::Status {
    if (id < -1 || id >= static_cast<int64_t>(n)) {
      return absl::InvalidArgumentError(
          absl::StrCat("vocabulary: ", name, " id ", id, " is outside [0, ", n, ")"));
    }
    return absl::OkStatus();
  };
  for (auto [id, name] : {std::pair{spec.bos_id, "bos"}, {spec.eos_id, "eos"}, {spec.unk_id, "unk"},
                          {spec.pad_id, "pad"}}) {
    if (absl::Status s = check_id(id, name); !s.ok()) return s;
  }
  for (int32_t id : spec.eog_ids) {
    if (absl::Status s = check_id(id, "end-of-generation"); !s.ok()) return s;
  }
  return absl::OkStatus();
}

bool ParseBytePiece(std::string_view piece, uint8_t* byte) {
  if (piece.size() != 6 || piece.substr(0, 3) != "<0x" || piece[5] != '>') return false;
  auto hex = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
  };
  const int hi = hex(piece[3]), lo = hex(piece[4]);
  if (hi < 0 || lo < 0) return false;
  *byte = static_cast<uint8_t>(hi * 16 + lo);
  return true;
}

std::string ReplaceAll(std::string_view s, std::string_view from, std::string_view to) {
  std::string out;
  out.reserve(s.size());
  size_t pos = 0;
  for (size_t hit; (hit = s.find(from, pos)) != std::string_view::npos; pos = hit + from.size()) {
    out.append(s.substr(pos, hit - pos));
    out.append(to);
  }
  out.append(s.substr(pos));
  return out;
}

void FindBytePieces(const VocabSpec& spec, int32_t byte_ids[256]) {
  std::fill(byte_ids, byte_ids + 256, -1);
  for (size_t i = 0; i < spec.tokens.size(); ++i) {
    if (!spec.token_types.empty() && spec.token_types[i] != TokenType::kByte &&
        spec.token_types[i] != TokenType::kUndefined && spec.token_types[i] != TokenType::kNormal) {
      continue;
    }
    uint8_t b;
    if (ParseBytePiece(spec.tokens[i], &b) && byte_ids[b] < 0) byte_ids[b] = static_cast<int32_t>(i);
  }
}

}  // namespace internal

std::string Tokenizer::Decode(std::span<const int32_t> ids, bool special) const {
  std::string out;
  const bool strip = spec_.strip_space_after_bos && spec_.add_space_prefix && spec_.bos_id >= 0;
  int32_t prev = -1;
  for (int32_t id : ids) {
    std::string piece = TokenBytes(id, special);
    if (strip && prev == spec_.bos_id && !piece.empty() && piece[0] == ' ') {
      out.append(piece, 1, std::string::npos);
    } else {
      out += piece;
    }
    prev = id;
  }
  return out;
}

bool Tokenizer::IsEndOfGeneration(int32_t id) const {
  if (id < 0) return false;
  if (id == spec_.eos_id) return true;
  return std::find(spec_.eog_ids.begin(), spec_.eog_ids.end(), id) != spec_.eog_ids.end();
}

absl::StatusOr<std::unique_ptr<Tokenizer>> CreateTokenizer(VocabSpec spec) {
  switch (spec.kind) {
    case TokenizerKind::kSpmScores:
      return internal::CreateSpmTokenizer(std::move(spec));
    case TokenizerKind::kGpt2Bpe:
      return internal::CreateGpt2BpeTokenizer(std::move(spec));
    case TokenizerKind::kSentencePieceModel:
      return internal::CreateSentencePieceTokenizer(std::move(spec));
    case TokenizerKind::kNone:
      break;
  }
  return absl::InvalidArgumentError("vocabulary: no tokenizer kind set (the model file carries no tokenizer?)");
}

// ---- StreamingDetokenizer ----

std::string StreamingDetokenizer::Push(int32_t id) {
  const VocabSpec& spec = tok_.spec();
  std::string piece = tok_.TokenBytes(id);
  const bool strip = spec.strip_space_after_bos && spec.add_space_prefix && spec.bos_id >= 0;
  if (strip && prev_ == spec.bos_id && !piece.empty() && piece[0] == ' ') piece.erase(0, 1);
  prev_ = id;
  pending_ += piece;

  // Emit every complete sequence; replace sequences that can never become
  // valid; hold back only a trailing valid-but-incomplete prefix.
  std::string out;
  size_t i = 0;
  while (i < pending_.size()) {
    utf8::SeqResult r = utf8::NextSequence(std::string_view(pending_).substr(i));
    if (r.kind == utf8::SeqKind::kIncomplete) break;  // must be the tail
    if (r.kind == utf8::SeqKind::kComplete) {
      out.append(pending_, i, r.length);
    } else {
      out.append(utf8::kReplacement);
    }
    i += r.length;
  }
  pending_.erase(0, i);
  return out;
}

std::string StreamingDetokenizer::Flush() {
  std::string out = utf8::Sanitize(pending_);
  pending_.clear();
  return out;
}

}  // namespace nibble
