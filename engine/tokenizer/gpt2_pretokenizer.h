// Pre-tokenizer for byte-level BPE: splits text into "words" with the regex
// list llama.cpp uses for a GGUF tokenizer.ggml.pre name.
//
// Semantics (llama.cpp unicode_regex_split): the regexes are applied in
// order; each one re-splits every fragment produced so far, and both its
// matches and the unmatched gaps between them become fragments. A regex only
// sees its fragment (lookahead stops at the fragment's end).
// Matching is PCRE2 in UTF + UCP mode (\p{L}, \p{N}, \s = Unicode white space).
//
// Supported names: gpt2 family ("gpt-2", "gpt2", "mpt", "olmo", "jais",
// "phi-2", ...), "default" (and ""), "smollm"/"starcoder"/"refact"/
// "command-r"/"codeshell"/"exaone"/"minerva-7b", "llama3"/"llama-bpe"/
// "llama-v3"/"falcon3"/"dbrx"/"smaug-bpe"/"chatglm-bpe"/"glm4",
// "qwen2"/"deepseek-r1-qwen"/"stablelm2"/"megrez", "falcon", "gpt-4o"/
// "llama4", "tekken". Anything else falls back to the gpt2 regex with a
// logged warning.
// Non-goals: deepseek's literal-range regexes, custom splitters (kimi-k2, afmoe).
//
// Thread safety: immutable after Create(); Split is safe to call concurrently.
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace nibble {

class PreTokenizer {
 public:
  // Compiles the regexes for `pre`. Fails only if PCRE2 rejects a pattern.
  static absl::StatusOr<std::unique_ptr<PreTokenizer>> Create(std::string_view pre);
  ~PreTokenizer();
  PreTokenizer(const PreTokenizer&) = delete;
  PreTokenizer& operator=(const PreTokenizer&) = delete;

  // Appends the words of `text` (views into it) to `words`.
  // REQUIRES: `text` is valid UTF-8 (utf8::Sanitize it first).
  absl::Status Split(std::string_view text, std::vector<std::string_view>* words) const;

  // llama.cpp "ignore_merges": a word that is itself a token is not BPE-merged.
  bool ignore_merges() const { return ignore_merges_; }
  // The name whose regexes are in use (after fallback).
  const std::string& name() const { return name_; }

 private:
  PreTokenizer() = default;
  struct Regex;
  std::vector<std::unique_ptr<Regex>> regexes_;
  std::string name_;
  bool ignore_merges_ = false;
};

}  // namespace nibble
