// One interface over every tokenizer nibble reads (see vocab.h for the kinds).
//
// Thread safety: a Tokenizer is immutable after creation; Encode/Decode are
// safe to call concurrently. StreamingDetokenizer is per-sequence state.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/tokenizer/vocab.h"

namespace nibble {

struct EncodeOptions {
  bool add_bos = true;        // prepend BOS if the vocabulary has one and add_bos is set in it
  bool parse_special = false; // recognise control/user-defined token texts like "<|im_start|>"
};

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;

  // Text -> token ids. `add_bos` is honoured only when the vocabulary's add_bos
  // flag allows it (as llama.cpp does); see ShouldAddBos().
  virtual absl::StatusOr<std::vector<int32_t>> Encode(std::string_view text,
                                                      const EncodeOptions& opts) const = 0;

  // The raw bytes one token stands for (byte-level/byte-fallback decoded; may be
  // a partial UTF-8 sequence). Control tokens decode to "" unless `special`.
  virtual std::string TokenBytes(int32_t id, bool special = false) const = 0;

  // Concatenated TokenBytes, applying strip_space_after_bos like llama2.c.
  std::string Decode(std::span<const int32_t> ids, bool special = false) const;

  virtual int32_t vocab_size() const = 0;
  const VocabSpec& spec() const { return spec_; }
  int32_t bos_id() const { return spec_.bos_id; }
  int32_t eos_id() const { return spec_.eos_id; }
  bool ShouldAddBos() const { return spec_.add_bos && spec_.bos_id >= 0; }
  // True for eos and every other end-of-generation token.
  bool IsEndOfGeneration(int32_t id) const;
  // Looks up a piece's id by its exact text; -1 if absent.
  virtual int32_t PieceToId(std::string_view piece) const = 0;

 protected:
  explicit Tokenizer(VocabSpec spec) : spec_(std::move(spec)) {}
  VocabSpec spec_;
};

absl::StatusOr<std::unique_ptr<Tokenizer>> CreateTokenizer(VocabSpec spec);

// Turns a stream of token ids into text that is always valid UTF-8: bytes of an
// incomplete multi-byte sequence are held back until the rest arrives.
class StreamingDetokenizer {
 public:
  explicit StreamingDetokenizer(const Tokenizer& tok) : tok_(tok) {}
  // Returns the text that became complete with this token (maybe empty).
  std::string Push(int32_t id);
  // Returns whatever is held back (invalid sequences replaced by U+FFFD).
  std::string Flush();

 private:
  const Tokenizer& tok_;
  std::string pending_;
  int32_t prev_ = -1;
};

}  // namespace nibble
