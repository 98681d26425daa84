// Internal to kernels/cpu/paged_attention.cc: the tiled (flash-style, online
// softmax) causal attention kernel behind PagedAttention and
// ContiguousAttention.
//
// Goals: one kernel for prefill, chunked prefill and decode, over paged or
// contiguous, fp32 or int8 K/V, so every path computes each query row with
// the same operations. For each work item (one kv head, some of its query
// heads, a tile of query tokens) K/V are streamed in tiles of kKvTile
// positions whose boundaries are ABSOLUTE positions (multiples of kKvTile);
// per query row a running max m and sum l are kept and the fp32 output
// accumulator is rescaled by exp(m_old - m_new) when the max grows. The
// arithmetic applied to a row depends only on that row's q, the K/V values of
// positions [0, its position], head_dim and the SIMD level; never on the
// block size, the block table, the number of query rows in the call, the work
// split or the thread count. So paged == contiguous, chunked prefill ==
// one-shot prefill == decode, bit for bit, on one ISA.
//
// Non-goals: a public API (see paged_attention.h), fp16 K/V, sliding windows.
#pragma once

#include <cstdint>
#include <vector>

namespace nibble {

class ThreadPool;

namespace cpu::internal {

// Positions per K/V tile (tile t covers [t * kKvTile, (t + 1) * kKvTile)).
inline constexpr int kKvTile = 64;

// Where the K/V rows of one layer live. The row of position p is in block
// block_table[p / block_size] at slot p % block_size; `k` / `v` point at the
// layer's K / V section of block 0 (bytes: base + offset).
// fp32: the row of kv head h at slot s starts (s * kv_dim + h * head_dim) * 4
// bytes into the section. int8: see KvInt8Section (scales, then codes).
// Contiguous K/V: block_size = INT32_MAX, block_table = {0}, block_stride 0.
struct KvSource {
  const uint8_t* k = nullptr;
  const uint8_t* v = nullptr;
  int64_t block_stride = 0;  // bytes
  int block_size = 0;
  const int32_t* block_table = nullptr;
  bool int8 = false;
  int64_t scales_bytes = 0;  // int8: KvInt8Section::ScalesBytes
};

struct TiledProblem {
  const float* q = nullptr;  // [n_tokens, n_heads * head_dim]
  float* out = nullptr;      // [n_tokens, n_heads * head_dim]
  int n_tokens = 0, pos0 = 0, n_heads = 0, n_kv_heads = 0, head_dim = 0;
  KvSource kv;
};

enum class AttnIsa { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

// REQUIRES: n_heads % n_kv_heads == 0, head_dim > 0, the block table covers
// positions [0, pos0 + n_tokens), `isa` is supported by this CPU.
// `scratch` grows to (threads x per-item scratch) floats on first use and is
// reused (no allocation once large enough). pool may be null.
void TiledAttention(const TiledProblem& p, AttnIsa isa, ThreadPool* pool, std::vector<float>* scratch);

}  // namespace cpu::internal
}  // namespace nibble
