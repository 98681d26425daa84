// Paged KV cache for serving: one pool of fixed-size blocks shared by all
// sequences, with per-sequence block tables and prefix caching.
//
// Goals: many concurrent sequences without reserving max_seq_len per sequence
// (a sequence holds ceil(len / block_size) blocks); O(1) allocate/free from a
// free list; reference-counted blocks so identical prompt prefixes share
// memory (prefix caching); statistics for metrics.
// Non-goals: copy-on-write (only FULL blocks of already-computed tokens are
// shared, and a full block is never written again), swapping to host
// memory, thread safety.
//
// Element types (Options::dtype): kF32 (default), kF16 (IEEE fp16 K and V,
// rounded once by WriteKV, half the bytes; layout as kF32 with 2-byte
// elements) or kInt8. int8 stores each
// (position, kv head) K and V vector as symmetric int8 codes with one fp32
// scale (cpu::QuantizeKvRowInt8), quantized once by WriteKV and dequantized
// on the fly by the attention kernel: a block takes (kv_dim + 4 * n_kv_heads)
// / (4 * kv_dim) of the fp32 bytes (~0.27x for head_dim 64), so a byte budget
// holds ~3.7x the positions. BlockBytes() is the single source of truth for
// memory accounting.
//
// Layout: a block holds, for block_size consecutive positions, every layer's
// K and V. kF32: [layer][K|V] sections of block_size * kv_dim floats; V is
// [slot][kv_dim], K is transposed, [kv head][head_dim][slot] (the attention
// kernel reads its K^T tiles in place: cpu::PagedAttentionArgs::k_transposed). kInt8: [layer][K|V]
// sections of cpu::KvInt8Section layout (fp32 scales[slot][n_kv_heads], then
// int8 codes, padded to 4 bytes: V codes[slot][kv_dim], K codes transposed
// [kv head][head_dim][slot]). Block memory is allocated
// once (uninitialised, so the OS maps pages on first touch).
//
// Prefix caching: a full block whose tokens are final may be published with
// Publish(). Its key is the chained hash h_i = H(h_{i-1}, tokens of block i)
// (h_{-1} = a fixed seed), so a key identifies the whole prefix up to and
// including the block. Lookups also compare the parent key and the block's
// tokens, so a false hit needs a 64-bit collision of the parent key chain.
// A published block whose reference count drops to 0 stays cached (and
// counts as free): it is evicted, least recently released first, only when
// the free list is empty.
//
// Thread safety: none; the serving scheduler owns one cache on its engine thread.
#pragma once

#include <cstdint>
#include <list>
#include <memory>
#include <span>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/core/config.h"
#include "kernels/cpu/paged_attention.h"

namespace nibble {

// Element type of the paged K/V (see kernels/cpu/paged_attention.h).
using KvDtype = cpu::KvDtype;
// "f32" / "int8".
const char* KvDtypeName(KvDtype d);
// Accepts "f32", "fp32", "float32", "int8", "i8" (case-sensitive);
// INVALID_ARGUMENT naming the value otherwise.
absl::StatusOr<KvDtype> ParseKvDtype(std::string_view name);

// The blocks of one sequence: block i holds positions [i * B, (i + 1) * B).
struct BlockTable {
  std::vector<int32_t> blocks;
  // Chained keys of the leading full blocks whose K/V are final (set by
  // MatchPrefix and Publish); size() <= blocks.size().
  std::vector<uint64_t> keys;
};

class PagedKVCache {
 public:
  struct Options {
    int block_size = 16;          // positions per block, in [1, 1024]
    int num_blocks = 0;           // > 0
    bool prefix_caching = true;   // false: Match/Publish are no-ops
    KvDtype dtype = KvDtype::kF32;
  };

  struct Stats {
    int64_t blocks_total = 0;
    int64_t blocks_used = 0;    // reference count > 0
    int64_t blocks_free = 0;    // total - used (includes cached, evictable blocks)
    int64_t blocks_cached = 0;  // published in the prefix cache (used or not)
    int64_t bytes_total = 0;    // memory of the whole pool
    int64_t block_bytes = 0;    // memory of one block (depends on the dtype)
    int64_t prefix_hits = 0;    // blocks found by MatchPrefix, cumulative
    int64_t evictions = 0;      // cached blocks reclaimed, cumulative
  };

  // INVALID_ARGUMENT for bad options or a pool whose size overflows.
  static absl::StatusOr<std::unique_ptr<PagedKVCache>> Create(const ModelConfig& c, const Options& opts);

  // Bytes of one block for this model, block size and dtype; INVALID_ARGUMENT
  // for a config without layers / kv_dim, a block_size outside [1, 1024], or
  // a size that overflows int64.
  static absl::StatusOr<int64_t> BlockBytes(const ModelConfig& c, int block_size, KvDtype dtype);

  int block_size() const { return block_size_; }
  int num_blocks() const { return num_blocks_; }
  int n_layers() const { return n_layers_; }
  int kv_dim() const { return kv_dim_; }
  int n_kv_heads() const { return n_kv_heads_; }
  int head_dim() const { return head_dim_; }
  KvDtype dtype() const { return dtype_; }
  int64_t block_bytes() const { return block_bytes_; }
  // Blocks needed for n_positions positions.
  int BlocksFor(int64_t n_positions) const {
    return static_cast<int>((n_positions + block_size_ - 1) / block_size_);
  }

  // Writes position `slot` of `block` for `layer`: k and v are kv_dim floats
  // each (copied for kF32, quantized for kInt8). REQUIRES: all in range.
  void WriteKV(int32_t block, int layer, int slot, const float* k, const float* v);
  // Sets a's base, block_stride, k_offset, v_offset, block_size and kv_dtype
  // for `layer` (in the units the kernel expects for the dtype).
  void FillAttentionArgs(int layer, cpu::PagedAttentionArgs* a) const;

  // Raw fp32 layout (REQUIRES dtype() == kF32): block b's data starts at
  // base() + b * block_stride(); layer l's K section at + k_offset(l), V rows
  // at + v_offset(l), V slot s at + s * kv_dim(), K element e (= kv head *
  // head_dim + dimension) of slot s at + e * block_size() + s.
  float* base() { return static_cast<float*>(data_.get()); }
  int64_t block_stride() const { return block_stride_; }
  int64_t k_offset(int layer) const { return int64_t{2 * layer} * block_size_ * kv_dim_; }
  int64_t v_offset(int layer) const { return int64_t{2 * layer + 1} * block_size_ * kv_dim_; }
  // K element `e` (< kv_dim) / V row of `slot` in `block` for `layer`. REQUIRES: all in range.
  float* k_at(int32_t block, int layer, int slot, int e) {
    return base() + block * block_stride_ + k_offset(layer) + int64_t{e} * block_size_ + slot;
  }
  float* v_row(int32_t block, int layer, int slot) {
    return base() + block * block_stride_ + v_offset(layer) + int64_t{slot} * kv_dim_;
  }

  // Blocks that Allocate() can still hand out (free list + evictable cached).
  int available() const { return static_cast<int>(free_.size() + lru_.size()); }

  // Grows `t` to cover n_positions positions. All-or-nothing: on
  // RESOURCE_EXHAUSTED `t` is unchanged.
  absl::Status Reserve(BlockTable* t, int64_t n_positions);
  // Drops every reference `t` holds and clears it. Published blocks stay cached.
  void Free(BlockTable* t);

  // Prefix caching. REQUIRES: `t` is empty. Appends to `t` the longest run of
  // cached full blocks matching tokens[0, k * B) (retaining them) and returns
  // the number of positions covered, k * B, at most max_positions.
  int64_t MatchPrefix(std::span<const int32_t> tokens, int64_t max_positions, BlockTable* t);
  // Publishes the full blocks of `t` covering tokens[0, n_computed) whose K/V
  // are final. Blocks already published (t->keys) are skipped; a block whose
  // key is already cached elsewhere is left private. REQUIRES: tokens holds
  // the sequence's tokens at positions [0, n_computed).
  void Publish(std::span<const int32_t> tokens, int64_t n_computed, BlockTable* t);

  Stats stats() const;
  int ref_count(int32_t block) const { return meta_[block].refs; }

  // The chained block key (exposed for tests).
  static uint64_t BlockKey(uint64_t parent, std::span<const int32_t> tokens);
  static constexpr uint64_t kRootKey = 0x6e6962626c65ULL;  // parent of block 0

 private:
  struct BlockMeta {
    int refs = 0;
    bool cached = false;
    uint64_t key = 0, parent = 0;
    std::vector<int32_t> tokens;                // cached blocks: their tokens
    std::list<int32_t>::iterator lru_it;        // valid while cached && refs == 0
  };
  PagedKVCache() = default;
  absl::StatusOr<int32_t> AllocateOne();
  void Retain(int32_t b);
  void Release(int32_t b);

  int block_size_ = 0, num_blocks_ = 0, n_layers_ = 0, kv_dim_ = 0, n_kv_heads_ = 0, head_dim_ = 0;
  bool prefix_caching_ = true;
  KvDtype dtype_ = KvDtype::kF32;
  int64_t block_stride_ = 0;   // floats (kF32 layout)
  int64_t block_bytes_ = 0;
  int64_t i8_section_ = 0;     // kInt8: bytes of one K or V section
  std::vector<int8_t> k_row_codes_;  // kInt8: one K row's codes before transposing (WriteKV scratch)
  std::shared_ptr<void> data_;  // engine/core/huge_pages.h (uncommitted until written)
  std::vector<BlockMeta> meta_;
  std::vector<int32_t> free_;             // uncached blocks with refs == 0
  std::list<int32_t> lru_;                // cached blocks with refs == 0, oldest first
  std::unordered_map<uint64_t, int32_t> index_;  // key -> cached block
  int64_t used_ = 0, cached_ = 0, prefix_hits_ = 0, evictions_ = 0;
};

}  // namespace nibble
