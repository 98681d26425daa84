// Causal multi-head (grouped-query) attention over a paged KV cache, and the
// same kernel over a contiguous per-sequence cache (ContiguousAttention).
//
// Goals: the serving path's attention, reading K/V rows through a block table
// instead of one contiguous per-sequence buffer. One tiled, flash-style kernel
// (kernels/cpu/paged_attention_tiled.h: K/V streamed in tiles of 64 absolute
// positions, online softmax with a running max / sum per query row, GQA query
// heads sharing each K/V tile) serves prefill, chunked prefill and decode, so
// each query row's output is bit-identical whatever the block size / table,
// contiguous vs paged layout, the number of query rows in the call (one-shot
// vs chunked prefill vs decode), the thread count and the SIMD level (scalar,
// AVX2 and AVX-512 follow one canonical fp32 operation order).
// Optional int8 K/V (KvDtype::kInt8): each (position, kv head) K and V vector
// is stored as symmetric int8 codes with one fp32 scale (x ~= scale * code,
// scale = max|x| / 127) and dequantized on the fly inside the dot products and
// the weighted V sum (no temporary fp32 rows). No allocation once the scratch
// has grown. Non-goals: fp16 K/V, sliding windows, ALiBi, asymmetric /
// per-channel K quantization.
//
// Shapes: q and out are [n_tokens, n_heads * head_dim]; query row t sits at
// position pos0 + t and attends to positions [0, pos0 + t]. The K row of
// position p is base + block_table[p / block_size] * block_stride + k_offset
// + (p % block_size) * kv_dim (V likewise with v_offset), kv_dim =
// n_kv_heads * head_dim.
//
// int8 layout (kInt8): `base` is read as bytes and block_stride / k_offset /
// v_offset are BYTE counts. The K (V) section of one layer in one block, at
// k_offset (v_offset), is KvInt8Section: float scales[block_size][n_kv_heads]
// followed by int8 codes[block_size][kv_dim]; the section is padded to a
// multiple of 4 bytes so scales stay 4-byte aligned.
//
// Transposed K (fp32 only; PagedAttentionArgs::k_transposed, ContiguousAttention's
// k_t): K stored as head_dim x positions matrices per kv head, so that decode
// reads the K^T tiles the kernel multiplies by in place instead of gathering
// and transposing K rows every step (AVX-512; the other ISAs copy them into
// the tile). Same values, same bits as row-major K. Paged: the K section of
// one layer in one block is [n_kv_heads][head_dim][block_size] floats.
// Contiguous: see ContiguousKtIndex.
//
// Thread safety: reentrant (given distinct scratch); parallel over (kv head,
// query-token tile) items on `pool`.
#pragma once

#include <cstdint>
#include <vector>

namespace nibble {

class ThreadPool;

namespace cpu {

// Element type of the paged K/V rows.
// kF16: IEEE fp16 K and V (K transposed, k_transposed required), widened
// exactly in the kernel: half the bytes of kF32, the same operations on the
// rounded values.
enum class KvDtype : int8_t { kF32 = 0, kInt8 = 1, kF16 = 2 };

// Byte layout of one int8 K or V section (one layer, one block).
struct KvInt8Section {
  // Bytes of the scales, codes start there.
  static int64_t ScalesBytes(int block_size, int n_kv_heads) { return int64_t{block_size} * n_kv_heads * 4; }
  // Whole section, padded to a multiple of 4 bytes.
  static int64_t Bytes(int block_size, int n_kv_heads, int head_dim) {
    const int64_t codes = int64_t{block_size} * n_kv_heads * head_dim;
    return ScalesBytes(block_size, n_kv_heads) + (codes + 3) / 4 * 4;
  }
};

// Quantizes one position's K or V row x[n_kv_heads * head_dim] to symmetric
// int8: per head scale = max|x_head| / 127 (0 for an all-zero head), code =
// round-to-nearest(x / scale) in [-127, 127]. A head holding a NaN or an
// infinity gets scale NaN (its attention output becomes NaN, as with fp32).
void QuantizeKvRowInt8(const float* x, int n_kv_heads, int head_dim, int8_t* codes, float* scales);

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
  // kInt8 / kF16: base points at bytes and block_stride / k_offset / v_offset
  // are in bytes (see the int8 layout above; kF16: V rows of kv_dim fp16, K
  // transposed [n_kv_heads][head_dim][block_size] fp16).
  KvDtype kv_dtype = KvDtype::kF32;
  // This layer's K section of a block is transposed (see above; required for
  // kF16; kInt8: the scales stay first, the codes follow as [n_kv_heads][head_dim][block_size]).
  bool k_transposed = false;
};

// `scores` is per-call scratch (grown as needed; may be reused across calls).
// pool may be null (single-threaded). Runs at ActiveIsa() (ops.h). Malformed
// shapes (n_heads not a multiple of n_kv_heads > 0, head_dim <= 0, pos0 < 0,
// a block table too short for pos0 + n_tokens) read nothing and fill `out`
// with NaN.
void PagedAttention(const PagedAttentionArgs& a, ThreadPool* pool, std::vector<float>* scores);

// The same kernel over contiguous fp32 K/V: k_cache / v_cache hold
// [>= pos0 + n_tokens, n_kv_heads * head_dim] (position-major). Bit-identical
// to PagedAttention on equal K/V values. Other arguments as above.
// k_t (optional): the same K transposed (ContiguousKtIndex layout); when
// given, K is read from it and k_cache may be null.
void ContiguousAttention(const float* q, const float* k_cache, const float* v_cache, float* out, int n_tokens,
                         int pos0, int n_heads, int n_kv_heads, int head_dim, ThreadPool* pool,
                         std::vector<float>* scores, const float* k_t = nullptr);

// Contiguous transposed K: positions in units of kContiguousKtUnit; unit u
// holds, for each kv head h, a head_dim x kContiguousKtUnit matrix. A
// capacity of C positions takes ContiguousKtFloats(C, ...) floats.
inline constexpr int kContiguousKtUnit = 64;
inline int64_t ContiguousKtIndex(int n_kv_heads, int head_dim, int h, int i, int64_t p) {
  const int64_t u = p / kContiguousKtUnit;
  return ((u * n_kv_heads + h) * head_dim + i) * kContiguousKtUnit + p % kContiguousKtUnit;
}
inline int64_t ContiguousKtFloats(int64_t capacity, int n_kv_heads, int head_dim) {
  return (capacity + kContiguousKtUnit - 1) / kContiguousKtUnit * kContiguousKtUnit * n_kv_heads * head_dim;
}
// Writes the K rows of positions [pos0, pos0 + n) (row-major, kv_dim each)
// into the transposed layout.
void WriteContiguousKt(const float* k_rows, int n, int pos0, int n_kv_heads, int head_dim, float* k_t);

// fp16 contiguous K/V: K^T in the ContiguousKtIndex layout and V rows
// [>= pos0 + n_tokens, kv_dim], IEEE fp16 bits, widened exactly: the bits of
// ContiguousAttention on the rounded values. WriteContiguousF16 rounds the K
// and V rows of positions [pos0, pos0 + n) into them.
void ContiguousAttentionF16(const float* q, const uint16_t* k_t, const uint16_t* v, float* out, int n_tokens,
                            int pos0, int n_heads, int n_kv_heads, int head_dim, ThreadPool* pool,
                            std::vector<float>* scores);
void WriteContiguousF16(const float* k_rows, const float* v_rows, int n, int pos0, int n_kv_heads, int head_dim,
                        uint16_t* k_t, uint16_t* v);

// Scalar reference in double precision (tests): same contract, no scratch;
// int8 K/V are dequantized (scale * code) exactly as the fast kernels do.
void PagedAttentionRef(const PagedAttentionArgs& a);

// Tests: the int8 kernel at a given SIMD level ("scalar", "avx2", "avx512").
// Returns false (and computes nothing) if this CPU lacks it or a.kv_dtype is not kInt8.
bool PagedAttentionInt8ForIsaForTesting(const PagedAttentionArgs& a, const char* isa, std::vector<float>* scores);

// Tests: PagedAttention (either dtype) at a given SIMD level, on `pool` (may
// be null). Returns false (and computes nothing) if this CPU lacks it.
bool PagedAttentionForIsaForTesting(const PagedAttentionArgs& a, const char* isa, ThreadPool* pool,
                                    std::vector<float>* scores);

}  // namespace cpu
}  // namespace nibble
