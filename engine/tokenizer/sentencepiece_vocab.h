// Reads a SentencePiece .model file (natively, sp_processor.h) into
// a VocabSpec, so that callers see its pieces, scores, types and special ids.
//
// Non-goals: user-defined piece types (the Debian library exposes no accessor;
// they read as normal), normaliser rules other than the dummy prefix.
#pragma once

#include <string>

#include "absl/status/status.h"
#include "engine/tokenizer/vocab.h"

namespace nibble {

// Fills `out` (replacing it): kind kSentencePieceModel, sp_model_path = path,
// tokens (▁-style pieces), scores, token_types (control, unknown, unused,
// byte, else normal), bos/eos/unk/pad ids from the model (-1 if disabled),
// add_bos = (bos exists), add_space_prefix from the model's normaliser
// (probed: does "a" encode to a piece starting with ▁), strip_space_after_bos.
// Errors (NOT_FOUND, INVALID_ARGUMENT) name `path`.
absl::Status ReadSentencePieceVocab(const std::string& path, VocabSpec* out);

}  // namespace nibble
