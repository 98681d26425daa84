// Causal multi-head (grouped-query) attention over a paged KV cache.
//
// Goals: the serving path's attention, reading K/V rows through a block table
// instead of one contiguous per-sequence buffer; numerically the same
// two-pass algorithm as the contiguous CPU Attention (scores = q.k * 1/sqrt(d)
// with cpu::DotF32, max-subtracted cpu::Softmax, then sum_p w_p * v_p in
// position order), so results agree with it to the last bit when the keys and
// values are equal. Non-goals: int8/fp16 K/V, sliding windows, ALiBi.
//
// Shapes: q and out are [n_tokens, n_heads * head_dim]; query row t sits at
// position pos0 + t and attends to positions [0, pos0 + t]. The K row of
// position p is base + block_table[p / block_size] * block_stride + k_offset
// + (p % block_size) * kv_dim (V likewise with v_offset), kv_dim =
// n_kv_heads * head_dim.
//
// Thread safety: reentrant; parallel over (token, head) pairs on `pool`.
#pragma once

#include <cstdint>
#include <vector>

namespace nibble {

class ThreadPool;

namespace cpu {

struct PagedAttentionArgs {
  const float* q = nullptr;    // [n_tokens, n_heads * head_dim], RoPE applied
  float* out = nullptr;        // [n_tokens, n_heads * head_dim]
  int n_tokens = 0;
  int pos0 = 0;                // position of query row 0
  int n_heads = 0, n_kv_heads = 0, head_dim = 0;
  // Paged K/V of one layer.
  const float* base = nullptr;        // start of block 0
  int64_t block_stride = 0;           // floats from one block to the next
  int64_t k_offset = 0, v_offset = 0; // this layer's K / V rows inside a block
  int block_size = 0;                 // positions per block
  const int32_t* block_table = nullptr;
  int n_blocks = 0;                   // REQUIRES: n_blocks * block_size >= pos0 + n_tokens
};

// `scores` is per-call scratch (grown as needed; may be reused across calls).
// pool may be null (single-threaded).
void PagedAttention(const PagedAttentionArgs& a, ThreadPool* pool, std::vector<float>* scores);

// Scalar reference in double precision (tests): same contract, no scratch.
void PagedAttentionRef(const PagedAttentionArgs& a);

}  // namespace cpu
}  // namespace nibble
