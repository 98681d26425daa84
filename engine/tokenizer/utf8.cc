#include "engine/tokenizer/utf8.h"

namespace nibble::utf8 {

SeqResult NextSequence(std::string_view s) {
  const auto b0 = static_cast<uint8_t>(s[0]);
  if (b0 < 0x80) return {SeqKind::kComplete, 1, b0};
  size_t need;
  uint32_t cp;
  uint8_t lo = 0x80, hi = 0xBF;  // allowed range of the second byte
  if (b0 >= 0xC2 && b0 <= 0xDF) {
    need = 2;
    cp = b0 & 0x1F;
  } else if (b0 >= 0xE0 && b0 <= 0xEF) {
    need = 3;
    cp = b0 & 0x0F;
    if (b0 == 0xE0) lo = 0xA0;  // no overlongs
    if (b0 == 0xED) hi = 0x9F;  // no surrogates
  } else if (b0 >= 0xF0 && b0 <= 0xF4) {
    need = 4;
    cp = b0 & 0x07;
    if (b0 == 0xF0) lo = 0x90;  // no overlongs
    if (b0 == 0xF4) hi = 0x8F;  // nothing above U+10FFFF
  } else {
    return {SeqKind::kInvalid, 1, 0};  // continuation byte, C0, C1, F5..FF
  }
  for (size_t i = 1; i < need; ++i) {
    if (i >= s.size()) return {SeqKind::kIncomplete, i, 0};
    const auto b = static_cast<uint8_t>(s[i]);
    const uint8_t l = (i == 1) ? lo : 0x80;
    const uint8_t h = (i == 1) ? hi : 0xBF;
    if (b < l || b > h) return {SeqKind::kInvalid, i, 0};
    cp = (cp << 6) | (b & 0x3F);
  }
  return {SeqKind::kComplete, need, cp};
}

std::string Sanitize(std::string_view s, bool per_byte) {
  std::string out;
  out.reserve(s.size());
  size_t i = 0;
  while (i < s.size()) {
    SeqResult r = NextSequence(s.substr(i));
    if (r.kind == SeqKind::kComplete) {
      out.append(s.substr(i, r.length));
    } else {
      for (size_t k = 0; k < (per_byte ? r.length : 1); ++k) out.append(kReplacement);
    }
    i += r.length;
  }
  return out;
}

bool IsValid(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    SeqResult r = NextSequence(s.substr(i));
    if (r.kind != SeqKind::kComplete) return false;
    i += r.length;
  }
  return true;
}

void Append(uint32_t cp, std::string* out) {
  if (cp < 0x80) {
    out->push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

}  // namespace nibble::utf8
