#include "engine/model/paged_kv_cache.h"

#include <algorithm>
#include <cstring>
#include <numeric>
#include <vector>

#include "gtest/gtest.h"

namespace nibble {
namespace {

ModelConfig TinyConfig() {
  ModelConfig c;
  c.dim = 8;
  c.hidden_dim = 16;
  c.n_layers = 2;
  c.n_heads = 2;
  c.n_kv_heads = 1;
  c.head_dim = 4;
  c.vocab_size = 32;
  c.max_seq_len = 64;
  c.rope_dim = 4;
  return c;
}

std::unique_ptr<PagedKVCache> Make(int blocks, int block_size = 4, bool prefix = true) {
  auto c = PagedKVCache::Create(TinyConfig(), {.block_size = block_size, .num_blocks = blocks, .prefix_caching = prefix});
  EXPECT_TRUE(c.ok()) << c.status();
  return *std::move(c);
}

// A distinct value for element i of K (w = 0) or V (w = 1) at (block, layer, slot).
float TestVal(int b, int l, int s, int w, int i) {
  return float(1 + b * 100 + l * 30 + s * 7 + w * 3 + i) * (i % 2 ? -1 : 1);
}

// Writes TestVal into every (block < blocks, layer, slot < slots) of a TinyConfig cache (kv_dim 4).
void WriteTestVals(PagedKVCache* c, int blocks, int slots) {
  for (int b = 0; b < blocks; ++b)
    for (int l = 0; l < 2; ++l)
      for (int s = 0; s < slots; ++s) {
        float k[4], v[4];
        for (int i = 0; i < 4; ++i) k[i] = TestVal(b, l, s, 0, i), v[i] = TestVal(b, l, s, 1, i);
        c->WriteKV(b, l, s, k, v);
      }
}

TEST(PagedKVCache, RejectsBadOptions) {
  EXPECT_FALSE(PagedKVCache::Create(TinyConfig(), {.block_size = 0, .num_blocks = 4}).ok());
  EXPECT_FALSE(PagedKVCache::Create(TinyConfig(), {.block_size = 4, .num_blocks = 0}).ok());
  EXPECT_FALSE(PagedKVCache::Create(TinyConfig(), {.block_size = 1024, .num_blocks = 1 << 30}).ok());
}

TEST(PagedKVCache, LayoutDoesNotOverlap) {
  auto c = Make(3);
  // Every (block, layer, K/V, slot) row is distinct and inside the pool.
  std::vector<int> hits(size_t(c->block_stride()) * c->num_blocks(), 0);
  for (int b = 0; b < 3; ++b)
    for (int l = 0; l < c->n_layers(); ++l)
      for (int s = 0; s < c->block_size(); ++s)
        for (int i = 0; i < c->kv_dim(); ++i) {
          ++hits.at(c->k_at(b, l, s, i) - c->base());
          ++hits.at(c->v_row(b, l, s) + i - c->base());
        }
  for (int h : hits) ASSERT_EQ(h, 1);
}

TEST(PagedKVCache, ReserveFreeAndExhaustion) {
  auto c = Make(5);
  BlockTable a, b;
  ASSERT_TRUE(c->Reserve(&a, 9).ok());  // 3 blocks
  EXPECT_EQ(a.blocks.size(), 3u);
  ASSERT_TRUE(c->Reserve(&a, 12).ok());  // still 3
  EXPECT_EQ(a.blocks.size(), 3u);
  EXPECT_EQ(c->stats().blocks_used, 3);
  const absl::Status s = c->Reserve(&b, 13);  // 4 > 2 left: all-or-nothing
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_TRUE(b.blocks.empty());
  ASSERT_TRUE(c->Reserve(&b, 8).ok());
  EXPECT_EQ(c->stats().blocks_free, 0);
  for (int32_t x : a.blocks)
    for (int32_t y : b.blocks) EXPECT_NE(x, y);
  c->Free(&a);
  EXPECT_TRUE(a.blocks.empty());
  EXPECT_EQ(c->stats().blocks_used, 2);
  EXPECT_EQ(c->stats().blocks_free, 3);
  c->Free(&b);
  EXPECT_EQ(c->stats().blocks_used, 0);
  EXPECT_EQ(c->available(), 5);
}

TEST(PagedKVCache, PrefixSharingRefCountsAndEviction) {
  auto c = Make(6);
  std::vector<int32_t> prompt(11);
  std::iota(prompt.begin(), prompt.end(), 1);
  BlockTable a;
  EXPECT_EQ(c->MatchPrefix(prompt, 11, &a), 0);  // nothing cached yet
  ASSERT_TRUE(c->Reserve(&a, 11).ok());
  c->Publish(prompt, 11, &a);  // 2 full blocks published, the partial third is not
  EXPECT_EQ(c->stats().blocks_cached, 2);
  EXPECT_EQ(a.keys.size(), 2u);

  // Same first 9 tokens, different after: shares exactly the 2 full blocks.
  std::vector<int32_t> other = prompt;
  other[9] = 30;
  BlockTable b;
  EXPECT_EQ(c->MatchPrefix(other, 11, &b), 8);
  ASSERT_EQ(b.blocks.size(), 2u);
  EXPECT_EQ(b.blocks[0], a.blocks[0]);
  EXPECT_EQ(b.blocks[1], a.blocks[1]);
  EXPECT_EQ(c->ref_count(a.blocks[0]), 2);
  EXPECT_EQ(c->ref_count(a.blocks[2]), 1);
  EXPECT_EQ(c->stats().prefix_hits, 2);

  // A different second block shares only the first.
  std::vector<int32_t> third = prompt;
  third[5] = 31;
  BlockTable d;
  EXPECT_EQ(c->MatchPrefix(third, 11, &d), 4);
  // max_positions caps the match (a caller keeps >= 1 token to compute).
  BlockTable e;
  EXPECT_EQ(c->MatchPrefix(prompt, 7, &e), 4);
  c->Free(&d);
  c->Free(&e);

  const int32_t shared0 = a.blocks[0];
  c->Free(&a);
  EXPECT_EQ(c->ref_count(shared0), 1);
  c->Free(&b);
  // Nothing used; the 2 published blocks stay cached and count as free.
  EXPECT_EQ(c->stats().blocks_used, 0);
  EXPECT_EQ(c->stats().blocks_cached, 2);
  EXPECT_EQ(c->available(), 6);
  BlockTable again;
  EXPECT_EQ(c->MatchPrefix(prompt, 11, &again), 8);
  c->Free(&again);

  // Filling the pool evicts the cached blocks (free list first, then LRU).
  BlockTable big;
  ASSERT_TRUE(c->Reserve(&big, 24).ok());
  EXPECT_EQ(c->stats().blocks_cached, 0);
  EXPECT_EQ(c->stats().evictions, 2);
  BlockTable miss;
  EXPECT_EQ(c->MatchPrefix(prompt, 11, &miss), 0);
  c->Free(&big);
  EXPECT_EQ(c->stats().blocks_used, 0);
}

TEST(PagedKVCache, DuplicatePublishKeepsOneCachedCopy) {
  auto c = Make(6);
  std::vector<int32_t> p = {5, 6, 7, 8, 9};
  BlockTable a, b;
  ASSERT_TRUE(c->Reserve(&a, 5).ok());
  ASSERT_TRUE(c->Reserve(&b, 5).ok());  // computed independently (same step)
  c->Publish(p, 5, &a);
  c->Publish(p, 5, &b);
  EXPECT_EQ(c->stats().blocks_cached, 1);
  EXPECT_EQ(b.keys.size(), 1u);  // key known, block left private
  c->Free(&a);
  c->Free(&b);
  EXPECT_EQ(c->stats().blocks_used, 0);
  EXPECT_EQ(c->available(), 6);
}

TEST(PagedKVCache, PrefixCachingOff) {
  auto c = Make(4, 4, /*prefix=*/false);
  std::vector<int32_t> p = {1, 2, 3, 4, 5};
  BlockTable a, b;
  ASSERT_TRUE(c->Reserve(&a, 5).ok());
  c->Publish(p, 5, &a);
  EXPECT_EQ(c->MatchPrefix(p, 5, &b), 0);
  EXPECT_EQ(c->stats().blocks_cached, 0);
}

TEST(PagedKVCache, BlockKeyChains) {
  std::vector<int32_t> t = {1, 2, 3, 4};
  const uint64_t k1 = PagedKVCache::BlockKey(PagedKVCache::kRootKey, t);
  EXPECT_EQ(k1, PagedKVCache::BlockKey(PagedKVCache::kRootKey, t));
  EXPECT_NE(k1, PagedKVCache::BlockKey(k1, t));  // same tokens, other prefix
  std::vector<int32_t> u = {1, 2, 4, 3};
  EXPECT_NE(k1, PagedKVCache::BlockKey(PagedKVCache::kRootKey, u));
}

// Block bytes, checked against sizes computed here from the shape.
// fp32: V rows as written, K transposed per block ([kv head][dim][slot]),
// as FillAttentionArgs tells the kernel (k_transposed).
TEST(PagedKVCache, F32WriteKVStoresKTransposed) {
  auto c = Make(3);
  const int bs = c->block_size(), kvd = c->kv_dim();
  WriteTestVals(c.get(), 3, bs);
  for (int l = 0; l < 2; ++l) {
    cpu::PagedAttentionArgs a;
    c->FillAttentionArgs(l, &a);
    EXPECT_TRUE(a.k_transposed);
    for (int b = 0; b < 3; ++b)
      for (int s = 0; s < bs; ++s)
        for (int i = 0; i < kvd; ++i) {
          EXPECT_EQ(a.base[b * a.block_stride + a.k_offset + int64_t{i} * bs + s], TestVal(b, l, s, 0, i));
          EXPECT_EQ(a.base[b * a.block_stride + a.v_offset + int64_t{s} * kvd + i], TestVal(b, l, s, 1, i));
        }
  }
}

TEST(PagedKVCache, Int8BlockBytesAndRatio) {
  ModelConfig c = TinyConfig();  // 2 layers, kv_dim 4 (1 kv head of 4)
  EXPECT_EQ(*PagedKVCache::BlockBytes(c, 4, KvDtype::kF32), 2 * 2 * 4 * 4 * 4);
  // int8: per layer K and V sections of 4 scales (16 bytes) + 16 codes.
  EXPECT_EQ(*PagedKVCache::BlockBytes(c, 4, KvDtype::kInt8), 2 * 2 * (16 + 16));
  // Odd sizes: 3 slots x kv_dim 4 = 12 codes, 3 scales = 12 bytes.
  EXPECT_EQ(*PagedKVCache::BlockBytes(c, 3, KvDtype::kInt8), 2 * 2 * (12 + 12));
  c.head_dim = 5;  // 15 codes, padded to 16
  c.rope_dim = 4;
  EXPECT_EQ(*PagedKVCache::BlockBytes(c, 3, KvDtype::kInt8), 2 * 2 * (12 + 16));
  // SmolLM2-135M shape (30 layers, 3 kv heads of 64): 4 * 64 / (64 + 4) = 3.76x.
  ModelConfig s;
  s.n_layers = 30;
  s.n_heads = 9;
  s.n_kv_heads = 3;
  s.head_dim = 64;
  const int64_t f = *PagedKVCache::BlockBytes(s, 16, KvDtype::kF32);
  const int64_t q = *PagedKVCache::BlockBytes(s, 16, KvDtype::kInt8);
  EXPECT_EQ(f, int64_t{2} * 30 * 16 * 192 * 4);
  EXPECT_EQ(q, int64_t{2} * 30 * (16 * 3 * 4 + 16 * 192));
  EXPECT_GE(double(f) / double(q), 3.5);
  EXPECT_FALSE(PagedKVCache::BlockBytes(s, 0, KvDtype::kInt8).ok());
  EXPECT_FALSE(PagedKVCache::BlockBytes(ModelConfig{}, 16, KvDtype::kInt8).ok());
}

TEST(PagedKVCache, Int8WriteKVLayoutAndStats) {
  auto r = PagedKVCache::Create(TinyConfig(), {.block_size = 3, .num_blocks = 4, .dtype = KvDtype::kInt8});
  ASSERT_TRUE(r.ok()) << r.status();
  auto c = *std::move(r);
  EXPECT_EQ(c->dtype(), KvDtype::kInt8);
  EXPECT_EQ(c->stats().block_bytes, c->block_bytes());
  EXPECT_EQ(c->stats().bytes_total, 4 * c->block_bytes());
  // Fill the pool with a marker, write every (block, layer, slot) with distinct
  // values, and read them back through the kernel-facing layout.
  uint8_t* raw = reinterpret_cast<uint8_t*>(c->base());
  std::fill(raw, raw + 4 * c->block_bytes(), uint8_t{0xAB});
  WriteTestVals(c.get(), 4, 3);
  for (int l = 0; l < 2; ++l) {
    cpu::PagedAttentionArgs a;
    c->FillAttentionArgs(l, &a);
    EXPECT_EQ(a.kv_dtype, KvDtype::kInt8);
    EXPECT_TRUE(a.k_transposed);
    EXPECT_EQ(a.block_stride, c->block_bytes());
    for (int b = 0; b < 4; ++b)
      for (int s = 0; s < 3; ++s)
        for (int w = 0; w < 2; ++w) {
          const uint8_t* sec = reinterpret_cast<const uint8_t*>(a.base) + b * a.block_stride + (w ? a.v_offset : a.k_offset);
          float scale;
          std::memcpy(&scale, sec + s * 4, 4);
          // V codes [slot][kv_dim]; K codes transposed [dim][slot] (one kv head, block size 3).
          const int8_t* codes = reinterpret_cast<const int8_t*>(sec + cpu::KvInt8Section::ScalesBytes(3, 1));
          for (int i = 0; i < 4; ++i) {
            const float x = TestVal(b, l, s, w, i);
            const int8_t code = w ? codes[s * 4 + i] : codes[i * 3 + s];
            EXPECT_NEAR(scale * code, x, scale / 2 + 1e-6f) << b << l << s << w << i;
          }
        }
  }
}

TEST(PagedKVCache, ParseKvDtype) {
  EXPECT_EQ(*ParseKvDtype("f32"), KvDtype::kF32);
  EXPECT_EQ(*ParseKvDtype("int8"), KvDtype::kInt8);
  EXPECT_STREQ(KvDtypeName(KvDtype::kInt8), "int8");
  auto bad = ParseKvDtype("q4");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("q4"), std::string::npos);
}

}  // namespace
}  // namespace nibble
