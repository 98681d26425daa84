#include "engine/model/paged_kv_cache.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <string>

#include "absl/strings/str_cat.h"
#include "engine/core/huge_pages.h"
#include "kernels/common/fp16.h"

namespace nibble {

const char* KvDtypeName(KvDtype d) {
  return d == KvDtype::kInt8 ? "int8" : d == KvDtype::kF16 ? "f16" : "f32";
}

absl::StatusOr<KvDtype> ParseKvDtype(std::string_view name) {
  if (name == "f32" || name == "fp32" || name == "float32") return KvDtype::kF32;
  if (name == "int8" || name == "i8") return KvDtype::kInt8;
  if (name == "f16" || name == "fp16" || name == "float16") return KvDtype::kF16;
  return absl::InvalidArgumentError(
      absl::StrCat("KV cache dtype '", std::string(name), "' is not one of f32, f16, int8"));
}

absl::StatusOr<int64_t> PagedKVCache::BlockBytes(const ModelConfig& c, int block_size, KvDtype dtype) {
  if (block_size < 1 || block_size > 1024)
    return absl::InvalidArgumentError(absl::StrCat("PagedKVCache: block_size ", block_size, " is not in [1, 1024]"));
  if (c.n_layers < 1 || c.n_kv_heads < 1 || c.head_dim < 1 || c.kv_dim() < 1)
    return absl::InvalidArgumentError("PagedKVCache: the model config has no layers or an empty kv_dim");
  // Every factor is < 2^31 (ints), block_size <= 2^10: bound the products before forming them.
  const int64_t kv = c.kv_dim();
  if (c.n_layers > (int64_t{1} << 20) || kv > (int64_t{1} << 30))
    return absl::InvalidArgumentError(absl::StrCat("PagedKVCache: n_layers ", c.n_layers, " / kv_dim ", kv,
                                                   " are too large for a KV cache"));
  const int64_t section = dtype == KvDtype::kInt8  ? cpu::KvInt8Section::Bytes(block_size, c.n_kv_heads, c.head_dim)
                          : dtype == KvDtype::kF16 ? int64_t{block_size} * kv * 2
                                                   : int64_t{block_size} * kv * 4;
  return int64_t{2} * c.n_layers * section;  // <= 2 * 2^20 * (2^10 * 2^30 * 5) < 2^63
}

absl::StatusOr<std::unique_ptr<PagedKVCache>> PagedKVCache::Create(const ModelConfig& c, const Options& opts) {
  if (opts.num_blocks < 1)
    return absl::InvalidArgumentError(absl::StrCat("PagedKVCache: num_blocks ", opts.num_blocks, " must be > 0"));
  if (opts.dtype != KvDtype::kF32 && opts.dtype != KvDtype::kInt8 && opts.dtype != KvDtype::kF16)
    return absl::InvalidArgumentError(absl::StrCat("PagedKVCache: unknown dtype ", static_cast<int>(opts.dtype)));
  auto bytes = BlockBytes(c, opts.block_size, opts.dtype);
  if (!bytes.ok()) return bytes.status();
  const int64_t block_bytes = *bytes;
  const int64_t max_bytes = std::numeric_limits<int64_t>::max() / 8;
  if (block_bytes > max_bytes / opts.num_blocks)
    return absl::InvalidArgumentError(absl::StrCat("PagedKVCache: ", opts.num_blocks, " blocks of ", block_bytes,
                                                   " bytes overflow the address space"));
  auto cache = std::unique_ptr<PagedKVCache>(new PagedKVCache());
  cache->block_size_ = opts.block_size;
  cache->num_blocks_ = opts.num_blocks;
  cache->n_layers_ = c.n_layers;
  cache->kv_dim_ = c.kv_dim();
  cache->n_kv_heads_ = c.n_kv_heads;
  cache->head_dim_ = c.head_dim;
  cache->prefix_caching_ = opts.prefix_caching;
  cache->dtype_ = opts.dtype;
  cache->block_bytes_ = block_bytes;
  cache->block_stride_ = block_bytes / 4;  // block_bytes is a multiple of 4 for every dtype
  cache->i8_section_ = cpu::KvInt8Section::Bytes(opts.block_size, c.n_kv_heads, c.head_dim);
  if (opts.dtype == KvDtype::kInt8) cache->k_row_codes_.resize(size_t(c.kv_dim()));
  // Huge-page memory: attention reads one kv head's rows at a stride of all heads' width.
  cache->data_ = HugePageAlloc(size_t(cache->block_stride_) * opts.num_blocks * sizeof(float), /*zero=*/false);
  if (cache->data_ == nullptr)
    return absl::ResourceExhaustedError(absl::StrCat("PagedKVCache: cannot allocate ", opts.num_blocks,
                                                     " blocks of ", block_bytes, " bytes"));
  cache->meta_.resize(opts.num_blocks);
  cache->free_.reserve(opts.num_blocks);
  // Hand out low ids first (pop_back).
  for (int32_t b = opts.num_blocks - 1; b >= 0; --b) cache->free_.push_back(b);
  return cache;
}

void PagedKVCache::WriteKV(int32_t block, int layer, int slot, const float* k, const float* v) {
  if (dtype_ == KvDtype::kF32) {
    float* kt = k_at(block, layer, slot, 0);
    for (int e = 0; e < kv_dim_; ++e) kt[int64_t{e} * block_size_] = k[e];
    std::memcpy(v_row(block, layer, slot), v, size_t(kv_dim_) * sizeof(float));
    return;
  }
  if (dtype_ == KvDtype::kF16) {
    // [layer][K|V] sections of block_size * kv_dim fp16: K transposed, V rows.
    const int64_t sec = int64_t{block_size_} * kv_dim_;
    uint16_t* kt = reinterpret_cast<uint16_t*>(data_.get()) + int64_t{block} * (block_bytes_ / 2) + 2 * layer * sec;
    uint16_t* vr = kt + sec + int64_t{slot} * kv_dim_;
    for (int e = 0; e < kv_dim_; ++e) {
      kt[int64_t{e} * block_size_ + slot] = Fp32ToFp16(k[e]);
      vr[e] = Fp32ToFp16(v[e]);
    }
    return;
  }
  uint8_t* blk = reinterpret_cast<uint8_t*>(data_.get()) + int64_t{block} * block_bytes_;
  const int64_t scales_bytes = cpu::KvInt8Section::ScalesBytes(block_size_, n_kv_heads_);
  for (int which = 0; which < 2; ++which) {
    uint8_t* sec = blk + (int64_t{2} * layer + which) * i8_section_;
    float* scales = reinterpret_cast<float*>(sec) + int64_t{slot} * n_kv_heads_;
    int8_t* codes = reinterpret_cast<int8_t*>(sec + scales_bytes);
    if (which == 1) {
      cpu::QuantizeKvRowInt8(v, n_kv_heads_, head_dim_, codes + int64_t{slot} * kv_dim_, scales);
      continue;
    }
    // K codes transposed: [kv head][dim][slot] (quantized as a row first).
    cpu::QuantizeKvRowInt8(k, n_kv_heads_, head_dim_, k_row_codes_.data(), scales);
    for (int e = 0; e < kv_dim_; ++e) codes[int64_t{e} * block_size_ + slot] = k_row_codes_[e];
  }
}

void PagedKVCache::FillAttentionArgs(int layer, cpu::PagedAttentionArgs* a) const {
  a->base = static_cast<float*>(data_.get());
  a->block_size = block_size_;
  a->kv_dtype = dtype_;
  if (dtype_ == KvDtype::kF32) {
    a->block_stride = block_stride_;
    a->k_offset = k_offset(layer);
    a->v_offset = v_offset(layer);
    a->k_transposed = true;
  } else if (dtype_ == KvDtype::kF16) {
    const int64_t sec = int64_t{block_size_} * kv_dim_ * 2;
    a->block_stride = block_bytes_;
    a->k_offset = int64_t{2} * layer * sec;
    a->v_offset = (int64_t{2} * layer + 1) * sec;
    a->k_transposed = true;
  } else {
    a->block_stride = block_bytes_;
    a->k_offset = int64_t{2} * layer * i8_section_;
    a->v_offset = (int64_t{2} * layer + 1) * i8_section_;
    a->k_transposed = true;
  }
}

uint64_t PagedKVCache::BlockKey(uint64_t parent, std::span<const int32_t> tokens) {
  // splitmix64-style mixing of the parent key and each token.
  auto mix = [](uint64_t z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
  };
  uint64_t h = mix(parent + 0x9e3779b97f4a7c15ULL);
  for (int32_t t : tokens) h = mix(h ^ (static_cast<uint64_t>(static_cast<uint32_t>(t)) + 0x9e3779b97f4a7c15ULL));
  return mix(h ^ tokens.size());
}

absl::StatusOr<int32_t> PagedKVCache::AllocateOne() {
  int32_t b;
  if (!free_.empty()) {
    b = free_.back();
    free_.pop_back();
  } else if (!lru_.empty()) {
    b = lru_.front();
    lru_.pop_front();
    BlockMeta& m = meta_[b];
    index_.erase(m.key);
    m.cached = false;
    m.tokens.clear();
    --cached_;
    ++evictions_;
  } else {
    return absl::ResourceExhaustedError(absl::StrCat("PagedKVCache: all ", num_blocks_, " blocks are in use"));
  }
  meta_[b].refs = 1;
  ++used_;
  return b;
}

void PagedKVCache::Retain(int32_t b) {
  BlockMeta& m = meta_[b];
  if (m.refs == 0) {
    if (m.cached) lru_.erase(m.lru_it);
    ++used_;
  }
  ++m.refs;
}

void PagedKVCache::Release(int32_t b) {
  BlockMeta& m = meta_[b];
  if (m.refs <= 0) return;  // defensive: never underflow
  if (--m.refs > 0) return;
  --used_;
  if (m.cached) {
    m.lru_it = lru_.insert(lru_.end(), b);
  } else {
    free_.push_back(b);
  }
}

absl::Status PagedKVCache::Reserve(BlockTable* t, int64_t n_positions) {
  const int64_t need = (n_positions + block_size_ - 1) / block_size_ - static_cast<int64_t>(t->blocks.size());
  if (need <= 0) return absl::OkStatus();
  if (need > available())
    return absl::ResourceExhaustedError(absl::StrCat("PagedKVCache: ", need, " more blocks needed, ", available(),
                                                     " available"));
  for (int64_t i = 0; i < need; ++i) t->blocks.push_back(*AllocateOne());  // cannot fail: checked above
  return absl::OkStatus();
}

void PagedKVCache::Free(BlockTable* t) {
  // Release the tail first so a prefix's leading blocks are evicted last.
  for (auto it = t->blocks.rbegin(); it != t->blocks.rend(); ++it) Release(*it);
  t->blocks.clear();
  t->keys.clear();
}

int64_t PagedKVCache::MatchPrefix(std::span<const int32_t> tokens, int64_t max_positions, BlockTable* t) {
  if (!prefix_caching_ || !t->blocks.empty()) return 0;
  const int64_t limit = std::min<int64_t>(max_positions, static_cast<int64_t>(tokens.size()));
  uint64_t parent = kRootKey;
  int64_t pos = 0;
  while (pos + block_size_ <= limit) {
    std::span<const int32_t> blk = tokens.subspan(pos, block_size_);
    const uint64_t key = BlockKey(parent, blk);
    auto it = index_.find(key);
    if (it == index_.end()) break;
    const BlockMeta& m = meta_[it->second];
    if (m.parent != parent || !std::equal(blk.begin(), blk.end(), m.tokens.begin(), m.tokens.end())) break;
    Retain(it->second);
    t->blocks.push_back(it->second);
    t->keys.push_back(key);
    ++prefix_hits_;
    parent = key;
    pos += block_size_;
  }
  return pos;
}

void PagedKVCache::Publish(std::span<const int32_t> tokens, int64_t n_computed, BlockTable* t) {
  if (!prefix_caching_) return;
  const int64_t limit = std::min<int64_t>(n_computed, static_cast<int64_t>(tokens.size()));
  const int64_t full = std::min<int64_t>(limit / block_size_, static_cast<int64_t>(t->blocks.size()));
  for (int64_t i = static_cast<int64_t>(t->keys.size()); i < full; ++i) {
    const uint64_t parent = i == 0 ? kRootKey : t->keys[i - 1];
    std::span<const int32_t> blk = tokens.subspan(i * block_size_, block_size_);
    const uint64_t key = BlockKey(parent, blk);
    t->keys.push_back(key);
    const int32_t b = t->blocks[i];
    BlockMeta& m = meta_[b];
    if (m.cached || index_.contains(key)) continue;
    m.cached = true;
    m.key = key;
    m.parent = parent;
    m.tokens.assign(blk.begin(), blk.end());
    index_.emplace(key, b);
    ++cached_;
  }
}

PagedKVCache::Stats PagedKVCache::stats() const {
  Stats s;
  s.blocks_total = num_blocks_;
  s.blocks_used = used_;
  s.blocks_free = num_blocks_ - used_;
  s.blocks_cached = cached_;
  s.bytes_total = block_bytes_ * num_blocks_;
  s.block_bytes = block_bytes_;
  s.prefix_hits = prefix_hits_;
  s.evictions = evictions_;
  return s;
}

}  // namespace nibble
