#include "engine/tokenizer/sp_processor.h"

#include <algorithm>
#include <cfloat>
#include <functional>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "engine/tokenizer/bpe_merge.h"
#include "engine/tokenizer/tokenizer_impl.h"
#include "engine/tokenizer/utf8.h"

namespace nibble::internal {
namespace {

constexpr float kUnkPenalty = 10.0f;  // unigram: unknown score = min_score - 10

size_t CharLen(std::string_view s, size_t pos) {
  return std::min(utf8::LeadLength(static_cast<uint8_t>(s[pos])), s.size() - pos);
}

}  // namespace

absl::StatusOr<std::unique_ptr<SpProcessor>> SpProcessor::FromBytes(std::string bytes) {
  auto proto = ParseSpModelProto(bytes);
  if (!proto.ok()) return proto.status();
  std::unique_ptr<SpProcessor> p(new SpProcessor());
  p->bytes_ = std::move(bytes);
  p->model_ = std::move(*proto);
  const SpModelProto& m = p->model_;
  if (m.model_type == SpModelType::kWord) {
    return absl::UnimplementedError("trainer_spec.model_type: WORD models are not supported");
  }
  if (m.treat_whitespace_as_suffix) {
    return absl::UnimplementedError("trainer_spec.treat_whitespace_as_suffix is not supported");
  }
  auto norm = SpNormalizer::Create(m.precompiled_charsmap, {.add_dummy_prefix = m.add_dummy_prefix,
                                                            .remove_extra_whitespaces = m.remove_extra_whitespaces,
                                                            .escape_whitespaces = m.escape_whitespaces});
  if (!norm.ok()) return norm.status();
  p->normalizer_ = std::move(*norm);

  std::fill(std::begin(p->byte_ids_), std::end(p->byte_ids_), -1);
  p->min_score_ = FLT_MAX;
  p->max_score_ = FLT_MIN;  // as the library: FLT_MIN, the smallest positive float
  for (int i = 0; i < p->size(); ++i) {
    const SpPiece& sp = m.pieces[i];
    const bool segmentable = sp.type == SpPieceType::kNormal || sp.type == SpPieceType::kUserDefined ||
                             sp.type == SpPieceType::kUnused;
    if (sp.piece.empty()) return absl::InvalidArgumentError(absl::StrCat("ModelProto.pieces[", i, "]: empty piece"));
    auto& map = segmentable ? p->segment_ids_ : p->reserved_ids_;
    if (!map.try_emplace(sp.piece, i).second) {
      return absl::InvalidArgumentError(absl::StrCat("ModelProto.pieces[", i, "]: piece \"", sp.piece,
                                                     "\" is already defined"));
    }
    if (sp.type == SpPieceType::kUnknown) {
      if (p->model_unk_ >= 0) {
        return absl::InvalidArgumentError(absl::StrCat("ModelProto.pieces[", i, "]: a second unknown piece"));
      }
      p->model_unk_ = i;
    }
    if (sp.type == SpPieceType::kByte) {
      uint8_t b;
      if (!m.byte_fallback) {
        return absl::InvalidArgumentError(absl::StrCat("ModelProto.pieces[", i, "]: byte piece \"", sp.piece,
                                                       "\" but trainer_spec.byte_fallback is false"));
      }
      if (!ParseBytePiece(sp.piece, &b)) {
        return absl::InvalidArgumentError(absl::StrCat("ModelProto.pieces[", i, "]: byte piece \"", sp.piece,
                                                       "\" is not of the form <0xXX>"));
      }
      p->byte_ids_[b] = i;
    }
    if (sp.type == SpPieceType::kNormal) {
      p->min_score_ = std::min(p->min_score_, sp.score);
      p->max_score_ = std::max(p->max_score_, sp.score);
    }
    if (segmentable && sp.type != SpPieceType::kUnused) {
      for (size_t k = 0; k < sp.piece.size();) {
        k += CharLen(sp.piece, k);
        if (k < sp.piece.size()) p->prefixes_.insert(sp.piece.substr(0, k));
      }
    }
  }
  if (p->model_unk_ < 0) return absl::InvalidArgumentError("ModelProto.pieces: no unknown (<unk>) piece");
  if (m.byte_fallback) {
    for (int b = 0; b < 256; ++b) {
      if (p->byte_ids_[b] < 0) {
        return absl::InvalidArgumentError(
            absl::StrFormat("ModelProto.pieces: byte_fallback is set but piece <0x%02X> is missing", b));
      }
    }
  }
  auto special = [&](const std::string& piece, SpPieceType type) {
    const int id = p->PieceToId(piece);
    return id >= 0 && p->Type(id) == type ? id : -1;
  };
  p->unk_id_ = special(m.unk_piece, SpPieceType::kUnknown);
  p->bos_id_ = special(m.bos_piece, SpPieceType::kControl);
  p->eos_id_ = special(m.eos_piece, SpPieceType::kControl);
  p->pad_id_ = special(m.pad_piece, SpPieceType::kControl);
  return p;
}

int SpProcessor::PieceToId(std::string_view piece) const {
  if (auto it = reserved_ids_.find(AsAbsl(piece)); it != reserved_ids_.end()) return it->second;
  if (auto it = segment_ids_.find(AsAbsl(piece)); it != segment_ids_.end()) return it->second;
  return -1;
}

int SpProcessor::SegmentId(std::string_view s) const {
  auto it = segment_ids_.find(AsAbsl(s));
  return it == segment_ids_.end() ? -1 : it->second;
}

std::vector<int> SpProcessor::Encode(std::string_view text) const {
  const std::string norm = normalizer_.Normalize(text);
  std::vector<Span> spans;
  switch (model_.model_type) {
    case SpModelType::kBpe: SegmentBpe(norm, &spans); break;
    case SpModelType::kChar: SegmentChar(norm, &spans); break;
    default: SegmentUnigram(norm, &spans); break;
  }
  std::vector<int> ids;
  ids.reserve(spans.size());
  bool prev_unk = false;
  for (const Span& sp : spans) {
    const bool unk = sp.id == model_unk_;
    if (unk && model_.byte_fallback) {
      for (uint32_t i = 0; i < sp.len; ++i) ids.push_back(byte_ids_[static_cast<uint8_t>(norm[sp.start + i])]);
    } else if (!(unk && prev_unk)) {  // a run of unknowns is one unknown
      ids.push_back(sp.id);
    }
    prev_unk = unk;
  }
  return ids;
}

void SpProcessor::SegmentBpe(std::string_view s, std::vector<Span>* out) const {
  std::vector<BpeSymbol> sym;
  sym.reserve(s.size());
  for (size_t pos = 0; pos < s.size();) {
    const size_t n = CharLen(s, pos);
    sym.push_back({.start = static_cast<uint32_t>(pos), .len = static_cast<uint32_t>(n)});
    pos += n;
  }
  // Unused pieces take part in merges but are split back at the end into the
  // two pieces that formed them (left length recorded per merged text).
  absl::flat_hash_map<std::string, uint32_t> unused_splits;
  BpeMerge(
      s, sym,
      [&](std::string_view piece, float* score) {
        const int id = SegmentId(piece);
        if (id < 0) return false;
        *score = Score(id);
        return true;
      },
      [&](uint32_t start, uint32_t left, uint32_t right) {
        const std::string_view merged = s.substr(start, left + right);
        const int id = SegmentId(merged);
        if (id >= 0 && IsUnused(id)) unused_splits[AsAbsl(merged)] = left;
      });
  const std::function<void(uint32_t, uint32_t)> emit = [&](uint32_t start, uint32_t len) {
    const std::string_view w = s.substr(start, len);
    const int id = SegmentId(w);
    if (id >= 0 && IsUnused(id)) {
      if (auto it = unused_splits.find(AsAbsl(w)); it != unused_splits.end()) {
        emit(start, it->second);
        emit(start + it->second, len - it->second);
        return;
      }
    }
    out->push_back({start, len, id >= 0 ? id : model_unk_});
  };
  for (int32_t i = sym.empty() ? -1 : 0; i >= 0; i = sym[i].next) emit(sym[i].start, sym[i].len);
}

void SpProcessor::SegmentUnigram(std::string_view s, std::vector<Span>* out) const {
  struct Best {
    float score = 0.0f;
    int32_t start = -1;  // -1: not reached
    int32_t id = -1;
  };
  const size_t n = s.size();
  std::vector<Best> best(n + 1);
  best[0].start = 0;
  auto relax = [&](size_t from, size_t to, int id, float score) {
    const float cand = best[from].score + score;
    if (best[to].start < 0 || cand > best[to].score) best[to] = {cand, static_cast<int32_t>(from), id};
  };
  const float unk_score = min_score_ - kUnkPenalty;
  for (size_t pos = 0; pos < n; pos += CharLen(s, pos)) {
    if (best[pos].start < 0) continue;  // unreachable (cannot happen: unknown nodes cover every char)
    const size_t first = CharLen(s, pos);
    bool single = false;
    size_t len = 0, chars = 0;
    while (pos + len < n) {
      len += CharLen(s, pos + len);
      ++chars;
      const std::string_view sub = s.substr(pos, len);
      const int id = SegmentId(sub);
      if (id >= 0 && !IsUnused(id)) {
        const float score = IsUserDefined(id) ? static_cast<float>(chars) * max_score_ - 0.1f : Score(id);
        relax(pos, pos + len, id, score);
        if (len == first) single = true;
      }
      if (!prefixes_.contains(AsAbsl(sub))) break;
    }
    if (!single) relax(pos, pos + first, model_unk_, unk_score);
  }
  std::vector<Span> rev;
  for (size_t pos = n; pos > 0;) {
    const Best& b = best[pos];
    rev.push_back({static_cast<uint32_t>(b.start), static_cast<uint32_t>(pos - b.start), b.id});
    pos = static_cast<size_t>(b.start);
  }
  out->assign(rev.rbegin(), rev.rend());
}

void SpProcessor::SegmentChar(std::string_view s, std::vector<Span>* out) const {
  for (size_t pos = 0; pos < s.size();) {
    const size_t n = CharLen(s, pos);
    const int id = SegmentId(s.substr(pos, n));
    out->push_back({static_cast<uint32_t>(pos), static_cast<uint32_t>(n), id >= 0 ? id : model_unk_});
    pos += n;
  }
}

}  // namespace nibble::internal
