#include "engine/io/ggml_types.h"

#include <cstring>
#include <limits>

#include "absl/strings/str_cat.h"
#include "kernels/common/fp16.h"

namespace nibble::io {
namespace {

constexpr int kQK = 256;  // super-block size of the K-quants

struct TypeEntry {
  uint32_t id;
  GgmlTypeTraits traits;
};

// Geometry from ggml's type_traits table.
constexpr TypeEntry kTypes[] = {
    {0, {"f32", 1, 4, true}},
    {1, {"f16", 1, 2, true}},
    {2, {"q4_0", 32, 2 + 16, true}},
    {3, {"q4_1", 32, 2 + 2 + 16, true}},
    {6, {"q5_0", 32, 2 + 4 + 16, true}},
    {7, {"q5_1", 32, 2 + 2 + 4 + 16, true}},
    {8, {"q8_0", 32, 2 + 32, true}},
    {9, {"q8_1", 32, 4 + 4 + 32, false}},
    {10, {"q2_K", kQK, kQK / 16 + kQK / 4 + 2 + 2, true}},
    {11, {"q3_K", kQK, kQK / 8 + kQK / 4 + 12 + 2, true}},
    {12, {"q4_K", kQK, 2 + 2 + 12 + kQK / 2, true}},
    {13, {"q5_K", kQK, 2 + 2 + 12 + kQK / 8 + kQK / 2, true}},
    {14, {"q6_K", kQK, kQK / 2 + kQK / 4 + kQK / 16 + 2, true}},
    {15, {"q8_K", kQK, 4 + kQK + kQK / 8, true}},
    {16, {"iq2_xxs", kQK, 2 + kQK / 4, false}},
    {17, {"iq2_xs", kQK, 2 + kQK / 4 + kQK / 32, false}},
    {18, {"iq3_xxs", kQK, 2 + kQK / 4 + kQK / 8, false}},
    {19, {"iq1_s", kQK, 2 + kQK / 8 + kQK / 16, false}},
    {20, {"iq4_nl", 32, 2 + 16, false}},
    {21, {"iq3_s", kQK, 2 + kQK / 4 + kQK / 8 + kQK / 32 + 4, false}},
    {22, {"iq2_s", kQK, 2 + kQK / 4 + kQK / 16, false}},
    {23, {"iq4_xs", kQK, 2 + 2 + kQK / 2 + kQK / 64, false}},
    {24, {"i8", 1, 1, false}},
    {25, {"i16", 1, 2, false}},
    {26, {"i32", 1, 4, false}},
    {27, {"i64", 1, 8, false}},
    {28, {"f64", 1, 8, false}},
    {29, {"iq1_m", kQK, kQK / 8 + kQK / 16 + kQK / 32, false}},
    {30, {"bf16", 1, 2, true}},
    {34, {"tq1_0", kQK, 2 + 4 * 13, false}},
    {35, {"tq2_0", kQK, 2 + 64, false}},
    {39, {"mxfp4", 32, 1 + 16, false}},
};

uint16_t LoadU16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
float LoadHalf(const uint8_t* p) { return Fp16ToFp32(LoadU16(p)); }

// get_scale_min_k4: the 6-bit scale and min of sub-block j (0..7) packed in
// the 12-byte `q` of a Q4_K / Q5_K block.
void ScaleMinK4(int j, const uint8_t* q, uint8_t* sc, uint8_t* m) {
  if (j < 4) {
    *sc = q[j] & 63;
    *m = q[j + 4] & 63;
  } else {
    *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
    *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

// Each function below dequantizes one block `b` to `y`.

void BlockQ4_0(const uint8_t* b, float* y) {
  const float d = LoadHalf(b);
  const uint8_t* qs = b + 2;
  for (int j = 0; j < 16; ++j) {
    y[j] = static_cast<float>((qs[j] & 0xF) - 8) * d;
    y[j + 16] = static_cast<float>((qs[j] >> 4) - 8) * d;
  }
}

void BlockQ4_1(const uint8_t* b, float* y) {
  const float d = LoadHalf(b), m = LoadHalf(b + 2);
  const uint8_t* qs = b + 4;
  for (int j = 0; j < 16; ++j) {
    y[j] = static_cast<float>(qs[j] & 0xF) * d + m;
    y[j + 16] = static_cast<float>(qs[j] >> 4) * d + m;
  }
}

void BlockQ5_0(const uint8_t* b, float* y) {
  const float d = LoadHalf(b);
  uint32_t qh;
  std::memcpy(&qh, b + 2, 4);
  const uint8_t* qs = b + 6;
  for (int j = 0; j < 16; ++j) {
    const int hi0 = ((qh >> j) & 1) << 4, hi1 = ((qh >> (j + 16)) & 1) << 4;
    y[j] = static_cast<float>(((qs[j] & 0xF) | hi0) - 16) * d;
    y[j + 16] = static_cast<float>(((qs[j] >> 4) | hi1) - 16) * d;
  }
}

void BlockQ5_1(const uint8_t* b, float* y) {
  const float d = LoadHalf(b), m = LoadHalf(b + 2);
  uint32_t qh;
  std::memcpy(&qh, b + 4, 4);
  const uint8_t* qs = b + 8;
  for (int j = 0; j < 16; ++j) {
    const int hi0 = ((qh >> j) & 1) << 4, hi1 = ((qh >> (j + 16)) & 1) << 4;
    y[j] = static_cast<float>((qs[j] & 0xF) | hi0) * d + m;
    y[j + 16] = static_cast<float>((qs[j] >> 4) | hi1) * d + m;
  }
}

void BlockQ8_0(const uint8_t* b, float* y) {
  const float d = LoadHalf(b);
  const int8_t* qs = reinterpret_cast<const int8_t*>(b + 2);
  for (int j = 0; j < 32; ++j) y[j] = static_cast<float>(qs[j]) * d;
}

// Layout: scales[16] (low nibble scale, high nibble min), qs[64], d, dmin.
void BlockQ2_K(const uint8_t* b, float* y) {
  const uint8_t* scales = b;
  const uint8_t* q = b + 16;
  const float d = LoadHalf(b + 80), dmin = LoadHalf(b + 82);
  int is = 0;
  for (int half = 0; half < 2; ++half, q += 32) {
    for (int shift = 0; shift < 8; shift += 2) {
      for (int part = 0; part < 2; ++part) {  // two 16-element groups per 32 bytes
        const uint8_t sc = scales[is++];
        const float dl = d * static_cast<float>(sc & 0xF), ml = dmin * static_cast<float>(sc >> 4);
        for (int l = 0; l < 16; ++l) *y++ = dl * static_cast<float>((q[l + 16 * part] >> shift) & 3) - ml;
      }
    }
  }
}

// Layout: hmask[32], qs[64], scales[12] (16 packed 6-bit values), d.
void BlockQ3_K(const uint8_t* b, float* y) {
  const uint8_t* hmask = b;
  const uint8_t* q = b + 32;
  const uint8_t* packed = b + 96;
  const float d = LoadHalf(b + 108);
  int8_t scales[16];
  for (int i = 0; i < 16; ++i) {
    const int low = (packed[i % 8] >> (4 * (i / 8))) & 0xF;
    const int high = (packed[8 + i % 4] >> (2 * (i / 4))) & 3;
    scales[i] = static_cast<int8_t>((low | (high << 4)) - 32);
  }
  int is = 0, bit = 0;
  for (int half = 0; half < 2; ++half, q += 32) {
    for (int shift = 0; shift < 8; shift += 2, ++bit) {
      for (int part = 0; part < 2; ++part) {
        const float dl = d * static_cast<float>(scales[is++]);
        for (int l = 16 * part; l < 16 * part + 16; ++l) {
          const int v = ((q[l] >> shift) & 3) - (((hmask[l] >> bit) & 1) ? 0 : 4);
          *y++ = dl * static_cast<float>(v);
        }
      }
    }
  }
}

// Layout: d, dmin, scales[12], qs[128].
void BlockQ4_K(const uint8_t* b, float* y) {
  const float d = LoadHalf(b), dmin = LoadHalf(b + 2);
  const uint8_t* scales = b + 4;
  const uint8_t* q = b + 16;
  for (int is = 0; is < 8; is += 2, q += 32) {
    uint8_t sc, m;
    ScaleMinK4(is, scales, &sc, &m);
    const float d1 = d * static_cast<float>(sc), m1 = dmin * static_cast<float>(m);
    ScaleMinK4(is + 1, scales, &sc, &m);
    const float d2 = d * static_cast<float>(sc), m2 = dmin * static_cast<float>(m);
    for (int l = 0; l < 32; ++l) *y++ = d1 * static_cast<float>(q[l] & 0xF) - m1;
    for (int l = 0; l < 32; ++l) *y++ = d2 * static_cast<float>(q[l] >> 4) - m2;
  }
}

// Layout: d, dmin, scales[12], qh[32], qs[128].
void BlockQ5_K(const uint8_t* b, float* y) {
  const float d = LoadHalf(b), dmin = LoadHalf(b + 2);
  const uint8_t* scales = b + 4;
  const uint8_t* qh = b + 16;
  const uint8_t* ql = b + 48;
  for (int is = 0; is < 8; is += 2, ql += 32) {
    uint8_t sc, m;
    ScaleMinK4(is, scales, &sc, &m);
    const float d1 = d * static_cast<float>(sc), m1 = dmin * static_cast<float>(m);
    ScaleMinK4(is + 1, scales, &sc, &m);
    const float d2 = d * static_cast<float>(sc), m2 = dmin * static_cast<float>(m);
    for (int l = 0; l < 32; ++l) {
      *y++ = d1 * static_cast<float>((ql[l] & 0xF) | (((qh[l] >> is) & 1) << 4)) - m1;
    }
    for (int l = 0; l < 32; ++l) {
      *y++ = d2 * static_cast<float>((ql[l] >> 4) | (((qh[l] >> (is + 1)) & 1) << 4)) - m2;
    }
  }
}

// Layout: ql[128], qh[64], int8 scales[16], d.
void BlockQ6_K(const uint8_t* b, float* y) {
  const uint8_t* ql = b;
  const uint8_t* qh = b + 128;
  const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
  const float d = LoadHalf(b + 208);
  for (int half = 0; half < 2; ++half, ql += 64, qh += 32, sc += 8, y += 128) {
    for (int l = 0; l < 32; ++l) {
      const int is = l / 16;
      const int q1 = ((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
      const int q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
      const int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
      const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
      y[l] = d * static_cast<float>(sc[is]) * static_cast<float>(q1);
      y[l + 32] = d * static_cast<float>(sc[is + 2]) * static_cast<float>(q2);
      y[l + 64] = d * static_cast<float>(sc[is + 4]) * static_cast<float>(q3);
      y[l + 96] = d * static_cast<float>(sc[is + 6]) * static_cast<float>(q4);
    }
  }
}

// Layout: float d, int8 qs[256], int16 bsums[16] (bsums unused here).
void BlockQ8_K(const uint8_t* b, float* y) {
  float d;
  std::memcpy(&d, b, 4);
  const int8_t* qs = reinterpret_cast<const int8_t*>(b + 4);
  for (int j = 0; j < kQK; ++j) y[j] = d * static_cast<float>(qs[j]);
}

using BlockFn = void (*)(const uint8_t*, float*);

BlockFn BlockFunction(GgmlType type) {
  switch (type) {
    case GgmlType::kQ4_0: return BlockQ4_0;
    case GgmlType::kQ4_1: return BlockQ4_1;
    case GgmlType::kQ5_0: return BlockQ5_0;
    case GgmlType::kQ5_1: return BlockQ5_1;
    case GgmlType::kQ8_0: return BlockQ8_0;
    case GgmlType::kQ2_K: return BlockQ2_K;
    case GgmlType::kQ3_K: return BlockQ3_K;
    case GgmlType::kQ4_K: return BlockQ4_K;
    case GgmlType::kQ5_K: return BlockQ5_K;
    case GgmlType::kQ6_K: return BlockQ6_K;
    case GgmlType::kQ8_K: return BlockQ8_K;
    default: return nullptr;
  }
}

}  // namespace

const GgmlTypeTraits* GetGgmlTypeTraits(uint32_t type) {
  for (const TypeEntry& e : kTypes) {
    if (e.id == type) return &e.traits;
  }
  return nullptr;
}

std::string GgmlTypeName(uint32_t type) {
  const GgmlTypeTraits* t = GetGgmlTypeTraits(type);
  return t ? std::string(t->name) : absl::StrCat("type#", type);
}

absl::StatusOr<uint64_t> GgmlRowBytes(GgmlType type, int64_t n) {
  const GgmlTypeTraits* t = GetGgmlTypeTraits(static_cast<uint32_t>(type));
  if (t == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat("unknown ggml type id ", static_cast<uint32_t>(type)));
  }
  if (n < 0 || n % t->block_size != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(n, " elements is not a whole number of ", t->name, " blocks of ", t->block_size));
  }
  const uint64_t blocks = static_cast<uint64_t>(n / t->block_size);
  if (blocks > std::numeric_limits<uint64_t>::max() / static_cast<uint64_t>(t->type_size)) {
    return absl::InvalidArgumentError(absl::StrCat(n, " elements of ", t->name, " overflow a 64-bit size"));
  }
  return blocks * static_cast<uint64_t>(t->type_size);
}

absl::Status DequantizeRow(GgmlType type, const void* src, float* dst, int64_t n) {
  const GgmlTypeTraits* t = GetGgmlTypeTraits(static_cast<uint32_t>(type));
  if (t == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat("unknown ggml type id ", static_cast<uint32_t>(type)));
  }
  if (!t->can_dequantize) {
    return absl::UnimplementedError(absl::StrCat("dequantizing ggml type ", t->name, " is not supported"));
  }
  if (n < 0 || n % t->block_size != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(n, " elements is not a whole number of ", t->name, " blocks of ", t->block_size));
  }
  const uint8_t* p = static_cast<const uint8_t*>(src);
  switch (type) {
    case GgmlType::kF32:
      std::memcpy(dst, p, static_cast<size_t>(n) * sizeof(float));
      return absl::OkStatus();
    case GgmlType::kF16:
      for (int64_t i = 0; i < n; ++i) dst[i] = Fp16ToFp32(LoadU16(p + 2 * i));
      return absl::OkStatus();
    case GgmlType::kBF16:
      for (int64_t i = 0; i < n; ++i) dst[i] = Bf16ToFp32(LoadU16(p + 2 * i));
      return absl::OkStatus();
    default:
      break;
  }
  const BlockFn fn = BlockFunction(type);
  if (fn == nullptr) {
    return absl::UnimplementedError(absl::StrCat("dequantizing ggml type ", t->name, " is not supported"));
  }
  for (int64_t i = 0; i < n / t->block_size; ++i) {
    fn(p + i * t->type_size, dst + i * t->block_size);
  }
  return absl::OkStatus();
}

}  // namespace nibble::io
