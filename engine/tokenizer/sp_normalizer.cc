#include "engine/tokenizer/sp_normalizer.h"

#include <cstring>

#include "absl/strings/str_cat.h"
#include "engine/tokenizer/utf8.h"

namespace nibble::internal {
namespace {

constexpr std::string_view kSpaceMark = "\xE2\x96\x81";  // U+2581 "▁"

// Darts-clone double-array unit accessors.
inline bool HasLeaf(uint32_t u) { return (u >> 8) & 1; }
inline uint32_t Value(uint32_t u) { return u & ((1u << 31) - 1); }
inline uint32_t Label(uint32_t u) { return u & ((1u << 31) | 0xFF); }
inline uint32_t Offset(uint32_t u) { return (u >> 10) << ((u & (1u << 9)) >> 6); }

}  // namespace

absl::StatusOr<SpNormalizer> SpNormalizer::Create(std::string_view charsmap, Options opts) {
  SpNormalizer n;
  n.opts_ = opts;
  if (charsmap.empty()) return n;
  if (charsmap.size() < 4) {
    return absl::InvalidArgumentError("normalizer_spec.precompiled_charsmap: shorter than its 4-byte header");
  }
  uint8_t h[4];
  std::memcpy(h, charsmap.data(), 4);
  const uint64_t trie_bytes = static_cast<uint64_t>(h[0]) | static_cast<uint64_t>(h[1]) << 8 |
                              static_cast<uint64_t>(h[2]) << 16 | static_cast<uint64_t>(h[3]) << 24;
  if (trie_bytes > charsmap.size() - 4 || trie_bytes % 4 != 0 || trie_bytes == 0) {
    return absl::InvalidArgumentError(absl::StrCat("normalizer_spec.precompiled_charsmap: trie size ", trie_bytes,
                                                   " does not fit the ", charsmap.size(), "-byte blob"));
  }
  n.trie_.resize(trie_bytes / 4);
  for (size_t i = 0; i < n.trie_.size(); ++i) {
    const auto* p = reinterpret_cast<const uint8_t*>(charsmap.data() + 4 + 4 * i);
    n.trie_[i] = static_cast<uint32_t>(p[0]) | static_cast<uint32_t>(p[1]) << 8 |
                 static_cast<uint32_t>(p[2]) << 16 | static_cast<uint32_t>(p[3]) << 24;
  }
  n.pool_.assign(charsmap.substr(4 + trie_bytes));
  return n;
}

size_t SpNormalizer::LongestMatch(std::string_view s, uint32_t* value) const {
  const size_t units = trie_.size();
  size_t best = 0;
  uint32_t node = Offset(trie_[0]);
  for (size_t i = 0; i < s.size(); ++i) {
    const uint8_t c = static_cast<uint8_t>(s[i]);
    node ^= c;
    if (node >= units) break;
    const uint32_t unit = trie_[node];
    if (Label(unit) != c) break;
    node ^= Offset(unit);
    if (node >= units) break;
    if (HasLeaf(unit)) {
      best = i + 1;
      *value = Value(trie_[node]);
    }
  }
  return best;
}

std::pair<std::string_view, size_t> SpNormalizer::NormalizePrefix(std::string_view s) const {
  if (!trie_.empty()) {
    uint32_t value = 0;
    const size_t len = LongestMatch(s, &value);
    if (len > 0 && value < pool_.size()) {
      const char* start = pool_.data() + value;
      const size_t n = strnlen(start, pool_.size() - value);
      return {std::string_view(start, n), len};
    }
  }
  const utf8::SeqResult r = utf8::NextSequence(s);
  if (r.kind != utf8::SeqKind::kComplete) return {utf8::kReplacement, 1};
  return {s.substr(0, r.length), r.length};
}

std::string SpNormalizer::Normalize(std::string_view text) const {
  std::string out;
  out.reserve(text.size() + 8);
  const std::string_view space = opts_.escape_whitespaces ? kSpaceMark : " ";
  if (opts_.remove_extra_whitespaces) {
    while (!text.empty()) {
      const auto [piece, used] = NormalizePrefix(text);
      if (piece != " ") break;
      text.remove_prefix(used);
    }
  }
  if (text.empty()) return out;
  if (opts_.add_dummy_prefix) out.append(space);
  bool prev_space = opts_.remove_extra_whitespaces;
  while (!text.empty()) {
    auto [piece, used] = NormalizePrefix(text);
    if (prev_space && opts_.remove_extra_whitespaces) {
      while (!piece.empty() && piece.front() == ' ') piece.remove_prefix(1);
    }
    if (!piece.empty()) {
      for (char c : piece) {
        if (c == ' ' && opts_.escape_whitespaces) {
          out.append(kSpaceMark);
        } else {
          out.push_back(c);
        }
      }
      prev_space = piece.back() == ' ';
    }
    text.remove_prefix(used);
    if (!opts_.remove_extra_whitespaces) prev_space = false;
  }
  if (opts_.remove_extra_whitespaces) {
    while (out.size() >= space.size() && std::string_view(out).ends_with(space)) out.resize(out.size() - space.size());
  }
  return out;
}

}  // namespace nibble::internal
