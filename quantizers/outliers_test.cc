// Outlier / salient side-cars (GWQ/SpQR fp16 outliers, PB-LLM int8 salient
// weights): selection against a brute-force stable sort, exact decoding of
// kept weights, storage counted by hand, fraction 0 == the plain quantizer
// byte for byte, lower proxy output error than the plain format on the real
// stories260K layers with real calibration Hessians, and a model with
// side-cars round-tripping through the nibble file with identical logits.
#include "quantizers/outliers.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <iostream>
#include <numeric>
#include <random>
#include <set>

#include "absl/strings/str_format.h"
#include "engine/io/nibble_file.h"
#include "engine/model/llama_model.h"
#include "engine/model/model_loader.h"
#include "engine/tokenizer/tokenizer.h"
#include "kernels/common/fp16.h"
#include "quantizers/calibration.h"
#include "quantizers/model_quantizer.h"
#include "quantizers/quant_error.h"
#include "quantizers/rtn.h"
#include "tests/test_util.h"

namespace nibble {
namespace {

fmt::Format F(const char* name) {
  auto f = fmt::Format::Parse(name);
  EXPECT_TRUE(f.has_value()) << name;
  return f.value_or(fmt::Format{});
}

HostTensor RandomMatrix(int64_t rows, int64_t cols, uint32_t seed, int levels = 0) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, 0.05f);
  HostTensor t;
  t.name = "synthetic";
  t.shape = {rows, cols};
  t.data.resize(rows * cols);
  for (float& v : t.data) {
    v = nd(rng);
    if (levels > 0) v = std::round(v * levels) / levels;  // many exact ties
  }
  // A few heavy outliers, as real LLM weights have.
  for (int i = 0; i < 6; ++i) t.data[rng() % t.data.size()] = (i % 2 ? 1.0f : -1.0f) * 0.6f;
  return t;
}

// Brute force: stable sort of all indices by saliency descending, first k.
std::set<int64_t> BruteTopK(const HostTensor& w, const std::vector<float>& cw, double fraction, Saliency kind) {
  const int64_t n = w.numel(), cols = w.cols();
  std::vector<double> sal(n);
  for (int64_t i = 0; i < n; ++i) {
    const float v = w.data[i];
    sal[i] = kind == Saliency::kMagnitude ? std::fabs(v) : static_cast<double>(v * v * cw[i % cols]);
  }
  std::vector<int64_t> idx(n);
  std::iota(idx.begin(), idx.end(), 0);
  std::stable_sort(idx.begin(), idx.end(), [&](int64_t a, int64_t b) { return sal[a] > sal[b]; });
  const int64_t k = std::llround(fraction * n);
  return std::set<int64_t>(idx.begin(), idx.begin() + k);
}

std::set<int64_t> AsSet(const SalientSet& s) {
  std::set<int64_t> out;
  for (int64_t r = 0; r < s.rows; ++r) {
    EXPECT_LE(s.row_ptr[r], s.row_ptr[r + 1]);
    for (uint32_t i = s.row_ptr[r]; i < s.row_ptr[r + 1]; ++i) {
      if (i > s.row_ptr[r]) EXPECT_LT(s.col[i - 1], s.col[i]) << "columns not ascending in row " << r;
      out.insert(r * s.cols + s.col[i]);
    }
  }
  return out;
}

TEST(SelectSalientTest, TopKMatchesBruteForceAndTiesAreStable) {
  for (int levels : {0, 40}) {  // 40: |w| takes ~10 distinct values, ties everywhere
    const HostTensor w = RandomMatrix(37, 90, 7 + levels, levels);
    std::vector<float> cw(w.cols());
    std::mt19937 rng(3);
    for (float& c : cw) c = std::uniform_real_distribution<float>(0.1f, 3.0f)(rng);
    if (levels > 0) std::fill(cw.begin(), cw.end(), 2.0f);  // keep the ties in w^2 * c
    for (Saliency kind : {Saliency::kMagnitude, Saliency::kHessian}) {
      for (double fraction : {0.0, 0.001, 0.01, 0.1, 0.5, 0.999}) {
        auto s = SelectSalient(w, cw, fraction, kind);
        ASSERT_TRUE(s.ok()) << s.status();
        EXPECT_EQ(s->row_ptr.size(), static_cast<size_t>(w.rows() + 1));
        EXPECT_EQ(s->nnz(), static_cast<size_t>(std::llround(fraction * w.numel())));
        EXPECT_EQ(AsSet(*s), BruteTopK(w, cw, fraction, kind))
            << SaliencyName(kind) << " fraction " << fraction << " levels " << levels;
      }
    }
  }
}

TEST(SelectSalientTest, RejectsBadInput) {
  const HostTensor w = RandomMatrix(4, 32, 1);
  for (double bad : {-0.01, 1.0, 1.5, std::nan("")}) {
    EXPECT_FALSE(SelectSalient(w, {}, bad, Saliency::kMagnitude).ok()) << bad;
    OutlierOptions o;
    o.fraction = bad;
    o.saliency = Saliency::kMagnitude;
    EXPECT_FALSE(QuantizeWithOutliers(w, nullptr, nullptr, F("int4_g32"), o).ok()) << bad;
  }
  EXPECT_FALSE(SelectSalient(w, {}, 0.1, Saliency::kHessian).ok());  // no column weights
  std::vector<float> neg(32, 1.0f);
  neg[3] = -1.0f;
  EXPECT_FALSE(SelectSalient(w, neg, 0.1, Saliency::kHessian).ok());
  OutlierOptions o;
  o.fraction = 0.1;  // hessian saliency without a Hessian
  EXPECT_FALSE(QuantizeWithOutliers(w, nullptr, nullptr, F("int4_g32"), o).ok());
  o.saliency = Saliency::kMagnitude;
  o.method = "gptq";  // gptq without a Hessian
  EXPECT_FALSE(QuantizeWithOutliers(w, nullptr, nullptr, F("int4_g32"), o).ok());
  o.method = "rtn";
  o.type = Sidecar::ValueType::kNone;
  EXPECT_FALSE(QuantizeWithOutliers(w, nullptr, nullptr, F("int4_g32"), o).ok());
}

// H of correlated inputs (as in gptq_test).
Hessian CorrelatedHessian(int64_t cols, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd;
  std::vector<float> m(cols * cols);
  for (float& v : m) v = nd(rng) * 0.3f;
  for (int64_t i = 0; i < cols; ++i) m[i * cols + i] += 1.0f;
  const int64_t n = 4 * cols;
  std::vector<float> x(n * cols, 0.0f), z(cols);
  for (int64_t t = 0; t < n; ++t) {
    for (float& v : z) v = nd(rng);
    for (int64_t k = 0; k < cols; ++k)
      for (int64_t j = 0; j < cols; ++j) x[t * cols + j] += z[k] * m[k * cols + j];
  }
  HessianAccumulator acc(cols);
  acc.Add(x.data(), n);
  return acc.Finish();
}

TEST(OutliersTest, KeptWeightsDecodeExactlyAndDecodeEqualsChosen) {
  const int64_t rows = 24, cols = 80;
  const HostTensor w = RandomMatrix(rows, cols, 5);
  const Hessian h = CorrelatedHessian(cols, 11);
  for (const char* method : {"rtn", "gptq"}) {
    for (Sidecar::ValueType type : {Sidecar::ValueType::kF16, Sidecar::ValueType::kI8}) {
      OutlierOptions o;
      o.fraction = 0.05;
      o.type = type;
      o.method = method;
      o.n_threads = 2;
      std::vector<float> chosen;
      auto q = QuantizeWithOutliers(w, &h, nullptr, F(type == Sidecar::ValueType::kI8 ? "binary_g32" : "int3_g32"),
                                    o, &chosen);
      ASSERT_TRUE(q.ok()) << q.status();
      ASSERT_EQ(q->sidecar.type, type);
      ASSERT_EQ(q->sidecar.nnz(), static_cast<size_t>(std::llround(0.05 * rows * cols)));
      auto d = DequantizeWithSidecar(*q);
      ASSERT_TRUE(d.ok()) << d.status();
      EXPECT_EQ(*d, chosen) << method;
      const Sidecar& s = q->sidecar;
      for (int64_t r = 0; r < rows; ++r) {
        float amax = 0.0f;
        for (uint32_t i = s.row_ptr[r]; i < s.row_ptr[r + 1]; ++i)
          amax = std::max(amax, std::fabs(w.data[r * cols + s.col[i]]));
        for (uint32_t i = s.row_ptr[r]; i < s.row_ptr[r + 1]; ++i) {
          const int64_t k = r * cols + s.col[i];
          if (type == Sidecar::ValueType::kF16) {
            if (std::string(method) == "rtn") EXPECT_EQ((*d)[k], Fp16ToFp32(Fp32ToFp16(w.data[k])));
          } else {
            const float step = Fp16ToFp32(s.row_scale[r]);
            EXPECT_NEAR(step, amax / 127.0f, amax / 127.0f * 1e-3);  // fp16 of the row's salient absmax / 127
            EXPECT_EQ((*d)[k], step * static_cast<float>(s.i8[i]));
            if (std::string(method) == "rtn") EXPECT_LE(std::fabs((*d)[k] - w.data[k]), 0.5f * step * 1.001f);
          }
        }
      }
    }
  }
}

TEST(OutliersTest, FractionZeroIsThePlainQuantizerBitForBit) {
  const HostTensor w = RandomMatrix(20, 96, 8);
  const Hessian h = CorrelatedHessian(96, 4);
  for (const char* fname : {"int3_g32", "binary_g64", "int4_g32_sym"}) {
    OutlierOptions o;
    o.n_threads = 1;
    auto rtn = QuantizeWithOutliers(w, &h, nullptr, F(fname), o);
    auto ref_rtn = RtnQuantize(w, h.mean_sq, F(fname));
    o.method = "gptq";
    auto gptq = QuantizeWithOutliers(w, &h, nullptr, F(fname), o);
    auto ref_gptq = GptqQuantize(w, h, F(fname), GptqOptions{});
    ASSERT_TRUE(rtn.ok() && ref_rtn.ok() && gptq.ok() && ref_gptq.ok());
    for (auto [a, b] : {std::pair{&*rtn, &*ref_rtn}, std::pair{&*gptq, &*ref_gptq}}) {
      EXPECT_TRUE(a->sidecar.empty());
      EXPECT_EQ(a->sidecar.type, Sidecar::ValueType::kNone);
      ASSERT_EQ(a->segments.size(), 1u);
      ASSERT_EQ(a->segments[0].data.size(), b->segments[0].data.size());
      EXPECT_EQ(0, std::memcmp(a->segments[0].data.data(), b->segments[0].data.data(), a->segments[0].data.size()))
          << fname;
    }
  }
}

TEST(OutliersTest, BitsPerWeightCountsTheSidecar) {
  const int64_t rows = 10, cols = 200;  // 200 = 1.5625 groups of 128: padded last group
  const HostTensor w = RandomMatrix(rows, cols, 2);
  OutlierOptions o;
  o.fraction = 0.03;  // 60 kept
  o.saliency = Saliency::kMagnitude;
  for (auto [fname, type] : {std::pair{"int3_g128", Sidecar::ValueType::kF16},
                             std::pair{"binary_g128", Sidecar::ValueType::kI8}}) {
    o.type = type;
    auto q = QuantizeWithOutliers(w, nullptr, nullptr, F(fname), o);
    ASSERT_TRUE(q.ok()) << q.status();
    const fmt::Format f = F(fname);
    // Packed: 2 blocks per row. int3_g128 asym: 2 + 2 + 48 bytes; binary_g128: 2 + 16 bytes.
    const double block = std::string(fname) == "int3_g128" ? 52.0 : 18.0;
    ASSERT_EQ(f.BlockBytes(), block);
    const double nnz = 60, value_bits = type == Sidecar::ValueType::kF16 ? 16 : 8;
    const double scales = type == Sidecar::ValueType::kI8 ? 16.0 * rows : 0.0;
    const double hand = rows * 2 * block * 8 + nnz * (16 + value_bits) + (rows + 1) * 32 + scales;
    EXPECT_EQ(q->sidecar.nnz(), 60u);
    EXPECT_DOUBLE_EQ(q->BitsPerWeight(), hand / (rows * cols)) << fname;
    std::cout << absl::StrFormat("  %s + 3%% %s: %.4f bits/weight (plain %.4f)\n", fname, SidecarTypeName(type),
                                 q->BitsPerWeight(), f.BitsPerWeight(cols));
  }
}

// ---- Real weights, real activations: stories260K calibrated on TinyStories.

class Stories260KOutliers : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    LoadOptions lo;
    lo.tokenizer_path = ::nibble::testing::Stories260KTokenizer();
    auto loaded = LoadModel(::nibble::testing::Stories260KModel(), lo);
    ASSERT_TRUE(loaded.ok()) << loaded.status();
    auto tok = CreateTokenizer(loaded->vocab);
    ASSERT_TRUE(tok.ok());
    auto model = LlamaModel::Create(*std::move(loaded), 1);
    ASSERT_TRUE(model.ok());
    model_ = model->release();
    auto stats = Calibrate(*model_, **tok, ::nibble::testing::SharedDir() + "/data/tinystories-val.txt", 2048, 256);
    ASSERT_TRUE(stats.ok()) << stats.status();
    stats_ = new CalibrationStats(*std::move(stats));
  }
  static void TearDownTestSuite() {
    delete stats_;
    delete model_;
  }
  static LlamaModel* model_;
  static CalibrationStats* stats_;
};
LlamaModel* Stories260KOutliers::model_ = nullptr;
CalibrationStats* Stories260KOutliers::stats_ = nullptr;

TEST_F(Stories260KOutliers, SidecarsLowerProxyOutputError) {
  ASSERT_NE(stats_, nullptr);
  struct Case {
    const char* format;
    double fraction;
    Sidecar::ValueType type;
    const char* label;
  };
  const Case cases[] = {{"int3_g128", 0.01, Sidecar::ValueType::kF16, "GWQ/SpQR 1% f16"},
                        {"binary_g64", 0.10, Sidecar::ValueType::kI8, "PB-LLM 10% i8"}};
  for (const Case& c : cases) {
    for (const char* method : {"rtn", "gptq"}) {
      double sum_plain = 0, sum_side = 0, bpw_plain = 0, bpw_side = 0;
      int n = 0;
      for (int layer : {0, 3}) {
        const LayerWeights& lw = model_->loaded().weights.layers[layer];
        for (LinearWeight which : kAllLinearWeights) {
          const HostTensor& w = WeightOf(lw, which);
          const Hessian* h = stats_->Get(layer, which);
          ASSERT_NE(h, nullptr);
          OutlierOptions o;
          o.method = method;
          o.type = c.type;
          auto plain = QuantizeWithOutliers(w, h, nullptr, F(c.format), o);
          o.fraction = c.fraction;
          std::vector<float> chosen;
          auto side = QuantizeWithOutliers(w, h, nullptr, F(c.format), o, &chosen);
          ASSERT_TRUE(plain.ok() && side.ok()) << side.status();
          auto dp = DequantizeWithSidecar(*plain), ds = DequantizeWithSidecar(*side);
          ASSERT_TRUE(dp.ok() && ds.ok());
          EXPECT_EQ(*ds, chosen);
          const double pp = ProxyOutputError(w.data.data(), dp->data(), w.rows(), w.cols(), *h);
          const double ps = ProxyOutputError(w.data.data(), ds->data(), w.rows(), w.cols(), *h);
          EXPECT_LT(ps, pp) << c.label << " " << method << " layer " << layer << " " << LinearWeightName(which);
          sum_plain += pp;
          sum_side += ps;
          bpw_plain += plain->BitsPerWeight();
          bpw_side += side->BitsPerWeight();
          ++n;
        }
      }
      std::cout << absl::StrFormat("%-16s %-4s mean proxy error: %s %.5f (%.3f bpw)  + side-car %.5f (%.3f bpw)\n",
                                   c.label, method, c.format, sum_plain / n, bpw_plain / n, sum_side / n,
                                   bpw_side / n);
    }
  }
}

// A whole model with side-cars (via the driver) survives the nibble file and
// runs with exactly the logits of the in-memory quantized model.
TEST(OutliersE2E, SidecarModelRoundTripsThroughNibbleFile) {
  struct Case {
    const char* format;
    double fraction;
    Sidecar::ValueType type;
  };
  for (const Case& c :
       {Case{"int3_g64", 0.02, Sidecar::ValueType::kF16}, Case{"binary_g64", 0.1, Sidecar::ValueType::kI8}}) {
    LoadOptions lo;
    lo.tokenizer_path = ::nibble::testing::Stories260KTokenizer();
    auto m = LoadModel(::nibble::testing::Stories260KModel(), lo);
    ASSERT_TRUE(m.ok()) << m.status();
    QuantizeConfig cfg;
    cfg.format = F(c.format);
    cfg.outlier_fraction = c.fraction;
    cfg.outlier_type = c.type;
    cfg.outlier_saliency = Saliency::kMagnitude;
    cfg.n_threads = 1;
    auto report = QuantizeModel(&*m, cfg);
    ASSERT_TRUE(report.ok()) << report.status();
    EXPECT_EQ(m->metadata["quant.outliers"], absl::StrFormat("%g", c.fraction));
    EXPECT_EQ(m->metadata["quant.outlier_type"], SidecarTypeName(c.type));
    const HostTensor& wq = m->weights.layers[0].wq;
    ASSERT_NE(wq.quant, nullptr);
    EXPECT_EQ(wq.quant->sidecar.type, c.type);
    EXPECT_GT(wq.quant->sidecar.nnz(), 0u);
    EXPECT_GT(report->tensors[0].bpw, F(c.format).BitsPerWeight(wq.cols()));  // side-car counted
    const std::string path = ::nibble::testing::MakeTempDir("outliers") + "/m.nbl";
    ASSERT_TRUE(io::WriteNibbleFile(*m, path, {.fsync = false}).ok());
    auto back = io::LoadNibbleFile(path);
    ASSERT_TRUE(back.ok()) << back.status();
    EXPECT_EQ(back->metadata["quant.outlier_type"], SidecarTypeName(c.type));
    const Sidecar& s = back->weights.layers[0].wq.quant->sidecar;
    ASSERT_EQ(s.type, c.type);
    ASSERT_EQ(s.nnz(), wq.quant->sidecar.nnz());
    EXPECT_TRUE(std::equal(s.col.begin(), s.col.end(), wq.quant->sidecar.col.begin()));

    auto a = LlamaModel::Create(*std::move(m), 1);
    auto b = LlamaModel::Create(*std::move(back), 1);
    ASSERT_TRUE(a.ok() && b.ok());
    const std::vector<int32_t> tokens = {1, 403, 73, 261, 30, 480, 5};
    const int vocab = (*a)->config().vocab_size;
    std::vector<float> la(tokens.size() * vocab), lb(la.size());
    auto ca = (*a)->NewKVCache(), cb = (*b)->NewKVCache();
    ASSERT_TRUE((*a)->Forward(tokens, 0, ca.get(), la, true).ok());
    ASSERT_TRUE((*b)->Forward(tokens, 0, cb.get(), lb, true).ok());
    EXPECT_EQ(la, lb) << c.format;
    for (float v : la) ASSERT_TRUE(std::isfinite(v));
  }
}

}  // namespace
}  // namespace nibble
