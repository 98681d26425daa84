#include "engine/core/huge_pages.h"

#include <cstdint>
#include <algorithm>
#include <cstring>
#include <random>
#include <vector>

#include "engine/core/quant_tensor.h"
#include "gtest/gtest.h"
#include "kernels/formats/format.h"

namespace nibble {
namespace {

// A quantized matrix of two format segments and an f16 side-car, its bytes in
// a buffer the test owns (as a mapped file would).
struct Fixture {
  std::shared_ptr<std::vector<uint8_t>> buf = std::make_shared<std::vector<uint8_t>>();
  std::shared_ptr<std::vector<uint32_t>> row_ptr = std::make_shared<std::vector<uint32_t>>();
  std::shared_ptr<std::vector<uint16_t>> col = std::make_shared<std::vector<uint16_t>>();
  std::shared_ptr<std::vector<uint16_t>> f16 = std::make_shared<std::vector<uint16_t>>();
  HostTensor t;

  Fixture(int64_t rows, int64_t cols) {
    const fmt::Format a = *fmt::Format::Parse("int4_g32"), b = *fmt::Format::Parse("int2_g64_sym");
    const int64_t split = rows / 3;
    buf->resize(static_cast<size_t>(split * a.RowBytes(cols) + (rows - split) * b.RowBytes(cols)));
    std::mt19937 rng(5);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    std::vector<float> w(static_cast<size_t>(cols));
    uint8_t* p = buf->data();
    for (int64_t r = 0; r < rows; ++r) {
      for (float& v : w) v = nd(rng);
      const fmt::Format& f = r < split ? a : b;
      fmt::QuantizeRowRef(f, w.data(), cols, nullptr, p);
      p += f.RowBytes(cols);
    }
    auto q = std::make_shared<QuantTensor>();
    q->rows = rows;
    q->cols = cols;
    q->segments.push_back({0, split, a, std::span<const uint8_t>(buf->data(), split * a.RowBytes(cols))});
    q->segments.push_back({split, rows, b,
                           std::span<const uint8_t>(buf->data() + split * a.RowBytes(cols),
                                                    (rows - split) * b.RowBytes(cols))});
    // One kept weight per row, at column r % cols, value r / 8 as fp16 (exact).
    for (int64_t r = 0; r <= rows; ++r) row_ptr->push_back(static_cast<uint32_t>(r));
    for (int64_t r = 0; r < rows; ++r) {
      col->push_back(static_cast<uint16_t>(r % cols));
      f16->push_back(static_cast<uint16_t>(0x3c00 + 0x80 * (r % 8)));  // 1.0 .. 1.875
    }
    q->sidecar.type = Sidecar::ValueType::kF16;
    q->sidecar.row_ptr = *row_ptr;
    q->sidecar.col = *col;
    q->sidecar.f16 = *f16;
    q->owners = {buf, row_ptr, col, f16};
    t.name = "blk.0.wq";
    t.shape = {rows, cols};
    t.quant = q;
  }
};

std::vector<float> DequantAll(const QuantTensor& q) {
  std::vector<float> out(static_cast<size_t>(q.rows * q.cols));
  for (int64_t r = 0; r < q.rows; ++r) q.DequantizeRow(r, out.data() + r * q.cols);
  return out;
}

TEST(HugePages, QuantizedBytesMoveAndValuesStay) {
  const int64_t rows = 37, cols = 172;  // odd rows, a partial last group
  Fixture f(rows, cols);
  ModelWeights w;
  w.layers.resize(1);
  w.layers[0].wq = f.t;
  w.tok_embeddings.shape = {4, 8};
  w.tok_embeddings.data.assign(32, 0.5f);  // fp32: left alone
  const std::vector<float> before = DequantAll(*f.t.quant);

  const size_t moved = MoveQuantizedToHugePages(&w);
  ASSERT_GT(moved, f.buf->size());  // segments plus the side-car arrays
  const QuantTensor& q = *w.layers[0].wq.quant;
  EXPECT_NE(&q, f.t.quant.get());  // a new tensor: the original (shared) one is untouched
  for (const QuantSegment& s : q.segments) {
    EXPECT_EQ(reinterpret_cast<uintptr_t>(s.data.data()) % 64, 0u);
    EXPECT_TRUE(s.data.data() < f.buf->data() || s.data.data() >= f.buf->data() + f.buf->size());
  }
  EXPECT_NE(q.sidecar.col.data(), f.col->data());
  EXPECT_EQ(w.tok_embeddings.data, std::vector<float>(32, 0.5f));

  // The source bytes may go away: the moved tensor keeps its own.
  std::memset(f.buf->data(), 0xff, f.buf->size());
  std::fill(f.col->begin(), f.col->end(), uint16_t{0});
  f.t.quant.reset();
  f.buf.reset();
  EXPECT_EQ(DequantAll(q), before);
}

TEST(HugePages, NothingQuantizedMovesNothing) {
  ModelWeights w;
  w.tok_embeddings.shape = {2, 2};
  w.tok_embeddings.data = {1, 2, 3, 4};
  EXPECT_EQ(MoveQuantizedToHugePages(&w), 0u);
  EXPECT_EQ(w.tok_embeddings.data, (std::vector<float>{1, 2, 3, 4}));
}

// fp32 matrices (not norms, not quantized ones) move into the arena with
// their values; an fp16 matrix moved by MoveQuantizedToHugePages keeps its bits.
TEST(HugePages, F32AndF16MatricesMoveAndValuesStay) {
  ModelWeights w;
  w.tok_embeddings.shape = {3, 5};
  for (int i = 0; i < 15; ++i) w.tok_embeddings.data.push_back(0.5f * i - 3.0f);
  w.final_norm.shape = {5};
  w.final_norm.data = {1, 1, 1, 1, 1};
  w.layers.resize(1);
  w.layers[0].wq.shape = {2, 7};
  for (int i = 0; i < 14; ++i) w.layers[0].wq.data.push_back(-0.25f * i);
  auto bits = std::make_shared<std::vector<uint16_t>>(std::vector<uint16_t>{0x3c00, 0xc000, 0x0001, 0x7bff});
  w.layers[0].wk.shape = {2, 2};
  w.layers[0].wk.f16 = {bits->data(), bits->size()};
  w.layers[0].wk.owner = bits;
  const std::vector<float> emb = w.tok_embeddings.data, wq = w.layers[0].wq.data;

  EXPECT_EQ(MoveF32ToHugePages(&w), 128u);  // 15 and 14 floats, each rounded up to 64 bytes
  EXPECT_TRUE(w.tok_embeddings.data.empty());
  ASSERT_EQ(w.tok_embeddings.fp32_size(), emb.size());
  EXPECT_TRUE(std::equal(emb.begin(), emb.end(), w.tok_embeddings.fp32()));
  EXPECT_EQ(reinterpret_cast<uintptr_t>(w.tok_embeddings.fp32()) % (size_t{2} << 20), 0u);
  ASSERT_EQ(w.layers[0].wq.fp32_size(), wq.size());
  EXPECT_TRUE(std::equal(wq.begin(), wq.end(), w.layers[0].wq.fp32()));
  EXPECT_EQ(reinterpret_cast<uintptr_t>(w.layers[0].wq.fp32()) % 64, 0u);
  EXPECT_EQ(w.final_norm.data.size(), 5u);  // 1-D tensors stay
  EXPECT_EQ(w.layers[0].wk.fp32(), nullptr);

  const uint16_t* before = w.layers[0].wk.f16.data();
  EXPECT_EQ(MoveQuantizedToHugePages(&w), 64u);
  EXPECT_NE(w.layers[0].wk.f16.data(), before);
  bits.reset();  // the arena, not the source, holds the values now
  EXPECT_EQ(std::vector<uint16_t>(w.layers[0].wk.f16.begin(), w.layers[0].wk.f16.end()),
            (std::vector<uint16_t>{0x3c00, 0xc000, 0x0001, 0x7bff}));
}

TEST(HugePages, AllocIsAlignedAndZeroed) {
  auto p = HugePageAlloc(3 << 20);
  ASSERT_NE(p, nullptr);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(p.get()) % (size_t{2} << 20), 0u);
  const auto* b = static_cast<const uint8_t*>(p.get());
  for (size_t i = 0; i < (size_t{3} << 20); i += 4093) EXPECT_EQ(b[i], 0) << i;
}

}  // namespace
}  // namespace nibble
