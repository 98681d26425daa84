// ForwardBatched (paged, several sequences stacked) against Forward (one
// contiguous cache per sequence, the path checked against llama.cpp).
#include <algorithm>
#include <cmath>
#include <filesystem>
#include <vector>

#include "engine/model/llama_model.h"
#include "engine/model/model_loader.h"
#include "gtest/gtest.h"
#include "tests/test_util.h"

namespace nibble {
namespace {

// Tolerance on logits: the stacked matmul can take another path than the
// single-sequence one (packed fma chains, 4x4 tiles or dot products, by token
// count), so sums are rounded in a different order; stories260K logits are
// O(10), fp32 sums over dim <= 512.
constexpr float kLogitTol = 2e-4f;

// residual_rotation != 0: the same weights run as a residual-rotated model
// (not equivalent to the original, but Forward and ForwardBatched must agree).
std::unique_ptr<LlamaModel> LoadStories(uint64_t residual_rotation = 0) {
  if (!std::filesystem::exists(testing::Stories260KModel())) return nullptr;
  LoadOptions lo;
  lo.tokenizer_path = testing::Stories260KTokenizer();
  auto m = LoadModel(testing::Stories260KModel(), lo);
  EXPECT_TRUE(m.ok()) << m.status();
  m->config.residual_rotation = residual_rotation;
  m->config.ffn_rotation = residual_rotation;
  auto model = LlamaModel::Create(*std::move(m), 2);
  EXPECT_TRUE(model.ok()) << model.status();
  return *std::move(model);
}

std::vector<int32_t> Tokens(int n, int seed, int vocab) {
  std::vector<int32_t> t(n);
  uint32_t s = 2463534242u + seed;
  for (int& x : t) {
    s ^= s << 13;
    s ^= s >> 17;
    s ^= s << 5;
    x = static_cast<int32_t>(s % vocab);
  }
  return t;
}

float MaxDiff(const float* a, const float* b, int n) {
  float m = 0.0f;
  for (int i = 0; i < n; ++i) m = std::max(m, std::fabs(a[i] - b[i]));
  return m;
}

class ForwardBatchedP : public ::testing::TestWithParam<uint64_t> {};

TEST_P(ForwardBatchedP, MatchesForwardForThreeSequencesWithChunkedPrefillAndDecode) {
  auto model = LoadStories(GetParam());
  if (!model) GTEST_SKIP() << "stories260K not present";
  const ModelConfig& c = model->config();
  const int V = c.vocab_size;
  auto cache = *PagedKVCache::Create(c, {.block_size = 4, .num_blocks = 64});
  // Three sequences: prompts of 23, 6 and 1 tokens, then 5 decode tokens each.
  const int plen[3] = {23, 6, 1};
  std::vector<int32_t> seq[3];
  for (int s = 0; s < 3; ++s) seq[s] = Tokens(plen[s] + 5, s, V);

  // Reference: Forward, one contiguous cache per sequence, all logits.
  std::vector<std::vector<float>> ref(3);
  for (int s = 0; s < 3; ++s) {
    auto kv = model->NewKVCache(64);
    ref[s].resize(seq[s].size() * V);
    ASSERT_TRUE(model->Forward(seq[s], 0, kv.get(), ref[s], /*all_logits=*/true).ok());
  }

  // Batched: seq 0's prompt in chunks of 10 (10, 10, 3), seq 1 whole, seq 2 whole;
  // seq 1 and 2 start decoding while seq 0 is still prefilling.
  BlockTable bt[3];
  int done[3] = {0, 0, 0};
  std::vector<float> logits(3 * V);
  int checked = 0;
  for (int step = 0; step < 12; ++step) {
    std::vector<BatchSequence> batch;
    std::vector<int> who;
    for (int s = 0; s < 3; ++s) {
      const int total = static_cast<int>(seq[s].size());
      if (done[s] >= total) continue;
      int n = done[s] < plen[s] ? std::min(plen[s] - done[s], s == 0 ? 10 : plen[s]) : 1;
      ASSERT_TRUE(cache->Reserve(&bt[s], done[s] + n).ok());
      batch.push_back({std::span<const int32_t>(seq[s]).subspan(done[s], n), done[s], &bt[s], true});
      who.push_back(s);
    }
    if (batch.empty()) break;
    ASSERT_TRUE(model->ForwardBatched(batch, cache.get(), logits).ok());
    for (size_t i = 0; i < batch.size(); ++i) {
      const int s = who[i];
      const int last = done[s] + static_cast<int>(batch[i].tokens.size()) - 1;
      EXPECT_LT(MaxDiff(&logits[i * V], &ref[s][size_t(last) * V], V), kLogitTol) << "seq " << s << " pos " << last;
      // Greedy choice agrees too.
      const int a = std::max_element(&logits[i * V], &logits[(i + 1) * V]) - &logits[i * V];
      const int b = std::max_element(&ref[s][size_t(last) * V], &ref[s][size_t(last + 1) * V]) - &ref[s][size_t(last) * V];
      EXPECT_EQ(a, b);
      done[s] += static_cast<int>(batch[i].tokens.size());
      ++checked;
    }
  }
  EXPECT_EQ(checked, 3 + 2 + 5 * 3);  // seq0: 3 chunks; seqs 1, 2: 1 prefill each; 15 decodes
  for (auto& t : bt) cache->Free(&t);
  EXPECT_EQ(cache->stats().blocks_used, 0);
}

INSTANTIATE_TEST_SUITE_P(PlainAndRotated, ForwardBatchedP, ::testing::Values(uint64_t{0}, uint64_t{12345}));

TEST(ForwardBatched, SharedPrefixBlocksGiveSameLogits) {
  auto model = LoadStories();
  if (!model) GTEST_SKIP() << "stories260K not present";
  const ModelConfig& c = model->config();
  const int V = c.vocab_size;
  auto cache = *PagedKVCache::Create(c, {.block_size = 4, .num_blocks = 32});
  std::vector<int32_t> a = Tokens(10, 7, V), b = a;
  b[9] = (b[9] + 1) % V;
  BlockTable ta, tb;
  std::vector<float> la(V), lb(V), ref(V);
  ASSERT_TRUE(cache->Reserve(&ta, 10).ok());
  BatchSequence sa{a, 0, &ta, true};
  ASSERT_TRUE(model->ForwardBatched({&sa, 1}, cache.get(), la).ok());
  cache->Publish(a, 10, &ta);
  ASSERT_EQ(cache->MatchPrefix(b, 9, &tb), 8);  // two blocks reused
  ASSERT_TRUE(cache->Reserve(&tb, 10).ok());
  BatchSequence sb{std::span<const int32_t>(b).subspan(8), 8, &tb, true};
  ASSERT_TRUE(model->ForwardBatched({&sb, 1}, cache.get(), lb).ok());
  auto kv = model->NewKVCache(16);
  ASSERT_TRUE(model->Forward(b, 0, kv.get(), ref).ok());
  EXPECT_LT(MaxDiff(lb.data(), ref.data(), V), kLogitTol);
}

TEST(ForwardBatched, RejectsBadInput) {
  auto model = LoadStories();
  if (!model) GTEST_SKIP() << "stories260K not present";
  const int V = model->config().vocab_size;
  auto cache = *PagedKVCache::Create(model->config(), {.block_size = 4, .num_blocks = 4});
  BlockTable t;
  ASSERT_TRUE(cache->Reserve(&t, 4).ok());
  std::vector<float> logits(V);
  std::vector<int32_t> toks = {1, 2, 3, 4, 5};
  BatchSequence too_long{toks, 0, &t, true};  // 5 positions, 4 covered
  EXPECT_EQ(model->ForwardBatched({&too_long, 1}, cache.get(), logits).code(), absl::StatusCode::kOutOfRange);
  std::vector<int32_t> bad = {V};
  BatchSequence bad_tok{bad, 0, &t, true};
  EXPECT_EQ(model->ForwardBatched({&bad_tok, 1}, cache.get(), logits).code(), absl::StatusCode::kInvalidArgument);
  BatchSequence no_table{std::span<const int32_t>(toks).subspan(0, 1), 0, nullptr, true};
  EXPECT_EQ(model->ForwardBatched({&no_table, 1}, cache.get(), logits).code(), absl::StatusCode::kInvalidArgument);
  std::vector<float> small(V - 1);
  BatchSequence ok{std::span<const int32_t>(toks).subspan(0, 1), 0, &t, true};
  EXPECT_EQ(model->ForwardBatched({&ok, 1}, cache.get(), small).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(model->ForwardBatched({}, cache.get(), logits).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(model->ForwardBatched({&ok, 1}, cache.get(), logits).ok());
}

}  // namespace
}  // namespace nibble
