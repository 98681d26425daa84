// Format registry (names, sizes, bits per weight) and the row-level scalar
// references, dispatching per kind to int_format.cc, ternary_format.cc and
// binary_format.cc.
#include "kernels/formats/format.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "kernels/formats/blocks.h"
#include "kernels/formats/format_impl.h"

namespace nibble::fmt {
namespace {

constexpr uint16_t kGroups[] = {32, 64, 128};
constexpr uint8_t kIntBits[] = {8, 4, 3, 2};

std::vector<Format> BuildAllFormats() {
  std::vector<Format> all;
  for (uint8_t bits : kIntBits) {
    for (uint16_t g : kGroups) {
      for (bool sym : {false, true}) all.push_back(Format{Kind::kInt, bits, g, sym});
    }
  }
  for (uint16_t g : kGroups) all.push_back(Format{Kind::kTernary, 2, g, false});
  for (uint16_t g : kGroups) all.push_back(Format{Kind::kBinary, 1, g, false});
  for (uint16_t g : kGroups) all.push_back(Format{Kind::kBinTern, 2, g, false});
  for (uint8_t bits : {4, 3, 2}) {
    for (uint16_t g : kGroups) all.push_back(Format{Kind::kNl, bits, g, false});
  }
  return all;
}

// True for the formats AllFormats() lists (42 entries: a linear scan is fine
// at one call per row).
bool IsKnown(const Format& f) {
  const std::vector<Format>& all = AllFormats();
  return std::find(all.begin(), all.end(), f) != all.end();
}

// Decodes the first n values of one block.
void DecodeBlock(const Format& f, const uint8_t* block, int n, float* out) {
  switch (f.kind) {
    case Kind::kInt:
      DecodeIntBlock(block, f.bits, f.group, f.symmetric, n, out);
      return;
    case Kind::kTernary:
      DecodeTernaryBlock(block, n, out);
      return;
    case Kind::kBinary:
      DecodeBinaryBlock(block, n, out);
      return;
    case Kind::kBinTern:
      DecodeBinTernBlock(block, n, out);
      return;
    case Kind::kNl:
      DecodeNlBlock(block, f.bits, f.group, n, out);
      return;
  }
}

// Weights in group g of a row of `cols` columns.
int GroupSize(const Format& f, int64_t cols, int64_t g) {
  return static_cast<int>(std::min<int64_t>(f.group, cols - g * f.group));
}

}  // namespace

namespace internal {

float ClampRoundF16(float v) {
  if (v > kF16Max) v = kF16Max;
  if (v < -kF16Max) v = -kF16Max;
  return RoundToF16(v);
}

}  // namespace internal

std::string Format::Name() const {
  const std::string g = "_g" + std::to_string(group);
  switch (kind) {
    case Kind::kInt:
      return "int" + std::to_string(bits) + g + (symmetric ? "_sym" : "");
    case Kind::kTernary:
      return "ternary" + g;
    case Kind::kBinary:
      return "binary" + g;
    case Kind::kBinTern:
      return "bintern" + g;
    case Kind::kNl:
      return "nl" + std::to_string(bits) + g;
  }
  return "unknown_kind" + std::to_string(static_cast<int>(kind));
}

std::optional<Format> Format::Parse(std::string_view name) {
  // Exact match against the registry: no alternative spellings, so a stored
  // name maps to exactly one format and back.
  for (const Format& f : AllFormats()) {
    if (f.Name() == name) return f;
  }
  return std::nullopt;
}

int64_t Format::BlockBytes() const {
  if (!IsKnown(*this)) return 0;
  switch (kind) {
    case Kind::kInt:
      return IntBlockBytes(bits, group, symmetric);
    case Kind::kTernary:
      return TernaryBlockBytes(group);
    case Kind::kBinary:
      return BinaryBlockBytes(group);
    case Kind::kBinTern:
      return BinTernBlockBytes(group);
    case Kind::kNl:
      return NlBlockBytes(bits, group);
  }
  return 0;
}

double Format::BitsPerWeight(int64_t cols) const {
  if (cols <= 0) return 0.0;
  return 8.0 * static_cast<double>(RowBytes(cols)) / static_cast<double>(cols);
}

const std::vector<Format>& AllFormats() {
  static const std::vector<Format>* const all = new std::vector<Format>(BuildAllFormats());
  return *all;
}

GroupParams FitGroupRef(const Format& f, const float* w, int n, const float* importance) {
  return FitGroupRef(f, w, n, importance, kBinTernLambda);
}

GroupParams FitGroupRef(const Format& f, const float* w, int n, const float* importance,
                        float bintern_lambda) {
  if (w == nullptr || n <= 0 || !IsKnown(f)) return GroupParams{};
  n = std::min<int>(n, f.group);
  switch (f.kind) {
    case Kind::kInt:
      return internal::FitIntGroup(f, w, n, importance);
    case Kind::kTernary:
      return internal::FitTernaryGroup(w, n, importance);
    case Kind::kBinary:
      return internal::FitBinaryGroup(w, n, importance);
    case Kind::kBinTern:
      return internal::FitBinTernGroup(w, n, importance, bintern_lambda);
    case Kind::kNl:
      return internal::FitNlGroup(f, w, n, importance);
  }
  return GroupParams{};
}

float QuantizeValueRef(const Format& f, const GroupParams& p, float w) {
  switch (f.kind) {
    case Kind::kInt:
      return internal::QuantizeIntValue(f, p, w);
    case Kind::kTernary:
      return internal::QuantizeTernaryValue(p, w);
    case Kind::kBinary:
      return internal::QuantizeBinaryValue(p, w);
    case Kind::kBinTern:
      return internal::QuantizeBinTernValue(p, w);
    case Kind::kNl:
      return internal::QuantizeNlValue(f, p, w);
  }
  return 0.0f;
}

void PackGroupRef(const Format& f, const GroupParams& p, const float* w, int n, uint8_t* block) {
  if (block == nullptr || !IsKnown(f)) return;
  std::memset(block, 0, static_cast<size_t>(f.BlockBytes()));
  if (w == nullptr) n = 0;
  n = std::clamp<int>(n, 0, f.group);
  switch (f.kind) {
    case Kind::kInt:
      internal::PackIntGroup(f, p, w, n, block);
      return;
    case Kind::kTernary:
      internal::PackTernaryGroup(f, p, w, n, block);
      return;
    case Kind::kBinary:
      internal::PackBinaryGroup(f, p, w, n, block);
      return;
    case Kind::kBinTern:
      internal::PackBinTernGroup(f, p, w, n, block);
      return;
    case Kind::kNl:
      internal::PackNlGroup(f, p, w, n, block);
      return;
  }
}

void QuantizeRowRef(const Format& f, const float* w, int64_t cols, const float* importance, uint8_t* out) {
  QuantizeRowRef(f, w, cols, importance, out, kBinTernLambda);
}

void QuantizeRowRef(const Format& f, const float* w, int64_t cols, const float* importance, uint8_t* out,
                    float bintern_lambda) {
  if (cols <= 0 || !IsKnown(f)) return;
  const int64_t block_bytes = f.BlockBytes();
  for (int64_t g = 0; g < f.BlocksPerRow(cols); ++g) {
    const int64_t off = g * f.group;
    const int n = GroupSize(f, cols, g);
    const float* imp = importance ? importance + off : nullptr;
    const GroupParams p = FitGroupRef(f, w + off, n, imp, bintern_lambda);
    PackGroupRef(f, p, w + off, n, out + g * block_bytes);
  }
}

void DequantizeRowRef(const Format& f, const uint8_t* row, int64_t cols, float* out) {
  if (cols <= 0 || !IsKnown(f)) return;
  const int64_t block_bytes = f.BlockBytes();
  for (int64_t g = 0; g < f.BlocksPerRow(cols); ++g) {
    DecodeBlock(f, row + g * block_bytes, GroupSize(f, cols, g), out + g * f.group);
  }
}

float DotRowRef(const Format& f, const uint8_t* row, const float* x, int64_t cols) {
  if (cols <= 0 || !IsKnown(f)) return 0.0f;
  const int64_t block_bytes = f.BlockBytes();
  float v[kMaxGroup];
  float total = 0.0f;
  for (int64_t g = 0; g < f.BlocksPerRow(cols); ++g) {
    const int n = GroupSize(f, cols, g);
    DecodeBlock(f, row + g * block_bytes, n, v);
    const float* xg = x + g * f.group;
    float acc = 0.0f;
    for (int i = 0; i < n; ++i) acc += v[i] * xg[i];
    total += acc;
  }
  return total;
}

double EffectiveBitsRef(const Format& f, const uint8_t* row, int64_t cols) {
  if (cols <= 0) return 0.0;
  if (f.kind != Kind::kBinTern || !IsKnown(f)) return f.BitsPerWeight(cols);
  const int64_t block_bytes = f.BlockBytes();
  double bits = 0.0;
  for (int64_t g = 0; g < f.BlocksPerRow(cols); ++g) {
    const bool ternary = BinTernIsTernary(row + g * block_bytes);
    bits += 16.0 + 1.0 + static_cast<double>(f.group) * (ternary ? 2.0 : 1.0);
  }
  return bits / static_cast<double>(cols);
}

}  // namespace nibble::fmt
