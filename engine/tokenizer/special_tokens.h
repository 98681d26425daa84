// Splits text on the texts of special tokens before a tokenizer sees it, the
// way llama.cpp's tokenizer_st_partition does:
//   - candidates are tokens typed control, user-defined or unknown;
//   - longest token text first (ties: lower id first); each token splits every
//     remaining raw fragment at each of its occurrences, left to right;
//   - without parse_special only user-defined tokens are split out (they are
//     always matched, as in Hugging Face tokenizers); with it control and
//     unknown tokens too.
// Non-goals: lstrip/rstrip token attributes (not carried in VocabSpec).
//
// Thread safety: immutable after construction.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "engine/tokenizer/vocab.h"

namespace nibble {

struct TextFragment {
  int32_t token = -1;     // >= 0: this fragment is that special token
  std::string_view text;  // token < 0: raw text to tokenize (never empty)
};

class SpecialTokenSplitter {
 public:
  explicit SpecialTokenSplitter(const VocabSpec& spec);

  // Returns the fragments of `text` in order; views point into `text`.
  // Empty text gives no fragments.
  std::vector<TextFragment> Split(std::string_view text, bool parse_special) const;

  bool empty() const { return specials_.empty(); }

 private:
  struct Special {
    std::string text;
    int32_t id;
    bool always;  // user-defined: split even without parse_special
  };
  std::vector<Special> specials_;
};

}  // namespace nibble
