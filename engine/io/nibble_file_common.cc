// Shared pieces of the nibble model file: CRC32C, the header encoding, enum
// spellings and the consistency rules (see nibble_file_internal.h).
#include <bit>
#include <cstring>
#include <limits>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "engine/io/nibble_file.h"
#include "engine/io/nibble_file_internal.h"

#if defined(__x86_64__)
#include <nmmintrin.h>
#endif

namespace nibble::io {
namespace {

static_assert(std::endian::native == std::endian::little, "nibble files are little-endian; so is this code");

struct CrcTables {
  uint32_t t[8][256];
};

constexpr CrcTables MakeCrcTables() {
  CrcTables tab{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = (c >> 1) ^ (0x82F63B78u & (0u - (c & 1u)));
    tab.t[0][i] = c;
  }
  for (int s = 1; s < 8; ++s) {
    for (int i = 0; i < 256; ++i) tab.t[s][i] = (tab.t[s - 1][i] >> 8) ^ tab.t[0][tab.t[s - 1][i] & 0xffu];
  }
  return tab;
}

constexpr CrcTables kCrc = MakeCrcTables();

#if defined(__x86_64__)
__attribute__((target("sse4.2"))) uint32_t Crc32cSse42(const uint8_t* p, size_t n, uint32_t crc) {
  uint64_t c = ~crc;
  for (; n > 0 && (reinterpret_cast<uintptr_t>(p) & 7u) != 0; --n) c = _mm_crc32_u8(static_cast<uint32_t>(c), *p++);
  for (; n >= 8; n -= 8, p += 8) {
    uint64_t v;
    std::memcpy(&v, p, 8);
    c = _mm_crc32_u64(c, v);
  }
  for (; n > 0; --n) c = _mm_crc32_u8(static_cast<uint32_t>(c), *p++);
  return ~static_cast<uint32_t>(c);
}

bool HaveSse42() {
  static const bool have = __builtin_cpu_supports("sse4.2");
  return have;
}
#endif

}  // namespace

uint32_t Crc32cPortable(const void* data, size_t n, uint32_t crc) {
  const auto* p = static_cast<const uint8_t*>(data);
  const auto& t = kCrc.t;
  uint32_t c = ~crc;
  for (; n >= 8; n -= 8, p += 8) {
    uint32_t lo, hi;
    std::memcpy(&lo, p, 4);
    std::memcpy(&hi, p + 4, 4);
    lo ^= c;
    c = t[7][lo & 0xffu] ^ t[6][(lo >> 8) & 0xffu] ^ t[5][(lo >> 16) & 0xffu] ^ t[4][lo >> 24] ^ t[3][hi & 0xffu] ^
        t[2][(hi >> 8) & 0xffu] ^ t[1][(hi >> 16) & 0xffu] ^ t[0][hi >> 24];
  }
  for (; n > 0; --n) c = t[0][(c ^ *p++) & 0xffu] ^ (c >> 8);
  return ~c;
}

uint32_t Crc32c(const void* data, size_t n, uint32_t crc) {
#if defined(__x86_64__)
  if (HaveSse42()) return Crc32cSse42(static_cast<const uint8_t*>(data), n, crc);
#endif
  return Crc32cPortable(data, n, crc);
}

bool LooksLikeNibbleFile(const uint8_t* head, size_t n) { return n >= 4 && std::memcmp(head, kNibbleMagic, 4) == 0; }

namespace nbl {
namespace {

template <typename T>
void Put(std::string& s, size_t off, T v) {
  std::memcpy(s.data() + off, &v, sizeof(T));
}

}  // namespace

std::string EncodeHeader(const Header& h) {
  std::string s(kNibbleHeaderSize, '\0');
  std::memcpy(s.data(), kNibbleMagic, 4);
  Put(s, kOffVersion, h.version);
  Put(s, kOffJsonOffset, h.json_offset);
  Put(s, kOffJsonLength, h.json_length);
  Put(s, kOffDataOffset, h.data_offset);
  Put(s, kOffDataLength, h.data_length);
  Put(s, kOffJsonCrc, h.json_crc32c);
  Put(s, kOffFlags, h.flags);
  Put(s, kOffHeaderCrc, Crc32c(s.data(), kOffHeaderCrc));
  return s;
}

const char* RopeStyleName(RopeStyle s) { return s == RopeStyle::kHalf ? "half" : "interleaved"; }

std::optional<RopeStyle> ParseRopeStyle(std::string_view s) {
  if (s == "interleaved") return RopeStyle::kInterleaved;
  if (s == "half") return RopeStyle::kHalf;
  return std::nullopt;
}

const char* TokenizerKindName(TokenizerKind k) {
  switch (k) {
    case TokenizerKind::kNone:
      return "none";
    case TokenizerKind::kSpmScores:
      return "spm_scores";
    case TokenizerKind::kGpt2Bpe:
      return "gpt2_bpe";
    case TokenizerKind::kSentencePieceModel:
      return "sentencepiece_model";
  }
  return "?";
}

std::optional<TokenizerKind> ParseTokenizerKind(std::string_view s) {
  for (TokenizerKind k :
       {TokenizerKind::kNone, TokenizerKind::kSpmScores, TokenizerKind::kGpt2Bpe, TokenizerKind::kSentencePieceModel}) {
    if (s == TokenizerKindName(k)) return k;
  }
  return std::nullopt;
}

const char* SidecarTypeName(Sidecar::ValueType t) {
  switch (t) {
    case Sidecar::ValueType::kNone:
      return "none";
    case Sidecar::ValueType::kF16:
      return "f16";
    case Sidecar::ValueType::kI8:
      return "i8";
  }
  return "?";
}

std::optional<Sidecar::ValueType> ParseSidecarType(std::string_view s) {
  for (Sidecar::ValueType t : {Sidecar::ValueType::kNone, Sidecar::ValueType::kF16, Sidecar::ValueType::kI8}) {
    if (s == SidecarTypeName(t)) return t;
  }
  return std::nullopt;
}

absl::Status ValidateVocab(const VocabSpec& v, int vocab_size, const std::string& path) {
  auto bad = [&](const std::string& what) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": tokenizer: ", what));
  };
  if (!ParseTokenizerKind(TokenizerKindName(v.kind))) {
    return bad(absl::StrCat("unknown tokenizer kind ", static_cast<int>(v.kind)));
  }
  const size_t n = v.tokens.size();
  if (n != 0 && n != static_cast<size_t>(vocab_size)) {
    return bad(absl::StrCat("has ", n, " tokens but config.vocab_size is ", vocab_size));
  }
  if (!v.scores.empty() && v.scores.size() != n) {
    return bad(absl::StrCat("has ", v.scores.size(), " scores for ", n, " tokens"));
  }
  if (!v.token_types.empty() && v.token_types.size() != n) {
    return bad(absl::StrCat("has ", v.token_types.size(), " token types for ", n, " tokens"));
  }
  for (size_t i = 0; i < v.token_types.size(); ++i) {
    const auto t = static_cast<int32_t>(v.token_types[i]);
    if (t < 0 || t > static_cast<int32_t>(TokenType::kByte)) {
      return bad(absl::StrCat("token ", i, " has unknown token type ", t));
    }
  }
  for (auto [name, id] : {std::pair{"bos_id", v.bos_id}, std::pair{"eos_id", v.eos_id}, std::pair{"unk_id", v.unk_id},
                          std::pair{"pad_id", v.pad_id}}) {
    if (id < -1 || id >= vocab_size) {
      return bad(absl::StrCat(name, " = ", id, " is outside [-1, ", vocab_size, ")"));
    }
  }
  for (int32_t id : v.eog_ids) {
    if (id < 0 || id >= vocab_size) return bad(absl::StrCat("eog id ", id, " is outside [0, ", vocab_size, ")"));
  }
  return absl::OkStatus();
}

absl::Status ValidateQuant(const QuantTensor& q, int64_t rows, int64_t cols, const std::string& name,
                           const std::string& path) {
  auto bad = [&](const std::string& what) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": tensor '", name, "': ", what));
  };
  if (rows <= 0 || cols <= 0 || q.rows != rows || q.cols != cols) {
    return bad(absl::StrCat("quantized matrix is [", q.rows, ", ", q.cols, "] but the tensor shape is [", rows, ", ",
                            cols, "]"));
  }
  if (q.segments.empty()) return bad("quantized tensor has no segments");
  int64_t next = 0;
  for (size_t i = 0; i < q.segments.size(); ++i) {
    const QuantSegment& s = q.segments[i];
    const std::string seg = absl::StrCat("segment ", i, ": ");
    if (s.row_begin != next || s.row_end <= s.row_begin || s.row_end > rows) {
      return bad(absl::StrCat(seg, "rows [", s.row_begin, ", ", s.row_end, ") do not continue at row ", next,
                              " within ", rows, " rows (segments must cover the rows in order)"));
    }
    next = s.row_end;
    const std::string fname = s.format.Name();
    const auto parsed = fmt::Format::Parse(fname);
    if (!parsed || !(*parsed == s.format) || s.format.group == 0) {
      return bad(absl::StrCat(seg, "invalid format (kind ", static_cast<int>(s.format.kind), ", bits ", s.format.bits,
                              ", group ", s.format.group, ", name '", fname, "')"));
    }
    const int64_t row_bytes = s.format.RowBytes(cols);
    const int64_t n_rows = s.row_end - s.row_begin;
    if (row_bytes <= 0 || n_rows > std::numeric_limits<int64_t>::max() / row_bytes ||
        static_cast<uint64_t>(n_rows * row_bytes) != s.data.size()) {
      return bad(absl::StrCat(seg, fname, " needs ", n_rows, " x ", row_bytes, " bytes, has ", s.data.size()));
    }
  }
  if (next != rows) return bad(absl::StrCat("segments cover ", next, " of ", rows, " rows"));

  const Sidecar& sc = q.sidecar;
  const std::string scn = "side-car: ";
  if (!ParseSidecarType(SidecarTypeName(sc.type))) {
    return bad(absl::StrCat(scn, "unknown value type ", static_cast<int>(sc.type)));
  }
  const size_t nnz = sc.col.size();
  if (sc.type == Sidecar::ValueType::kNone) {
    if (!sc.row_ptr.empty() || nnz != 0 || !sc.f16.empty() || !sc.i8.empty() || !sc.row_scale.empty()) {
      return bad(scn + "type none but arrays are present");
    }
    return absl::OkStatus();
  }
  if (sc.row_ptr.size() != static_cast<uint64_t>(rows) + 1) {
    return bad(absl::StrCat(scn, "row_ptr has ", sc.row_ptr.size(), " entries, expected rows + 1 = ", rows + 1));
  }
  if (nnz > std::numeric_limits<uint32_t>::max()) return bad(absl::StrCat(scn, "nnz ", nnz, " exceeds 2^32 - 1"));
  const bool f16 = sc.type == Sidecar::ValueType::kF16;
  const size_t want_f16 = f16 ? nnz : 0, want_i8 = f16 ? 0 : nnz, want_scale = f16 ? 0 : static_cast<size_t>(rows);
  if (sc.f16.size() != want_f16 || sc.i8.size() != want_i8 || sc.row_scale.size() != want_scale) {
    return bad(absl::StrCat(scn, SidecarTypeName(sc.type), " with nnz ", nnz, " needs ", want_f16, " f16 values, ",
                            want_i8, " i8 values and ", want_scale, " row scales; has ", sc.f16.size(), ", ",
                            sc.i8.size(), " and ", sc.row_scale.size()));
  }
  if (sc.row_ptr[0] != 0) return bad(absl::StrCat(scn, "row_ptr[0] = ", sc.row_ptr[0], ", expected 0"));
  for (int64_t r = 0; r < rows; ++r) {
    if (sc.row_ptr[r + 1] < sc.row_ptr[r]) {
      return bad(
          absl::StrCat(scn, "row_ptr decreases at row ", r, " (", sc.row_ptr[r], " -> ", sc.row_ptr[r + 1], ")"));
    }
  }
  if (sc.row_ptr[rows] != nnz) {
    return bad(absl::StrCat(scn, "row_ptr[rows] = ", sc.row_ptr[rows], " but nnz = ", nnz));
  }
  for (size_t k = 0; k < nnz; ++k) {
    if (sc.col[k] >= cols) {
      return bad(absl::StrCat(scn, "entry ", k, " has column ", sc.col[k], " >= cols ", cols));
    }
  }
  return absl::OkStatus();
}

std::string Utf8Problem(std::string_view s) {
  const auto* p = reinterpret_cast<const uint8_t*>(s.data());
  const size_t n = s.size();
  size_t i = 0;
  while (i < n) {
    const uint8_t b = p[i];
    if (b < 0x80) {
      ++i;
      continue;
    }
    int len = 0;
    uint32_t cp = 0, min = 0;
    if ((b & 0xe0) == 0xc0) {
      len = 2, cp = b & 0x1fu, min = 0x80;
    } else if ((b & 0xf0) == 0xe0) {
      len = 3, cp = b & 0x0fu, min = 0x800;
    } else if ((b & 0xf8) == 0xf0) {
      len = 4, cp = b & 0x07u, min = 0x10000;
    } else {
      return absl::StrFormat("invalid UTF-8 lead byte 0x%02x at byte %d", b, i);
    }
    if (n - i < static_cast<size_t>(len)) return absl::StrFormat("truncated UTF-8 sequence at byte %d", i);
    for (int k = 1; k < len; ++k) {
      if ((p[i + k] & 0xc0) != 0x80) return absl::StrFormat("invalid UTF-8 continuation at byte %d", i + k);
      cp = cp << 6 | (p[i + k] & 0x3fu);
    }
    if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) {
      return absl::StrFormat("invalid UTF-8 code point U+%04X at byte %d", cp, i);
    }
    i += len;
  }
  return "";
}

}  // namespace nbl
}  // namespace nibble::io
