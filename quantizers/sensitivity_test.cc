// KLD probes: the divergence math against closed forms, and probes of the real
// stories260K model (an untouched model has zero divergence, a tensor is
// restored after its probe, coarser formats move the distribution more), and
// the sensitivities feeding the bit allocator.
#include "quantizers/sensitivity.h"

#include <gtest/gtest.h>

#include <cmath>
#include <memory>
#include <vector>

#include "engine/model/model_loader.h"
#include "engine/tokenizer/tokenizer.h"
#include "quantizers/rtn.h"
#include "tests/test_util.h"

namespace nibble {
namespace {

using ::nibble::testing::SharedDir;
using ::nibble::testing::Stories260KModel;
using ::nibble::testing::Stories260KTokenizer;

TEST(KlDivergence, ClosedForms) {
  // Two outcomes: KL((p, 1-p) || (q, 1-q)) = p ln(p/q) + (1-p) ln((1-p)/(1-q)).
  const float in_p[2] = {std::log(0.3f), std::log(0.7f)};
  const float in_q[2] = {std::log(0.6f) + 5.0f, std::log(0.4f) + 5.0f};  // unnormalized: softmax removes the shift
  float lp[2], lq[2];
  LogSoftmax(in_p, 2, lp);
  LogSoftmax(in_q, 2, lq);
  EXPECT_NEAR(std::exp(lq[0]), 0.6, 1e-6);
  const double want = 0.3 * std::log(0.3 / 0.6) + 0.7 * std::log(0.7 / 0.4);
  EXPECT_NEAR(KlDivergence(lp, lq, 2), want, 1e-6);
  EXPECT_NEAR(KlDivergence(lp, lp, 2), 0.0, 1e-12);
  // Large logits do not overflow.
  const float big[3] = {1000.0f, 999.0f, -1000.0f};
  float lb[3];
  LogSoftmax(big, 3, lb);
  EXPECT_NEAR(std::exp(lb[0]) + std::exp(lb[1]), 1.0, 1e-4);  // fp32 ulp at 1000 is 6e-5
  EXPECT_TRUE(std::isfinite(lb[2]));
}

class ProbeTest : public ::testing::Test {
 protected:
  void SetUp() override {
    LoadOptions lo;
    lo.tokenizer_path = Stories260KTokenizer();
    auto loaded = LoadModel(Stories260KModel(), lo);
    ASSERT_TRUE(loaded.ok()) << loaded.status();
    auto tok = CreateTokenizer(loaded->vocab);
    ASSERT_TRUE(tok.ok()) << tok.status();
    tok_ = *std::move(tok);
    auto model = LlamaModel::Create(*std::move(loaded), 2);
    ASSERT_TRUE(model.ok()) << model.status();
    model_ = *std::move(model);
    text_ = SharedDir() + "/data/tinystories-val.txt";
    auto chunks = CalibrationChunks(*tok_, text_, 256, 128, model_->config().max_seq_len);
    ASSERT_TRUE(chunks.ok()) << chunks.status();
    auto probe = KldProbe::Create(model_.get(), *std::move(chunks));
    ASSERT_TRUE(probe.ok()) << probe.status();
    probe_ = *std::move(probe);
  }

  std::shared_ptr<const QuantTensor> Rtn(const HostTensor& w, const char* format) {
    auto f = fmt::Format::Parse(format);
    EXPECT_TRUE(f.has_value());
    auto q = RtnQuantize(w, {}, *f);
    EXPECT_TRUE(q.ok()) << q.status();
    return std::make_shared<const QuantTensor>(*std::move(q));
  }

  std::unique_ptr<Tokenizer> tok_;
  std::unique_ptr<LlamaModel> model_;
  std::unique_ptr<KldProbe> probe_;
  std::string text_;
};

TEST_F(ProbeTest, UntouchedModelHasZeroDivergenceAndTensorsAreRestored) {
  EXPECT_EQ(probe_->n_positions(), 256);
  auto k0 = probe_->Kld();
  ASSERT_TRUE(k0.ok()) << k0.status();
  EXPECT_LT(*k0, 1e-9);
  HostTensor& wq = model_->mutable_loaded().weights.layers[2].wq;
  auto k = probe_->KldWith(&wq, Rtn(wq, "int2_g64"));
  ASSERT_TRUE(k.ok()) << k.status();
  EXPECT_GT(*k, 1e-4);
  EXPECT_EQ(wq.quant, nullptr);
  auto k1 = probe_->Kld();
  ASSERT_TRUE(k1.ok());
  EXPECT_LT(*k1, 1e-9);
}

// Starting at the perturbed layer from the recorded residual stream gives
// the full pass's divergence exactly.
TEST_F(ProbeTest, PartialPassEqualsFullPass) {
  HostTensor& w = model_->mutable_loaded().weights.layers[3].w_up;
  auto q = Rtn(w, "int3_g64");
  auto full = probe_->KldWith(&w, q, -1);
  auto part = probe_->KldWith(&w, q, 3);
  ASSERT_TRUE(full.ok() && part.ok());
  EXPECT_GT(*full, 0.0);
  EXPECT_DOUBLE_EQ(*full, *part);
  EXPECT_FALSE(probe_->Kld(model_->config().n_layers + 1).ok());
}

TEST_F(ProbeTest, CoarserFormatsMoveTheDistributionMore) {
  HostTensor& w = model_->mutable_loaded().weights.layers[0].w_down;
  double prev = 0;
  for (const char* f : {"int8_g32", "int4_g32", "int3_g64", "int2_g64"}) {
    auto k = probe_->KldWith(&w, Rtn(w, f));
    ASSERT_TRUE(k.ok()) << k.status();
    EXPECT_GT(*k, prev) << f;
    prev = *k;
  }
  // The tied embedding probe quantizes lookup and head together.
  auto costs = EmbeddingCosts(*probe_, *model_, {*fmt::Format::Parse("int8_g32"), *fmt::Format::Parse("int2_g64")},
                              /*output=*/false, 2);
  ASSERT_TRUE(costs.ok()) << costs.status();
  ASSERT_EQ(costs->size(), 2u);
  EXPECT_GT((*costs)[0].bits, (*costs)[1].bits);
  EXPECT_LT((*costs)[0].err, (*costs)[1].err);
  EXPECT_EQ(model_->loaded().weights.tok_embeddings.quant, nullptr);
}

TEST_F(ProbeTest, LinearSensitivitiesArePositivePerUnitOfProxy) {
  auto stats = Calibrate(*model_, *tok_, text_, 1024, 128);
  ASSERT_TRUE(stats.ok()) << stats.status();
  auto s = LinearSensitivities(*probe_, *model_, *stats, *fmt::Format::Parse("int3_g64"), 2);
  ASSERT_TRUE(s.ok()) << s.status();
  ASSERT_EQ(s->size(), static_cast<size_t>(model_->config().n_layers));
  double lo = 1e300, hi = 0;
  for (const auto& layer : *s)
    for (double v : layer) {
      EXPECT_TRUE(std::isfinite(v));
      EXPECT_GT(v, 0.0);
      lo = std::min(lo, v);
      hi = std::max(hi, v);
    }
  // The point of probing: layers differ in how much of their proxy error
  // reaches the output (a single scale would make the weights useless).
  EXPECT_GT(hi / lo, 2.0);
  // No tensor left quantized.
  for (const LayerWeights& l : model_->loaded().weights.layers) EXPECT_EQ(l.wq.quant, nullptr);
}

TEST(KldProbeErrors, EmptyInput) {
  EXPECT_FALSE(KldProbe::Create(nullptr, {{1, 2}}).ok());
}

}  // namespace
}  // namespace nibble
