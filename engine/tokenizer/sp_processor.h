// Internal: a narrow, std-only wrapper over sentencepiece::SentencePieceProcessor.
//
// Why a wrapper: Debian's sentencepiece_processor.h declares
// `namespace absl { using std::string_view; }`, which clashes with Abseil's
// own absl::string_view class (ABSL_OPTION_USE_STD_STRING_VIEW is 0 there).
// So the SentencePiece header is included by sp_processor.cc alone, which
// includes no Abseil header; everything else talks to this class.
//
// Thread safety: immutable after Load(); all methods are const and
// SentencePiece's Encode is thread-safe.
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace nibble::internal {

class SpProcessor {
 public:
  // Loads a SentencePiece .model file. On failure returns nullptr and sets
  // `error` (without the path; the caller adds it).
  static std::unique_ptr<SpProcessor> Load(const std::string& path, std::string* error);
  // Same from the serialized ModelProto bytes of a .model file.
  static std::unique_ptr<SpProcessor> LoadFromBytes(const std::string& bytes, std::string* error);
  // The serialized ModelProto (to embed the model in another file).
  std::string Serialized() const;
  ~SpProcessor();

  // Text -> ids (the model's normaliser, dummy prefix and byte fallback apply).
  bool Encode(std::string_view text, std::vector<int>* ids, std::string* error) const;

  int size() const;
  const std::string& Piece(int id) const;  // REQUIRES: 0 <= id < size()
  float Score(int id) const;
  bool IsControl(int id) const;
  bool IsUnknown(int id) const;
  bool IsUnused(int id) const;
  bool IsByte(int id) const;
  // -1 if the piece is not in the vocabulary.
  int PieceToId(std::string_view piece) const;
  int bos_id() const;  // -1 when the model has none
  int eos_id() const;
  int unk_id() const;
  int pad_id() const;

 private:
  struct Impl;
  explicit SpProcessor(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace nibble::internal
