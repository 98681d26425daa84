// SentencePiece's text normaliser, natively: the precompiled character map
// (NormalizerSpec.precompiled_charsmap: a Darts-clone double-array trie of
// source strings plus a pool of NUL-terminated replacements, as written by
// spm_train for nmt_nfkc, nfkc_cf, ...), extra-whitespace removal, the dummy
// "▁" prefix and whitespace escaping.
//
// Semantics (checked against the SentencePiece library in
// tests/sp_native_test.cc):
//   1. At each position the longest trie match is replaced by its pool
//      string; without a match one UTF-8 character is copied (an invalid
//      byte becomes U+FFFD).
//   2. remove_extra_whitespaces: leading spaces are dropped, runs of spaces
//      collapse to one, trailing spaces are dropped (a "space" is a
//      normalised piece equal to / starting with " ").
//   3. add_dummy_prefix: "▁" (or " ") is prepended to non-empty output.
//   4. escape_whitespaces: " " becomes "▁" (U+2581).
// Non-goals: user-defined symbols kept atomic through normalisation (they are
// normalised like any text), treat_whitespace_as_suffix (rejected at load),
// the normalisation_rule_tsv (spm_train compiles it into the charsmap).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace nibble::internal {

class SpNormalizer {
 public:
  struct Options {
    bool add_dummy_prefix = true;
    bool remove_extra_whitespaces = true;
    bool escape_whitespaces = true;
  };
  // `charsmap` may be empty (identity). Errors name the blob's problem.
  static absl::StatusOr<SpNormalizer> Create(std::string_view charsmap, Options opts);

  // Thread-safe (const).
  std::string Normalize(std::string_view text) const;

 private:
  // The replacement for the longest trie match at the start of `s` and the
  // number of input bytes it consumes (>= 1).
  std::pair<std::string_view, size_t> NormalizePrefix(std::string_view s) const;
  // Darts-clone common-prefix search: the longest key that prefixes `s`;
  // returns its length (0: none) and value.
  size_t LongestMatch(std::string_view s, uint32_t* value) const;

  Options opts_;
  std::vector<uint32_t> trie_;  // double-array units (empty: identity)
  std::string pool_;            // NUL-terminated replacement strings
};

}  // namespace nibble::internal
