// fp16 weights kept at 16 bits (LoadOptions::keep_f16) against the same file
// widened to fp32: the fp16 kernels are the fp32 kernels on the widened rows,
// so prefill and decode logits are equal bit for bit at every ISA.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "engine/io/nibble_file.h"
#include "engine/model/llama_model.h"
#include "engine/model/model_loader.h"
#include "gtest/gtest.h"
#include "kernels/cpu/ops.h"
#include "tests/test_util.h"

namespace nibble {
namespace {

class F16ForwardTest : public ::testing::TestWithParam<const char*> {
 protected:
  void SetUp() override {
    if (!cpu::ForceIsaForTesting(GetParam())) GTEST_SKIP() << "CPU lacks " << GetParam();
  }
  void TearDown() override { cpu::ForceIsaForTesting(""); }
};

// All logits of a 23-token prefill then 4 single-token decode steps.
std::vector<float> Logits(LoadedModel m) {
  auto model = LlamaModel::Create(std::move(m), 2);
  EXPECT_TRUE(model.ok()) << model.status();
  if (!model.ok()) return {};
  const int V = (*model)->config().vocab_size;
  std::vector<int32_t> prompt;
  for (int i = 0; i < 23; ++i) prompt.push_back((i * 37 + 11) % V);
  auto kv = (*model)->NewKVCache(64);
  std::vector<float> out(size_t(27) * V);
  EXPECT_TRUE((*model)->Forward(prompt, 0, kv.get(), {out.data(), size_t(23) * V}, /*all_logits=*/true).ok());
  for (int s = 0; s < 4; ++s) {
    const int32_t tok = (s * 53 + 7) % V;
    EXPECT_TRUE((*model)->Forward({&tok, 1}, 23 + s, kv.get(), {out.data() + size_t(23 + s) * V, size_t(V)}).ok());
  }
  return out;
}

TEST_P(F16ForwardTest, KeptF16LogitsEqualWidenedF32) {
  if (!std::filesystem::exists(testing::Stories260KModel())) GTEST_SKIP() << "stories260K not present";
  LoadOptions lo;
  lo.tokenizer_path = testing::Stories260KTokenizer();
  auto src = LoadModel(testing::Stories260KModel(), lo);
  ASSERT_TRUE(src.ok()) << src.status();
  const std::string dir = testing::MakeTempDir("f16_forward");
  const std::string path = dir + "/stories260K.f16.nbl";
  io::NibbleWriteOptions wo;
  wo.fp16_matrices = true;
  wo.fsync = false;
  ASSERT_TRUE(io::WriteNibbleFile(*src, path, wo).ok());

  LoadOptions keep, widen;
  keep.keep_f16 = true;
  widen.keep_f16 = false;
  auto kept = LoadModel(path, keep);
  ASSERT_TRUE(kept.ok()) << kept.status();
  const ModelWeights& w = kept->weights;
  EXPECT_TRUE(w.tok_embeddings.is_f16());
  for (const LayerWeights& l : w.layers)
    for (const HostTensor* t : {&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down}) {
      EXPECT_TRUE(t->is_f16()) << t->name;
      EXPECT_TRUE(t->data.empty()) << t->name;
    }
  EXPECT_FALSE(w.layers[0].attn_norm.is_f16());  // 1-D tensors stay fp32
  // Written back as it is kept (fp16 storage from HostTensor::f16), then read again: the same values.
  const std::string path2 = dir + "/stories260K.f16.again.nbl";
  ASSERT_TRUE(io::WriteNibbleFile(*kept, path2, {}).ok());
  auto again = LoadModel(path2, keep);
  ASSERT_TRUE(again.ok()) << again.status();
  ASSERT_TRUE(again->weights.layers[1].w_down.is_f16());
  EXPECT_TRUE(std::equal(again->weights.layers[1].w_down.f16.begin(), again->weights.layers[1].w_down.f16.end(),
                         w.layers[1].w_down.f16.begin(), w.layers[1].w_down.f16.end()));
  EXPECT_TRUE(std::equal(again->weights.tok_embeddings.f16.begin(), again->weights.tok_embeddings.f16.end(),
                         w.tok_embeddings.f16.begin(), w.tok_embeddings.f16.end()));
  auto widened = LoadModel(path, widen);
  ASSERT_TRUE(widened.ok()) << widened.status();
  EXPECT_FALSE(widened->weights.layers[0].wq.is_f16());

  const std::vector<float> a = Logits(*std::move(kept)), b = Logits(*std::move(widened));
  ASSERT_EQ(a.size(), b.size());
  ASSERT_FALSE(a.empty());
  for (size_t i = 0; i < a.size(); ++i)
    ASSERT_EQ(std::memcmp(&a[i], &b[i], sizeof(float)), 0) << GetParam() << " logit " << i << ": " << a[i] << " vs "
                                                            << b[i];
  // And fp16 rounding of the weights moves the fp32 model's logits only a little.
  const std::vector<float> f = Logits(*std::move(src));
  double max_diff = 0;
  for (size_t i = 0; i < a.size(); ++i) max_diff = std::max(max_diff, double(std::fabs(a[i] - f[i])));
  EXPECT_GT(max_diff, 0.0);   // the weights did change
  EXPECT_LT(max_diff, 0.05);  // stories260K logits are O(10)
  std::filesystem::remove_all(dir);
}

// The contiguous fp16 KV cache (NewKVCache(n, kF16)): the same prefill +
// decode as with the fp32 cache, logits within the fp16 rounding of K/V
// (measured max diff ~0.02 on stories260K; bound 0.1), the same argmax at
// every step, and a cache of about half the bytes (fp32 also keeps row-major K).
TEST_P(F16ForwardTest, F16KvCacheStaysCloseToF32) {
  if (!std::filesystem::exists(testing::Stories260KModel())) GTEST_SKIP() << "stories260K not present";
  LoadOptions lo;
  lo.tokenizer_path = testing::Stories260KTokenizer();
  auto src = LoadModel(testing::Stories260KModel(), lo);
  ASSERT_TRUE(src.ok()) << src.status();
  auto model = LlamaModel::Create(*std::move(src), 2);
  ASSERT_TRUE(model.ok()) << model.status();
  LlamaModel& m = **model;
  const int V = m.config().vocab_size;
  std::vector<int32_t> prompt;
  for (int i = 0; i < 70; ++i) prompt.push_back((i * 37 + 11) % V);
  std::vector<float> out[2];
  size_t bytes[2];
  for (int d = 0; d < 2; ++d) {
    auto kv = m.NewKVCache(80, d == 0 ? KvDtype::kF32 : KvDtype::kF16);
    bytes[d] = kv->bytes();
    out[d].resize(size_t(74) * V);
    ASSERT_TRUE(m.Forward(prompt, 0, kv.get(), {out[d].data(), size_t(70) * V}, /*all_logits=*/true).ok());
    for (int s = 0; s < 4; ++s) {
      const int32_t tok = (s * 53 + 7) % V;
      ASSERT_TRUE(m.Forward({&tok, 1}, 70 + s, kv.get(), {out[d].data() + size_t(70 + s) * V, size_t(V)}).ok());
    }
  }
  EXPECT_LT(bytes[1] * 10, bytes[0] * 4);  // 2 + 2 bytes vs 4 + 4 + 4 per element: 1/3
  float worst = 0.0f;
  for (int t = 0; t < 74; ++t) {
    const float* a = out[0].data() + size_t(t) * V;
    const float* b = out[1].data() + size_t(t) * V;
    EXPECT_EQ(std::max_element(a, a + V) - a, std::max_element(b, b + V) - b) << "step " << t;
    for (int i = 0; i < V; ++i) worst = std::max(worst, std::fabs(a[i] - b[i]));
  }
  printf("%s: f16 vs f32 KV cache, max |logit diff| over 74 positions = %.4g\n", GetParam(), worst);
  EXPECT_GT(worst, 0.0f);
  EXPECT_LT(worst, 0.1f) << GetParam();

  // An observer reads fp32 K/V rows: an observed run on an fp16 cache is refused, not silently partial.
  struct Counting : ActivationObserver {
    int calls = 0;
    void OnLinearInput(int, LinearInput, const float*, int, int) override { ++calls; }
  } obs;
  m.SetObserver(&obs);
  auto kv16 = m.NewKVCache(80, KvDtype::kF16);
  const absl::Status st = m.Forward(prompt, 0, kv16.get(), {out[1].data(), out[1].size()}, true);
  EXPECT_EQ(st.code(), absl::StatusCode::kFailedPrecondition) << st;
  EXPECT_EQ(obs.calls, 0);
  auto kv32 = m.NewKVCache(80, KvDtype::kF32);
  EXPECT_TRUE(m.Forward(prompt, 0, kv32.get(), {out[0].data(), out[0].size()}, true).ok());
  EXPECT_GT(obs.calls, 0);
  m.SetObserver(nullptr);
}

INSTANTIATE_TEST_SUITE_P(AllIsas, F16ForwardTest, ::testing::Values("scalar", "avx2", "avx512"));

}  // namespace
}  // namespace nibble
