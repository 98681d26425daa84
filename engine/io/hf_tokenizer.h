// Tokenizer of a Hugging Face checkpoint directory, as a VocabSpec.
//
// Goals: tokenizer.model -> kSentencePieceModel (the file is handed to the
// SentencePiece library); tokenizer.json with a "BPE" model and a ByteLevel
// pre-tokenizer -> kGpt2Bpe (vocab by id, ranked merges, added tokens with
// special -> kControl, pre-tokenizer name guessed from its structure);
// bos/eos/pad from tokenizer_config.json, else config.json; chat_template
// from tokenizer_config.json or chat_template.jinja.
// Non-goals: WordPiece/Unigram tokenizer.json, normalizers; anything else
// leaves kind = kNone with a logged warning (the caller may pass --tokenizer).
#pragma once

#include <string>

#include "absl/status/status.h"
#include "engine/tokenizer/vocab.h"

namespace nibble::io {

// `config_json`: config.json's text (bos/eos fallbacks), may be empty.
// `chat_template` may be null. Errors (malformed files) name the file.
absl::Status ReadHfTokenizer(const std::string& dir, const std::string& config_json, VocabSpec* vocab,
                             std::string* chat_template);

}  // namespace nibble::io
