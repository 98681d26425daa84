// kGpt2Bpe: GPT-2 style byte-level BPE (GGUF tokenizer.ggml.model == "gpt2").
//
//   text -> special-token split (special_tokens.h)
//        -> invalid UTF-8 replaced by U+FFFD (one per byte, like llama.cpp)
//        -> pre-tokenizer words (gpt2_pretokenizer.h)
//        -> each word's bytes mapped to printable code points (bytes_to_unicode)
//        -> ranked merges applied lowest rank first (leftmost on ties) with a
//           priority queue, as llama.cpp's llm_tokenizer_bpe_session does
//        -> pieces looked up in the vocabulary.
// Decoding maps the code points of a piece back to bytes.
//
// llama.cpp forces add_space_prefix off for BPE vocabularies; so do we (and
// with it strip_space_after_bos), whatever the VocabSpec says.
// Non-goals: SPM-style BPE with ▁ (gemma4), WordPiece, Unigram.
#include <limits>
#include <queue>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "engine/tokenizer/gpt2_pretokenizer.h"
#include "engine/tokenizer/special_tokens.h"
#include "engine/tokenizer/tokenizer_impl.h"
#include "engine/tokenizer/utf8.h"

namespace nibble::internal {
namespace {

// GPT-2's bytes_to_unicode(): printable Latin-1 bytes stand for themselves,
// the other 68 bytes map to U+0100.. in byte order.
struct ByteMap {
  std::string byte_to_text[256];
  int16_t cp_to_byte[512];  // code point -> byte, -1 if none (all mapped cps are < 512)

  ByteMap() {
    std::fill(std::begin(cp_to_byte), std::end(cp_to_byte), int16_t{-1});
    int extra = 0;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
      const uint32_t cp = printable ? b : 256 + extra++;
      utf8::Append(cp, &byte_to_text[b]);
      cp_to_byte[cp] = static_cast<int16_t>(b);
    }
  }
};

const ByteMap& Bytes() {
  static const ByteMap* m = new ByteMap();
  return *m;
}

class Gpt2BpeTokenizer final : public Tokenizer {
 public:
  explicit Gpt2BpeTokenizer(VocabSpec spec) : Tokenizer(std::move(spec)), splitter_(spec_) {}

  absl::Status Init();

  absl::StatusOr<std::vector<int32_t>> Encode(std::string_view text,
                                              const EncodeOptions& opts) const override;
  std::string TokenBytes(int32_t id, bool special) const override;
  int32_t vocab_size() const override { return static_cast<int32_t>(spec_.tokens.size()); }
  int32_t PieceToId(std::string_view piece) const override {
    auto it = ids_.find(AsAbsl(piece));
    return it == ids_.end() ? -1 : it->second;
  }

 private:
  struct Symbol {
    uint32_t start, len;  // bytes of the byte-level encoded word; len 0 once merged away
    int32_t prev, next;
  };
  struct Bigram {
    int32_t rank;
    int32_t left, right;
    uint32_t size;
  };
  struct BigramGreater {  // min-heap on (rank, left)
    bool operator()(const Bigram& a, const Bigram& b) const {
      return a.rank > b.rank || (a.rank == b.rank && a.left > b.left);
    }
  };
  using Cache = absl::flat_hash_map<std::string, std::vector<int32_t>>;

  TokenType Type(int32_t id) const {
    return spec_.token_types.empty() ? TokenType::kNormal : spec_.token_types[id];
  }
  // BPE of one pre-tokenizer word (raw bytes); appends ids.
  void EncodeWord(std::string_view word, std::vector<int32_t>* out, std::string* scratch) const;

  SpecialTokenSplitter splitter_;
  std::unique_ptr<PreTokenizer> pre_;
  absl::flat_hash_map<std::string, int32_t> ids_;    // piece text -> first id with it
  absl::flat_hash_map<std::string, int32_t> ranks_;  // "left right" -> merge rank
};

absl::Status Gpt2BpeTokenizer::Init() {
  spec_.add_space_prefix = false;
  spec_.strip_space_after_bos = false;
  if (absl::Status s = ValidateCommon(spec_); !s.ok()) return s;
  const size_t n = spec_.tokens.size();
  if (n == 0) return absl::InvalidArgumentError("BPE vocabulary: no tokens");
  if (spec_.merges.size() > static_cast<size_t>(std::numeric_limits<int32_t>::max())) {
    return absl::InvalidArgumentError("BPE vocabulary: too many merges");
  }
  ids_.reserve(n);
  for (size_t i = 0; i < n; ++i) ids_.try_emplace(spec_.tokens[i], static_cast<int32_t>(i));
  ranks_.reserve(spec_.merges.size());
  for (size_t i = 0; i < spec_.merges.size(); ++i) {
    const std::string& m = spec_.merges[i];
    const size_t sp = m.size() > 1 ? m.find(' ', 1) : std::string::npos;
    if (sp == std::string::npos || sp + 1 >= m.size()) {
      return absl::InvalidArgumentError(
          absl::StrCat("BPE vocabulary: merge ", i, " '", m, "' is not of the form 'left right'"));
    }
    ranks_.try_emplace(m, static_cast<int32_t>(i));
  }
  auto pre = PreTokenizer::Create(spec_.pre);
  if (!pre.ok()) return pre.status();
  pre_ = std::move(*pre);
  return absl::OkStatus();
}

absl::StatusOr<std::vector<int32_t>> Gpt2BpeTokenizer::Encode(std::string_view text,
                                                              const EncodeOptions& opts) const {
  if (text.size() >= std::numeric_limits<uint32_t>::max() / 8) {
    return absl::InvalidArgumentError(absl::StrCat("text of ", text.size(), " bytes is too long to tokenize"));
  }
  std::vector<int32_t> out;
  out.reserve(text.size() / 3 + 4);
  const bool add_special = opts.add_bos;
  if (add_special && ShouldAddBos()) out.push_back(spec_.bos_id);

  Cache cache;
  std::string scratch, clean;
  std::vector<std::string_view> words;
  for (const TextFragment& f : splitter_.Split(text, opts.parse_special)) {
    if (f.token >= 0) {
      out.push_back(f.token);
      continue;
    }
    std::string_view frag = f.text;
    if (!utf8::IsValid(frag)) {
      clean = utf8::Sanitize(frag, /*per_byte=*/true);
      frag = clean;
    }
    words.clear();
    if (absl::Status s = pre_->Split(frag, &words); !s.ok()) return s;
    for (std::string_view w : words) {
      if (w.size() > 256) {  // long words are rarely repeated: skip the cache
        EncodeWord(w, &out, &scratch);
        continue;
      }
      auto it = cache.find(AsAbsl(w));
      if (it == cache.end()) {
        std::vector<int32_t> ids;
        EncodeWord(w, &ids, &scratch);
        it = cache.emplace(std::string(w), std::move(ids)).first;
      }
      out.insert(out.end(), it->second.begin(), it->second.end());
    }
  }
  if (add_special && spec_.add_eos && spec_.eos_id >= 0) out.push_back(spec_.eos_id);
  return out;
}

void Gpt2BpeTokenizer::EncodeWord(std::string_view word, std::vector<int32_t>* out,
                                  std::string* scratch) const {
  const ByteMap& bm = Bytes();
  std::string enc;
  enc.reserve(word.size() * 2);
  std::vector<Symbol> sym;
  sym.reserve(word.size());
  for (char c : word) {
    const std::string& t = bm.byte_to_text[static_cast<uint8_t>(c)];
    sym.push_back({static_cast<uint32_t>(enc.size()), static_cast<uint32_t>(t.size()), 0, 0});
    enc += t;
  }
  const std::string_view s = enc;
  if (pre_->ignore_merges()) {
    auto it = ids_.find(AsAbsl(s));
    if (it != ids_.end()) {
      out->push_back(it->second);
      return;
    }
  }
  const int32_t count = static_cast<int32_t>(sym.size());
  for (int32_t i = 0; i < count; ++i) {
    sym[i].prev = i - 1;
    sym[i].next = i + 1 < count ? i + 1 : -1;
  }

  std::priority_queue<Bigram, std::vector<Bigram>, BigramGreater> queue;
  auto try_add = [&](int32_t l, int32_t r) {
    if (l < 0 || r < 0) return;
    scratch->assign(s.substr(sym[l].start, sym[l].len));
    scratch->push_back(' ');
    scratch->append(s.substr(sym[r].start, sym[r].len));
    auto it = ranks_.find(*scratch);
    if (it == ranks_.end()) return;
    queue.push({it->second, l, r, sym[l].len + sym[r].len});
  };
  for (int32_t i = 1; i < count; ++i) try_add(i - 1, i);

  while (!queue.empty()) {
    const Bigram b = queue.top();
    queue.pop();
    Symbol& l = sym[b.left];
    Symbol& r = sym[b.right];
    // Stale entry: a side was merged away or grew; positions are contiguous,
    // so equal total size means the same text.
    if (l.len == 0 || r.len == 0 || l.next != b.right || l.len + r.len != b.size) continue;
    l.len += r.len;
    r.len = 0;
    l.next = r.next;
    if (r.next >= 0) sym[r.next].prev = b.left;
    try_add(l.prev, b.left);
    try_add(b.left, l.next);
  }

  for (int32_t i = count > 0 ? 0 : -1; i >= 0; i = sym[i].next) {
    const std::string_view piece = s.substr(sym[i].start, sym[i].len);
    auto it = ids_.find(AsAbsl(piece));
    if (it != ids_.end()) {
      out->push_back(it->second);
      continue;
    }
    // Not a token (a vocabulary missing merge results or byte characters):
    // fall back to the characters one by one, then to <unk>.
    for (size_t p = 0; p < piece.size();) {
      const size_t n = std::min(utf8::LeadLength(static_cast<uint8_t>(piece[p])), piece.size() - p);
      auto c = ids_.find(AsAbsl(piece.substr(p, n)));
      if (c != ids_.end()) {
        out->push_back(c->second);
      } else if (spec_.unk_id >= 0) {
        out->push_back(spec_.unk_id);
      }
      p += n;
    }
  }
}

std::string Gpt2BpeTokenizer::TokenBytes(int32_t id, bool special) const {
  if (id < 0 || id >= vocab_size()) return "";
  const std::string& text = spec_.tokens[id];
  switch (Type(id)) {
    case TokenType::kControl:
    case TokenType::kUnknown:
      return special ? text : "";
    case TokenType::kUserDefined:
      return text;
    case TokenType::kByte: {
      uint8_t b;
      if (ParseBytePiece(text, &b)) return std::string(1, static_cast<char>(b));
      return text;
    }
    case TokenType::kUnused:
      return "";
    default:
      break;
  }
  const ByteMap& bm = Bytes();
  std::string out;
  out.reserve(text.size());
  for (size_t i = 0; i < text.size();) {
    utf8::SeqResult r = utf8::NextSequence(std::string_view(text).substr(i));
    if (r.kind == utf8::SeqKind::kComplete && r.codepoint < 512 && bm.cp_to_byte[r.codepoint] >= 0) {
      out.push_back(static_cast<char>(bm.cp_to_byte[r.codepoint]));
    } else {
      out.append(text, i, r.length);  // not a byte-level character: keep it as is
    }
    i += r.length;
  }
  return out;
}

}  // namespace

absl::StatusOr<std::unique_ptr<Tokenizer>> CreateGpt2BpeTokenizer(VocabSpec spec) {
  auto tok = std::make_unique<Gpt2BpeTokenizer>(std::move(spec));
  if (absl::Status s = tok->Init(); !s.ok()) return s;
  return std::unique_ptr<Tokenizer>(std::move(tok));
}

}  // namespace nibble::internal
