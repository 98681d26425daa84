#include "engine/tokenizer/special_tokens.h"

#include <algorithm>
#include <list>

namespace nibble {

SpecialTokenSplitter::SpecialTokenSplitter(const VocabSpec& spec) {
  const size_t n = std::min(spec.token_types.size(), spec.tokens.size());
  for (size_t i = 0; i < n; ++i) {
    const TokenType t = spec.token_types[i];
    if (spec.tokens[i].empty()) continue;
    if (t == TokenType::kControl || t == TokenType::kUnknown || t == TokenType::kUserDefined) {
      specials_.push_back({spec.tokens[i], static_cast<int32_t>(i), t == TokenType::kUserDefined});
    }
  }
  std::stable_sort(specials_.begin(), specials_.end(), [](const Special& a, const Special& b) {
    return a.text.size() > b.text.size();
  });
}

std::vector<TextFragment> SpecialTokenSplitter::Split(std::string_view text, bool parse_special) const {
  std::list<TextFragment> frags;
  if (!text.empty()) frags.push_back({-1, text});
  for (const Special& sp : specials_) {
    if (!parse_special && !sp.always) continue;
    for (auto it = frags.begin(); it != frags.end(); ++it) {
      if (it->token >= 0) continue;
      std::string_view rest = it->text;
      size_t pos = rest.find(sp.text);
      if (pos == std::string_view::npos) continue;
      // Replace this raw fragment by [left] special [left] special ... [tail].
      auto insert_at = std::next(it);
      while (pos != std::string_view::npos) {
        if (pos > 0) frags.insert(insert_at, {-1, rest.substr(0, pos)});
        frags.insert(insert_at, {sp.id, std::string_view(sp.text)});
        rest.remove_prefix(pos + sp.text.size());
        pos = rest.find(sp.text);
      }
      if (!rest.empty()) frags.insert(insert_at, {-1, rest});
      it = std::prev(frags.erase(it));  // points at the last inserted fragment
    }
  }
  return {frags.begin(), frags.end()};
}

}  // namespace nibble
