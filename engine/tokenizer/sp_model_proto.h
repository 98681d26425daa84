// Reads a SentencePiece .model file (a serialized sentencepiece.ModelProto)
// without the SentencePiece library: the fields nibble's native tokenizer
// needs, from the protobuf wire format.
//
// Why not libprotobuf with generated code: the schema belongs to SentencePiece,
// and Debian's libsentencepiece (the reference our tests compare against)
// bundles its own protobuf, which must not share a process with the system
// libprotobuf. The wire format is small and stable; every length and offset is
// checked, unknown fields are skipped, so a corrupt file is an error, never a
// crash.
//
// Field numbers (sentencepiece_model.proto, proto2):
//   ModelProto: 1 pieces (repeated SentencePiece), 2 trainer_spec,
//               3 normalizer_spec, 5 denormalizer_spec (ignored)
//   SentencePiece: 1 piece (string), 2 score (float), 3 type (enum, default NORMAL)
//   TrainerSpec: 3 model_type (UNIGRAM=1 default, BPE=2, WORD=3, CHAR=4),
//                24 treat_whitespace_as_suffix, 35 byte_fallback,
//                40..43 unk/bos/eos/pad id, 45..48 unk/bos/eos/pad piece
//   NormalizerSpec: 1 name, 2 precompiled_charsmap, 3 add_dummy_prefix (true),
//                   4 remove_extra_whitespaces (true), 5 escape_whitespaces (true)
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace nibble::internal {

// sentencepiece.ModelProto.SentencePiece.Type
enum class SpPieceType : int32_t {
  kNormal = 1,
  kUnknown = 2,
  kControl = 3,
  kUserDefined = 4,
  kByte = 6,
  kUnused = 5,
};

enum class SpModelType : int32_t { kUnigram = 1, kBpe = 2, kWord = 3, kChar = 4 };

struct SpPiece {
  std::string piece;
  float score = 0.0f;
  SpPieceType type = SpPieceType::kNormal;
};

struct SpModelProto {
  std::vector<SpPiece> pieces;
  // trainer_spec
  SpModelType model_type = SpModelType::kUnigram;
  bool treat_whitespace_as_suffix = false;
  bool byte_fallback = false;
  int32_t unk_id = 0, bos_id = 1, eos_id = 2, pad_id = -1;
  std::string unk_piece = "<unk>", bos_piece = "<s>", eos_piece = "</s>", pad_piece = "<pad>";
  // normalizer_spec
  std::string normalizer_name;
  std::string precompiled_charsmap;
  bool add_dummy_prefix = true;
  bool remove_extra_whitespaces = true;
  bool escape_whitespaces = true;
};

// Parses the serialized ModelProto. Errors (INVALID_ARGUMENT) name the field,
// e.g. "ModelProto.pieces[7].score: truncated". Enum values outside the known
// ones are errors; a piece list that is empty is an error.
absl::StatusOr<SpModelProto> ParseSpModelProto(std::string_view bytes);

}  // namespace nibble::internal
