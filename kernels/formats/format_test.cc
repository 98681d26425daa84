// Tests for nibble's packed weight formats (kernels/formats/format.h).
//
// Layouts are checked against an independent decoder written here from
// docs/FORMATS.md (bit by bit, values in double); numerics against bounds
// derived from each fit's definition (stated next to each check), and against
// independent baselines (plain min/max RTN, the 0.7*mean|w| ternary heuristic,
// exhaustive search over all ternary vectors of a small group).
#include "kernels/formats/format.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/common/fp16.h"

namespace nibble::fmt {
namespace {

// ------------------------------------------ documented layout (FORMATS.md) ---

int HeaderBytes(const Format& f) {
  switch (f.kind) {
    case Kind::kInt: return f.symmetric ? 2 : 4;  // fp16 d [, fp16 m]
    case Kind::kTernary: return 2;                // fp16 a
    case Kind::kBinary: return 2;                 // fp16 a
    case Kind::kBinTern: return 4;                // fp16 a, u8 flag, u8 reserved
    case Kind::kNl: return 2;                     // fp16 d
  }
  return -1;
}
int CodeBits(const Format& f) {
  switch (f.kind) {
    case Kind::kInt: return f.bits;
    case Kind::kTernary: return 2;
    case Kind::kBinary: return 1;
    case Kind::kBinTern: return 2;
    case Kind::kNl: return f.bits;
  }
  return -1;
}
int64_t DocBlockBytes(const Format& f) { return HeaderBytes(f) + f.group * CodeBits(f) / 8; }

float F16At(const uint8_t* p) { return Fp16ToFp32(static_cast<uint16_t>(p[0] | p[1] << 8)); }
float RoundF16(float v) { return Fp16ToFp32(Fp32ToFp16(v)); }
// `nbits` bits starting at bit `pos` of p, LSB first.
int BitsAt(const uint8_t* p, int pos, int nbits) {
  int v = 0;
  for (int j = 0; j < nbits; ++j) v |= ((p[(pos + j) / 8] >> ((pos + j) % 8)) & 1) << j;
  return v;
}
// Integer code i of a kInt block, per the documented packing.
int DocIntCode(const Format& f, const uint8_t* block, int i) {
  const uint8_t* codes = block + HeaderBytes(f);
  if (f.bits == 3) return BitsAt(codes, 2 * i, 2) | BitsAt(codes + f.group / 4, i, 1) << 2;
  return BitsAt(codes, i * f.bits, f.bits);
}
// The nl level tables as docs/FORMATS.md lists them (written out
// independently of blocks.h's copy), and each table's largest gap.
constexpr int kDocNl4Levels[16] = {-127, -100, -79, -63, -48, -34, -20, -7, 0, 13, 27, 42, 57, 73, 95, 126};
constexpr int kDocNl3Levels[8] = {-104, -64, -34, -9, 14, 40, 73, 127};
constexpr int kDocNl2Levels[4] = {-127, -39, 24, 100};
std::vector<int> DocNlLevels(int bits) {
  if (bits == 4) return {std::begin(kDocNl4Levels), std::end(kDocNl4Levels)};
  if (bits == 3) return {std::begin(kDocNl3Levels), std::end(kDocNl3Levels)};
  return {std::begin(kDocNl2Levels), std::end(kDocNl2Levels)};
}
int DocNlMaxGap(int bits) {
  const std::vector<int> l = DocNlLevels(bits);
  int g = 0;
  for (size_t i = 1; i < l.size(); ++i) g = std::max(g, l[i] - l[i - 1]);
  return g;
}

// Value i of one block, per the documentation (arithmetic in double: d*q+m of
// fp16 operands is exact in double, so the float cast is the one rounding).
float DocValue(const Format& f, const uint8_t* block, int i) {
  const double a = F16At(block);
  switch (f.kind) {
    case Kind::kInt: {
      const int q = DocIntCode(f, block, i);
      if (f.symmetric) return static_cast<float>(a * (q - (1 << (f.bits - 1))));
      return static_cast<float>(a * q + F16At(block + 2));
    }
    case Kind::kTernary:
      return static_cast<float>(a * (BitsAt(block + 2, 2 * i, 2) - 1));  // 0:-a 1:0 2:+a (3:+2a)
    case Kind::kBinary:
      return static_cast<float>(BitsAt(block + 2, i, 1) ? a : -a);
    case Kind::kBinTern:
      if (block[2] != 0) return static_cast<float>(a * (BitsAt(block + 4, 2 * i, 2) - 1));
      return static_cast<float>(BitsAt(block + 4, i, 1) ? a : -a);
    case Kind::kNl:
      return static_cast<float>(a * DocNlLevels(f.bits)[DocIntCode(f, block, i)]);
  }
  return NAN;
}
// The values a block's codes can take (|level| is what padding minimises).
std::vector<double> Levels(const Format& f, const uint8_t* block) {
  std::vector<double> out;
  const double a = F16At(block);
  if (f.kind == Kind::kNl) {
    for (int l : DocNlLevels(f.bits)) out.push_back(a * l);
  } else if (f.kind == Kind::kInt) {
    for (int q = 0; q < (1 << f.bits); ++q)
      out.push_back(f.symmetric ? a * (q - (1 << (f.bits - 1))) : a * q + F16At(block + 2));
  } else if (f.kind == Kind::kBinary || (f.kind == Kind::kBinTern && block[2] == 0)) {
    out = {-a, a};
  } else {
    out = {-a, 0.0, a};
  }
  return out;
}

// ---------------------------------------------------------------- helpers ---

std::vector<float> Gaussian(size_t n, uint32_t seed, float sigma = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d(0.0f, sigma);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}
std::vector<float> Uniform(size_t n, uint32_t seed, float lo, float hi) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> d(lo, hi);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

// Importance-weighted squared error of one group.
double GroupErr(const float* w, const float* v, const float* imp, int n) {
  double e = 0;
  for (int i = 0; i < n; ++i) e += (imp ? imp[i] : 1.0) * (double(w[i]) - v[i]) * (double(w[i]) - v[i]);
  return e;
}
// Binary least-squares error: sum c w^2 - (sum c|w|)^2 / sum c, and that a.
double BinaryLsErr(const float* w, const float* imp, int n, double* a) {
  double s = 0, sa = 0, s2 = 0;
  for (int i = 0; i < n; ++i) {
    const double c = imp ? imp[i] : 1.0;
    s += c, sa += c * std::fabs(w[i]), s2 += c * double(w[i]) * w[i];
  }
  *a = s > 0 ? sa / s : 0;
  return s > 0 ? s2 - sa * sa / s : 0;
}

// The uniform-noise model (error d^2/12 per weight) is an expectation: a
// squared residual uniform on [-d/2, d/2] has CV 0.89, so the mean over the
// >= 4096 weights these checks use has CV <= 1.4%; 1.05 is ~4 sigma.
constexpr double kUniformModelMargin = 1.05;
// Best binary quantizer of N(0,1): a = E|w|, NMSE = 1 - (E|w|)^2 = 1 - 2/pi.
constexpr double kBinaryGaussianNmse = 1 - 2 / M_PI;
// Best ternary quantizer of N(0,1): min over t of 1 - 2 phi(t)^2 / (1 - Phi(t))
// (support |w| > t with its LS scale), 0.19017 at t = 0.612.
constexpr double kTernaryGaussianNmse = 0.1902;
// Sampling noise of an NMSE measured on 8192 weights (relative sd ~1-2%).
constexpr double kGaussianNmseSlack = 0.01;

struct Stats {
  double err = 0, energy = 0, model = 0;  // model: the kind's predicted error (see CheckGroup)
  double Nmse() const { return err / energy; }
};

// Checks one quantized group against the bound derived from its fit, and the
// structure of its values. w/v/imp: the group's n weights, decoded values,
// importances (may be null). Adds to stats.
void CheckGroup(const Format& f, const float* w, const float* v, const float* imp, int n,
                const uint8_t* block, Stats* st, const std::string& where) {
  SCOPED_TRACE(where);
  const double err = GroupErr(w, v, imp, n);
  double energy = 0, lo = w[0], hi = w[0], vext = 0, sum_c = 0;
  for (int i = 0; i < n; ++i) {
    energy += double(w[i]) * w[i];
    lo = std::min<double>(lo, w[i]), hi = std::max<double>(hi, w[i]);
    if (std::fabs(w[i]) > std::fabs(vext)) vext = w[i];
    sum_c += imp ? imp[i] : 1.0;
  }
  st->err += GroupErr(w, v, nullptr, n);
  st->energy += energy;
  const std::vector<double> levels = Levels(f, block);
  const double slack = std::ldexp(std::fabs(lo) + std::fabs(hi) + (hi - lo), -10) + std::ldexp(1.0, -22);
  if (f.kind == Kind::kInt || f.kind == Kind::kNl) {
    // Every value is the grid level nearest to w (RTN), up to float rounding.
    // For w inside the grid's span that means |w - v| <= half the largest gap
    // between adjacent levels (kInt: d/2).
    const double d = f.kind == Kind::kInt ? std::fabs(F16At(block)) : std::fabs(F16At(block)) * DocNlMaxGap(f.bits);
    const double gmin = *std::min_element(levels.begin(), levels.end());
    const double gmax = *std::max_element(levels.begin(), levels.end());
    for (int i = 0; i < n; ++i) {
      double nearest = INFINITY;
      for (double l : levels) nearest = std::min(nearest, std::fabs(w[i] - l));
      const double tol = 1e-6 * (std::fabs(w[i]) + std::fabs(gmin) + std::fabs(gmax)) + 1e-30;
      ASSERT_LE(std::fabs(w[i] - v[i]), nearest + tol) << "i=" << i;
      if (w[i] >= gmin && w[i] <= gmax) {
        ASSERT_LE(std::fabs(w[i] - v[i]), d / 2 + tol) << "i=" << i;
      }
    }
    // The clipping search includes plain RTN, whose per-weight error is at
    // most B: asym d0/2 with d0 = (max-min)/(2^b-1); sym d0/2 on vext's side
    // and up to |d0| = |vext|/2^(b-1) past the grid's short end; plus the
    // fp16 rounding of d and m (slack). So err <= sum c_i B_i^2.
    // nl: the search puts vext on either end level; with vext on the end of
    // smaller magnitude m = min(|L[0]|, L[last]) (d0 = |vext| / m) the grid
    // covers [-|vext|, |vext|], and its largest gap is maxgap |d0|.
    const int half = 1 << (f.bits - 1);
    double bound = 0;
    for (int i = 0; i < n; ++i) {
      double b;
      if (f.kind == Kind::kNl) {
        const std::vector<int> l = DocNlLevels(f.bits);
        b = DocNlMaxGap(f.bits) / 2.0 * std::fabs(vext) / std::min(-l.front(), l.back());
      } else if (!f.symmetric) {
        b = (hi - lo) / ((1 << f.bits) - 1) / 2;
      } else {
        const double d0 = std::fabs(vext) / half;
        const bool covered = (w[i] * vext >= 0) || std::fabs(w[i]) <= d0 * (half - 1);
        b = covered ? d0 / 2 : d0;
      }
      b += slack;
      bound += (imp ? imp[i] : 1.0) * b * b;
    }
    EXPECT_LE(err, bound * (1 + 1e-9) + 1e-30);
    if (f.kind == Kind::kNl) {
      // Model: the error of int{bits} sym (same bytes per block) on this
      // group; the non-uniform grid is there to beat it (asserted per row set).
      const Format sym4{Kind::kInt, f.bits, f.group, true};
      const GroupParams p4 = FitGroupRef(sym4, w, n, nullptr);
      for (int i = 0; i < n; ++i) {
        const double e = double(w[i]) - QuantizeValueRef(sym4, p4, w[i]);
        st->model += e * e;
      }
      return;
    }
    // Model for NMSE: uniform rounding noise of the min/max step, d0^2 / 12.
    const double d0 = f.symmetric ? std::fabs(vext) / half : (hi - lo) / (2 * half - 1);
    st->model += n * d0 * d0 / 12;
    return;
  }
  double a_ls = 0;
  const double bin_err = BinaryLsErr(w, imp, n, &a_ls);
  const double a16 = F16At(block);
  // Rounding the LS scale to fp16 adds sum c (a16 - a)^2 <= sum c (2^-11 a)^2.
  const double f16_err = sum_c * std::pow(std::ldexp(a_ls, -11) + 1e-7, 2);
  {  // Model for NMSE: the unweighted binary LS error plus its fp16 rounding.
    double a_u = 0;
    const double e = BinaryLsErr(w, nullptr, n, &a_u);
    st->model += e + n * std::pow(std::ldexp(a_u, -11) + 1e-7, 2);
  }
  const bool binary = f.kind == Kind::kBinary || (f.kind == Kind::kBinTern && block[2] == 0);
  if (binary) {
    // a = weighted mean |w| is the LS scale: err = bin_err + sum c (a16 - a)^2 exactly.
    for (int i = 0; i < n; ++i) ASSERT_EQ(v[i], w[i] < 0 ? -a16 : a16) << "i=" << i;
    EXPECT_NEAR(err, bin_err + sum_c * (a16 - a_ls) * (a16 - a_ls), 1e-5 * energy + 1e-12);
    return;
  }
  // Ternary: values in {-a, 0, a} with sign(w); support = the largest |w|.
  double min_in = INFINITY, max_out = 0;
  for (int i = 0; i < n; ++i) {
    if (v[i] == 0) {
      max_out = std::max<double>(max_out, std::fabs(w[i]));
    } else {
      ASSERT_EQ(v[i], w[i] > 0 ? a16 : -a16) << "i=" << i;
      min_in = std::min<double>(min_in, std::fabs(w[i]));
    }
  }
  if (f.kind == Kind::kTernary) {
    EXPECT_GT(min_in, max_out) << "support is not a threshold set";
    // The cosine-best support is at least as aligned as the sign vector (a
    // threshold support too), and with its LS scale the error is
    // |w|^2 (1 - cos^2): so err <= bin_err, plus the fp16 rounding of a.
    EXPECT_LE(err, bin_err + f16_err + 1e-6 * energy);
  } else {
    // kBinTern keeps ternary only if it beats the stored binary fit by the
    // lambda criterion: err < (1 - lambda) * (bin_err + fp16 rounding).
    EXPECT_LE(err, (1 - kBinTernLambda) * (bin_err + f16_err) + 1e-6 * energy);
  }
}

// Quantizes `rows` rows of `cols` weights and checks: QuantizeValueRef of the
// fitted params equals the dequantized row bit for bit; per-group bounds;
// DotRowRef against an exact dot of the dequantized row; padding codes.
void CheckRows(const Format& f, const std::vector<float>& w, int64_t rows, int64_t cols,
               const std::vector<float>* importance, const std::string& what, Stats* stats = nullptr) {
  Stats local;
  Stats& st = stats ? *stats : local;
  const int64_t row_bytes = f.RowBytes(cols);
  std::vector<uint8_t> packed(row_bytes);
  std::vector<float> deq(cols);
  const std::vector<float> x = Uniform(cols, 77 + cols, -1, 1);
  for (int64_t r = 0; r < rows; ++r) {
    const float* wr = w.data() + r * cols;
    const float* ir = importance ? importance->data() + r * cols : nullptr;
    const std::string where = what + " " + f.Name() + " row " + std::to_string(r) + " cols " + std::to_string(cols);
    QuantizeRowRef(f, wr, cols, ir, packed.data());
    DequantizeRowRef(f, packed.data(), cols, deq.data());
    for (int64_t g = 0; g < f.BlocksPerRow(cols); ++g) {
      const int64_t off = g * f.group;
      const int n = static_cast<int>(std::min<int64_t>(f.group, cols - off));
      const uint8_t* block = packed.data() + g * f.BlockBytes();
      const GroupParams p = FitGroupRef(f, wr + off, n, ir ? ir + off : nullptr);
      for (int i = 0; i < f.group; ++i) {
        if (i < n) {
          ASSERT_EQ(QuantizeValueRef(f, p, wr[off + i]), deq[off + i]) << where << " col " << off + i;
          ASSERT_EQ(DocValue(f, block, i), deq[off + i]) << where << " col " << off + i;
        } else {  // padding: the code nearest zero
          double min_level = INFINITY;
          for (double l : Levels(f, block)) min_level = std::min(min_level, std::fabs(l));
          ASSERT_LE(std::fabs(DocValue(f, block, i)), min_level * (1 + 1e-6) + 1e-30) << where << " pad " << i;
        }
      }
      CheckGroup(f, wr + off, deq.data() + off, ir ? ir + off : nullptr, n, block, &st,
                 where + " group " + std::to_string(g));
      if (::testing::Test::HasFatalFailure()) return;
    }
    // fp32 accumulation of cols+1 rounded terms: |error| <= gamma * sum|v x|.
    double exact = 0, mag = 0;
    for (int64_t c = 0; c < cols; ++c) exact += double(deq[c]) * x[c], mag += std::fabs(double(deq[c]) * x[c]);
    const double u = std::ldexp(1.0, -24), k = double(cols) + 2;
    EXPECT_NEAR(DotRowRef(f, packed.data(), x.data(), cols), exact, k * u / (1 - k * u) * mag + 1e-30) << where;
  }
}

// ------------------------------------------------------------ param suite ---

class FormatTest : public ::testing::TestWithParam<Format> {};

TEST_P(FormatTest, NameParseRoundTrip) {
  const Format f = GetParam();
  const std::optional<Format> back = Format::Parse(f.Name());
  ASSERT_TRUE(back.has_value()) << f.Name();
  EXPECT_EQ(*back, f);
  EXPECT_FALSE(Format::Parse(f.Name() + "x").has_value());
  EXPECT_FALSE(Format::Parse(" " + f.Name()).has_value());
}

TEST_P(FormatTest, SizesMatchDocumentedFormula) {
  const Format f = GetParam();
  EXPECT_EQ(f.BlockBytes(), DocBlockBytes(f));
  for (int64_t cols : {1, 7, 31, 33, 172, 1025}) {
    const int64_t rows = 3, blocks = (cols + f.group - 1) / f.group;
    EXPECT_EQ(f.RowBytes(cols), blocks * DocBlockBytes(f)) << cols;
    const double tensor_bytes = double(rows) * double(f.RowBytes(cols));
    EXPECT_DOUBLE_EQ(f.BitsPerWeight(cols), tensor_bytes * 8 / (double(rows) * cols)) << cols;
  }
}

// Random block bytes decode exactly as docs/FORMATS.md says.
TEST_P(FormatTest, DecodeMatchesDocumentedLayout) {
  const Format f = GetParam();
  std::mt19937 rng(1234);
  for (int64_t cols : {int64_t(f.group) * 3, int64_t(f.group) * 2 + 5}) {
    std::vector<uint8_t> row(f.RowBytes(cols));
    for (auto& b : row) b = static_cast<uint8_t>(rng());
    for (int64_t g = 0; g < f.BlocksPerRow(cols); ++g) {  // finite fp16 scales; flags 0, 1, 7
      uint8_t* block = row.data() + g * f.BlockBytes();
      for (int s = 0; s < (f.kind == Kind::kInt && !f.symmetric ? 2 : 1); ++s) {
        const uint16_t h = Fp32ToFp16(std::uniform_real_distribution<float>(-3, 3)(rng));
        block[2 * s] = h & 0xff, block[2 * s + 1] = h >> 8;
      }
      if (f.kind == Kind::kBinTern) block[2] = static_cast<uint8_t>(g == 0 ? 0 : g == 1 ? 1 : 7);
    }
    std::vector<float> out(cols);
    DequantizeRowRef(f, row.data(), cols, out.data());
    for (int64_t c = 0; c < cols; ++c) {
      ASSERT_EQ(out[c], DocValue(f, row.data() + (c / f.group) * f.BlockBytes(), int(c % f.group)))
          << f.Name() << " col " << c;
    }
  }
}

TEST_P(FormatTest, RoundTripGaussianRows) {
  const Format f = GetParam();
  for (int64_t cols : {1, 7, 31, 33, 172, 1025}) {
    const int64_t rows = 4;
    const auto w = Gaussian(rows * cols, 11 + cols, 0.05f);
    const auto imp = Uniform(rows * cols, 5 + cols, 0.1f, 2.0f);
    CheckRows(f, w, rows, cols, nullptr, "gaussian");
    if (HasFatalFailure()) return;
    CheckRows(f, w, rows, cols, &imp, "gaussian+importance");
    if (HasFatalFailure()) return;
  }
  // NMSE on N(0, s^2), 8 x 1024 weights, no importance. Per-group fits are
  // optimal in-sample, so on average they do at least as well as the best
  // population quantizer of each kind (kBinaryGaussianNmse,
  // kTernaryGaussianNmse; bintern <= binary); kGaussianNmseSlack covers the
  // sampling noise of 8192 weights. kInt: the search only lowers the error
  // below min/max RTN, whose error is uniform rounding noise of the step,
  // d0^2 / 12 (st.model).
  const auto w = Gaussian(8 * 1024, 99, 0.05f);
  Stats st;
  CheckRows(f, w, 8, 1024, nullptr, "nmse", &st);
  if (HasFatalFailure()) return;
  switch (f.kind) {
    case Kind::kInt: EXPECT_LE(st.err, st.model * kUniformModelMargin) << f.Name() << " nmse " << st.Nmse(); break;
    case Kind::kBinary: EXPECT_LE(st.Nmse(), kBinaryGaussianNmse + kGaussianNmseSlack); break;
    case Kind::kTernary: EXPECT_LE(st.Nmse(), kTernaryGaussianNmse + kGaussianNmseSlack); break;
    case Kind::kBinTern: EXPECT_LE(st.Nmse(), kBinaryGaussianNmse + kGaussianNmseSlack); break;
    case Kind::kNl: EXPECT_LT(st.err, st.model) << f.Name() << " nmse " << st.Nmse(); break;
  }
}

// GPTQ applies params it did not get from FitGroupRef (and weights it has
// updated) value by value: QuantizeValueRef must still equal what packing
// stores, for params that are not fp16-exact.
TEST_P(FormatTest, QuantizeValueEqualsPackedValueForArbitraryParams) {
  const Format f = GetParam();
  std::mt19937 rng(21);
  for (int trial = 0; trial < 50; ++trial) {
    const int n = trial % 4 ? f.group : 1 + int(rng() % f.group);
    const auto w = Gaussian(n, 300 + trial, 0.7f);
    std::uniform_real_distribution<float> u(0.001f, 0.5f);
    GroupParams p{u(rng) * (trial % 2 ? 1 : -1), f.kind == Kind::kBinTern ? float(trial % 2) : u(rng) - 0.6f};
    p.scale += 1e-7f;  // not representable in fp16
    std::vector<uint8_t> block(f.BlockBytes());
    PackGroupRef(f, p, w.data(), n, block.data());
    std::vector<float> out(n);
    DequantizeRowRef(f, block.data(), n, out.data());
    for (int i = 0; i < n; ++i) ASSERT_EQ(QuantizeValueRef(f, p, w[i]), out[i]) << f.Name() << " i=" << i;
  }
}

// Bad weights (NaN, Inf, beyond fp16) never crash or produce codes out of
// range; finite groups next to them are unaffected.
TEST_P(FormatTest, NonFiniteWeightsAreContained) {
  const Format f = GetParam();
  std::vector<float> w = Gaussian(2 * f.group, 8, 0.1f);
  w[1] = NAN, w[2] = INFINITY, w[3] = -INFINITY, w[4] = 1e30f, w[5] = -7e4f;
  std::vector<uint8_t> row(f.RowBytes(w.size()));
  QuantizeRowRef(f, w.data(), w.size(), nullptr, row.data());
  std::vector<float> out(w.size());
  DequantizeRowRef(f, row.data(), w.size(), out.data());
  for (int i = f.group; i < 2 * f.group; ++i) EXPECT_LT(std::fabs(out[i] - w[i]), 0.2f) << f.Name();
  for (int i = 0; i < f.group; ++i) EXPECT_FALSE(std::isnan(out[i]) && i != 1) << f.Name() << " i=" << i;
}

// Real weights: rows of stories260K (llama2.c fp32: 7 int32 header, then the
// token embedding [512, 64], rms_att [5, 64], wq [5, 64, 64]).
std::vector<float> ReadStoriesFloats(int64_t float_offset, int64_t count) {
  std::string dir;
  if (const char* s = std::getenv("NIBBLE_SHARED_DIR")) dir = s;
  else if (const char* s = std::getenv("NIBBLE_SOURCE_DIR")) dir = std::string(s) + "/../shared";
  else dir = "../shared";
  std::ifstream in(dir + "/models/stories260K/stories260K.bin", std::ios::binary);
  if (!in) return {};
  int32_t header[7];
  if (!in.read(reinterpret_cast<char*>(header), sizeof(header))) return {};
  if (header[0] != 64 || header[2] != 5 || std::abs(header[5]) != 512) return {};
  std::vector<float> v(count);
  in.seekg(28 + 4 * float_offset);
  if (!in.read(reinterpret_cast<char*>(v.data()), 4 * count)) return {};
  return v;
}

TEST_P(FormatTest, RoundTripRealWeights) {
  const Format f = GetParam();
  const std::vector<float> wq = ReadStoriesFloats(512 * 64 + 5 * 64, 64 * 64);
  // Embedding rows 300..331 (merged tokens, trained). Rows of ids < 32
  // (control and rare byte tokens) are near-identical copies of each other
  // and not representative of trained weights.
  const std::vector<float> emb = ReadStoriesFloats(300 * 64, 32 * 64);
  if (wq.empty() || emb.empty()) GTEST_SKIP() << "stories260K.bin not found under ../shared";
  Stats a, b;
  CheckRows(f, wq, 64, 64, nullptr, "wq0", &a);
  if (HasFatalFailure()) return;
  CheckRows(f, emb, 2, 1024, nullptr, "emb", &b);
  if (HasFatalFailure()) return;
  CheckRows(f, emb, 1, 172, nullptr, "emb172");
  if (HasFatalFailure()) return;
  // Same reasoning as for Gaussian rows, with the data's own prediction
  // (st.model): kInt <= the uniform-noise model of min/max RTN, within its
  // sampling noise; binary, ternary and bintern <= the binary LS error.
  for (const Stats& st : {a, b}) {
    const double margin = f.kind == Kind::kInt ? kUniformModelMargin : f.kind == Kind::kNl ? 1.0 : 1 + 1e-6;
    EXPECT_LE(st.err, st.model * margin + 1e-12) << f.Name() << " nmse " << st.Nmse();
  }
}

INSTANTIATE_TEST_SUITE_P(AllFormats, FormatTest, ::testing::ValuesIn(AllFormats()),
                         [](const ::testing::TestParamInfo<Format>& i) { return i.param.Name(); });

// ---------------------------------------------------------- single checks ---

TEST(FormatRegistryTest, ListsEveryFormatOnceWithDistinctNames) {
  std::set<std::string> names;
  for (const Format& f : AllFormats()) names.insert(f.Name());
  EXPECT_EQ(AllFormats().size(), 4u * 3 * 2 + 3u * 3 + 3u * 3);
  EXPECT_EQ(names.size(), AllFormats().size());
  EXPECT_EQ(AllFormats().front().Name(), "int8_g32");
  EXPECT_EQ(Format::Parse("int4_g64_sym"), (Format{Kind::kInt, 4, 64, true}));
  EXPECT_EQ(Format::Parse("bintern_g128"), (Format{Kind::kBinTern, 2, 128, false}));
  for (const char* bad : {"", "int4", "int4_g48", "int5_g64", "int4_g064", "INT4_G64", "int4_g64_asym",
                          "ternary_g64_sym", "binary_g256", "int4_g64_sym_sym", "bintern", "int4_g64\n"}) {
    EXPECT_FALSE(Format::Parse(bad).has_value()) << bad;
  }
}

// Bits per weight at cols divisible by the group: the docs/FORMATS.md table.
TEST(FormatRegistryTest, BitsPerWeightTableAndOrdering) {
  const struct { const char* name; double bits; } table[] = {
      {"int8_g32", 9.0},     {"int8_g64_sym", 8.25},   {"int4_g32", 5.0},     {"int4_g64", 4.5},
      {"int4_g128_sym", 4.125}, {"int3_g64", 3.5},     {"int3_g128_sym", 3.125}, {"int2_g32", 3.0},
      {"int2_g128_sym", 2.125}, {"ternary_g64", 2.25}, {"binary_g32", 1.5},  {"binary_g128", 1.125},
      {"bintern_g32", 3.0},  {"bintern_g128", 2.25}, {"nl4_g32", 4.5},       {"nl4_g128", 4.125},
      {"nl3_g64", 3.25},     {"nl2_g128", 2.125},      {"nl2_g32", 2.5}};
  for (const auto& t : table) EXPECT_DOUBLE_EQ(Format::Parse(t.name)->BitsPerWeight(1024), t.bits) << t.name;
  for (uint16_t g : {32, 64, 128}) {
    for (bool sym : {false, true}) {
      double prev = 0;
      for (uint8_t b : {2, 3, 4, 8}) {
        const double bits = Format{Kind::kInt, b, g, sym}.BitsPerWeight(4096);
        EXPECT_LT(prev, bits) << int(b) << " g" << g;
        prev = bits;
      }
    }
    EXPECT_LT(Format({Kind::kBinary, 1, g, false}).BitsPerWeight(4096),
              Format({Kind::kTernary, 2, g, false}).BitsPerWeight(4096));
  }
}

// Every code of 2/3/4/8-bit kInt decodes to d*q+m (asym) / d*(q-2^(b-1)) (sym)
// and sits at its documented bit position.
TEST(IntFormatTest, EveryCodeDecodesToItsLevel) {
  for (const Format& f : AllFormats()) {
    if (f.kind != Kind::kInt) continue;
    const float d = 0.125f, m = -0.75f;  // exact in fp16
    const int levels = 1 << f.bits, half = levels / 2;
    for (int shift = 0; shift < 3; ++shift) {
      std::vector<float> w(f.group);
      std::vector<int> q(f.group);
      for (int i = 0; i < f.group; ++i) {
        q[i] = (i * 5 + 3 + shift * 7) % levels;  // i*5 mod 2^b visits every code
        w[i] = f.symmetric ? d * (q[i] - half) : d * q[i] + m;
      }
      std::vector<uint8_t> block(f.BlockBytes());
      const GroupParams p{d, f.symmetric ? 0.0f : m};
      PackGroupRef(f, p, w.data(), f.group, block.data());
      std::vector<float> out(f.group);
      DequantizeRowRef(f, block.data(), f.group, out.data());
      for (int i = 0; i < f.group; ++i) {
        ASSERT_EQ(DocIntCode(f, block.data(), i), q[i]) << f.Name() << " i=" << i;
        ASSERT_EQ(out[i], w[i]) << f.Name() << " i=" << i;
        ASSERT_EQ(QuantizeValueRef(f, p, w[i]), w[i]) << f.Name() << " i=" << i;
      }
    }
  }
}

TEST(IntFormatTest, ZeroAndConstantGroups) {
  for (const Format& f : AllFormats()) {
    for (float c : {0.0f, 0.3f, -2.5f}) {
      std::vector<float> w(f.group + 3, c), out(w.size());
      std::vector<uint8_t> row(f.RowBytes(w.size()));
      QuantizeRowRef(f, w.data(), w.size(), nullptr, row.data());
      DequantizeRowRef(f, row.data(), w.size(), out.data());
      for (size_t i = 0; i < w.size(); ++i) {
        // asym int (d = 0, all values decode to m), binary and bintern (a = |c|)
        // store a constant exactly up to fp16; sym int / ternary within fp16 of c.
        EXPECT_NEAR(out[i], c, std::fabs(c) * std::ldexp(1.0, -10)) << f.Name() << " c=" << c;
        if (f.kind == Kind::kInt && !f.symmetric) {
          EXPECT_EQ(out[i], RoundF16(c)) << f.Name();
        }
      }
    }
  }
}

// The clipping search is never worse than plain min/max (max-abs) RTN.
TEST(IntFormatTest, ClippingSearchNeverWorseThanPlainRtn) {
  std::mt19937 rng(7);
  for (int trial = 0; trial < 1000; ++trial) {
    const Format f{Kind::kInt, uint8_t(std::array<int, 4>{2, 3, 4, 8}[trial % 4]),
                   uint16_t(32 << (trial / 4 % 3)), bool(trial / 12 % 2)};
    const int n = trial % 5 == 0 ? 1 + int(rng() % f.group) : f.group;
    std::vector<float> w(n), imp(n);
    std::student_t_distribution<float> heavy(3.0f);
    for (int i = 0; i < n; ++i) {
      w[i] = trial % 3 == 0 ? heavy(rng) * 0.02f : std::normal_distribution<float>(0.01f, 0.03f)(rng);
      imp[i] = std::uniform_real_distribution<float>(0.0f, 3.0f)(rng);
    }
    const float* ip = trial % 2 ? imp.data() : nullptr;
    const float lo = *std::min_element(w.begin(), w.end()), hi = *std::max_element(w.begin(), w.end());
    float vext = 0;
    for (float x : w) if (std::fabs(x) > std::fabs(vext)) vext = x;
    const int half = 1 << (f.bits - 1);
    const double d = f.symmetric ? RoundF16(-vext / half) : RoundF16((hi - lo) / (2 * half - 1));
    const double m = f.symmetric ? -half * d : RoundF16(lo);
    double plain = 0;  // every weight at its nearest level of the plain grid
    for (int i = 0; i < n; ++i) {
      double best = INFINITY;
      for (int q = 0; q < 2 * half; ++q) best = std::min(best, std::fabs(w[i] - (d * q + m)));
      plain += (ip ? ip[i] : 1.0) * best * best;
    }
    const GroupParams p = FitGroupRef(f, w.data(), n, ip);
    std::vector<float> v(n);
    for (int i = 0; i < n; ++i) v[i] = QuantizeValueRef(f, p, w[i]);
    ASSERT_LE(GroupErr(w.data(), v.data(), ip, n), plain * (1 + 1e-5) + 1e-14) << f.Name() << " trial " << trial;
  }
}

double Cosine(const std::vector<float>& a, const std::vector<float>& b) {
  double ab = 0, aa = 0, bb = 0;
  for (size_t i = 0; i < a.size(); ++i) ab += double(a[i]) * b[i], aa += double(a[i]) * a[i], bb += double(b[i]) * b[i];
  return bb > 0 ? ab / std::sqrt(aa * bb) : 0;
}

TEST(TernaryFormatTest, CosineBeatsHeuristicAndMatchesExhaustiveSearch) {
  std::mt19937 rng(3);
  for (int trial = 0; trial < 1100; ++trial) {
    const Format f{Kind::kTernary, 2, uint16_t(32 << (trial % 3)), false};
    const int n = trial < 1000 ? f.group : 8;  // the last 100: all 3^8 ternary vectors
    std::vector<float> w(n), v(n), h(n);
    std::student_t_distribution<float> heavy(2.5f);
    for (auto& x : w) x = trial % 2 ? heavy(rng) : std::normal_distribution<float>()(rng);
    const GroupParams p = FitGroupRef(f, w.data(), n, nullptr);
    for (int i = 0; i < n; ++i) v[i] = QuantizeValueRef(f, p, w[i]);
    double mean_abs = 0;
    for (float x : w) mean_abs += std::fabs(x) / n;
    for (int i = 0; i < n; ++i) h[i] = std::fabs(w[i]) > 0.7 * mean_abs ? (w[i] > 0 ? 1.f : -1.f) : 0.f;
    ASSERT_GE(Cosine(w, v), Cosine(w, h) - 1e-6) << "trial " << trial;
    if (n == 8) {
      double best = 0;
      for (int code = 0; code < 6561; ++code) {
        std::vector<float> t(8);
        for (int i = 0, c = code; i < 8; ++i, c /= 3) t[i] = float(c % 3) - 1;
        best = std::max(best, Cosine(w, t));
      }
      ASSERT_NEAR(Cosine(w, v), best, 1e-6) << "trial " << trial;
    }
  }
}

TEST(BinTernFormatTest, PicksBinaryOrTernaryByCriterion) {
  const Format f = *Format::Parse("bintern_g32");
  std::mt19937 rng(5);
  std::vector<float> bin(32), zeros(32), mixed(32);
  for (int i = 0; i < 32; ++i) {
    const float s = rng() % 2 ? 1.f : -1.f;
    bin[i] = 0.375f * s;                       // exactly binary: err_bin = 0
    zeros[i] = i % 4 ? 0.0f : s * (1 + 0.01f * i);  // 3/4 zeros
    mixed[i] = s * (i % 2 ? 1.0f : 0.25f);     // half +-1, half +-0.25
  }
  auto flag = [&](const std::vector<float>& w, float lambda) {
    std::vector<uint8_t> block(f.BlockBytes());
    const GroupParams p = FitGroupRef(f, w.data(), 32, nullptr, lambda);
    PackGroupRef(f, p, w.data(), 32, block.data());
    EXPECT_EQ(block[2], p.zero) << "flag byte";
    EXPECT_EQ(block[3], 0) << "reserved byte";
    return int(block[2]);
  };
  EXPECT_EQ(flag(bin, kBinTernLambda), 0);
  EXPECT_EQ(flag(zeros, kBinTernLambda), 1);
  EXPECT_EQ(flag(zeros, 1.0f), 0);  // nothing beats err_bin by 100%
  // mixed: binary a = 0.625, err_bin = 32 * 0.375^2; ternary support = the
  // +-1 half (cosine 0.707 > 0.625 / 0.729), a = 1, nearest coding zeroes the
  // 0.25s: err_ter = 16 * 0.25^2. Reduction 1 - 1 / 4.5 = 0.778.
  EXPECT_EQ(flag(mixed, kBinTernLambda), 1);
  EXPECT_EQ(flag(mixed, 0.77f), 1);
  EXPECT_EQ(flag(mixed, 0.78f), 0);
}

TEST(BinTernFormatTest, EffectiveBitsCountBinaryGroupsAtOneBit) {
  for (uint16_t g : {32, 64, 128}) {
    const Format f{Kind::kBinTern, 2, g, false};
    std::vector<float> w(3 * g);
    for (int i = 0; i < 3 * g; ++i) {
      const float s = (i * 7) % 3 ? 1.f : -1.f;
      w[i] = (i / g == 1 && i % 4) ? 0.0f : 0.5f * s;  // group 1 ternary, groups 0 and 2 binary
    }
    std::vector<uint8_t> row(f.RowBytes(w.size()));
    QuantizeRowRef(f, w.data(), w.size(), nullptr, row.data());
    ASSERT_EQ(row[f.BlockBytes() + 2], 1);
    ASSERT_EQ(row[2], 0);
    EXPECT_DOUBLE_EQ(EffectiveBitsRef(f, row.data(), w.size()), (3 * 17.0 + g * (1 + 2 + 1)) / (3 * g));
    EXPECT_DOUBLE_EQ(f.BitsPerWeight(w.size()), 8.0 * (4 + g / 4) / g);
  }
  const Format i4 = *Format::Parse("int4_g64");
  EXPECT_DOUBLE_EQ(EffectiveBitsRef(i4, nullptr, 172), i4.BitsPerWeight(172));
}

}  // namespace
}  // namespace nibble::fmt
