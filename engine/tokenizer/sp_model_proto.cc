#include "engine/tokenizer/sp_model_proto.h"

#include <cstring>

#include "absl/strings/str_cat.h"
#include "engine/tokenizer/tokenizer_impl.h"

namespace nibble::internal {
namespace {

enum WireType : uint32_t { kVarint = 0, kFixed64 = 1, kLen = 2, kFixed32 = 5 };

// A bounds-checked cursor over one message's bytes.
class Wire {
 public:
  explicit Wire(std::string_view b) : p_(b.data()), end_(b.data() + b.size()) {}
  bool done() const { return p_ == end_; }

  bool Varint(uint64_t* v) {
    uint64_t r = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      if (p_ == end_) return false;
      const uint8_t b = static_cast<uint8_t>(*p_++);
      r |= static_cast<uint64_t>(b & 0x7F) << shift;
      if ((b & 0x80) == 0) {
        *v = r;
        return true;
      }
    }
    return false;  // more than 10 bytes
  }
  bool Fixed32(uint32_t* v) {
    if (end_ - p_ < 4) return false;
    uint8_t b[4];
    std::memcpy(b, p_, 4);
    *v = static_cast<uint32_t>(b[0]) | static_cast<uint32_t>(b[1]) << 8 | static_cast<uint32_t>(b[2]) << 16 |
         static_cast<uint32_t>(b[3]) << 24;
    p_ += 4;
    return true;
  }
  bool Bytes(std::string_view* v) {
    uint64_t n;
    if (!Varint(&n) || n > static_cast<uint64_t>(end_ - p_)) return false;
    *v = std::string_view(p_, n);
    p_ += n;
    return true;
  }
  // Reads a tag; false at a malformed tag.
  bool Tag(uint32_t* field, uint32_t* type) {
    uint64_t t;
    if (!Varint(&t) || (t >> 3) == 0 || (t >> 3) > 0x1FFFFFFF) return false;
    *field = static_cast<uint32_t>(t >> 3);
    *type = static_cast<uint32_t>(t & 7);
    return true;
  }
  bool Skip(uint32_t type) {
    uint64_t v = 0;
    uint32_t f;
    std::string_view s;
    switch (type) {
      case kVarint: return Varint(&v);
      case kFixed64:
        if (end_ - p_ < 8) return false;
        p_ += 8;
        return true;
      case kLen: return Bytes(&s);
      case kFixed32: return Fixed32(&f);
      default: return false;  // groups (3, 4) and reserved types
    }
  }

 private:
  const char* p_;
  const char* end_;
};

absl::Status Bad(std::string_view where, std::string_view what) {
  return absl::InvalidArgumentError(
      absl::StrCat("ModelProto", where.empty() ? "" : ".", AsAbsl(where), ": ", AsAbsl(what)));
}

// Reads a field of the expected wire type into one of the typed outputs.
struct Field {
  Wire* w;
  uint32_t type;
  std::string where;

  absl::Status Int(int64_t* out) {
    uint64_t v = 0;
    if (type != kVarint) return Bad(where, "wrong wire type");
    if (!w->Varint(&v)) return Bad(where, "truncated varint");
    *out = static_cast<int64_t>(v);
    return absl::OkStatus();
  }
  absl::Status Int32(int32_t* out) {
    int64_t v = 0;
    if (absl::Status s = Int(&v); !s.ok()) return s;
    if (v < INT32_MIN || v > INT32_MAX) return Bad(where, "out of int32 range");
    *out = static_cast<int32_t>(v);
    return absl::OkStatus();
  }
  absl::Status Bool(bool* out) {
    int64_t v = 0;
    if (absl::Status s = Int(&v); !s.ok()) return s;
    *out = v != 0;
    return absl::OkStatus();
  }
  absl::Status Float(float* out) {
    uint32_t v = 0;
    if (type != kFixed32) return Bad(where, "wrong wire type");
    if (!w->Fixed32(&v)) return Bad(where, "truncated");
    std::memcpy(out, &v, 4);
    return absl::OkStatus();
  }
  absl::Status Bytes(std::string_view* out) {
    if (type != kLen) return Bad(where, "wrong wire type");
    if (!w->Bytes(out)) return Bad(where, "truncated or bad length");
    return absl::OkStatus();
  }
  absl::Status String(std::string* out) {
    std::string_view v;
    if (absl::Status s = Bytes(&v); !s.ok()) return s;
    out->assign(v);
    return absl::OkStatus();
  }
};

// Calls fn(field_number, Field&) for each field of the message `bytes`;
// fn returns OK after consuming the field, or NOT_FOUND to have it skipped.
template <typename Fn>
absl::Status ForEachField(std::string_view bytes, std::string_view where, Fn&& fn) {
  Wire w(bytes);
  while (!w.done()) {
    uint32_t number, type;
    if (!w.Tag(&number, &type)) return Bad(where, "malformed field tag");
    Field f{&w, type, where.empty() ? absl::StrCat(number) : absl::StrCat(AsAbsl(where), ".", number)};
    absl::Status s = fn(number, f);
    if (absl::IsNotFound(s)) {
      if (!w.Skip(type)) return Bad(f.where, "truncated or unsupported wire type");
    } else if (!s.ok()) {
      return s;
    }
  }
  return absl::OkStatus();
}

absl::Status ParsePiece(std::string_view bytes, std::string_view where, SpPiece* p) {
  return ForEachField(bytes, where, [&](uint32_t n, Field& f) -> absl::Status {
    switch (n) {
      case 1: f.where = absl::StrCat(AsAbsl(where), ".piece"); return f.String(&p->piece);
      case 2: f.where = absl::StrCat(AsAbsl(where), ".score"); return f.Float(&p->score);
      case 3: {
        f.where = absl::StrCat(AsAbsl(where), ".type");
        int32_t t = 0;
        if (absl::Status s = f.Int32(&t); !s.ok()) return s;
        if (t < 1 || t > 6) return Bad(f.where, absl::StrCat("unknown piece type ", t));
        p->type = static_cast<SpPieceType>(t);
        return absl::OkStatus();
      }
      default: return absl::NotFoundError("");
    }
  });
}

absl::Status ParseTrainer(std::string_view bytes, SpModelProto* m) {
  return ForEachField(bytes, "trainer_spec", [&](uint32_t n, Field& f) -> absl::Status {
    switch (n) {
      case 3: {
        int32_t t = 0;
        if (absl::Status s = f.Int32(&t); !s.ok()) return s;
        if (t < 1 || t > 4) return Bad(f.where, absl::StrCat("unknown model_type ", t));
        m->model_type = static_cast<SpModelType>(t);
        return absl::OkStatus();
      }
      case 24: return f.Bool(&m->treat_whitespace_as_suffix);
      case 35: return f.Bool(&m->byte_fallback);
      case 40: return f.Int32(&m->unk_id);
      case 41: return f.Int32(&m->bos_id);
      case 42: return f.Int32(&m->eos_id);
      case 43: return f.Int32(&m->pad_id);
      case 45: return f.String(&m->unk_piece);
      case 46: return f.String(&m->bos_piece);
      case 47: return f.String(&m->eos_piece);
      case 48: return f.String(&m->pad_piece);
      default: return absl::NotFoundError("");
    }
  });
}

absl::Status ParseNormalizer(std::string_view bytes, SpModelProto* m) {
  return ForEachField(bytes, "normalizer_spec", [&](uint32_t n, Field& f) -> absl::Status {
    switch (n) {
      case 1: return f.String(&m->normalizer_name);
      case 2: return f.String(&m->precompiled_charsmap);
      case 3: return f.Bool(&m->add_dummy_prefix);
      case 4: return f.Bool(&m->remove_extra_whitespaces);
      case 5: return f.Bool(&m->escape_whitespaces);
      default: return absl::NotFoundError("");
    }
  });
}

}  // namespace

absl::StatusOr<SpModelProto> ParseSpModelProto(std::string_view bytes) {
  SpModelProto m;
  absl::Status s = ForEachField(bytes, "", [&](uint32_t n, Field& f) -> absl::Status {
    std::string_view sub;
    switch (n) {
      case 1: {
        const std::string where = absl::StrCat("pieces[", m.pieces.size(), "]");
        f.where = where;
        if (absl::Status st = f.Bytes(&sub); !st.ok()) return st;
        return ParsePiece(sub, where, &m.pieces.emplace_back());
      }
      case 2:
        f.where = "trainer_spec";
        if (absl::Status st = f.Bytes(&sub); !st.ok()) return st;
        return ParseTrainer(sub, &m);
      case 3:
        f.where = "normalizer_spec";
        if (absl::Status st = f.Bytes(&sub); !st.ok()) return st;
        return ParseNormalizer(sub, &m);
      default: return absl::NotFoundError("");
    }
  });
  if (!s.ok()) return s;
  if (m.pieces.empty()) return Bad("pieces", "the model has no pieces");
  return m;
}

}  // namespace nibble::internal
