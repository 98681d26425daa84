// Small UTF-8 helpers shared by the tokenizers and the streaming detokenizer.
//
// Goals: strict validation per RFC 3629 / Unicode (no overlongs, no surrogates,
// nothing above U+10FFFF) for what we emit, and llama.cpp-compatible chunking
// (lead-byte length) for what tokenizers split.
// Non-goals: normalisation (NFC/NFKC), case folding, grapheme clusters.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace nibble::utf8 {

inline constexpr std::string_view kReplacement = "\xEF\xBF\xBD";  // U+FFFD

// Byte length a sequence starting with `lead` claims, from its high bits only
// (1 for ASCII and for stray continuation bytes, 2/3/4 otherwise), exactly as
// llama.cpp and SentencePiece chunk text into "characters". Not a validity check.
inline size_t LeadLength(uint8_t lead) {
  static constexpr uint8_t kLen[16] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4};
  return kLen[lead >> 4];
}

enum class SeqKind {
  kComplete,    // a valid sequence of `length` bytes
  kIncomplete,  // a valid prefix that ran out of input (`length` bytes seen)
  kInvalid,     // `length` bytes (>= 1) that can never start a valid sequence
};

struct SeqResult {
  SeqKind kind;
  size_t length;
  uint32_t codepoint;  // meaningful for kComplete only
};

// Examines the sequence starting at s[0]. REQUIRES: !s.empty().
// For kInvalid, `length` is the "maximal subpart" (Unicode 15, 3.9 U+FFFD
// substitution): each one gets one U+FFFD.
SeqResult NextSequence(std::string_view s);

// Replaces every invalid or truncated sequence by U+FFFD: one per maximal
// subpart, or with `per_byte` one per byte of it (what llama.cpp's decoder
// does, e.g. "\xE4\xB8a" -> two U+FFFD then "a").
std::string Sanitize(std::string_view s, bool per_byte = false);

// Appends the UTF-8 encoding of `cp`. REQUIRES: cp <= 0x10FFFF, not a surrogate.
void Append(uint32_t cp, std::string* out);

// True if `s` is entirely valid UTF-8.
bool IsValid(std::string_view s);

}  // namespace nibble::utf8
