// Internal: a SentencePiece .model tokenizer implemented natively (no
// libsentencepiece in the process): the ModelProto reader
// (sp_model_proto.h), the normaliser (sp_normalizer.h) and the BPE, Unigram
// and CHAR segmenters, token-for-token equal to the SentencePiece library
// (tests/sp_native_test.cc runs both on trained and real models).
//
// Segmentation, as SentencePiece does it:
//  - BPE: UTF-8 characters merged by score (bpe_merge.h) over the normal,
//    user-defined and unused pieces; a final unused piece is re-split into
//    the two pieces it was merged from.
//  - Unigram: Viterbi over all pieces (normal: their score; user-defined:
//    length * max_score - 0.1; unused: never), ties to the earliest start; a
//    character no single-character piece covers is an unknown node scored
//    min_score - 10.
//  - CHAR: each character is its piece or unknown.
//  Unknown pieces become <0xXX> byte pieces with byte_fallback, else a run of
//  unknowns is one unk id.
// Non-goals: WORD models, treat_whitespace_as_suffix, sampling/n-best
// encodings, user-defined symbols protected from normalisation.
//
// Thread safety: immutable after creation; all methods are const.
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/statusor.h"
#include "engine/tokenizer/sp_model_proto.h"
#include "engine/tokenizer/sp_normalizer.h"

namespace nibble::internal {

class SpProcessor {
 public:
  // From the serialized ModelProto bytes of a .model file. Errors
  // (INVALID_ARGUMENT) name the field; the caller adds the path.
  static absl::StatusOr<std::unique_ptr<SpProcessor>> FromBytes(std::string bytes);

  // The serialized ModelProto it was made from (to embed it in another file).
  const std::string& Serialized() const { return bytes_; }

  // Text -> ids (normaliser, dummy prefix and byte fallback apply).
  std::vector<int> Encode(std::string_view text) const;

  int size() const { return static_cast<int>(model_.pieces.size()); }
  // REQUIRES: 0 <= id < size() for the per-id accessors.
  const std::string& Piece(int id) const { return model_.pieces[id].piece; }
  float Score(int id) const { return model_.pieces[id].score; }
  bool IsControl(int id) const { return Type(id) == SpPieceType::kControl; }
  bool IsUnknown(int id) const { return Type(id) == SpPieceType::kUnknown; }
  bool IsUnused(int id) const { return Type(id) == SpPieceType::kUnused; }
  bool IsByte(int id) const { return Type(id) == SpPieceType::kByte; }
  bool IsUserDefined(int id) const { return Type(id) == SpPieceType::kUserDefined; }
  // -1 if the piece is not in the vocabulary.
  int PieceToId(std::string_view piece) const;
  // As the library reports them: the id of the trainer's bos/eos/pad piece if
  // it is a control piece (unk: an unknown piece), else -1.
  int bos_id() const { return bos_id_; }
  int eos_id() const { return eos_id_; }
  int unk_id() const { return unk_id_; }
  int pad_id() const { return pad_id_; }

 private:
  struct Span {
    uint32_t start, len;
    int id;
  };
  SpPieceType Type(int id) const { return model_.pieces[id].type; }
  // Id among the segmentable pieces (normal, user-defined, unused), or -1.
  int SegmentId(std::string_view s) const;
  void SegmentBpe(std::string_view s, std::vector<Span>* out) const;
  void SegmentUnigram(std::string_view s, std::vector<Span>* out) const;
  void SegmentChar(std::string_view s, std::vector<Span>* out) const;

  std::string bytes_;
  SpModelProto model_;
  SpNormalizer normalizer_;
  absl::flat_hash_map<std::string, int> segment_ids_;   // normal, user-defined, unused
  absl::flat_hash_map<std::string, int> reserved_ids_;  // control, unknown, byte
  absl::flat_hash_set<std::string> prefixes_;           // unigram: proper prefixes of segmentable pieces
  int byte_ids_[256];
  int unk_id_ = -1, bos_id_ = -1, eos_id_ = -1, pad_id_ = -1;
  int model_unk_ = -1;  // the UNKNOWN piece used for unknown text
  float min_score_ = 0.0f, max_score_ = 0.0f;

  SpProcessor() = default;
};

}  // namespace nibble::internal
