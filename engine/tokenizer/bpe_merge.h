// Internal: the score-ordered BPE merge loop shared by kSpmScores
// (spm_tokenizer.cc) and the native SentencePiece BPE model (sp_processor.cc).
//
// Given a text cut into initial symbols, repeatedly merges the adjacent pair
// whose concatenation has the highest score (leftmost on ties, as llama2.c,
// llama.cpp and SentencePiece do) until no pair is mergeable. A priority queue
// of candidate pairs with lazy invalidation makes it O(n log n). Symbols with
// `fixed` >= 0 (byte-fallback tokens) never merge and cut the text into
// segments that are merged independently (same result, smaller heaps).
#pragma once

#include <algorithm>
#include <cstdint>
#include <string_view>
#include <vector>

namespace nibble::internal {

struct BpeSymbol {
  uint32_t start = 0;  // byte offset in the text
  uint32_t len = 0;    // 0 once merged into the left neighbour
  int32_t prev = -1, next = -1;
  int32_t fixed = -1;  // >= 0: a fixed token id that never merges
};

// Merges `sym` in place (prev/next are (re)linked here; the symbols must be
// in text order and contiguous). pair_score(text, &score) says whether `text`
// (the concatenation of two neighbours) is a mergeable piece and its score.
// on_merge(left_start, left_len, right_len) is called after each merge.
// Afterwards the live symbols are those reachable from index 0 through
// `next` (len > 0).
template <typename PairScore, typename OnMerge>
void BpeMerge(std::string_view s, std::vector<BpeSymbol>& sym, PairScore&& pair_score, OnMerge&& on_merge) {
  struct Bigram {
    float score;
    int32_t left, right;
    uint32_t size;
  };
  const auto less = [](const Bigram& a, const Bigram& b) {
    return a.score < b.score || (a.score == b.score && a.left > b.left);
  };
  const int32_t count = static_cast<int32_t>(sym.size());
  for (int32_t i = 0; i < count; ++i) {
    sym[i].prev = i - 1;
    sym[i].next = i + 1 < count ? i + 1 : -1;
  }
  std::vector<Bigram> heap;
  auto try_add = [&](int32_t l, int32_t r) {
    if (l < 0 || r < 0 || sym[l].fixed >= 0 || sym[r].fixed >= 0) return;
    const uint32_t size = sym[l].len + sym[r].len;
    float score;
    if (!pair_score(s.substr(sym[l].start, size), &score)) return;
    heap.push_back({score, l, r, size});
    std::push_heap(heap.begin(), heap.end(), less);
  };
  for (int32_t seg = 0; seg < count;) {
    int32_t end = seg;
    while (end < count && sym[end].fixed < 0) ++end;
    heap.clear();
    for (int32_t i = seg + 1; i < end; ++i) try_add(i - 1, i);
    while (!heap.empty()) {
      std::pop_heap(heap.begin(), heap.end(), less);
      const Bigram b = heap.back();
      heap.pop_back();
      BpeSymbol& l = sym[b.left];
      BpeSymbol& r = sym[b.right];
      // Stale entry: one side was merged away or grew since it was queued.
      if (l.len == 0 || r.len == 0 || l.next != b.right || l.len + r.len != b.size) continue;
      on_merge(l.start, l.len, r.len);
      l.len += r.len;
      r.len = 0;
      l.next = r.next;
      if (r.next >= 0) sym[r.next].prev = b.left;
      try_add(l.prev, b.left);
      try_add(b.left, l.next);
    }
    seg = end + 1;  // skip the fixed symbol
  }
}

}  // namespace nibble::internal
