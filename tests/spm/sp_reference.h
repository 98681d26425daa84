// Test-only: the SentencePiece library (Debian libsentencepiece) as the
// independent reference for nibble's native SentencePiece tokenizer, and its
// trainer to make Unigram/BPE/CHAR models with different normalisers.
//
// Std-only header: Debian's sentencepiece_processor.h declares
// `namespace absl { using std::string_view; }`, which clashes with Abseil, so
// the library is included by sp_reference.cc alone (which includes no Abseil).
// Only test binaries link this (never a process that links gRPC).
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace nibble::testing {

class SpReference {
 public:
  // nullptr + *error on failure.
  static std::unique_ptr<SpReference> Load(const std::string& path, std::string* error);
  static std::unique_ptr<SpReference> FromBytes(const std::string& bytes, std::string* error);
  ~SpReference();

  std::vector<int> Encode(std::string_view text) const;  // empty on error
  int size() const;
  std::string Piece(int id) const;
  float Score(int id) const;
  bool IsControl(int id) const;
  bool IsUnknown(int id) const;
  bool IsUnused(int id) const;
  bool IsByte(int id) const;
  int PieceToId(std::string_view piece) const;
  int bos_id() const;
  int eos_id() const;
  int unk_id() const;
  int pad_id() const;

 private:
  struct Impl;
  explicit SpReference(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Runs spm_train with `args` (e.g. "--input=x.txt --model_prefix=/tmp/m
// --vocab_size=500 --model_type=bpe"); false + *error on failure.
bool TrainSentencePiece(const std::string& args, std::string* error);

}  // namespace nibble::testing
