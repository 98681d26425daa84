// Whole-model driver options on stories260K: per-tensor formats
// (QuantizeConfig::tensor_formats) land on exactly the matrices they name,
// the last match wins, the report names them, and bad patterns / combinations
// are refused with the offending name.
#include "quantizers/model_quantizer.h"

#include "kernels/common/fp16.h"

#include <gtest/gtest.h>

#include <string>

#include "engine/core/quant_tensor.h"
#include "engine/model/model_loader.h"
#include "tests/test_util.h"

namespace nibble {
namespace {

LoadedModel LoadStories() {
  LoadOptions lo;
  lo.tokenizer_path = testing::Stories260KTokenizer();
  auto loaded = LoadModel(testing::Stories260KModel(), lo);
  EXPECT_TRUE(loaded.ok()) << loaded.status();
  return loaded.ok() ? *std::move(loaded) : LoadedModel{};
}

fmt::Format F(const char* name) {
  auto f = fmt::Format::Parse(name);
  EXPECT_TRUE(f.has_value()) << name;
  return f.value_or(fmt::Format{});
}

std::string FormatOf(const HostTensor& t) {
  EXPECT_NE(t.quant, nullptr);
  if (t.quant == nullptr || t.quant->segments.size() != 1) return "?";
  return t.quant->segments[0].format.Name();
}

TEST(ModelQuantizerTest, TensorFormatsApplyByWeightAndByMatrix) {
  LoadedModel m = LoadStories();
  QuantizeConfig cfg;
  cfg.format = F("int4_g32");
  cfg.tensor_formats = {{"w_down", F("int4_g64")}, {"blk.2.wq", F("int8_g32")}, {"blk.2.w_down", F("int3_g64")}};
  auto r = QuantizeModel(&m, cfg);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->format, "int4_g32,w_down=int4_g64,blk.2.wq=int8_g32,blk.2.w_down=int3_g64");
  for (size_t l = 0; l < m.weights.layers.size(); ++l) {
    const LayerWeights& lw = m.weights.layers[l];
    EXPECT_EQ(FormatOf(lw.wq), l == 2 ? "int8_g32" : "int4_g32") << l;
    EXPECT_EQ(FormatOf(lw.wk), "int4_g32") << l;
    EXPECT_EQ(FormatOf(lw.w_up), "int4_g32") << l;
    EXPECT_EQ(FormatOf(lw.w_down), l == 2 ? "int3_g64" : "int4_g64") << l;  // the later entry wins
  }
  for (const TensorReport& t : r->tensors)
    if (t.name == "blk.0.w_down") EXPECT_EQ(t.format, "int4_g64");
}

// norms_f16: the norms are rounded to fp16 in place and counted at 16 bits;
// the linear layers come out the same (RTN does not read the norms).
TEST(ModelQuantizerTest, Fp16NormsAreRoundedAndCountedAt16Bits) {
  LoadedModel a = LoadStories(), b = LoadStories();
  ASSERT_FALSE(a.weights.layers.empty());
  const std::vector<float> norm0 = a.weights.layers[0].attn_norm.data;
  QuantizeConfig cfg;
  cfg.format = F("int4_g32");
  auto ra = QuantizeModel(&a, cfg);
  cfg.norms_f16 = true;
  auto rb = QuantizeModel(&b, cfg);
  ASSERT_TRUE(ra.ok() && rb.ok());
  int64_t norms = b.weights.final_norm.numel();
  for (const LayerWeights& l : b.weights.layers) norms += l.attn_norm.numel() + l.ffn_norm.numel();
  EXPECT_NEAR((ra->bpw_all - rb->bpw_all) * static_cast<double>(ra->params_all), 16.0 * static_cast<double>(norms),
              1e-6 * static_cast<double>(norms));
  EXPECT_EQ(ra->bpw_linear, rb->bpw_linear);
  int changed = 0;
  for (size_t i = 0; i < norm0.size(); ++i) {
    const float v = b.weights.layers[0].attn_norm.data[i];
    EXPECT_EQ(v, Fp16ToFp32(Fp32ToFp16(norm0[i]))) << i;
    changed += v != norm0[i];
  }
  EXPECT_GT(changed, 0);
  EXPECT_EQ(b.metadata["quant.norms"], "f16");
}

TEST(ModelQuantizerTest, TensorFormatsRefuseUnknownNamesAndAllocation) {
  LoadedModel m = LoadStories();
  QuantizeConfig cfg;
  cfg.format = F("int4_g32");
  cfg.tensor_formats = {{"w_dwn", F("int4_g64")}};
  auto r = QuantizeModel(&m, cfg);
  ASSERT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(r.status().message().find("w_dwn"), std::string::npos) << r.status();
  cfg.tensor_formats = {{"blk.99.wq", F("int4_g64")}};  // stories260K has 5 layers
  EXPECT_EQ(QuantizeModel(&m, cfg).status().code(), absl::StatusCode::kInvalidArgument);
  cfg.tensor_formats = {{"w_down", F("int4_g64")}};
  cfg.target_bpw = 4.5;
  cfg.calib_path = testing::SharedDir() + "/data/tinystories-val.txt";
  EXPECT_EQ(QuantizeModel(&m, cfg).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace nibble
