// Reader for llama2.c tokenizer files (tok*.bin, tokenizer.bin).
//
// Layout (little-endian): int32 max_token_length, then for each token
// { float32 score; int32 len; len bytes of piece text }. There is no token
// count in the file: it comes from the checkpoint's vocab_size.
//
// The pieces use plain spaces (" the"), byte-fallback pieces are "<0x0A>"
// style, id 0 is <unk>, 1 is BOS, 2 is EOS.
// Non-goals: writing the format.
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "engine/tokenizer/vocab.h"

namespace nibble {

// Fills `out` (replacing it) with kind kSpmScores, bos 1, eos 2, unk 0,
// add_bos, add_space_prefix and strip_space_after_bos set, and token types
// derived from the pieces (0 unknown, 1/2 control, "<0xXX>" byte, else normal).
// `vocab_size` > 0: exactly that many tokens are read (trailing bytes are an
// error); <= 0: tokens are read until the end of the file.
// Errors (NOT_FOUND, DATA_LOSS, INVALID_ARGUMENT) name `path` and the problem.
absl::Status ReadLlama2cVocab(const std::string& path, int32_t vocab_size, VocabSpec* out);

}  // namespace nibble
