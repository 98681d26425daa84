// Dequantizers vs. the Python gguf package (fixture from
// tests/fixtures/gen_ggml_dequant.py), compared bit for bit.
#include "engine/io/ggml_types.h"

#include <cmath>
#include <cstring>
#include <fstream>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/common/fp16.h"
#include "tests/test_util.h"

namespace nibble::io {
namespace {

struct Entry {
  uint32_t type;
  int64_t n;
  std::string bytes;
  std::vector<float> expected;
};

std::vector<Entry> ReadFixture() {
  const std::string path = nibble::testing::SourceDir() + "/tests/fixtures/ggml_dequant.bin";
  std::ifstream in(path, std::ios::binary);
  EXPECT_TRUE(in) << "missing fixture " << path;
  std::stringstream ss;
  ss << in.rdbuf();
  const std::string s = ss.str();
  size_t pos = 0;
  auto u32 = [&]() {
    uint32_t v = 0;
    if (pos + 4 <= s.size()) std::memcpy(&v, s.data() + pos, 4);
    pos += 4;
    return v;
  };
  std::vector<Entry> out;
  if (s.size() < 12 || s.compare(0, 4, "NBDQ") != 0) {
    ADD_FAILURE() << "bad fixture header in " << path;
    return out;
  }
  pos = 4;
  EXPECT_EQ(u32(), 1u);
  const uint32_t n_entries = u32();
  for (uint32_t i = 0; i < n_entries; ++i) {
    Entry e;
    e.type = u32();
    e.n = u32();
    const uint32_t nb = u32();
    if (pos + nb + 4 * static_cast<size_t>(e.n) > s.size()) {
      ADD_FAILURE() << "fixture truncated";
      break;
    }
    e.bytes = s.substr(pos, nb);
    pos += nb;
    e.expected.resize(e.n);
    std::memcpy(e.expected.data(), s.data() + pos, 4 * e.n);
    pos += 4 * e.n;
    out.push_back(std::move(e));
  }
  EXPECT_EQ(pos, s.size());
  return out;
}

TEST(GgmlTypesTest, MatchesPythonGgufBitExactly) {
  const std::vector<Entry> entries = ReadFixture();
  std::set<std::string> seen;
  for (const Entry& e : entries) {
    const std::string name = GgmlTypeName(e.type);
    seen.insert(name);
    auto bytes = GgmlRowBytes(static_cast<GgmlType>(e.type), e.n);
    ASSERT_TRUE(bytes.ok()) << bytes.status();
    ASSERT_EQ(*bytes, e.bytes.size()) << name;
    std::vector<float> got(e.n, -12345.0f);
    ASSERT_TRUE(DequantizeRow(static_cast<GgmlType>(e.type), e.bytes.data(), got.data(), e.n).ok()) << name;
    int mismatches = 0;
    for (int64_t i = 0; i < e.n; ++i) {
      if (FloatToBits(got[i]) != FloatToBits(e.expected[i])) {
        if (++mismatches <= 5) {
          ADD_FAILURE() << name << " element " << i << ": got " << got[i] << " expected " << e.expected[i];
        }
      }
    }
    EXPECT_EQ(mismatches, 0) << name;
  }
  for (const char* t : {"f32", "f16", "bf16", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_K", "q3_K", "q4_K",
                        "q5_K", "q6_K", "q8_K"}) {
    EXPECT_TRUE(seen.count(t)) << "fixture lacks " << t;
  }
}

TEST(GgmlTypesTest, DequantizesFromUnalignedSource) {
  for (const Entry& e : ReadFixture()) {
    std::string shifted = "x" + e.bytes;
    std::vector<float> got(e.n);
    ASSERT_TRUE(DequantizeRow(static_cast<GgmlType>(e.type), shifted.data() + 1, got.data(), e.n).ok());
    EXPECT_EQ(std::memcmp(got.data(), e.expected.data(), 4 * e.n), 0) << GgmlTypeName(e.type);
  }
}

TEST(GgmlTypesTest, HalfRoundTrips) {
  // Every finite fp16/bf16 value survives half -> float -> half.
  for (uint32_t h = 0; h < 65536; ++h) {
    const uint16_t bits = static_cast<uint16_t>(h);
    float f16 = 0, bf16 = 0;
    ASSERT_TRUE(DequantizeRow(GgmlType::kF16, &bits, &f16, 1).ok());
    ASSERT_TRUE(DequantizeRow(GgmlType::kBF16, &bits, &bf16, 1).ok());
    if ((bits & 0x7c00) != 0x7c00) {
      EXPECT_EQ(Fp32ToFp16(f16), bits) << h;
    }
    if ((bits & 0x7f80) != 0x7f80) {
      EXPECT_EQ(Fp32ToBf16(bf16), bits) << h;
    }
  }
  const uint16_t one_f16 = 0x3c00, one_bf16 = 0x3f80, minus_two_f16 = 0xc000;
  float v = 0;
  ASSERT_TRUE(DequantizeRow(GgmlType::kF16, &one_f16, &v, 1).ok());
  EXPECT_EQ(v, 1.0f);
  ASSERT_TRUE(DequantizeRow(GgmlType::kBF16, &one_bf16, &v, 1).ok());
  EXPECT_EQ(v, 1.0f);
  ASSERT_TRUE(DequantizeRow(GgmlType::kF16, &minus_two_f16, &v, 1).ok());
  EXPECT_EQ(v, -2.0f);
}

TEST(GgmlTypesTest, Traits) {
  auto q4k = GgmlRowBytes(GgmlType::kQ4_K, 512);
  ASSERT_TRUE(q4k.ok());
  EXPECT_EQ(*q4k, 2u * 144u);
  EXPECT_EQ(*GgmlRowBytes(GgmlType::kQ6_K, 256), 210u);
  EXPECT_EQ(*GgmlRowBytes(GgmlType::kQ8_0, 64), 68u);
  EXPECT_EQ(*GgmlRowBytes(GgmlType::kF16, 3), 6u);
  EXPECT_FALSE(GgmlRowBytes(GgmlType::kQ4_0, 33).ok());
  EXPECT_FALSE(GgmlRowBytes(GgmlType::kQ4_0, -32).ok());
  EXPECT_FALSE(GgmlRowBytes(static_cast<GgmlType>(77), 32).ok());
  EXPECT_FALSE(GgmlRowBytes(GgmlType::kF32, int64_t{1} << 62).ok());
  EXPECT_EQ(GgmlTypeName(12), "q4_K");
  EXPECT_EQ(GgmlTypeName(1000), "type#1000");
  EXPECT_EQ(GetGgmlTypeTraits(5), nullptr);  // retired Q4_2
}

TEST(GgmlTypesTest, UnsupportedTypesAreUnimplemented) {
  std::vector<uint8_t> src(1024);
  std::vector<float> dst(256);
  absl::Status s = DequantizeRow(GgmlType::kIQ2_XXS, src.data(), dst.data(), 256);
  EXPECT_EQ(s.code(), absl::StatusCode::kUnimplemented);
  EXPECT_NE(s.message().find("iq2_xxs"), std::string::npos) << s;
  EXPECT_EQ(DequantizeRow(static_cast<GgmlType>(99), src.data(), dst.data(), 32).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(DequantizeRow(GgmlType::kQ4_K, src.data(), dst.data(), 100).code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace nibble::io
