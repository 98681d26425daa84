// Tests of the packed-weight matmul (kernels/cpu/qmatmul.h): every format x
// every ISA this CPU has x odd shapes and token counts, with and without a
// side-car, and mixed-format segments. Each fast result is checked against
// (1) the scalar implementation of the same int8-activation algorithm
// (bit for bit: same exact int32 lane sums, same canonical fp32 order) and
// (2) the exact fp32 dequantize reference (fmt::DequantizeRowRef + side-car,
// independent of the kernels) within the bound the activation rounding
// implies: |err| <= sum_c |w_c| * dx_b(c) / 2 plus fp32 rounding.
#include "kernels/cpu/qmatmul.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "kernels/common/fp16.h"
#include "kernels/cpu/ops.h"
#include "kernels/cpu/qmatmul_internal.h"
#include "kernels/cpu/thread_pool.h"
#include "kernels/formats/blocks.h"
#include "kernels/formats/format.h"

namespace nibble::cpu {
namespace {

// Every ISA follows the canonical fp32 order of qmatmul_internal.h on the
// same exact int32 lane sums, so fast and scalar must agree bit for bit
// (tolerance 0; kept as a named constant should an ISA ever need slack).
constexpr double kIsaTolRel = 0.0;
// fp32 accumulation allowance against the exact reference, relative to the
// same magnitude (sum of |terms|).
constexpr double kFpRel = 1e-5;
// Activation rounding: |x - xq dx| <= dx/2 up to the fp32 rounding of
// x * (127 / amax) and of dx = amax / 127 (a few ulps of 127): 1e-3 slack.
constexpr double kActRoundSlack = 1.001;

std::vector<QIsa> Isas() {
  std::vector<QIsa> v;
  for (QIsa i : {QIsa::kScalar, QIsa::kAvx2, QIsa::kAvx512})
    if (QIsaSupported(i)) v.push_back(i);
  return v;
}

// A packed matrix owning its bytes, plus an optional side-car.
struct TestMatrix {
  int64_t rows = 0, cols = 0;
  std::vector<std::vector<uint8_t>> seg_bytes;
  std::vector<QSegmentView> segs;
  std::vector<uint32_t> row_ptr;
  std::vector<uint16_t> col, f16, row_scale;
  std::vector<int8_t> i8;
  QSidecarView::Type sc_type = QSidecarView::Type::kNone;

  QMatrixView View() const {
    QMatrixView v;
    v.rows = rows;
    v.cols = cols;
    v.segments = segs;
    v.sidecar.type = sc_type;
    if (sc_type != QSidecarView::Type::kNone) {
      v.sidecar.row_ptr = row_ptr.data();
      v.sidecar.col = col.data();
      v.sidecar.f16 = f16.data();
      v.sidecar.i8 = i8.data();
      v.sidecar.row_scale = row_scale.data();
    }
    return v;
  }
};

// Packs rows [r0, r1): even rows quantized from Gaussian weights (bintern:
// alternately lambda 0 and 1 so both group kinds occur), odd rows random
// code bytes with small random scales (every code value, ternary code 3).
std::vector<uint8_t> PackRows(const fmt::Format& f, int64_t n_rows, int64_t cols, std::mt19937& rng) {
  const int64_t rb = f.RowBytes(cols);
  std::vector<uint8_t> out(static_cast<size_t>(n_rows * rb));
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::uniform_int_distribution<int> byte(0, 255);
  std::uniform_real_distribution<float> scale(-0.3f, 0.3f);
  std::vector<float> w(static_cast<size_t>(cols));
  for (int64_t r = 0; r < n_rows; ++r) {
    uint8_t* row = out.data() + r * rb;
    if (r % 2 == 0) {
      for (float& v : w) v = nd(rng) * 0.1f;
      fmt::QuantizeRowRef(f, w.data(), cols, nullptr, row, (r / 2) % 2 == 0 ? 0.0f : 1.0f);
    } else {
      for (int64_t i = 0; i < rb; ++i) row[i] = static_cast<uint8_t>(byte(rng));
      for (int64_t g = 0; g < f.BlocksPerRow(cols); ++g) {
        uint8_t* blk = row + g * f.BlockBytes();
        fmt::StoreF16(blk, scale(rng));
        if (f.kind == fmt::Kind::kInt && !f.symmetric) fmt::StoreF16(blk + 2, scale(rng));
        if (f.kind == fmt::Kind::kBinTern) blk[3] = 0;  // flag byte blk[2] stays random
      }
    }
  }
  return out;
}

TestMatrix MakeMatrix(const std::vector<fmt::Format>& formats, int64_t rows, int64_t cols,
                      QSidecarView::Type sc, uint32_t seed) {
  std::mt19937 rng(seed);
  TestMatrix m;
  m.rows = rows;
  m.cols = cols;
  const int64_t n = static_cast<int64_t>(formats.size());
  m.seg_bytes.reserve(formats.size());
  for (int64_t s = 0; s < n; ++s) {
    const int64_t r0 = rows * s / n, r1 = rows * (s + 1) / n;
    if (r0 == r1) continue;
    m.seg_bytes.push_back(PackRows(formats[s], r1 - r0, cols, rng));
    m.segs.push_back({r0, r1, formats[s], m.seg_bytes.back().data()});
  }
  m.sc_type = sc;
  if (sc != QSidecarView::Type::kNone) {
    std::uniform_real_distribution<float> u(0.0f, 1.0f);
    std::uniform_int_distribution<int> i8(-127, 127);
    m.row_ptr.push_back(0);
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c = 0; c < cols; ++c) {
        if (u(rng) < 0.06f) {
          m.col.push_back(static_cast<uint16_t>(c));
          m.f16.push_back(Fp32ToFp16(u(rng) * 4.0f - 2.0f));
          m.i8.push_back(static_cast<int8_t>(i8(rng)));
        }
      }
      m.row_ptr.push_back(static_cast<uint32_t>(m.col.size()));
      m.row_scale.push_back(Fp32ToFp16(0.01f + u(rng) * 0.02f));
    }
    if (m.col.empty()) {  // keep data() non-null
      m.f16.push_back(0);
      m.i8.push_back(0);
      m.col.push_back(0);
    }
  }
  return m;
}

std::vector<float> RandomActs(int64_t n_tokens, int64_t cols, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> x(static_cast<size_t>(n_tokens * cols));
  for (float& v : x) v = nd(rng);
  // An outlier channel and an all-zero token block exercise the per-block scales.
  if (cols > 5) x[5] = 40.0f;
  for (int64_t c = 0; c < std::min<int64_t>(cols, 32); ++c) x[(n_tokens - 1) * cols + c] = 0.0f;
  return x;
}

// Per output: the activation-rounding bound and the magnitude of the terms.
struct Bounds {
  double act = 0, mag = 0;
};
Bounds ComputeBounds(const QMatrixView& w, const float* x, int64_t r) {
  Bounds b;
  const QSegmentView* seg = nullptr;
  for (const QSegmentView& s : w.segments)
    if (r >= s.row_begin && r < s.row_end) seg = &s;
  const qmm::FormatInfo fi = qmm::Describe(seg->format);
  const uint8_t* row = seg->data + (r - seg->row_begin) * seg->format.RowBytes(w.cols);
  const double qmax = fi.code == qmm::CodeKind::kU8 ? 255 : fi.code == qmm::CodeKind::kU4 ? 15 : 7;
  for (int64_t c = 0; c < w.cols; ++c) {
    const int64_t b0 = c / 32 * 32;
    double amax = 0;
    for (int64_t i = b0; i < std::min(w.cols, b0 + 32); ++i) amax = std::max(amax, std::fabs(double(x[i])));
    const double dx = amax / 127.0;
    const double p = std::fabs(PackedWeightAt(w, r, c));
    const qmm::GroupAffine ga =
        qmm::ParseGroup(fi.header, fi.bits, row + (c / fi.group) * fi.block_bytes, fmt::LoadF16);
    b.act += p * dx / 2 * kActRoundSlack;
    b.mag += (p + 2 * std::fabs(ga.m) + 2 * qmax * std::fabs(ga.d)) * std::fabs(x[c]);
  }
  const QSidecarView& sc = w.sidecar;
  if (sc.type != QSidecarView::Type::kNone) {
    for (uint32_t i = sc.row_ptr[r]; i < sc.row_ptr[r + 1]; ++i) {
      const double v = sc.type == QSidecarView::Type::kF16 ? Fp16ToFp32(sc.f16[i])
                                                            : Fp16ToFp32(sc.row_scale[r]) * sc.i8[i];
      b.mag += (std::fabs(v) + std::fabs(PackedWeightAt(w, r, sc.col[i]))) * std::fabs(x[sc.col[i]]);
    }
  }
  return b;
}

// Runs every ISA on one matrix and checks both references for every output.
void CheckAll(const TestMatrix& m, int64_t n_tokens, ThreadPool* pool, const std::string& what) {
  const QMatrixView w = m.View();
  std::string err;
  ASSERT_TRUE(ValidateQMatrix(w, &err)) << what << ": " << err;
  const std::vector<float> x = RandomActs(n_tokens, m.cols, static_cast<uint32_t>(m.rows * 131 + m.cols));
  std::vector<float> exact(static_cast<size_t>(n_tokens * m.rows));
  QuantMatMulF32Ref(w, x.data(), n_tokens, exact.data());
  QMatMulScratch scratch;
  std::vector<float> scalar(exact.size(), NAN), fast(exact.size(), NAN);
  QuantMatMulIsa(QIsa::kScalar, w, x.data(), n_tokens, scalar.data(), nullptr, &scratch);
  std::vector<Bounds> bounds;
  for (int64_t t = 0; t < n_tokens; ++t)
    for (int64_t r = 0; r < m.rows; ++r) bounds.push_back(ComputeBounds(w, x.data() + t * m.cols, r));
  for (QIsa isa : Isas()) {
    std::fill(fast.begin(), fast.end(), NAN);
    QuantMatMulIsa(isa, w, x.data(), n_tokens, fast.data(), pool, &scratch);
    int bad = 0;
    for (int64_t t = 0; t < n_tokens && bad < 3; ++t) {
      for (int64_t r = 0; r < m.rows && bad < 3; ++r) {
        const size_t i = static_cast<size_t>(t * m.rows + r);
        const Bounds& b = bounds[i];
        const double tight = kIsaTolRel * b.mag;
        const double loose = b.act + kFpRel * b.mag + 1e-30;
        if (!(std::fabs(double(fast[i]) - scalar[i]) <= tight) || !(std::fabs(double(fast[i]) - exact[i]) <= loose)) {
          ++bad;
          ADD_FAILURE() << what << " isa=" << QIsaName(isa) << " t=" << t << " r=" << r << ": fast " << fast[i]
                        << " scalar-int8 " << scalar[i] << " (tol " << tight << ") exact " << exact[i] << " (tol "
                        << loose << ")";
        }
      }
    }
  }
}

struct Shape {
  int64_t rows, cols, tokens;
};
// Covers the AVX-512 tilings: 6/4/3/2/1-token tiles (17 = 6 + 6 + 4 + 1),
// 4-row decode micro-tiles with row tails (9, 13, 33 rows) and software
// prefetch (>= 12 rows), and block counts with every tail (1, 3, 6, 7 blocks).
constexpr Shape kShapes[] = {{1, 172, 17}, {7, 100, 3}, {33, 172, 1}, {33, 576, 5}, {5, 32, 2},
                             {3, 17, 1},   {9, 17, 1},  {13, 224, 1}, {8, 80, 6},   {24, 96, 1}};

class QMatMulFormatTest : public ::testing::TestWithParam<fmt::Format> {};

TEST_P(QMatMulFormatTest, MatchesReferencesOnOddShapes) {
  const fmt::Format f = GetParam();
  uint32_t seed = 1;
  for (const Shape& s : kShapes) {
    const TestMatrix m = MakeMatrix({f}, s.rows, s.cols, QSidecarView::Type::kNone, seed++);
    CheckAll(m, s.tokens, nullptr, f.Name() + " " + std::to_string(s.rows) + "x" + std::to_string(s.cols));
  }
}

TEST_P(QMatMulFormatTest, SidecarReplacesPackedValues) {
  const fmt::Format f = GetParam();
  const TestMatrix m16 = MakeMatrix({f}, 9, 172, QSidecarView::Type::kF16, 7);
  CheckAll(m16, 3, nullptr, f.Name() + " sidecar f16");
  const TestMatrix m8 = MakeMatrix({f}, 9, 100, QSidecarView::Type::kI8, 8);
  CheckAll(m8, 1, nullptr, f.Name() + " sidecar i8");
}

INSTANTIATE_TEST_SUITE_P(AllFormats, QMatMulFormatTest, ::testing::ValuesIn(fmt::AllFormats()),
                         [](const ::testing::TestParamInfo<fmt::Format>& i) { return i.param.Name(); });

TEST(QMatMulTest, MixedSegmentsWithSidecarAndThreads) {
  const auto P = [](const char* n) { return *fmt::Format::Parse(n); };
  const std::vector<fmt::Format> formats = {P("int4_g32"), P("ternary_g64"), P("int3_g128_sym"), P("binary_g32"),
                                            P("int8_g64"),  P("bintern_g128"), P("int2_g64")};
  ThreadPool pool(2);
  const TestMatrix m = MakeMatrix(formats, 97, 300, QSidecarView::Type::kI8, 3);
  CheckAll(m, 1, &pool, "mixed t1");
  CheckAll(m, 6, &pool, "mixed t6");
  const TestMatrix big = MakeMatrix({P("int4_g64"), P("int2_g128")}, 600, 256, QSidecarView::Type::kF16, 4);
  CheckAll(big, 2, &pool, "mixed threaded");
}

// The dense matrix a view stands for: PackedWeightAt, then the side-car's kept
// values (fp16, or int8 times the row's fp16 scale) replacing entries.
std::vector<float> DenseOf(const QMatrixView& w) {
  std::vector<float> d(static_cast<size_t>(w.rows * w.cols));
  for (int64_t r = 0; r < w.rows; ++r)
    for (int64_t c = 0; c < w.cols; ++c) d[r * w.cols + c] = PackedWeightAt(w, r, c);
  const QSidecarView& sc = w.sidecar;
  if (sc.type == QSidecarView::Type::kNone) return d;
  for (int64_t r = 0; r < w.rows; ++r)
    for (uint32_t i = sc.row_ptr[r]; i < sc.row_ptr[r + 1]; ++i)
      d[r * w.cols + sc.col[i]] = sc.type == QSidecarView::Type::kF16
                                      ? Fp16ToFp32(sc.f16[i])
                                      : Fp16ToFp32(sc.row_scale[r]) * static_cast<float>(sc.i8[i]);
  return d;
}

// QuantMatMulDequantF32 (prefill without AMX) on every fp32 ISA: from
// kMatMulF32PackedMinTokens tokens on (AVX2/AVX-512) exactly
// MatMulF32PackedOrderRef of the dense matrix, below that (and on scalar)
// exactly the dispatched DotF32 of each dense row; within fp32 rounding of the
// exact reference either way.
void CheckDequant(const TestMatrix& m, int64_t n_tokens, ThreadPool* pool, const std::string& what) {
  const QMatrixView w = m.View();
  const std::vector<float> dense = DenseOf(w);
  const std::vector<float> x = RandomActs(n_tokens, m.cols, static_cast<uint32_t>(m.rows * 7 + n_tokens));
  std::vector<float> exact(static_cast<size_t>(n_tokens * m.rows)), packed_order(exact.size());
  QuantMatMulF32Ref(w, x.data(), n_tokens, exact.data());
  MatMulF32PackedOrderRef(dense.data(), m.rows, m.cols, x.data(), n_tokens, packed_order.data());
  for (const char* isa : {"scalar", "avx2", "avx512"}) {
    if (!ForceIsaForTesting(isa)) continue;
    std::vector<float> y(exact.size(), NAN);
    QuantMatMulDequantF32(w, x.data(), n_tokens, y.data(), pool);
    const bool packed = n_tokens >= kMatMulF32PackedMinTokens && std::string(isa) != "scalar";
    int bad = 0;
    for (int64_t t = 0; t < n_tokens && bad < 3; ++t)
      for (int64_t r = 0; r < m.rows && bad < 3; ++r) {
        const size_t i = static_cast<size_t>(t * m.rows + r);
        const float want = packed ? packed_order[i] : DotF32(&dense[r * m.cols], &x[t * m.cols], m.cols);
        double mag = 0;
        for (int64_t c = 0; c < m.cols; ++c) mag += std::fabs(double(dense[r * m.cols + c]) * x[t * m.cols + c]);
        if (!(std::memcmp(&y[i], &want, sizeof(float)) == 0) || !(std::fabs(double(y[i]) - exact[i]) <= kFpRel * mag + 1e-30)) {
          ++bad;
          ADD_FAILURE() << what << " isa=" << isa << " t=" << t << " r=" << r << ": got " << y[i] << " want " << want
                        << " exact " << exact[i];
        }
      }
  }
  ForceIsaForTesting("");
}

TEST_P(QMatMulFormatTest, DequantF32MatchesPackedOrderAndReference) {
  const fmt::Format f = GetParam();
  uint32_t seed = 11;
  for (const Shape& s : kShapes) {
    const TestMatrix m = MakeMatrix({f}, s.rows, s.cols, QSidecarView::Type::kNone, seed++);
    for (int64_t n : {int64_t{1}, s.tokens, int64_t{8}, int64_t{19}})
      CheckDequant(m, n, nullptr, f.Name() + " " + std::to_string(s.rows) + "x" + std::to_string(s.cols));
  }
  CheckDequant(MakeMatrix({f}, 9, 172, QSidecarView::Type::kF16, 5), 9, nullptr, f.Name() + " sidecar f16");
  CheckDequant(MakeMatrix({f}, 9, 100, QSidecarView::Type::kI8, 6), 12, nullptr, f.Name() + " sidecar i8");
}

// The AVX-512 row dequantizer against the format's reference decode, bit for
// bit, at row widths with every tail.
TEST_P(QMatMulFormatTest, DequantRowSimdEqualsReference) {
  const fmt::Format f = GetParam();
  std::mt19937 rng(5);
  int ran = 0;
  for (QIsa isa : {QIsa::kAvx2, QIsa::kAvx512}) {
    if (!QIsaSupported(isa)) continue;
    ++ran;
    for (int64_t cols : {1, 7, 8, 9, 17, 32, 33, 100, 172, 300, 576}) {
      const std::vector<uint8_t> rows = PackRows(f, 3, cols, rng);
      for (int64_t r = 0; r < 3; ++r) {
        const uint8_t* row = rows.data() + r * f.RowBytes(cols);
        std::vector<float> want(cols + 16, -7.0f), got(cols + 16, -7.0f);
        fmt::DequantizeRowRef(f, row, cols, want.data());
        (isa == QIsa::kAvx2 ? qmm::DequantRowAvx2 : qmm::DequantRowAvx512)(f, row, cols, got.data());
        ASSERT_EQ(std::memcmp(want.data(), got.data(), sizeof(float) * (cols + 16)), 0)
            << QIsaName(isa) << " " << f.Name() << " cols " << cols << " row " << r;  // nothing written past cols
      }
    }
  }
  if (ran == 0) GTEST_SKIP() << "no AVX2 / AVX-512 VNNI here";
}

TEST(QMatMulTest, DequantF32MixedSegmentsSidecarAndThreads) {
  const auto P = [](const char* n) { return *fmt::Format::Parse(n); };
  ThreadPool pool(2);
  const TestMatrix m = MakeMatrix({P("int4_g32"), P("ternary_g64"), P("int3_g128_sym"), P("binary_g32"),
                                   P("int8_g64"), P("bintern_g128"), P("int2_g64")},
                                  97, 300, QSidecarView::Type::kI8, 3);
  CheckDequant(m, 37, &pool, "mixed 37 tokens, 2 threads");
  CheckDequant(m, 3, &pool, "mixed 3 tokens, 2 threads");
}

TEST(QMatMulTest, ActiveIsaFollowsForcedIsa) {
  EXPECT_TRUE(QIsaSupported(QIsa::kScalar));
  const QIsa isa = ActiveQIsa();
  EXPECT_TRUE(QIsaSupported(isa));
}

TEST(QMatMulTest, ValidateRejectsBadViews) {
  TestMatrix m = MakeMatrix({*fmt::Format::Parse("int4_g32")}, 4, 64, QSidecarView::Type::kF16, 9);
  std::string err;
  QMatrixView v = m.View();
  EXPECT_TRUE(ValidateQMatrix(v, &err)) << err;
  std::vector<QSegmentView> gap = m.segs;
  gap[0].row_end = 3;
  v.segments = gap;
  EXPECT_FALSE(ValidateQMatrix(v, &err));
  EXPECT_NE(err.find("segments"), std::string::npos) << err;
  v = m.View();
  m.col[0] = 64;  // column out of range
  EXPECT_FALSE(ValidateQMatrix(v, &err));
  EXPECT_NE(err.find("column"), std::string::npos) << err;
}

// ------------------------------------------------------------------ AMX ---
// The AMX prefill kernel (kernels/cpu/qmatmul_amx.cc) computes the same exact
// int32 block sums as the VNNI kernel but in its own fixed fp32 order, so
// every output is checked (1) bit for bit against QuantMatMulAmxOrderRef (the
// same order in scalar code, which runs on any CPU), (2) against the exact
// fp32 reference within the documented bound and (3) against the canonical
// AVX-512 / scalar kernels within a tight fp32 tolerance relative to the
// magnitude of the terms. Segments of formats the AMX kernel does not cover
// must equal the canonical kernels bit for bit (fallback).
constexpr double kAmxVsCanonicalRel = 2e-6;

// Sets the AMX mode for a scope, then restores the default.
class ScopedAmx {
 public:
  ScopedAmx(int mode, int64_t min_tokens) { qmm::SetAmxForTesting(mode, min_tokens); }
  ~ScopedAmx() { qmm::SetAmxForTesting(-1, 0); }
};

bool SameBits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// Checks QIsa::kAmx (when this CPU has it; the scalar AMX-order reference
// otherwise) on one matrix. Returns how many outputs differ bit-wise from
// the canonical kernels (0 for covered formats would mean the AMX order did
// not run).
int64_t CheckAmx(const TestMatrix& m, int64_t n_tokens, ThreadPool* pool, const std::string& what) {
  const QMatrixView w = m.View();
  std::string err;
  EXPECT_TRUE(ValidateQMatrix(w, &err)) << what << ": " << err;
  const std::vector<float> x = RandomActs(n_tokens, m.cols, static_cast<uint32_t>(m.rows * 7 + m.cols + n_tokens));
  std::vector<float> exact(static_cast<size_t>(n_tokens * m.rows));
  QuantMatMulF32Ref(w, x.data(), n_tokens, exact.data());
  QMatMulScratch scratch;
  std::vector<float> canonical(exact.size(), NAN), ref(exact.size(), NAN), amx(exact.size(), NAN);
  QuantMatMulIsa(QIsa::kScalar, w, x.data(), n_tokens, canonical.data(), nullptr, &scratch);
  QuantMatMulAmxOrderRef(w, x.data(), n_tokens, ref.data());
  if (QIsaSupported(QIsa::kAmx)) {
    QuantMatMulIsa(QIsa::kAmx, w, x.data(), n_tokens, amx.data(), pool, &scratch);
    // Bit for bit (NaN-free inputs, so memcmp is the right equality).
    EXPECT_TRUE(SameBits(amx, ref)) << what << ": AMX kernel differs from its scalar order";
  }
  int bad = 0;
  int64_t differ = 0;
  for (int64_t t = 0; t < n_tokens; ++t) {
    for (int64_t r = 0; r < m.rows; ++r) {
      const size_t i = static_cast<size_t>(t * m.rows + r);
      differ += ref[i] != canonical[i];
      if (QIsaSupported(QIsa::kAmx) && std::memcmp(&amx[i], &ref[i], 4) != 0 && bad < 3) {
        ++bad;
        ADD_FAILURE() << what << " t=" << t << " r=" << r << ": amx " << amx[i] << " scalar AMX order " << ref[i];
      }
      // The bounds (O(cols * 32) each) on a sample of tokens; bit identity
      // with the scalar AMX order above covers every output.
      if (bad >= 3 || !(t < 3 || t == n_tokens - 1 || t % 8 == 5)) continue;
      const Bounds b = ComputeBounds(w, x.data() + t * m.cols, r);
      const double tight = kAmxVsCanonicalRel * b.mag + 1e-30;
      const double loose = b.act + kFpRel * b.mag + 1e-30;
      if (!(std::fabs(double(ref[i]) - canonical[i]) <= tight) || !(std::fabs(double(ref[i]) - exact[i]) <= loose)) {
        ++bad;
        ADD_FAILURE() << what << " t=" << t << " r=" << r << ": AMX order " << ref[i] << " canonical "
                      << canonical[i] << " (tol " << tight << ") exact " << exact[i] << " (tol " << loose << ")";
      }
    }
  }
  return differ;
}

// Row tails (rows % 16 != 0, fewer than 16 rows), block-count tails (odd
// block counts, partial last blocks and groups: 17, 100, 172 columns), token
// counts 1, 5, 15, 16, 17, 31, 33, 100 (16-token tiles with tails).
constexpr Shape kAmxShapes[] = {{37, 172, 17}, {16, 576, 16}, {5, 1536, 33}, {5, 100, 100}, {20, 32, 1},
                                {1, 17, 5},    {20, 224, 31}, {17, 64, 15},  {3, 576, 33},  {50, 96, 100}, {512, 64, 1}, {512, 64, 7}};

class QMatMulAmxTest : public ::testing::TestWithParam<fmt::Format> {};

TEST_P(QMatMulAmxTest, MatchesScalarOrderAndReferences) {
  const fmt::Format f = GetParam();
  uint32_t seed = 100;
  int64_t differ = 0;
  for (const Shape& s : kAmxShapes) {
    const TestMatrix m = MakeMatrix({f}, s.rows, s.cols, QSidecarView::Type::kNone, seed++);
    differ += CheckAmx(m, s.tokens, nullptr,
                       f.Name() + " " + std::to_string(s.rows) + "x" + std::to_string(s.cols) + " t" +
                           std::to_string(s.tokens));
  }
  if (qmm::AmxCovers(f)) {
    // Different fp32 order: some outputs must differ in the last bits, or
    // the AMX order did not run.
    EXPECT_GT(differ, 0) << f.Name();
  } else {
    EXPECT_EQ(differ, 0) << f.Name() << ": not covered, so the canonical kernels must run";
  }
}

INSTANTIATE_TEST_SUITE_P(AllFormats, QMatMulAmxTest, ::testing::ValuesIn(fmt::AllFormats()),
                         [](const ::testing::TestParamInfo<fmt::Format>& i) { return i.param.Name(); });

// QuantMatMulMany (several matrices on one x, one parallel region) writes
// each output exactly as QuantMatMul on that matrix alone: canonical ISAs and
// the AMX path, decode and prefill token counts, 1 and 2 threads, matrices of
// row counts that are not multiples of the 16-row grain, side-cars.
TEST(QMatMulManyTest, EqualsSeparateCallsBitForBit) {
  const auto P = [](const char* n) { return *fmt::Format::Parse(n); };
  const int64_t cols = 300;
  const TestMatrix a = MakeMatrix({P("int4_g32"), P("int3_g64_sym")}, 37, cols, QSidecarView::Type::kF16, 31);
  const TestMatrix b = MakeMatrix({P("int8_g32")}, 16, cols, QSidecarView::Type::kNone, 32);
  const TestMatrix c = MakeMatrix({P("ternary_g64"), P("int2_g128")}, 203, cols, QSidecarView::Type::kI8, 33);
  const QMatrixView views[] = {a.View(), b.View(), c.View()};
  ThreadPool pool2(2);
  for (ThreadPool* pool : {static_cast<ThreadPool*>(nullptr), &pool2}) {
    for (const int64_t n : {int64_t{1}, int64_t{3}, int64_t{20}}) {
      const std::vector<float> x = RandomActs(n, cols, static_cast<uint32_t>(n + 7));
      QMatMulScratch scratch;
      std::vector<std::vector<float>> sep(3), many(3);
      float* ys[3];
      for (int i = 0; i < 3; ++i) {
        sep[i].assign(static_cast<size_t>(n * views[i].rows), NAN);
        many[i].assign(sep[i].size(), NAN);
        QuantMatMul(views[i], x.data(), n, sep[i].data(), pool, &scratch);
        ys[i] = many[i].data();
      }
      QuantMatMulMany(views, x.data(), n, ys, pool, &scratch);
      for (int i = 0; i < 3; ++i)
        EXPECT_TRUE(SameBits(sep[i], many[i])) << "matrix " << i << " n=" << n << " threads=" << (pool ? 2 : 1);
    }
  }
}

TEST(QMatMulAmxTest, MixedSegmentsSidecarAndThreads) {
  const auto P = [](const char* n) { return *fmt::Format::Parse(n); };
  ThreadPool pool(2);
  // Segment boundaries inside 16-row strips, every header kind, both side-cars.
  const TestMatrix m = MakeMatrix({P("int4_g32"), P("ternary_g64"), P("int3_g128_sym"), P("binary_g32"),
                                   P("int8_g64"), P("bintern_g128"), P("int4_g128_sym")},
                                  203, 300, QSidecarView::Type::kI8, 21);
  EXPECT_GT(CheckAmx(m, 20, &pool, "mixed i8 t20"), 0);
  const TestMatrix big = MakeMatrix({P("int4_g64"), P("int8_g32")}, 600, 256, QSidecarView::Type::kF16, 22);
  EXPECT_GT(CheckAmx(big, 37, &pool, "mixed f16 t37"), 0);
}

// Segments whose format the AMX kernel does not cover run the canonical
// kernels inside an AMX call: those rows equal the scalar kernel bit for bit,
// the others the AMX order.
TEST(QMatMulAmxTest, UncoveredFormatFallsBack) {
  const auto P = [](const char* n) { return *fmt::Format::Parse(n); };
  const fmt::Format off = P("ternary_g64");
  qmm::SetAmxUncoveredForTesting(&off);
  EXPECT_FALSE(qmm::AmxCovers(off));
  EXPECT_TRUE(qmm::AmxCovers(P("ternary_g32")));
  EXPECT_TRUE(qmm::AmxCovers(P("int4_g32")));
  const TestMatrix m = MakeMatrix({P("int4_g32"), off, P("int2_g128")}, 61, 300, QSidecarView::Type::kF16, 23);
  const QMatrixView w = m.View();
  const int64_t n = 21;
  const std::vector<float> x = RandomActs(n, m.cols, 4);
  QMatMulScratch scratch;
  std::vector<float> canon(static_cast<size_t>(n * m.rows)), ref(canon.size()), amx(canon.size());
  QuantMatMulIsa(QIsa::kScalar, w, x.data(), n, canon.data(), nullptr, &scratch);
  QuantMatMulAmxOrderRef(w, x.data(), n, ref.data());
  if (QIsaSupported(QIsa::kAmx)) {
    ThreadPool pool(2);
    QuantMatMulIsa(QIsa::kAmx, w, x.data(), n, amx.data(), &pool, &scratch);
    EXPECT_TRUE(SameBits(amx, ref));
  }
  int64_t same_in = 0, same_out = 0, rows_in = 0;
  for (int64_t t = 0; t < n; ++t) {
    for (int64_t r = 0; r < m.rows; ++r) {
      const size_t i = static_cast<size_t>(t * m.rows + r);
      const bool same = std::memcmp(&ref[i], &canon[i], 4) == 0;
      if (r >= m.segs[1].row_begin && r < m.segs[1].row_end) {
        ++rows_in;
        same_in += same;
      } else {
        same_out += same;
      }
    }
  }
  EXPECT_EQ(same_in, rows_in) << "uncovered segment must run the canonical kernels";
  EXPECT_LT(same_out, n * m.rows - rows_in) << "covered segments must run the AMX order";
  qmm::SetAmxUncoveredForTesting(nullptr);
  EXPECT_TRUE(qmm::AmxCovers(off));
}

// The result does not depend on how the tokens are batched into 16-token
// tiles or split over threads: one 33-token call equals per-token calls.
TEST(QMatMulAmxTest, TokensIndependentOfBatching) {
  if (!QIsaSupported(QIsa::kAmx)) GTEST_SKIP() << "no AMX-INT8 (or no OS permission)";
  const TestMatrix m = MakeMatrix({*fmt::Format::Parse("int4_g64")}, 70, 200, QSidecarView::Type::kF16, 5);
  const QMatrixView w = m.View();
  const int64_t n = 33;
  const std::vector<float> x = RandomActs(n, m.cols, 9);
  ThreadPool pool(2);
  QMatMulScratch scratch;
  std::vector<float> all(static_cast<size_t>(n * m.rows)), one(all.size());
  QuantMatMulIsa(QIsa::kAmx, w, x.data(), n, all.data(), &pool, &scratch);
  for (int64_t t = 0; t < n; ++t)
    QuantMatMulIsa(QIsa::kAmx, w, x.data() + t * m.cols, 1, one.data() + t * m.rows, nullptr, &scratch);
  EXPECT_TRUE(SameBits(all, one));
}

// QuantMatMul (production) takes the AMX path exactly when AmxWanted says
// so, and follows NIBBLE_QMATMUL_AMX=0 (ctest runs this binary with and
// without it: qmatmul_test, qmatmul_test_amx_off).
TEST(QMatMulAmxTest, ProductionPathFollowsControls) {
  if (std::getenv("NIBBLE_QMATMUL_AMX_MIN_TOKENS") != nullptr) GTEST_SKIP() << "threshold overridden";
  const TestMatrix m = MakeMatrix({*fmt::Format::Parse("int4_g32")}, 48, 576, QSidecarView::Type::kNone, 6);
  const QMatrixView w = m.View();
  const char* env = std::getenv("NIBBLE_QMATMUL_AMX");
  const bool env_off = env != nullptr && std::string(env) == "0";
  if (env_off) {
    EXPECT_FALSE(qmm::AmxWanted(1 << 20));
  } else {
    EXPECT_EQ(qmm::AmxWanted(qmm::kAmxMinTokens), QIsaSupported(QIsa::kAmx));
  }
  EXPECT_FALSE(qmm::AmxWanted(qmm::kAmxMinTokens - 1));
  QMatMulScratch scratch;
  for (const int64_t n : {int64_t{1}, qmm::kAmxMinTokens - 1, qmm::kAmxMinTokens, int64_t{40}}) {
    const std::vector<float> x = RandomActs(n, m.cols, static_cast<uint32_t>(n));
    std::vector<float> prod(static_cast<size_t>(n * m.rows)), canon(prod.size()), amx(prod.size());
    QuantMatMul(w, x.data(), n, prod.data(), nullptr, &scratch);
    QuantMatMulIsa(QIsa::kScalar, w, x.data(), n, canon.data(), nullptr, &scratch);
    QuantMatMulAmxOrderRef(w, x.data(), n, amx.data());
    const bool want = ActiveQIsa() == QIsa::kAvx512 && qmm::AmxWanted(n);
    EXPECT_EQ(want, !env_off && QIsaSupported(QIsa::kAmx) && ActiveQIsa() == QIsa::kAvx512 &&
                        n >= qmm::kAmxMinTokens) << n;
    EXPECT_TRUE(SameBits(prod, want ? amx : canon)) << "n_tokens " << n << " amx " << want;
    EXPECT_FALSE(SameBits(amx, canon)) << n;  // the two orders are distinguishable here
    {
      ScopedAmx off(0, 0);
      QuantMatMul(w, x.data(), n, prod.data(), nullptr, &scratch);
      EXPECT_TRUE(SameBits(prod, canon)) << "disabled, n_tokens " << n;
    }
  }
}

TEST(QMatMulAmxTest, ControlFollowsOverrideAndThreshold) {
  if (std::getenv("NIBBLE_QMATMUL_AMX_MIN_TOKENS") != nullptr) GTEST_SKIP() << "threshold overridden";
  {
    ScopedAmx off(0, 0);
    EXPECT_FALSE(qmm::AmxWanted(1 << 20));
  }
  {
    ScopedAmx on(1, 0);
    EXPECT_FALSE(qmm::AmxWanted(qmm::kAmxMinTokens - 1));
    EXPECT_EQ(qmm::AmxWanted(qmm::kAmxMinTokens), qmm::AmxSupported());
  }
  {
    ScopedAmx on(1, 3);
    EXPECT_FALSE(qmm::AmxWanted(2));
    EXPECT_EQ(qmm::AmxWanted(3), qmm::AmxSupported());
  }
  EXPECT_EQ(QIsaSupported(QIsa::kAmx), qmm::AmxSupported() && QIsaSupported(QIsa::kAvx512));
  EXPECT_STREQ(QIsaName(QIsa::kAmx), "amx");
}

#if defined(__x86_64__)
// The dispatched (AVX-512) activation quantization must equal the scalar one bit for bit
// (every kernel's exactness argument rests on identical xq, dx, dxs, xs4).
TEST(QMatMulActsTest, QuantizeActsMatchesScalar) {
  if (!QIsaSupported(QIsa::kAvx512)) GTEST_SKIP() << "no AVX-512";
  for (const int64_t cols : {1, 17, 32, 100, 172, 576}) {
    const int64_t n_tokens = 5, nb = (cols + 63) / 64 * 2, total = n_tokens * nb;
    std::vector<float> x = RandomActs(n_tokens, cols, static_cast<uint32_t>(cols));
    // Specials: a NaN among finite values, an Inf block, denormals, ties.
    x[0] = NAN;
    if (cols > 40) x[cols + 33] = INFINITY;
    if (cols > 3) x[2 * cols + 1] = 1e-40f, x[2 * cols + 2] = -3e-39f;
    if (cols > 9) x[3 * cols + 3] = 127.0f, x[3 * cols + 4] = 0.5f, x[3 * cols + 5] = -1.5f, x[3 * cols + 6] = 2.5f;
    struct Out {
      std::vector<int8_t> xq;
      std::vector<float> dx, dxs, dx16, xsum;
      std::vector<int32_t> xs4;
    };
    auto run = [&](bool avx) {
      Out o{std::vector<int8_t>(total * 32, 99), std::vector<float>(total, -1), std::vector<float>(total, -1),
            std::vector<float>(total * 8, -1), std::vector<float>(total, -1), std::vector<int32_t>(total * 8, -1)};
      const auto quantize = avx ? qmm::QuantizeActs : qmm::QuantizeActsScalar;
      quantize(x.data(), n_tokens, cols, nb, o.xq.data(), o.dx.data(), o.dxs.data(), o.dx16.data(), o.xs4.data(),
               o.xsum.data());
      return o;
    };
    const Out a = run(false), b = run(true);
    EXPECT_EQ(a.xq, b.xq) << cols;
    EXPECT_EQ(a.xs4, b.xs4) << cols;
    EXPECT_EQ(0, std::memcmp(a.dx.data(), b.dx.data(), a.dx.size() * 4)) << cols;
    EXPECT_EQ(0, std::memcmp(a.dxs.data(), b.dxs.data(), a.dxs.size() * 4)) << cols;
    EXPECT_EQ(0, std::memcmp(a.dx16.data(), b.dx16.data(), a.dx16.size() * 4)) << cols;
    EXPECT_EQ(0, std::memcmp(a.xsum.data(), b.xsum.data(), a.xsum.size() * 4)) << cols;
  }
}
#endif

}  // namespace
}  // namespace nibble::cpu
