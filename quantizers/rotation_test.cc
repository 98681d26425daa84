// Rotation (quantizers/rotation.h): the structured matrices are orthogonal and
// incoherent for the widths real models use, deterministic per seed; the
// rotated stories260K computes the same logits as the original in fp32 (all
// positions of a 64-token prompt), and rotation refuses quantized weights.
#include "quantizers/rotation.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "engine/io/nibble_file.h"
#include "engine/model/llama_model.h"
#include "engine/model/model_loader.h"
#include "engine/tokenizer/tokenizer.h"
#include "quantizers/model_quantizer.h"
#include "tests/test_util.h"

namespace nibble {
namespace {

using ::nibble::testing::Stories260KModel;
using ::nibble::testing::Stories260KTokenizer;

TEST(RotationTest, StructuredRotationIsOrthogonalAndIncoherent) {
  for (int n : {1, 3, 8, 64, 172, 576}) {
    const std::vector<float> q = StructuredRotation(n, 42);
    ASSERT_EQ(q.size(), size_t(n) * n);
    double worst = 0, max_entry = 0;
    for (int i = 0; i < n; ++i) {
      for (int j = 0; j < n; ++j) {
        double d = 0;
        for (int k = 0; k < n; ++k) d += double(q[size_t(i) * n + k]) * q[size_t(j) * n + k];
        worst = std::max(worst, std::abs(d - (i == j ? 1.0 : 0.0)));
        max_entry = std::max(max_entry, double(std::abs(q[size_t(i) * n + j])));
      }
    }
    EXPECT_LT(worst, 1e-6) << "n=" << n;
    EXPECT_LE(max_entry, std::sqrt(2.0 / n) + 1e-6) << "n=" << n;
    EXPECT_EQ(q, StructuredRotation(n, 42)) << "n=" << n;
    if (n > 1) EXPECT_NE(q, StructuredRotation(n, 43)) << "n=" << n;  // signs depend on the seed
  }
}

TEST(RotationTest, FastRotationMatchesDenseProduct) {
  for (int n : {1, 6, 64, 172, 1536}) {
    const std::vector<float> q = StructuredRotation(n, 7);
    const FastRotation fast(n, 7);
    std::vector<float> x(size_t(n) * 2);
    for (size_t i = 0; i < x.size(); ++i) x[i] = std::sin(0.37 * double(i)) + (i % 17 == 0 ? 5.0 : 0.0);
    std::vector<float> y = x;
    fast.Apply(y.data(), 2);
    for (int row = 0; row < 2; ++row)
      for (int i = 0; i < n; ++i) {
        double want = 0;
        for (int j = 0; j < n; ++j) want += double(q[size_t(i) * n + j]) * x[size_t(row) * n + j];
        ASSERT_NEAR(y[size_t(row) * n + i], want, 1e-5 * (1 + std::abs(want))) << "n=" << n << " i=" << i;
      }
  }
}

LoadedModel LoadStories() {
  LoadOptions lo;
  lo.tokenizer_path = Stories260KTokenizer();
  auto loaded = LoadModel(Stories260KModel(), lo);
  EXPECT_TRUE(loaded.ok()) << loaded.status();
  return loaded.ok() ? *std::move(loaded) : LoadedModel{};
}

std::vector<float> AllLogits(LoadedModel m, const std::vector<int32_t>& tokens) {
  auto model = LlamaModel::Create(std::move(m), 2);
  EXPECT_TRUE(model.ok()) << model.status();
  if (!model.ok()) return {};
  auto cache = (*model)->NewKVCache();
  std::vector<float> logits(tokens.size() * size_t((*model)->config().vocab_size));
  EXPECT_TRUE((*model)->Forward(tokens, 0, cache.get(), logits, /*all_logits=*/true).ok());
  return logits;
}

// fp32 rotation changes only rounding: logits within 1e-4 of the largest.
void ExpectSameLogits(const std::vector<float>& got, const std::vector<float>& want, const char* what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  double max_diff = 0, max_abs = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    max_diff = std::max(max_diff, double(std::abs(got[i] - want[i])));
    max_abs = std::max(max_abs, double(std::abs(want[i])));
  }
  EXPECT_LT(max_diff, 1e-4 * max_abs) << what << ": max |logit| " << max_abs;
}

TEST(RotationTest, RotatedModelComputesTheSameLogits) {
  LoadedModel base = LoadStories();
  auto tok = CreateTokenizer(base.vocab);
  ASSERT_TRUE(tok.ok());
  auto enc = (*tok)->Encode("Once upon a time, there was a little girl named Lily. She loved to play outside in the "
                            "park with her friends and her dog.",
                            EncodeOptions{});
  ASSERT_TRUE(enc.ok());
  const std::vector<int32_t> tokens = *enc;
  ASSERT_GE(tokens.size(), 20u);
  const std::vector<float> want = AllLogits(base, tokens);

  for (bool heads : {false, true}) {
    LoadedModel rotated = base;
    ASSERT_TRUE(base.config.tied_embeddings);
    RotationOptions opt;
    opt.value_heads = heads;
    opt.ffn = true;
    ASSERT_TRUE(RotateModel(&rotated, opt, 2).ok());
    EXPECT_TRUE(rotated.config.tied_embeddings);  // shared table kept, rotated at run time
    EXPECT_EQ(rotated.config.residual_rotation, opt.seed);
    EXPECT_NE(rotated.config.ffn_rotation, 0u);
    EXPECT_EQ(rotated.weights.tok_embeddings.data, base.weights.tok_embeddings.data);
    for (float g : rotated.weights.layers[0].attn_norm.data) EXPECT_EQ(g, 1.0f);
    // The weights really changed basis (not an identity rotation).
    EXPECT_GT(std::abs(rotated.weights.layers[0].wq.data[0] - base.weights.layers[0].wq.data[0]), 1e-6f);
    const std::vector<float> got = AllLogits(rotated, tokens);
    ExpectSameLogits(got, want, heads ? "value heads rotated" : "residual only");
  }
}

TEST(RotationTest, UntiedModelIsFoldedWithoutRuntimeRotation) {
  LoadedModel base = LoadStories();
  base.weights.output = base.weights.tok_embeddings;  // the same model, untied
  base.weights.output.name = "output.weight";
  base.config.tied_embeddings = false;
  const std::vector<int32_t> tokens = {1, 403, 261, 378, 290, 21, 330, 260, 3, 497, 266, 352, 12, 300};
  const std::vector<float> want = AllLogits(base, tokens);
  LoadedModel rotated = base;
  ASSERT_TRUE(RotateModel(&rotated, RotationOptions{}, 2).ok());
  EXPECT_EQ(rotated.config.residual_rotation, 0u);
  EXPECT_FALSE(rotated.config.tied_embeddings);
  for (float g : rotated.weights.final_norm.data) EXPECT_EQ(g, 1.0f);
  const std::vector<float> got = AllLogits(rotated, tokens);
  ExpectSameLogits(got, want, "untied");
  LoadedModel again = base;
  EXPECT_EQ(RotateModel(&again, RotationOptions{.seed = 0}, 1).code(), absl::StatusCode::kInvalidArgument);
}

// A rotated, quantized tied model written to a nibble file (version 2, the
// seed in its config) reads back and computes the same logits; an unrotated
// model still writes version 1.
TEST(RotationTest, RotatedModelRoundTripsThroughNibbleFile) {
  const std::string dir = ::nibble::testing::MakeTempDir("rotation_test");
  LoadedModel m = LoadStories();
  QuantizeConfig cfg;
  cfg.method = "rtn";
  cfg.format = fmt::Format{fmt::Kind::kInt, 4, 32, false};
  cfg.rotate = true;
  ASSERT_TRUE(QuantizeModel(&m, cfg, nullptr).ok());  // residual + value heads (ffn off by default)
  ASSERT_NE(m.config.residual_rotation, 0u);
  const std::string path = dir + "/rot.nbl";
  ASSERT_TRUE(io::WriteNibbleFile(m, path).ok());
  LoadOptions lo;
  auto back = LoadModel(path, lo);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->config.residual_rotation, m.config.residual_rotation);
  EXPECT_EQ(back->config.ffn_rotation, m.config.ffn_rotation);
  EXPECT_EQ(m.config.ffn_rotation, 0u);
  const std::vector<int32_t> tokens = {1, 403, 261, 378, 290, 21, 330, 260, 3, 497};
  EXPECT_EQ(AllLogits(*back, tokens), AllLogits(m, tokens));
  auto version_of = [](const std::string& p) {
    std::ifstream f(p, std::ios::binary);
    char b[8] = {};
    f.read(b, 8);
    uint32_t v = 0;
    std::memcpy(&v, b + 4, 4);
    return v;
  };
  EXPECT_EQ(version_of(path), 2u);
  LoadedModel plain = LoadStories();
  ASSERT_TRUE(io::WriteNibbleFile(plain, dir + "/plain.nbl").ok());
  EXPECT_EQ(version_of(dir + "/plain.nbl"), 1u);
  std::filesystem::remove_all(dir);
}

TEST(RotationTest, RefusesQuantizedWeights) {
  LoadedModel m = LoadStories();
  QuantizeConfig cfg;
  cfg.method = "rtn";
  cfg.format = fmt::Format{fmt::Kind::kInt, 4, 32, false};
  ASSERT_TRUE(QuantizeModel(&m, cfg, nullptr).ok());
  const absl::Status s = RotateModel(&m, RotationOptions{}, 1);
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
  EXPECT_NE(std::string(s.message()).find("rotat"), std::string::npos) << s;
}

}  // namespace
}  // namespace nibble
