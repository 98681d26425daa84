// BoA (quantizers/boa.h): identity row Hessian == GPTQ bit for bit; lower
// attention-output error than GPTQ on a synthetic attention problem; the
// collector's attention-aware Hessians against a naive direct computation on
// real stories260K activations (RoPE through the engine's own kernel, the
// gradient of each score taken column by column); clear errors.
#include "quantizers/boa.h"

#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "engine/model/model_loader.h"
#include "kernels/cpu/ops.h"
#include "quantizers/model_quantizer.h"
#include "quantizers/quant_error.h"
#include "tests/test_util.h"

namespace nibble {
namespace {

using ::nibble::testing::Stories260KModel;
using ::nibble::testing::Stories260KTokenizer;

HostTensor RandomMatrix(const std::string& name, int64_t rows, int64_t cols, std::mt19937* rng, float row_spread = 0) {
  std::normal_distribution<float> nd(0.0f, 1.0f);
  HostTensor w;
  w.name = name;
  w.shape = {rows, cols};
  w.data.resize(rows * cols);
  for (int64_t r = 0; r < rows; ++r) {
    const float s = std::exp(row_spread * static_cast<float>(r % 8) / 8.0f);
    for (int64_t c = 0; c < cols; ++c) w.data[r * cols + c] = s * nd(*rng);
  }
  return w;
}

Hessian RandomHessian(int64_t n, std::mt19937* rng) {
  std::normal_distribution<float> nd(0.0f, 1.0f);
  HessianAccumulator acc(n);
  std::vector<float> x(4 * n * n);
  for (int64_t t = 0; t < 4 * n; ++t)
    for (int64_t i = 0; i < n; ++i) x[t * n + i] = nd(*rng) * (1.0f + 0.1f * i) + (i % 3 == 0 ? x[t * n] : 0.0f);
  acc.Add(x.data(), 4 * n);
  return acc.Finish();
}

Hessian IdentityHessian(int64_t n) {
  Hessian h;
  h.dim = n;
  h.n_tokens = 1;
  h.h.assign(n * n, 0.0f);
  h.mean_sq.assign(n, 0.5f);
  for (int64_t i = 0; i < n; ++i) h.h[i * n + i] = 1.0f;
  return h;
}

// (a) H_row = I: BoA is GPTQ, bytes and chosen values identical.
TEST(BoaQuantizeTest, IdentityRowHessianIsGptqBitForBit) {
  std::mt19937 rng(7);
  const int64_t hd = 8, rows = 32, cols = 96;
  HostTensor w = RandomMatrix("w", rows, cols, &rng);
  Hessian h = RandomHessian(cols, &rng);
  for (const char* name : {"int2_g32", "int3_g64", "int4_g128", "int8_g32", "int4_g64_sym", "int3_g32_sym"}) {
    SCOPED_TRACE(name);
    const fmt::Format f = *fmt::Format::Parse(name);
    GptqOptions o;
    o.n_threads = 2;
    for (bool act_order : {false, true}) {
      o.act_order = act_order;
      auto col = FactorHessian(h, o);
      ASSERT_TRUE(col.ok()) << col.status();
      auto row = FactorHessian(IdentityHessian(hd), o);
      ASSERT_TRUE(row.ok());
      std::vector<float> qg, qb, qn;
      auto g = GptqQuantize(w, *col, f, o, &qg);
      ASSERT_TRUE(g.ok()) << g.status();
      BoaHeads heads{hd, std::vector<const GptqFactor*>(rows / hd, &*col),
                     std::vector<const GptqFactor*>(rows / hd, &*row)};
      auto b = BoaQuantize(w, heads, f, o, &qb);
      ASSERT_TRUE(b.ok()) << b.status();
      heads.row.clear();
      auto n = BoaQuantize(w, heads, f, o, &qn);
      ASSERT_TRUE(n.ok()) << n.status();
      const auto& gs = g->segments[0].data;
      const auto& bs = b->segments[0].data;
      const auto& ns = n->segments[0].data;
      ASSERT_EQ(gs.size(), bs.size());
      EXPECT_TRUE(std::equal(gs.begin(), gs.end(), bs.begin()));
      EXPECT_TRUE(std::equal(gs.begin(), gs.end(), ns.begin()));
      EXPECT_EQ(qg, qb);
      EXPECT_EQ(qg, qn);
    }
  }
}

// Reference attention (independent of the collector): RoPE via the kernel,
// causal softmax(q k / sqrt(d)) v. x: [L, dim]; returns [L, n_heads * hd].
struct Attn {
  ModelConfig c;
  std::vector<float> q, k, v, out;
};

void Project(const HostTensor& w, const std::vector<float>& x, int64_t L, std::vector<float>* y) {
  const int64_t r = w.rows(), d = w.cols();
  y->assign(L * r, 0.0f);
  for (int64_t t = 0; t < L; ++t)
    for (int64_t i = 0; i < r; ++i) {
      double s = 0;
      for (int64_t j = 0; j < d; ++j) s += double{w.data[i * d + j]} * x[t * d + j];
      (*y)[t * r + i] = static_cast<float>(s);
    }
}

Attn RunAttention(const ModelConfig& c, const HostTensor& wq, const HostTensor& wk, const HostTensor& wv,
                  const std::vector<float>& x, int64_t L) {
  Attn a{c, {}, {}, {}, {}};
  Project(wq, x, L, &a.q);
  Project(wk, x, L, &a.k);
  Project(wv, x, L, &a.v);
  for (int64_t t = 0; t < L; ++t) {
    cpu::Rope(a.q.data() + t * c.q_dim(), c.n_heads, c.head_dim, c.rope_dim, static_cast<int>(t), c.rope_theta,
              c.rope_style);
    cpu::Rope(a.k.data() + t * c.kv_dim(), c.n_kv_heads, c.head_dim, c.rope_dim, static_cast<int>(t), c.rope_theta,
              c.rope_style);
  }
  const int hd = c.head_dim, gs = c.n_heads / c.n_kv_heads;
  a.out.assign(L * c.q_dim(), 0.0f);
  for (int h = 0; h < c.n_heads; ++h) {
    const int g = h / gs;
    for (int64_t t = 0; t < L; ++t) {
      std::vector<double> p(t + 1);
      double mx = -1e300, sum = 0;
      for (int64_t s = 0; s <= t; ++s) {
        double d = 0;
        for (int i = 0; i < hd; ++i) d += double{a.q[t * c.q_dim() + h * hd + i]} * a.k[s * c.kv_dim() + g * hd + i];
        p[s] = d / std::sqrt(double(hd));
        mx = std::max(mx, p[s]);
      }
      for (auto& e : p) sum += (e = std::exp(e - mx));
      for (int i = 0; i < hd; ++i) {
        double o = 0;
        for (int64_t s = 0; s <= t; ++s) o += p[s] / sum * a.v[s * c.kv_dim() + g * hd + i];
        a.out[t * c.q_dim() + h * hd + i] = static_cast<float>(o);
      }
    }
  }
  return a;
}

HostTensor Decoded(const HostTensor& w, const QuantTensor& q) {
  HostTensor d = w;
  auto v = DequantizeAll(q);
  EXPECT_TRUE(v.ok());
  if (v.ok()) d.data = *v;
  return d;
}

// (b) Synthetic attention: BoA's attention-output error is below GPTQ's.
TEST(BoaQuantizeTest, SyntheticAttentionOutputErrorBelowGptq) {
  ModelConfig c;
  c.dim = 64, c.n_heads = 4, c.n_kv_heads = 2, c.head_dim = 16, c.rope_dim = 16, c.n_layers = 1;
  c.hidden_dim = 64, c.vocab_size = 8, c.max_seq_len = 256;
  std::mt19937 rng(3);
  const int64_t L = 192;
  // Correlated, anisotropic inputs (as after RMSNorm in a real model).
  std::normal_distribution<float> nd(0.0f, 1.0f);
  HostTensor mix = RandomMatrix("mix", c.dim, c.dim, &rng);
  std::vector<float> z(L * c.dim), x;
  for (auto& e : z) e = nd(rng);
  Project(mix, z, L, &x);
  for (int64_t t = 0; t < L; ++t)
    for (int i = 0; i < c.dim; ++i) x[t * c.dim + i] *= 0.3f * (1.0f + 2.0f * (i % 5 == 0));
  HostTensor wq = RandomMatrix("wq", c.q_dim(), c.dim, &rng, 2.0f);
  HostTensor wk = RandomMatrix("wk", c.kv_dim(), c.dim, &rng, 2.0f);
  HostTensor wv = RandomMatrix("wv", c.kv_dim(), c.dim, &rng);
  for (auto* w : {&wq, &wk}) for (auto& e : w->data) e *= 0.25f;
  const Attn ref = RunAttention(c, wq, wk, wv, x, L);

  BoaCollector col(c);
  // Two batches: exercises the continuation path (pos0 > 0).
  for (int64_t b0 : {int64_t{0}, int64_t{128}}) {
    const int64_t n = b0 == 0 ? 128 : L - 128;
    col.OnLinearInput(0, LinearInput::kAttnIn, x.data() + b0 * c.dim, static_cast<int>(n), c.dim);
    col.OnAttention(0, {ref.q.data() + b0 * c.q_dim(), ref.k.data(), ref.v.data(), static_cast<int>(n),
                        static_cast<int>(b0), c.n_heads, c.n_kv_heads, c.head_dim});
  }
  ASSERT_TRUE(col.status().ok()) << col.status();
  auto stats = col.Finish();
  ASSERT_TRUE(stats.ok()) << stats.status();
  const Hessian* hin = stats->plain.Get(0, LinearInput::kAttnIn);
  ASSERT_NE(hin, nullptr);
  GptqOptions o;
  auto fin = FactorHessian(*hin, o);
  ASSERT_TRUE(fin.ok());
  auto err = [&](const HostTensor& q, const HostTensor& k, const HostTensor& v) {
    const Attn a = RunAttention(c, q, k, v, x, L);
    double e = 0, n = 0;
    for (size_t i = 0; i < a.out.size(); ++i) {
      e += (double{a.out[i]} - ref.out[i]) * (double{a.out[i]} - ref.out[i]);
      n += double{ref.out[i]} * ref.out[i];
    }
    return e / n;
  };
  for (const char* name : {"int2_g64", "int3_g64"}) {
    SCOPED_TRACE(name);
    const fmt::Format f = *fmt::Format::Parse(name);
    std::vector<HostTensor> g, b;
    for (auto [w, which] : {std::pair{&wq, LinearWeight::kWq}, {&wk, LinearWeight::kWk}, {&wv, LinearWeight::kWv}}) {
      auto gq = GptqQuantize(*w, *fin, f, o);
      auto bq = BoaQuantizeAttention(*w, which, stats->layers[0], *fin, f, o);
      ASSERT_TRUE(gq.ok() && bq.ok()) << gq.status() << bq.status();
      g.push_back(Decoded(*w, *gq));
      b.push_back(Decoded(*w, *bq));
    }
    const double eg = err(g[0], g[1], g[2]), eb = err(b[0], b[1], b[2]);
    printf("%s all: boa %.5f gptq %.5f | wq %.5f %.5f | wk %.5f %.5f | wv %.5f %.5f\n", name, eb, eg,
           err(b[0], wk, wv), err(g[0], wk, wv), err(wq, b[1], wv), err(wq, g[1], wv), err(wq, wk, b[2]),
           err(wq, wk, g[2]));
    // The value's attention-weighted Hessian is the exact objective for W_V:
    // lower at every depth. The query/key row Hessians are a relaxation (score
    // error, not output error): the sum is lower at int3; at int2 (~70% relative
    // output error, far outside the linearization) it is not, so only printed.
    if (std::string(name) == "int3_g64") {
      EXPECT_LT(eb, eg) << "BoA " << eb << " vs GPTQ " << eg;
    }
    EXPECT_LT(err(wq, wk, b[2]), err(wq, wk, g[2])) << "wv";
  }
}

// Records what the model's layer saw and forwards to the collector.
class Recorder : public ActivationObserver {
 public:
  explicit Recorder(ActivationObserver* next) : next_(next) {}
  void OnLinearInput(int layer, LinearInput which, const float* x, int n, int width) override {
    next_->OnLinearInput(layer, which, x, n, width);
    if (which == LinearInput::kAttnIn) xs_[layer].insert(xs_[layer].end(), x, x + int64_t{n} * width);
  }
  void OnAttention(int layer, const AttentionObservation& a) override {
    next_->OnAttention(layer, a);
    const int64_t qd = int64_t{a.n_heads} * a.head_dim, kvd = int64_t{a.n_kv_heads} * a.head_dim;
    qs_[layer].insert(qs_[layer].end(), a.q, a.q + a.n_tokens * qd);
    ks_[layer].assign(a.k_cache, a.k_cache + (a.pos0 + a.n_tokens) * kvd);
    ++batches_;
  }
  ActivationObserver* next_;
  std::map<int, std::vector<float>> xs_, qs_, ks_;
  int batches_ = 0;
};

// (c) The collector's Hessians vs a naive computation on stories260K, with
// the model's own RoPE pairing (interleaved) and with rotate-half pairs (the
// model then applies that RoPE too; weights are the same).
void CheckCollectorMatchesNaive(RopeStyle style) {
  LoadOptions lo;
  lo.tokenizer_path = Stories260KTokenizer();
  auto loaded = LoadModel(Stories260KModel(), lo);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  loaded->config.rope_style = style;
  auto model = LlamaModel::Create(*std::move(loaded), 1);
  ASSERT_TRUE(model.ok()) << model.status();
  const ModelConfig c = (*model)->config();
  BoaCollector col(c);
  Recorder rec(&col);
  (*model)->SetObserver(&rec);
  const int L = 300;  // two batches of Forward (256 + 44)
  std::vector<int32_t> toks(L);
  std::mt19937 rng(11);
  for (int i = 0; i < L; ++i) toks[i] = i == 0 ? 1 : static_cast<int32_t>(3 + rng() % (c.vocab_size - 3));
  auto cache = (*model)->NewKVCache(L);
  std::vector<float> logits(c.vocab_size);
  ASSERT_TRUE((*model)->Forward(toks, 0, cache.get(), logits).ok());
  (*model)->SetObserver(nullptr);
  EXPECT_EQ(rec.batches_, 2 * c.n_layers);
  auto stats = col.Finish();
  ASSERT_TRUE(stats.ok()) << stats.status();
  const int hd = c.head_dim, gs = c.n_heads / c.n_kv_heads, qd = c.q_dim(), kvd = c.kv_dim(), dim = c.dim;
  // basis[p][j]: RoPE at position p of the unit vector e_j (the kernel's).
  auto rope_basis = [&](int p) {
    std::vector<float> b(hd * hd, 0.0f);
    for (int j = 0; j < hd; ++j) b[j * hd + j] = 1.0f;
    cpu::Rope(b.data(), hd, hd, c.rope_dim, p, c.rope_theta, c.rope_style);  // hd "heads", each one e_j
    return b;
  };
  std::vector<std::vector<float>> basis(L);
  for (int p = 0; p < L; ++p) basis[p] = rope_basis(p);
  auto dot = [&](const float* a, const float* b) {
    double s = 0;
    for (int i = 0; i < hd; ++i) s += double{a[i]} * b[i];
    return s;
  };
  for (int l : {0, c.n_layers - 1}) {
    SCOPED_TRACE(l);
    const BoaLayerStats& s = stats->layers[l];
    ASSERT_EQ(s.head_dim, hd);
    ASSERT_EQ(s.q_row.size(), static_cast<size_t>(c.n_kv_heads));
    const float* Q = rec.qs_[l].data();
    const float* K = rec.ks_[l].data();
    const float* X = rec.xs_[l].data();
    for (int g = 0; g < c.n_kv_heads; ++g) {
      std::vector<double> hq(hd * hd, 0.0), hk(hd * hd, 0.0), hv(dim * dim, 0.0);
      std::vector<double> u(hd);
      for (int t = 0; t < L; ++t) {
        for (int sp = 0; sp <= t; ++sp) {
          // d score / d (pre-RoPE query)_j = <Rope_t(e_j), k_s>.
          for (int j = 0; j < hd; ++j) u[j] = dot(basis[t].data() + j * hd, K + sp * kvd + g * hd);
          for (int i = 0; i < hd; ++i)
            for (int j = 0; j < hd; ++j) hq[i * hd + j] += u[i] * u[j];
          // d score / d (pre-RoPE key)_j = <q_t, Rope_s(e_j)>, every head of the group.
          for (int h = 0; h < gs; ++h) {
            for (int j = 0; j < hd; ++j) u[j] = dot(basis[sp].data() + j * hd, Q + t * qd + (g * gs + h) * hd);
            for (int i = 0; i < hd; ++i)
              for (int j = 0; j < hd; ++j) hk[i * hd + j] += u[i] * u[j];
          }
        }
        for (int h = 0; h < gs; ++h) {
          std::vector<double> p(t + 1), zt(dim, 0.0);
          double mx = -1e300, sum = 0;
          for (int sp = 0; sp <= t; ++sp) {
            p[sp] = dot(Q + t * qd + (g * gs + h) * hd, K + sp * kvd + g * hd) / std::sqrt(double(hd));
            mx = std::max(mx, p[sp]);
          }
          for (auto& e : p) sum += (e = std::exp(e - mx));
          for (int sp = 0; sp <= t; ++sp)
            for (int i = 0; i < dim; ++i) zt[i] += p[sp] / sum * X[sp * dim + i];
          for (int i = 0; i < dim; ++i)
            for (int j = 0; j < dim; ++j) hv[i * dim + j] += zt[i] * zt[j];
        }
      }
      auto expect_near = [](const Hessian& got, const std::vector<double>& want, double scale, const char* what) {
        double mx = 0, err = 0;
        for (size_t i = 0; i < want.size(); ++i) {
          mx = std::max(mx, std::abs(want[i] * scale));
          err = std::max(err, std::abs(got.h[i] - want[i] * scale));
        }
        EXPECT_GT(mx, 0.0) << what;
        EXPECT_LT(err, 2e-5 * mx) << what << " max abs diff " << err << " of max " << mx;
      };
      expect_near(s.q_row[g], hq, 1.0 / (double(L) * hd), "q_row");
      expect_near(s.k_row[g], hk, 1.0 / (double(L) * hd), "k_row");
      expect_near(s.v_col[g], hv, 2.0 / (double(L) * gs), "v_col");
    }
  }
}

TEST(BoaCollectorTest, Stories260KMatchesNaive) { CheckCollectorMatchesNaive(RopeStyle::kInterleaved); }

TEST(BoaCollectorTest, RotateHalfMatchesNaive) { CheckCollectorMatchesNaive(RopeStyle::kHalf); }

// The collector's statistics do not depend on the number of threads.
TEST(BoaCollectorTest, ThreadCountInvariant) {
  ModelConfig c;
  // Big enough for ParallelItems to use threads; rope_dim < head_dim leaves dims unrotated.
  c.dim = 128, c.n_heads = 4, c.n_kv_heads = 2, c.head_dim = 16, c.rope_dim = 12, c.n_layers = 1;
  c.rope_theta = 10000.0f;
  const int L = 256;
  std::mt19937 rng(5);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> x(L * c.dim), q(L * c.q_dim()), k(L * c.kv_dim());
  for (auto* b : {&x, &q, &k})
    for (auto& e : *b) e = nd(rng);
  std::vector<BoaStats> out;
  for (int threads : {1, 3}) {
    CollectorOptions o;
    o.n_threads = threads;
    BoaCollector col(c, o);
    for (int b0 : {0, 128}) {  // two batches of 128 tokens
      const int n = 128;
      col.OnLinearInput(0, LinearInput::kAttnIn, x.data() + b0 * c.dim, n, c.dim);
      col.OnAttention(0, {q.data() + b0 * c.q_dim(), k.data(), k.data(), n, b0, c.n_heads, c.n_kv_heads,
                          c.head_dim});
    }
    auto st = col.Finish();
    ASSERT_TRUE(st.ok()) << st.status();
    out.push_back(*std::move(st));
  }
  const BoaLayerStats &a = out[0].layers[0], &b = out[1].layers[0];
  ASSERT_EQ(a.q_row.size(), 2u);
  ASSERT_EQ(b.q_row.size(), 2u);
  for (int g = 0; g < 2; ++g) {
    EXPECT_EQ(a.q_row[g].h, b.q_row[g].h);
    EXPECT_EQ(a.k_row[g].h, b.k_row[g].h);
    EXPECT_EQ(a.v_col[g].h, b.v_col[g].h);
  }
}

// (d) Bad input: clear errors.
TEST(BoaErrorsTest, BadInputs) {
  std::mt19937 rng(1);
  HostTensor w = RandomMatrix("blk.0.wq", 24, 64, &rng);
  Hessian h = RandomHessian(64, &rng);
  GptqOptions o;
  auto col = FactorHessian(h, o);
  ASSERT_TRUE(col.ok());
  const fmt::Format f = *fmt::Format::Parse("int4_g64");
  BoaHeads heads{16, {&*col, &*col}, {}};  // 16 does not divide 24
  auto r = BoaQuantize(w, heads, f, o);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(r.status().message().find("blk.0.wq"), std::string::npos) << r.status();
  heads = {8, {&*col, &*col}, {}};  // 3 heads, 2 factors
  EXPECT_FALSE(BoaQuantize(w, heads, f, o).ok());
  auto small = FactorHessian(RandomHessian(32, &rng), o);
  heads = {8, {&*col, &*col, &*small}, {}};
  EXPECT_FALSE(BoaQuantize(w, heads, f, o).ok());
  heads = {8, {&*col, &*col, &*col}, {&*col, nullptr, nullptr}};  // row factor not 8 x 8
  EXPECT_FALSE(BoaQuantize(w, heads, f, o).ok());
  // Not an attention projection / no statistics.
  EXPECT_FALSE(BoaQuantizeAttention(w, LinearWeight::kWo, BoaLayerStats{}, *col, f, o).ok());
  EXPECT_EQ(BoaQuantizeAttention(w, LinearWeight::kWq, BoaLayerStats{}, *col, f, o).status().code(),
            absl::StatusCode::kFailedPrecondition);
  // Collector: attention without its input, batches out of order.
  ModelConfig c;
  c.dim = 16, c.n_heads = 2, c.n_kv_heads = 1, c.head_dim = 8, c.rope_dim = 8, c.n_layers = 1;
  std::vector<float> buf(64 * 16, 0.5f);
  BoaCollector a(c);
  a.OnAttention(0, {buf.data(), buf.data(), buf.data(), 2, 0, 2, 1, 8});
  EXPECT_EQ(a.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_FALSE(a.Finish().ok());
  BoaCollector b(c);
  b.OnLinearInput(0, LinearInput::kAttnIn, buf.data(), 2, 16);
  b.OnAttention(0, {buf.data(), buf.data(), buf.data(), 2, 5, 2, 1, 8});
  EXPECT_NE(b.status().message().find("position 5"), std::string::npos) << b.status();
  BoaCollector wrong(c);
  wrong.OnLinearInput(0, LinearInput::kAttnIn, buf.data(), 2, 16);
  wrong.OnAttention(0, {buf.data(), buf.data(), buf.data(), 2, 0, 4, 1, 4});
  EXPECT_EQ(wrong.status().code(), absl::StatusCode::kInvalidArgument);
  // Whole-model driver: boa needs calibration text, no bit allocation.
  auto loaded = LoadModel(Stories260KModel(), LoadOptions{.tokenizer_path = Stories260KTokenizer()});
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  QuantizeConfig qc;
  qc.method = "boa";
  qc.format = f;
  auto rep = QuantizeModel(&*loaded, qc);
  EXPECT_EQ(rep.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(rep.status().message().find("--calib"), std::string::npos) << rep.status();
  qc.calib_path = "/nonexistent/calib.txt";
  qc.target_bpw = 3.0;
  rep = QuantizeModel(&*loaded, qc);
  EXPECT_NE(rep.status().message().find("boa"), std::string::npos) << rep.status();
}

}  // namespace
}  // namespace nibble
