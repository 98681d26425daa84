#include "engine/core/huge_pages.h"

#include <cstdint>
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

TEST(HugePages, AllocIsAlignedAndZeroed) {
  auto p = HugePageAlloc(3 << 20);
  ASSERT_NE(p, nullptr);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(p.get()) % (size_t{2} << 20), 0u);
  const auto* b = static_cast<const uint8_t*>(p.get());
  for (size_t i = 0; i < (size_t{3} << 20); i += 4093) EXPECT_EQ(b[i], 0) << i;
}

}  // namespace
}  // namespace nibble
