#include "engine/tokenizer/llama2c_vocab.h"

#include <cmath>

#include "absl/strings/str_cat.h"
#include "engine/io/byte_reader.h"
#include "engine/io/mapped_file.h"
#include "engine/tokenizer/tokenizer_impl.h"

namespace nibble {
namespace {

// Longest piece we accept; llama2.c vocabularies stay far below this.
constexpr int32_t kMaxPieceLen = 1 << 16;
// A token needs at least 8 bytes (score + length), so no file holds more than
// size / 8 tokens: caps the reservation for a hostile vocab_size.
constexpr size_t kMinTokenBytes = 8;

}  // namespace

absl::Status ReadLlama2cVocab(const std::string& path, int32_t vocab_size, VocabSpec* out) {
  auto file = io::MappedFile::Open(path);
  if (!file.ok()) return file.status();
  const io::MappedFile& f = **file;
  io::ByteReader r(f.data(), f.size(), path);

  auto max_len = r.Read<int32_t>("max_token_length header");
  if (!max_len.ok()) return max_len.status();
  if (*max_len <= 0 || *max_len > kMaxPieceLen) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": max_token_length ", *max_len,
                                                   " is not in [1, ", kMaxPieceLen,
                                                   "]; is this a llama2.c tokenizer file?"));
  }

  VocabSpec v;
  v.kind = TokenizerKind::kSpmScores;
  v.max_token_len = *max_len;
  const size_t cap = r.remaining() / kMinTokenBytes;
  if (vocab_size > 0 && static_cast<size_t>(vocab_size) > cap) {
    return absl::DataLossError(absl::StrCat(path, ": truncated: ", vocab_size, " tokens expected but ",
                                            f.size(), " bytes can hold at most ", cap));
  }
  const size_t reserve = vocab_size > 0 ? static_cast<size_t>(vocab_size) : cap;
  v.tokens.reserve(reserve);
  v.scores.reserve(reserve);

  auto with_index = [](const absl::Status& s, int64_t i) {
    return absl::Status(s.code(), absl::StrCat(s.message(), " (token ", i, ")"));
  };
  for (int64_t i = 0; vocab_size > 0 ? i < vocab_size : r.remaining() > 0; ++i) {
    auto score = r.Read<float>("token score");
    if (!score.ok()) return with_index(score.status(), i);
    auto len = r.Read<int32_t>("token length");
    if (!len.ok()) return with_index(len.status(), i);
    if (*len < 0 || *len > kMaxPieceLen) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": token ", i, " has length ", *len,
                                                     ", outside [0, ", kMaxPieceLen, "]"));
    }
    auto bytes = r.ReadBytes(static_cast<uint64_t>(*len), "token text");
    if (!bytes.ok()) return with_index(bytes.status(), i);
    if (!std::isfinite(*score)) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": token ", i, " has a non-finite score"));
    }
    v.tokens.emplace_back(*bytes);
    v.scores.push_back(*score);
  }
  if (r.remaining() != 0) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": ", r.remaining(), " unexpected bytes after ",
                                                   v.tokens.size(), " tokens (vocab_size mismatch?)"));
  }
  if (v.tokens.size() < 3) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": only ", v.tokens.size(), " tokens; need at least <unk>, BOS and EOS"));
  }

  v.token_types.resize(v.tokens.size(), TokenType::kNormal);
  v.token_types[0] = TokenType::kUnknown;
  v.token_types[1] = TokenType::kControl;
  v.token_types[2] = TokenType::kControl;
  for (size_t i = 3; i < v.tokens.size(); ++i) {
    uint8_t b;
    if (internal::ParseBytePiece(v.tokens[i], &b)) v.token_types[i] = TokenType::kByte;
  }
  v.unk_id = 0;
  v.bos_id = 1;
  v.eos_id = 2;
  v.add_bos = true;
  v.add_eos = false;
  v.add_space_prefix = true;
  v.strip_space_after_bos = true;
  *out = std::move(v);
  return absl::OkStatus();
}

}  // namespace nibble
