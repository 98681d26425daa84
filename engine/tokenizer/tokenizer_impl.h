// Internal: the concrete tokenizers behind CreateTokenizer() (tokenizer.h).
// Callers outside engine/tokenizer/ use CreateTokenizer only.
#pragma once

#include <memory>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "engine/tokenizer/tokenizer.h"

namespace nibble::internal {

// kSpmScores (spm_tokenizer.cc).
absl::StatusOr<std::unique_ptr<Tokenizer>> CreateSpmTokenizer(VocabSpec spec);
// kGpt2Bpe (gpt2_bpe.cc).
absl::StatusOr<std::unique_ptr<Tokenizer>> CreateGpt2BpeTokenizer(VocabSpec spec);
// kSentencePieceModel (sentencepiece_tokenizer.cc).
absl::StatusOr<std::unique_ptr<Tokenizer>> CreateSentencePieceTokenizer(VocabSpec spec);

// Validates the parts every kind shares: sizes of tokens/scores/token_types
// agree, special ids are in range (or -1).
absl::Status ValidateCommon(const VocabSpec& spec);

// Token ids of the 256 "<0xXX>" byte pieces, -1 where absent.
void FindBytePieces(const VocabSpec& spec, int32_t byte_ids[256]);

// If `piece` is exactly "<0xXX>" (hex, either case), stores the byte.
bool ParseBytePiece(std::string_view piece, uint8_t* byte);

// Debian's Abseil has its own absl::string_view class (not std's): use this
// for heterogeneous lookups in absl containers and for StrCat arguments.
inline absl::string_view AsAbsl(std::string_view s) { return absl::string_view(s.data(), s.size()); }

// Returns `s` with every occurrence of `from` (non-empty) replaced by `to`.
std::string ReplaceAll(std::string_view s, std::string_view from, std::string_view to);

}  // namespace nibble::internal
