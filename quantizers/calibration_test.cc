// Hessian accumulation against a naive fp64 X^T X, and calibration on the
// real stories260K model: the collector's Hessians equal X^T X of the raw
// activations captured by an independent test observer.
#include "quantizers/calibration.h"

#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "engine/model/model_loader.h"
#include "kernels/cpu/ops.h"
#include "tests/test_util.h"

namespace nibble {
namespace {

using ::nibble::testing::SharedDir;
using ::nibble::testing::Stories260KModel;
using ::nibble::testing::Stories260KTokenizer;

std::vector<double> NaiveGram(const std::vector<float>& x, int64_t n, int64_t d) {
  std::vector<double> g(d * d, 0.0);
  for (int64_t t = 0; t < n; ++t)
    for (int64_t i = 0; i < d; ++i)
      for (int64_t j = 0; j < d; ++j) g[i * d + j] += double{x[t * d + i]} * x[t * d + j];
  return g;
}

// Every tile kernel the CPU supports (scalar, AVX2, AVX-512), odd widths.
class AccumulatorTest : public ::testing::TestWithParam<std::tuple<const char*, int64_t>> {
 protected:
  void TearDown() override { cpu::ForceIsaForTesting(""); }
};

TEST_P(AccumulatorTest, MatchesNaiveGram) {
  const auto [isa, d] = GetParam();
  if (!cpu::ForceIsaForTesting(isa)) GTEST_SKIP() << isa << " not supported here";
  std::mt19937 rng(d);
  std::normal_distribution<float> nd(0.5f, 2.0f);
  HessianAccumulator acc(d);
  std::vector<float> all;
  for (int64_t n : {1, 7, 256, 33}) {
    std::vector<float> x(n * d);
    for (float& v : x) v = nd(rng);
    acc.Add(x.data(), n, n == 7 ? 1 : 2);
    all.insert(all.end(), x.begin(), x.end());
  }
  const int64_t total = static_cast<int64_t>(all.size()) / d;
  const Hessian h = acc.Finish();
  ASSERT_EQ(h.dim, d);
  ASSERT_EQ(h.n_tokens, total);
  ASSERT_TRUE(h.Validate("test").ok());
  const std::vector<double> g = NaiveGram(all, total, d);
  for (int64_t i = 0; i < d; ++i) {
    for (int64_t j = 0; j < d; ++j) {
      const double want = 2.0 * g[i * d + j] / total;
      const double scale = 2.0 * std::sqrt(g[i * d + i] * g[j * d + j]) / total;
      ASSERT_NEAR(h.at(i, j), want, 1e-5 * scale) << i << "," << j;
      ASSERT_EQ(h.at(i, j), h.at(j, i));
    }
    EXPECT_NEAR(h.mean_sq[i], g[i * d + i] / total, 1e-5 * g[i * d + i] / total);
  }
}

INSTANTIATE_TEST_SUITE_P(IsaWidths, AccumulatorTest,
                         ::testing::Combine(::testing::Values("scalar", "avx2", "avx512"),
                                            ::testing::Values(1, 5, 16, 17, 64, 172, 300)),
                         [](const ::testing::TestParamInfo<std::tuple<const char*, int64_t>>& i) {
                           return std::string(std::get<0>(i.param)) + "_" + std::to_string(std::get<1>(i.param));
                         });

TEST(AccumulatorTest, EmptyGivesZeros) {
  HessianAccumulator acc(3);
  const Hessian h = acc.Finish();
  EXPECT_EQ(h.n_tokens, 0);
  for (float v : h.h) EXPECT_EQ(v, 0.0f);
}

TEST(CollectorTest, WidthChangeIsAnError) {
  HessianCollector c;
  std::vector<float> x(16, 1.0f);
  c.OnLinearInput(0, LinearInput::kAttnIn, x.data(), 2, 8);
  c.OnLinearInput(0, LinearInput::kAttnIn, x.data(), 1, 16);
  EXPECT_FALSE(c.status().ok());
  EXPECT_FALSE(c.Finish().ok());
  HessianCollector bad;
  bad.OnLinearInput(-1, LinearInput::kAttnIn, x.data(), 1, 8);
  EXPECT_FALSE(bad.status().ok());
  HessianCollector huge;
  huge.OnLinearInput(0, LinearInput::kAttnIn, x.data(), 0, kMaxHessianDim + 1);
  EXPECT_FALSE(huge.status().ok());
}

TEST(CollectorTest, LayerRangeIsHonoured) {
  CollectorOptions o;
  o.layer_begin = 1;
  o.layer_end = 2;
  HessianCollector c(o);
  std::vector<float> x(8, 1.0f);
  for (int l = 0; l < 3; ++l) c.OnLinearInput(l, LinearInput::kFfnMid, x.data(), 1, 8);
  auto s = c.Finish();
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(s->Get(0, LinearInput::kFfnMid), nullptr);
  ASSERT_NE(s->Get(1, LinearInput::kFfnMid), nullptr);
  EXPECT_EQ(s->Get(2, LinearInput::kFfnMid), nullptr);
  EXPECT_EQ(s->Get(1, LinearWeight::kDown)->dim, 8);
}

// Records raw activations of one (layer, input) to recompute X^T X naively.
class Recorder : public ActivationObserver {
 public:
  Recorder(ActivationObserver* next, int layer, LinearInput which) : next_(next), layer_(layer), which_(which) {}
  void OnLinearInput(int layer, LinearInput which, const float* x, int n, int width) override {
    if (layer == layer_ && which == which_) {
      rows.insert(rows.end(), x, x + int64_t{n} * width);
      width_ = width;
    }
    next_->OnLinearInput(layer, which, x, n, width);
  }
  std::vector<float> rows;
  int width_ = 0;

 private:
  ActivationObserver* next_;
  int layer_;
  LinearInput which_;
};

std::unique_ptr<LlamaModel> LoadStories(std::unique_ptr<Tokenizer>* tok) {
  LoadOptions lo;
  lo.tokenizer_path = Stories260KTokenizer();
  auto loaded = LoadModel(Stories260KModel(), lo);
  EXPECT_TRUE(loaded.ok()) << loaded.status();
  if (!loaded.ok()) return nullptr;
  auto t = CreateTokenizer(loaded->vocab);
  EXPECT_TRUE(t.ok()) << t.status();
  if (!t.ok()) return nullptr;
  *tok = *std::move(t);
  auto m = LlamaModel::Create(*std::move(loaded), 1);
  EXPECT_TRUE(m.ok()) << m.status();
  return m.ok() ? *std::move(m) : nullptr;
}

TEST(CalibrateTest, Stories260KShapesAndCounts) {
  std::unique_ptr<Tokenizer> tok;
  auto model = LoadStories(&tok);
  ASSERT_NE(model, nullptr);
  const std::string text = SharedDir() + "/data/tinystories-val.txt";
  auto stats = Calibrate(*model, *tok, text, /*n_tokens=*/1000, /*ctx=*/300);
  ASSERT_TRUE(stats.ok()) << stats.status();
  EXPECT_EQ(stats->n_tokens, 1000);
  EXPECT_EQ(stats->n_chunks, 4);  // 300 + 300 + 300 + 100
  const ModelConfig& c = model->config();
  // Every layer, and the output head's input at index n_layers.
  ASSERT_EQ(static_cast<int>(stats->hessians.size()), c.n_layers + 1);
  const Hessian* head = stats->Get(c.n_layers, LinearInput::kHeadIn);
  ASSERT_NE(head, nullptr);
  EXPECT_EQ(head->dim, c.dim);
  EXPECT_EQ(head->n_tokens, 1000);
  EXPECT_EQ(stats->Get(c.n_layers, LinearWeight::kWq), nullptr);
  for (int l = 0; l < c.n_layers; ++l) {
    for (LinearWeight w : kAllLinearWeights) {
      const Hessian* h = stats->Get(l, w);
      ASSERT_NE(h, nullptr);
      EXPECT_EQ(h->dim, WeightOf(model->loaded().weights.layers[l], w).cols()) << LinearWeightName(w);
      EXPECT_EQ(h->n_tokens, 1000);
      for (int64_t i = 0; i < h->dim; ++i) EXPECT_NEAR(h->mean_sq[i], h->at(i, i) / 2, 1e-6f * h->at(i, i));
    }
  }
  EXPECT_EQ(model->loaded().weights.layers[0].w_down.cols(), 172);  // odd width exercised
}

// One document, one chunk: the Hessians must equal X^T X of the activations an
// independent recorder captures when the test runs [BOS] + Encode(doc) itself.
TEST(CalibrateTest, Stories260KHessiansEqualGramOfActivations) {
  std::unique_ptr<Tokenizer> tok;
  auto model = LoadStories(&tok);
  ASSERT_NE(model, nullptr);
  const std::string doc = "Once upon a time, there was a little dog named Max. Max liked to run in the park.";
  const std::string path = ::nibble::testing::WriteTempFile("calib.txt", "\n" + doc + "\n<|endoftext|>\n");
  auto stats = Calibrate(*model, *tok, path, 1000, 256);
  ASSERT_TRUE(stats.ok()) << stats.status();

  auto ids = tok->Encode(doc, EncodeOptions{false, false});
  ASSERT_TRUE(ids.ok());
  std::vector<int32_t> chunk = *ids;
  if (tok->ShouldAddBos()) chunk.insert(chunk.begin(), tok->bos_id());
  EXPECT_EQ(stats->n_tokens, static_cast<int64_t>(chunk.size()));
  EXPECT_EQ(stats->n_chunks, 1);

  const int head_layer = model->config().n_layers;
  for (int layer : {0, 3, head_layer}) {
    for (LinearInput which : {LinearInput::kAttnIn, LinearInput::kAttnOut, LinearInput::kFfnMid,
                              LinearInput::kHeadIn}) {
      if ((layer == head_layer) != (which == LinearInput::kHeadIn)) continue;
      HessianCollector sink;
      Recorder rec(&sink, layer, which);
      model->SetObserver(&rec);
      auto cache = model->NewKVCache(256);
      std::vector<float> logits(model->config().vocab_size);
      ASSERT_TRUE(model->Forward(chunk, 0, cache.get(), logits).ok());
      model->SetObserver(nullptr);
      const int64_t d = rec.width_, n = static_cast<int64_t>(rec.rows.size()) / d;
      ASSERT_EQ(n, static_cast<int64_t>(chunk.size()));
      const std::vector<double> g = NaiveGram(rec.rows, n, d);
      const Hessian* h = stats->Get(layer, which);
      ASSERT_NE(h, nullptr);
      ASSERT_EQ(h->dim, d);
      for (int64_t i = 0; i < d; ++i)
        for (int64_t j = 0; j < d; ++j) {
          // fp32 products: error scale sqrt(H_ii H_jj) (Cauchy-Schwarz bound of |H_ij|).
          const double want = 2.0 * g[i * d + j] / n;
          const double scale = 2.0 * std::sqrt(g[i * d + i] * g[j * d + j]) / n;
          ASSERT_NEAR(h->at(i, j), want, 1e-5 * scale + 1e-12) << layer << " " << i << "," << j;
        }
    }
  }
}

// The observed head input is what the output head multiplies: the tied
// embedding times each observed row gives Forward's logits for that token.
TEST(CalibrateTest, HeadInputTimesTiedEmbeddingIsTheLogits) {
  std::unique_ptr<Tokenizer> tok;
  auto model = LoadStories(&tok);
  ASSERT_NE(model, nullptr);
  const ModelConfig& c = model->config();
  ASSERT_TRUE(c.tied_embeddings);
  auto ids = tok->Encode("Lily saw a big red ball in the garden.", EncodeOptions{true, false});
  ASSERT_TRUE(ids.ok());
  const int64_t n = static_cast<int64_t>(ids->size());
  HessianCollector sink;
  Recorder rec(&sink, c.n_layers, LinearInput::kHeadIn);
  model->SetObserver(&rec);
  auto cache = model->NewKVCache(64);
  std::vector<float> logits(n * c.vocab_size);
  ASSERT_TRUE(model->Forward(*ids, 0, cache.get(), logits, /*all_logits=*/true).ok());
  model->SetObserver(nullptr);
  ASSERT_EQ(rec.width_, c.dim);
  ASSERT_EQ(static_cast<int64_t>(rec.rows.size()), n * c.dim);
  const std::vector<float>& e = model->loaded().weights.tok_embeddings.data;
  for (int64_t t = 0; t < n; ++t)
    for (int v = 0; v < c.vocab_size; ++v) {
      double dot = 0, mag = 0;
      for (int i = 0; i < c.dim; ++i) {
        dot += double(e[size_t(v) * c.dim + i]) * rec.rows[t * c.dim + i];
        mag += std::fabs(double(e[size_t(v) * c.dim + i]) * rec.rows[t * c.dim + i]);
      }
      ASSERT_NEAR(logits[t * c.vocab_size + v], dot, 1e-5 * mag + 1e-6) << "token " << t << " vocab " << v;
    }
  // Without an observer the same call gives the same logits.
  auto cache2 = model->NewKVCache(64);
  std::vector<float> logits2(logits.size());
  ASSERT_TRUE(model->Forward(*ids, 0, cache2.get(), logits2, /*all_logits=*/true).ok());
  EXPECT_EQ(logits, logits2);
}

TEST(CalibrateTest, ChunksStartWithBosAndStopAtTextEnd) {
  std::unique_ptr<Tokenizer> tok;
  auto model = LoadStories(&tok);
  ASSERT_NE(model, nullptr);
  const std::string a = "The cat sat on the mat and looked at the big red ball.";
  const std::string b = "Lily had a toy.";
  const std::string path = ::nibble::testing::WriteTempFile("calib2.txt", a + "<|endoftext|>" + b);
  auto ia = tok->Encode(a, EncodeOptions{false, false});
  auto ib = tok->Encode(b, EncodeOptions{false, false});
  ASSERT_TRUE(ia.ok() && ib.ok());
  ASSERT_TRUE(tok->ShouldAddBos());
  // Stream: BOS a BOS b. With ctx = 8 every chunk holds 7 stream tokens after
  // an inserted BOS unless the stream itself is at a BOS.
  const int64_t stream = 2 + static_cast<int64_t>(ia->size() + ib->size());
  auto stats = Calibrate(*model, *tok, path, 100000, 8);
  ASSERT_TRUE(stats.ok()) << stats.status();
  EXPECT_GT(stats->n_tokens, stream);       // BOS tokens were inserted
  EXPECT_LT(stats->n_tokens, stream * 8 / 7 + 3);
  EXPECT_EQ(stats->n_chunks, (stats->n_tokens + 7) / 8);
  // Every token budget is honoured exactly when the text is long enough.
  auto few = Calibrate(*model, *tok, path, 5, 8);
  ASSERT_TRUE(few.ok());
  EXPECT_EQ(few->n_tokens, 5);
  // 17 = 8 + 8 + 1: the last token cannot follow a BOS of its own, so 16.
  auto odd = Calibrate(*model, *tok, path, 17, 8);
  ASSERT_TRUE(odd.ok());
  EXPECT_EQ(odd->n_tokens, 16);
  EXPECT_EQ(odd->n_chunks, 2);
  // A text without any content is an error naming the file.
  const std::string empty = ::nibble::testing::WriteTempFile("calib3.txt", " <|endoftext|>\n");
  auto none = Calibrate(*model, *tok, empty, 10, 8);
  ASSERT_FALSE(none.ok());
  EXPECT_NE(none.status().message().find(empty), std::string::npos);
}

TEST(CalibrateTest, MissingTextFileNamesIt) {
  std::unique_ptr<Tokenizer> tok;
  auto model = LoadStories(&tok);
  ASSERT_NE(model, nullptr);
  auto s = Calibrate(*model, *tok, "/nonexistent/calib.txt", 100, 64);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.status().message().find("/nonexistent/calib.txt"), std::string::npos) << s.status();
  EXPECT_FALSE(Calibrate(*model, *tok, "/nonexistent/calib.txt", 0, 64).ok());
}

}  // namespace
}  // namespace nibble
