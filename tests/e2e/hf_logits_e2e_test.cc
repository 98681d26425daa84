// The same real weights written as a Hugging Face checkpoint (by
// scripts/export_hf.py: safetensors, HF's rotate-half Q/K layout) must give the
// same next-token logits as the original llama2.c / GGUF file. This checks the
// safetensors reader, the HF key mapping, the Q/K permutation convention and the
// rotate-half RoPE path together.
#include <cmath>
#include <cstdlib>
#include <string>
#include <vector>

#include "engine/model/llama_model.h"
#include "engine/model/model_loader.h"
#include "engine/tokenizer/tokenizer.h"
#include "gtest/gtest.h"
#include "kernels/common/fp16.h"
#include "tests/test_util.h"

namespace nibble {
namespace {

// fp32 logits of the same weights computed in a different summation order (the
// HF layout permutes Q/K rows): differences come from rounding only.
constexpr float kSameWeightsRelTol = 2e-4f;

bool Export(const std::string& src, const std::string& dst, const std::string& dtype, int shards = 1) {
  const std::string cmd = "python3 " + testing::SourceDir() + "/scripts/export_hf.py " + src + " " + dst +
                          " --dtype " + dtype + " --shards " + std::to_string(shards) + " >/dev/null 2>&1";
  return std::system(cmd.c_str()) == 0;
}

bool HavePythonDeps() { return std::system("python3 -c 'import numpy, gguf, safetensors' 2>/dev/null") == 0; }

void RoundWeightsToBf16(ModelWeights* w) {
  auto round = [](HostTensor& t) {
    for (float& x : t.data) x = Bf16ToFp32(Fp32ToBf16(x));
  };
  round(w->tok_embeddings);
  round(w->final_norm);
  round(w->output);
  for (LayerWeights& l : w->layers) {
    for (HostTensor* t : {&l.attn_norm, &l.wq, &l.wk, &l.wv, &l.wo, &l.ffn_norm, &l.w_gate, &l.w_up, &l.w_down})
      round(*t);
  }
}

std::vector<float> AllLogits(LoadedModel m, const std::vector<int32_t>& ids) {
  auto model = LlamaModel::Create(std::move(m), 2);
  EXPECT_TRUE(model.ok()) << model.status();
  if (!model.ok()) return {};
  auto cache = (*model)->NewKVCache(static_cast<int>(ids.size()));
  std::vector<float> logits(ids.size() * (*model)->config().vocab_size);
  auto s = (*model)->Forward(ids, 0, cache.get(), logits, /*all_logits=*/true);
  EXPECT_TRUE(s.ok()) << s;
  return logits;
}

void ExpectSameLogits(const std::vector<float>& a, const std::vector<float>& b, int vocab, float rel_tol,
                      const std::string& what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  ASSERT_FALSE(a.empty()) << what;
  float scale = 0, worst = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    scale = std::max(scale, std::fabs(a[i]));
    worst = std::max(worst, std::fabs(a[i] - b[i]));
  }
  EXPECT_LE(worst, rel_tol * scale) << what << ": max |diff| " << worst << " vs max |logit| " << scale;
  for (size_t row = 0; row < a.size() / vocab; ++row) {
    auto argmax = [&](const std::vector<float>& v) {
      return std::max_element(v.begin() + row * vocab, v.begin() + (row + 1) * vocab) - v.begin();
    };
    EXPECT_EQ(argmax(a), argmax(b)) << what << ": next-token argmax differs at position " << row;
  }
}

class HfLogitsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!HavePythonDeps()) GTEST_SKIP() << "python3 with numpy/gguf/safetensors is needed to export";
    dir_ = testing::MakeTempDir("nibble_hf_e2e_");
  }
  void TearDown() override {
    if (!dir_.empty()) std::system(("rm -rf " + dir_).c_str());
  }
  std::string dir_;
};

TEST_F(HfLogitsTest, Stories260KLlama2cVsHfF32Bf16Sharded) {
  const std::string src = testing::Stories260KModel(), tok = testing::Stories260KTokenizer();
  LoadOptions opts{.tokenizer_path = tok};
  auto ref = LoadModel(src, opts);
  ASSERT_TRUE(ref.ok()) << ref.status();
  auto tokenizer = CreateTokenizer(ref->vocab);
  ASSERT_TRUE(tokenizer.ok());
  auto ids = (*tokenizer)->Encode("Once upon a time, there was a little dog named Max.", {.add_bos = true});
  ASSERT_TRUE(ids.ok());
  const int vocab = ref->config.vocab_size;
  LoadedModel ref_bf16 = *ref;
  RoundWeightsToBf16(&ref_bf16.weights);
  const std::vector<float> want = AllLogits(*std::move(ref), *ids);
  const std::vector<float> want_bf16 = AllLogits(std::move(ref_bf16), *ids);

  for (auto [dtype, shards] : {std::pair{"f32", 1}, std::pair{"f32", 3}, std::pair{"bf16", 1}}) {
    const std::string out = dir_ + "/stories_" + dtype + "_" + std::to_string(shards);
    ASSERT_TRUE(Export(src, out, dtype, shards)) << out;
    auto hf = LoadModel(out, opts);
    ASSERT_TRUE(hf.ok()) << hf.status();
    EXPECT_EQ(hf->source_format, "hf");
    EXPECT_EQ(hf->config.rope_style, RopeStyle::kHalf);
    const bool bf16 = std::string(dtype) == "bf16";
    ExpectSameLogits(bf16 ? want_bf16 : want, AllLogits(*std::move(hf), *ids), vocab, kSameWeightsRelTol,
                     std::string("stories260K ") + dtype + " shards=" + std::to_string(shards));
  }
}

TEST_F(HfLogitsTest, SmolLM2GgufVsHfF32AndBf16) {
  auto gguf = testing::SmolLM2Gguf();
  if (!gguf) GTEST_SKIP() << "SmolLM2 GGUF not fetched (scripts/get-models.sh)";
  auto ref = LoadModel(*gguf);
  ASSERT_TRUE(ref.ok()) << ref.status();
  auto tokenizer = CreateTokenizer(ref->vocab);
  ASSERT_TRUE(tokenizer.ok());
  auto ids = (*tokenizer)->Encode("The capital of France is Paris, and the capital of Germany is", {});
  ASSERT_TRUE(ids.ok());
  const int vocab = ref->config.vocab_size;
  LoadedModel ref_bf16 = *ref;
  RoundWeightsToBf16(&ref_bf16.weights);
  const std::vector<float> want = AllLogits(*std::move(ref), *ids);
  const std::vector<float> want_bf16 = AllLogits(std::move(ref_bf16), *ids);

  for (std::string dtype : {"f32", "bf16"}) {
    const std::string out = dir_ + "/smollm2_" + dtype;
    ASSERT_TRUE(Export(*gguf, out, dtype)) << out;
    auto hf = LoadModel(out);  // tokenizer.json written by the exporter
    ASSERT_TRUE(hf.ok()) << hf.status();
    // The exported tokenizer.json must tokenize like the GGUF vocabulary.
    auto hf_tok = CreateTokenizer(hf->vocab);
    ASSERT_TRUE(hf_tok.ok()) << hf_tok.status();
    auto hf_ids = (*hf_tok)->Encode("The capital of France is Paris, and the capital of Germany is", {});
    ASSERT_TRUE(hf_ids.ok());
    EXPECT_EQ(*hf_ids, *ids);
    ExpectSameLogits(dtype == "bf16" ? want_bf16 : want, AllLogits(*std::move(hf), *ids), vocab,
                     kSameWeightsRelTol, "SmolLM2 " + dtype);
    std::system(("rm -rf " + out).c_str());
  }
}

}  // namespace
}  // namespace nibble
