// DF-MPC (quantizers/dfmpc.h): the closed forms are optimal (normal equations
// solved independently by Gauss-Jordan here, random perturbations never help,
// the Gram-trick composite error equals the explicit dim x dim products), the
// lossless case is the identity, per-layer composite errors drop on
// stories260K at equal bits, and bad options fail with clear errors.
#include "quantizers/dfmpc.h"

#include <cmath>
#include <filesystem>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "engine/model/model_loader.h"
#include "quantizers/model_quantizer.h"
#include "quantizers/quant_error.h"
#include "quantizers/rtn.h"
#include "tests/test_util.h"

namespace nibble {
namespace {

std::vector<float> Random(int64_t n, std::mt19937* rng, float sd = 1.0f) {
  std::normal_distribution<float> d(0.0f, sd);
  std::vector<float> v(static_cast<size_t>(n));
  for (float& x : v) x = d(*rng);
  return v;
}

HostTensor Matrix(const std::string& name, int64_t rows, int64_t cols, std::vector<float> data) {
  HostTensor t;
  t.name = name;
  t.shape = {rows, cols};
  t.data = std::move(data);
  return t;
}

// RTN fake quantization through the format registry.
std::vector<float> FakeQuant(const std::vector<float>& w, int64_t rows, int64_t cols, const char* format) {
  auto f = fmt::Format::Parse(format);
  if (!f) {
    ADD_FAILURE() << format;
    return w;
  }
  auto q = RtnQuantize(Matrix("w", rows, cols, w), {}, *f);
  EXPECT_TRUE(q.ok()) << q.status();
  auto d = DequantizeAll(*q);
  EXPECT_TRUE(d.ok());
  return *d;
}

// Independent reference: M = (V D Qᵀ + λI)(Q D Qᵀ + λI)⁻¹ by Gauss-Jordan with partial pivoting on Mᵀ.
std::vector<double> ReferenceMap(const std::vector<float>& v, const std::vector<float>& q, int hd, int cols,
                                 const std::vector<float>& w, double ridge) {
  std::vector<double> a(hd * hd, 0), b(hd * hd, 0);
  for (int i = 0; i < hd; ++i)
    for (int k = 0; k < hd; ++k)
      for (int j = 0; j < cols; ++j) {
        a[i * hd + k] += double(q[i * cols + j]) * w[j] * q[k * cols + j];
        b[i * hd + k] += double(v[i * cols + j]) * w[j] * q[k * cols + j];
      }
  double tr = 0;
  for (int i = 0; i < hd; ++i) tr += a[i * hd + i];
  const double lam = ridge * tr / hd;
  for (int i = 0; i < hd; ++i) a[i * hd + i] += lam, b[i * hd + i] += lam;
  // Solve A X = Bᵀ (A symmetric), M = Xᵀ.
  std::vector<double> x(hd * hd);
  for (int i = 0; i < hd; ++i)
    for (int k = 0; k < hd; ++k) x[i * hd + k] = b[k * hd + i];
  for (int c = 0; c < hd; ++c) {
    int p = c;
    for (int r = c + 1; r < hd; ++r)
      if (std::abs(a[r * hd + c]) > std::abs(a[p * hd + c])) p = r;
    for (int k = 0; k < hd; ++k) std::swap(a[c * hd + k], a[p * hd + k]), std::swap(x[c * hd + k], x[p * hd + k]);
    for (int r = 0; r < hd; ++r) {
      if (r == c) continue;
      const double f = a[r * hd + c] / a[c * hd + c];
      for (int k = 0; k < hd; ++k) a[r * hd + k] -= f * a[c * hd + k], x[r * hd + k] -= f * x[c * hd + k];
    }
  }
  std::vector<double> m(hd * hd);
  for (int i = 0; i < hd; ++i)
    for (int k = 0; k < hd; ++k) m[k * hd + i] = x[i * hd + k] / a[i * hd + i];
  return m;
}

// Explicit squared composite error Σ_h ||(Wo_h V_g - Ŵo_h Q_g) D^½||² with dim x dim products.
double ExplicitAttnError2(const std::vector<float>& wo, const std::vector<float>& wo_hat, const std::vector<float>& v,
                          const std::vector<float>& q, int dim, int nh, int nkv, int hd, const std::vector<float>& w,
                          double* ref2) {
  double e = 0, r2 = 0;
  const int qdim = nh * hd, group = nh / nkv;
  for (int h = 0; h < nh; ++h) {
    const int g = h / group;
    for (int r = 0; r < dim; ++r)
      for (int j = 0; j < dim; ++j) {
        double a = 0, b = 0;
        for (int k = 0; k < hd; ++k) {
          a += double(wo[r * qdim + h * hd + k]) * v[(g * hd + k) * dim + j];
          b += double(wo_hat[r * qdim + h * hd + k]) * q[(g * hd + k) * dim + j];
        }
        e += (a - b) * (a - b) * w[j];
        r2 += a * a * w[j];
      }
  }
  if (ref2) *ref2 = r2;
  return e;
}

TEST(DfmpcClosedForm, HeadMapMatchesIndependentLeastSquares) {
  std::mt19937 rng(1);
  const int hd = 8, cols = 64;
  std::vector<float> v = Random(hd * cols, &rng), w = Random(cols, &rng);
  for (float& x : w) x = x * x + 0.1f;
  const std::vector<float> q = FakeQuant(v, hd, cols, "int2_g32");
  for (double ridge : {0.0, 0.05, 1.0}) {
    auto m = DfmpcHeadMap(v.data(), q.data(), hd, cols, w, ridge);
    ASSERT_TRUE(m.ok()) << m.status();
    const std::vector<double> ref = ReferenceMap(v, q, hd, cols, w, ridge);
    for (int i = 0; i < hd * hd; ++i) EXPECT_NEAR((*m)[i], ref[i], 1e-9 * (1 + std::abs(ref[i]))) << ridge << " " << i;
  }
}

// The calibrated variant: whitening by the factor of H = (2/N) XᵀX turns the
// head map into the least-squares fit on the data itself,
// argmin_M Σ_t ||V x_t - M Q x_t||², solved independently on the projected data.
TEST(DfmpcClosedForm, CalibratedHeadMapIsTheDataLeastSquaresFit) {
  std::mt19937 rng(5);
  const int hd = 8, cols = 48, n = 400;
  // Correlated, anisotropic activations: X = Z A with a few loud channels.
  std::vector<float> z = Random(n * cols, &rng), mix = Random(cols * cols, &rng, 0.3f);
  for (int j = 0; j < cols; ++j) mix[j * cols + j] += (j % 7 == 0) ? 6.0f : 1.0f;
  std::vector<float> x(n * cols, 0.0f);
  for (int t = 0; t < n; ++t)
    for (int k = 0; k < cols; ++k)
      for (int j = 0; j < cols; ++j) x[t * cols + j] += z[t * cols + k] * mix[k * cols + j];
  Hessian h;
  h.dim = cols;
  h.n_tokens = n;
  h.h.assign(cols * cols, 0.0f);
  for (int a = 0; a < cols; ++a)
    for (int b = 0; b < cols; ++b) {
      double s = 0;
      for (int t = 0; t < n; ++t) s += double(x[t * cols + a]) * x[t * cols + b];
      h.h[a * cols + b] = static_cast<float>(2.0 * s / n);
    }
  const std::vector<float> v = Random(hd * cols, &rng);
  const std::vector<float> q = FakeQuant(v, hd, cols, "int2_g32");
  auto u = DfmpcHessianFactor(h, cols, 0.0, "test H");
  ASSERT_TRUE(u.ok()) << u.status();
  const std::vector<float> vw = DfmpcWhiten(v.data(), hd, cols, *u), qw = DfmpcWhiten(q.data(), hd, cols, *u);
  auto m = DfmpcHeadMap(vw.data(), qw.data(), hd, cols, {}, 0.0);
  ASSERT_TRUE(m.ok()) << m.status();
  // Reference: project the data (rows of V X^T, Q X^T are hd x n) and fit with unit weights.
  std::vector<float> vx(hd * n, 0.0f), qx(hd * n, 0.0f), ones(n, 1.0f);
  for (int i = 0; i < hd; ++i)
    for (int t = 0; t < n; ++t) {
      double a = 0, b = 0;
      for (int j = 0; j < cols; ++j) a += double(v[i * cols + j]) * x[t * cols + j], b += double(q[i * cols + j]) * x[t * cols + j];
      vx[i * n + t] = static_cast<float>(a);
      qx[i * n + t] = static_cast<float>(b);
    }
  const std::vector<double> ref = ReferenceMap(vx, qx, hd, n, ones, 0.0);
  for (int i = 0; i < hd * hd; ++i) EXPECT_NEAR((*m)[i], ref[i], 2e-3 * (1 + std::abs(ref[i]))) << i;
  // And on that data it beats the data-free (unit-weight) map and no compensation.
  auto data_error = [&](const std::vector<double>& mm) {
    double e = 0;
    for (int t = 0; t < n; ++t)
      for (int i = 0; i < hd; ++i) {
        double mq = 0;
        for (int k = 0; k < hd; ++k) mq += mm[i * hd + k] * qx[k * n + t];
        e += (vx[i * n + t] - mq) * (vx[i * n + t] - mq);
      }
    return e;
  };
  auto plain = DfmpcHeadMap(v.data(), q.data(), hd, cols, {}, 0.0);
  ASSERT_TRUE(plain.ok());
  std::vector<double> eye(hd * hd, 0.0);
  for (int i = 0; i < hd; ++i) eye[i * hd + i] = 1.0;
  EXPECT_LT(data_error(*m), data_error(*plain));
  EXPECT_LT(data_error(*m), data_error(eye));
  // Bad H: wrong width, all zero.
  EXPECT_FALSE(DfmpcHessianFactor(h, cols + 1, 0.0, "test H").ok());
  Hessian zero = h;
  std::fill(zero.h.begin(), zero.h.end(), 0.0f);
  auto zs = DfmpcHessianFactor(zero, cols, 0.01, "test H");
  ASSERT_FALSE(zs.ok());
  EXPECT_NE(zs.status().message().find("test H"), std::string::npos);
}

TEST(DfmpcClosedForm, CompensationIsOptimalAndBeatsNone) {
  std::mt19937 rng(2);
  const int dim = 64, nh = 4, nkv = 2, hd = 8, qdim = nh * hd, kvdim = nkv * hd;
  std::vector<float> wv = Random(kvdim * dim, &rng), wo = Random(dim * qdim, &rng, 0.5f), w = Random(dim, &rng);
  for (float& x : w) x = x * x + 0.2f;
  const std::vector<float> qv = FakeQuant(wv, kvdim, dim, "int2_g32");
  HostTensor wo_c = Matrix("wo", dim, qdim, wo);
  ASSERT_TRUE(DfmpcCompensateAttention(wv.data(), qv.data(), nh, nkv, hd, w, 0.0, &wo_c).ok());

  double ref2 = 0;
  const double none = ExplicitAttnError2(wo, wo, wv, qv, dim, nh, nkv, hd, w, &ref2);
  const double comp = ExplicitAttnError2(wo, wo_c.data, wv, qv, dim, nh, nkv, hd, w, nullptr);
  EXPECT_LT(comp, 0.9 * none);
  // The Gram-trick measure equals the explicit one.
  EXPECT_NEAR(DfmpcAttentionError(wo.data(), wo_c.data.data(), wv.data(), qv.data(), dim, nh, nkv, hd, w),
              std::sqrt(comp / ref2), 1e-6);
  EXPECT_NEAR(DfmpcAttentionError(wo.data(), wo.data(), wv.data(), qv.data(), dim, nh, nkv, hd, w),
              std::sqrt(none / ref2), 1e-6);
  // No random perturbation Wo_h M -> Wo_h (M + εP) of any head's map lowers the composite error.
  std::normal_distribution<float> nd(0.0f, 1.0f);
  for (int trial = 0; trial < 40; ++trial) {
    const float eps = trial < 20 ? 1e-2f : 1e-4f;
    std::vector<float> p(hd * hd);
    for (float& x : p) x = eps * nd(rng);
    std::vector<float> pert = wo_c.data;
    const int h = trial % nh;
    for (int r = 0; r < dim; ++r)
      for (int a = 0; a < hd; ++a) {
        double s = 0;
        for (int b = 0; b < hd; ++b) s += double(wo[r * qdim + h * hd + b]) * p[b * hd + a];
        pert[r * qdim + h * hd + a] += static_cast<float>(s);
      }
    EXPECT_GE(ExplicitAttnError2(wo, pert, wv, qv, dim, nh, nkv, hd, w, nullptr), comp * (1 - 1e-6)) << trial;
  }
}

TEST(DfmpcClosedForm, ChannelScaleIsOptimal) {
  std::mt19937 rng(3);
  const int cols = 64;
  std::vector<float> u = Random(cols, &rng), w = Random(cols, &rng);
  for (float& x : w) x = x * x;
  std::vector<float> q = u;
  for (float& x : q) x = std::round(x * 1.3f) / 1.3f;  // a crude quantizer
  auto err = [&](double c) {
    double e = 0;
    for (int j = 0; j < cols; ++j) e += w[j] * (u[j] - c * q[j]) * (u[j] - c * q[j]);
    return e;
  };
  const double c = DfmpcChannelScale(u.data(), q.data(), cols, w, 0.0);
  EXPECT_LT(err(c), err(1.0));
  for (double d : {1e-3, -1e-3, 1e-1, -1e-1}) EXPECT_GT(err(c + d), err(c));
  // Ridge shrinks toward 1.
  const double cr = DfmpcChannelScale(u.data(), q.data(), cols, w, 1.0);
  EXPECT_NEAR(cr, (c + 1.0) / 2.0, 1e-9);
  EXPECT_EQ(DfmpcChannelScale(u.data(), std::vector<float>(cols, 0.0f).data(), cols, w, 0.0), 1.0);
}

TEST(DfmpcClosedForm, LosslessIsIdentity) {
  std::mt19937 rng(4);
  const int dim = 32, nh = 4, nkv = 4, hd = 8, hidden = 40;
  std::vector<float> wv = Random(nkv * hd * dim, &rng), wo = Random(dim * nh * hd, &rng);
  for (double ridge : {0.0, 0.3}) {
    HostTensor t = Matrix("wo", dim, nh * hd, wo);
    ASSERT_TRUE(DfmpcCompensateAttention(wv.data(), wv.data(), nh, nkv, hd, {}, ridge, &t).ok());
    for (size_t i = 0; i < wo.size(); ++i) ASSERT_NEAR(t.data[i], wo[i], 1e-5 * (1 + std::abs(wo[i])));
    std::vector<float> up = Random(hidden * dim, &rng), down = Random(dim * hidden, &rng);
    HostTensor d = Matrix("w_down", dim, hidden, down);
    ASSERT_TRUE(DfmpcCompensateFfn(up.data(), up.data(), hidden, dim, {}, ridge, &d).ok());
    for (size_t i = 0; i < down.size(); ++i) ASSERT_NEAR(d.data[i], down[i], 1e-6 * (1 + std::abs(down[i])));
  }
}

TEST(DfmpcClosedForm, BadArguments) {
  std::vector<float> v(64, 1.0f);
  EXPECT_FALSE(DfmpcHeadMap(v.data(), v.data(), 8, 8, std::vector<float>(7, 1.0f), 0.0).ok());
  EXPECT_FALSE(DfmpcHeadMap(v.data(), v.data(), 8, 8, std::vector<float>(8, -1.0f), 0.0).ok());
  EXPECT_FALSE(DfmpcHeadMap(v.data(), v.data(), 8, 8, {}, -1.0).ok());
  EXPECT_FALSE(DfmpcHeadMap(v.data(), v.data(), 0, 8, {}, 0.0).ok());
  HostTensor wo = Matrix("blk.0.wo", 8, 8, v);
  auto s = DfmpcCompensateAttention(v.data(), v.data(), 3, 2, 4, {}, 0.0, &wo);
  EXPECT_FALSE(s.ok());
  s = DfmpcCompensateAttention(v.data(), v.data(), 4, 2, 4, {}, 0.0, &wo);  // wo has 8 != 16 columns
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("blk.0.wo"), std::string_view::npos) << s;
}

class DfmpcStories : public ::testing::Test {
 protected:
  static absl::StatusOr<LoadedModel> Load() {
    LoadOptions lo;
    lo.tokenizer_path = testing::Stories260KTokenizer();
    return LoadModel(testing::Stories260KModel(), lo);
  }
  static QuantizeConfig Config(bool compensate) {
    QuantizeConfig cfg;
    cfg.method = "dfmpc";
    cfg.format = *fmt::Format::Parse("int2_g64");
    cfg.dfmpc.high = *fmt::Format::Parse("int4_g64");
    cfg.dfmpc.compensate = compensate;
    cfg.n_threads = 2;
    return cfg;
  }
};

TEST_F(DfmpcStories, CompositeErrorsDropAtEqualBits) {
  if (!std::filesystem::exists(testing::Stories260KModel())) GTEST_SKIP() << "stories260K not present";
  auto a = Load(), b = Load();
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_TRUE(b.ok());
  auto plain = QuantizeModel(&*a, Config(false));
  ASSERT_TRUE(plain.ok()) << plain.status();
  auto comp = QuantizeModel(&*b, Config(true));
  ASSERT_TRUE(comp.ok()) << comp.status();
  EXPECT_EQ(plain->bpw_all, comp->bpw_all);
  ASSERT_EQ(comp->dfmpc_layers.size(), static_cast<size_t>(b->config.n_layers));
  ASSERT_EQ(plain->dfmpc_layers.size(), comp->dfmpc_layers.size());
  for (size_t l = 0; l < comp->dfmpc_layers.size(); ++l) {
    EXPECT_LT(comp->dfmpc_layers[l].attn, 0.97 * plain->dfmpc_layers[l].attn) << "layer " << l;
    EXPECT_LE(comp->dfmpc_layers[l].ffn, plain->dfmpc_layers[l].ffn) << "layer " << l;
    EXPECT_GT(plain->dfmpc_layers[l].attn, 0.0);
  }
  // Formats as requested: wv/w_up low, wo/w_down high, the rest low; wo/w_down carry the method.
  for (const TensorReport& t : comp->tensors) {
    const bool high = t.name.ends_with(".wo") || t.name.ends_with(".w_down");
    if (t.name.starts_with("blk.")) EXPECT_EQ(t.format, high ? "int4_g64" : "int2_g64") << t.name;
    if (high) EXPECT_EQ(t.method, "dfmpc") << t.name;
  }
  EXPECT_EQ(b->metadata["quant.method"], "dfmpc");
  EXPECT_EQ(b->metadata["quant.dfmpc.high"], "int4_g64");
}

TEST_F(DfmpcStories, BadOptionsFailClearly) {
  if (!std::filesystem::exists(testing::Stories260KModel())) GTEST_SKIP() << "stories260K not present";
  auto m = Load();
  ASSERT_TRUE(m.ok());
  auto expect_error = [&](QuantizeConfig cfg, const std::string& what) {
    auto r = QuantizeModel(&*m, cfg);
    ASSERT_FALSE(r.ok()) << what;
    EXPECT_NE(r.status().message().find(what), std::string_view::npos) << r.status();
  };
  QuantizeConfig c = Config(true);
  c.target_bpw = 3.0;
  expect_error(c, "bit allocation");
  c = Config(true);
  c.outlier_fraction = 0.01;
  expect_error(c, "--outliers");
  c = Config(true);
  c.dfmpc.ridge = -1;
  expect_error(c, "ridge");
  c = Config(true);
  c.dfmpc.ridge = std::nan("");
  expect_error(c, "ridge");
  c = Config(true);
  c.dfmpc.high = fmt::Format{fmt::Kind::kInt, 5, 64, false};
  expect_error(c, "--dfmpc-high");
  c = Config(true);
  c.dfmpc.rest = fmt::Format{fmt::Kind::kInt, 4, 7, false};
  expect_error(c, "--dfmpc-rest");
  // A malformed later layer is reported by name before anything is quantized.
  HostTensor& bad = m->weights.layers[1].w_down;
  bad.data.pop_back();
  auto r = QuantizeModel(&*m, Config(true));
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find(bad.name), std::string_view::npos) << r.status();
  // Nothing was modified by the failed calls.
  EXPECT_FALSE(m->weights.layers[0].wq.is_quantized());
  EXPECT_FALSE(m->weights.layers[0].wo.is_quantized());
}

TEST(DfmpcCli, BadFlagsFailClearly) {
  const std::string bin = testing::BinDir() + "/nibble-quantize";
  if (!std::filesystem::exists(bin) || !std::filesystem::exists(testing::Stories260KModel()))
    GTEST_SKIP() << "nibble-quantize or stories260K not present";
  const std::string base = bin + " -m " + testing::Stories260KModel() + " --tokenizer " +
                           testing::Stories260KTokenizer() + " -o " + testing::MakeTempDir("dfmpc") + "/m.nbl ";
  struct Case {
    std::string args, message;
  };
  for (const Case& c : {Case{"--format int2_g64 --dfmpc-high int4_g64", "--dfmpc-high needs --method dfmpc"},
                        Case{"--format int2_g64 --method dfmpc --dfmpc-high int5_g64", "--dfmpc-high: unknown format"},
                        Case{"--format int2_g64 --method dfmpc --dfmpc-ridge -1", "--dfmpc-ridge"},
                        Case{"--format int2_g64 --method dfmpc --dfmpc-weighting foo", "--dfmpc-weighting"},
                        Case{"--format int2_g64 --method rtn --dfmpc-no-compensation", "needs --method dfmpc"}}) {
    testing::RunResult r = testing::RunCommand(base + c.args + " 2>&1");
    EXPECT_NE(r.exit_code, 0) << c.args;
    EXPECT_NE(r.out.find(c.message), std::string::npos) << c.args << "\n" << r.out;
  }
}

}  // namespace
}  // namespace nibble
