#include "engine/io/vocab_util.h"

#include <algorithm>
#include <string_view>

namespace nibble::io {

void FillEogIds(VocabSpec* vocab) {
  static constexpr std::string_view kEogTexts[] = {
      "<|eot_id|>", "<|im_end|>", "<|end|>",    "<|return|>",      "<|call|>",
      "<end_of_turn>", "<|endoftext|>", "<|eom_id|>", "<EOT>", "_<EOT>",
      "<|end_of_text|>", "<end_of_utterance>",
  };
  std::vector<int32_t> ids;
  if (vocab->eos_id >= 0) ids.push_back(vocab->eos_id);
  for (size_t i = 0; i < vocab->tokens.size(); ++i) {
    const std::string& t = vocab->tokens[i];
    if (t.size() < 4 || t.size() > 24) continue;  // cheap filter: all markers fit
    bool match = std::find(std::begin(kEogTexts), std::end(kEogTexts), t) != std::end(kEogTexts);
    if (!match && t == "</s>") {
      match = i < vocab->token_types.size() && vocab->token_types[i] == TokenType::kControl;
    }
    if (match) ids.push_back(static_cast<int32_t>(i));
  }
  std::sort(ids.begin(), ids.end());
  ids.erase(std::unique(ids.begin(), ids.end()), ids.end());
  vocab->eog_ids = std::move(ids);
}

}  // namespace nibble::io
