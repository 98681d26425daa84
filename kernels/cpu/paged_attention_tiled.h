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
// one-shot prefill == decode, bit for bit.
//
// Cross-ISA identity: scalar, AVX2 and AVX-512 perform the same IEEE fp32
// operations in the same order (the int8 -> fp32 code conversion is exact),
// so the bits do not depend on the SIMD level either. The canonical order,
// per query row and K/V tile of n <= kKvTile keys j:
//  * dot_j = fma chain over i = 0..head_dim-1 in order, from +0:
//    dot = fma(q_i, k_j[i], dot)  (k_j[i]: fp32 value or int8 code);
//    s_j = dot_j * cs_j, cs_j = 1/sqrt(d) (int8: fl(scale_k,j * 1/sqrt(d)));
//  * tmax = max_j s_j, NaN scores skipped (max is exact, so order-free),
//    then tmax + 0 (a -0 becomes +0); m' = max(m, tmax);
//  * alpha = 1 if m' == m, else Exp(m - m'); p_j = Exp(s_j - m'), where Exp
//    is ExpCanonical (paged_attention_tiled.cc): clamp, n = round-to-even
//    (x * log2e), two fma range-reduction steps, a 6-fma polynomial plus
//    fma(y, r * r, r + 1), times 2^n built in the exponent field;
//  * sum = 16 lanes, lane L = fl(...((+0 + p_L) + p_{L+16}) + p_{L+32}...),
//    reduced by the halving tree v8[l] = a[l] + a[l+8], v4[l] = v8[l] +
//    v8[l+4], (v4[0] + v4[2]) + (v4[1] + v4[3]); l = l * alpha + sum;
//  * c_j = p_j (int8: p_j * scale_v,j); per element i:
//    acc_i = (alpha == 1 ? acc_i : acc_i * alpha), then for j in order
//    acc_i = fma(c_j, v_j[i], acc_i);
//  * after the last tile: out_i = acc_i * (1 / l).
// Scalar code spells every fma as std::fma and never relies on contraction
// (GCC does not contract a * b + c in ISO mode; clang is told not to).
// AVX-512 keeps 16 keys per register; AVX2 emulates the 16 sum lanes with
// two ymm accumulators. Asserted by paged_attention_test.cc
// (TiledAttention.BitIdenticalAcrossIsas).
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
  const uint8_t* k = nullptr;  // unused (may be null) when kt is set
  const uint8_t* v = nullptr;
  int64_t block_stride = 0;  // bytes
  int block_size = 0;
  const int32_t* block_table = nullptr;
  bool int8 = false;
  // IEEE fp16 K and V (kt required: K^T and V rows hold fp16 bits, 2 bytes
  // per element; widened exactly, so the canonical order is unchanged).
  bool f16 = false;
  int64_t scales_bytes = 0;  // int8: KvInt8Section::ScalesBytes
  // K stored transposed instead (kt != nullptr; fp32, fp16 with f16, int8 codes with int8 (the
  // scales stay in the K section at k, codes[] there unused)): positions
  // in units of kt_unit; unit u (positions [u * kt_unit, (u + 1) * kt_unit))
  // of kv head h is a head_dim x kt_unit matrix (row i = dimension i,
  // column = position % kt_unit) at kt + kt_table[u] * kt_stride + h *
  // head_dim * kt_unit * (4, 2 or 1) bytes (kt_table null: u itself). The kernel reads
  // K^T tiles straight from it (AVX-512, kt_unit % 16 == 0) instead of
  // transposing K rows: same values, so the same bits.
  const uint8_t* kt = nullptr;
  int kt_unit = 0;
  int64_t kt_stride = 0;  // bytes
  const int32_t* kt_table = nullptr;
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
// reused (no allocation once large enough). pool may be null. The output
// bits are the same for every `isa` (see above).
void TiledAttention(const TiledProblem& p, AttnIsa isa, ThreadPool* pool, std::vector<float>* scratch);

}  // namespace cpu::internal
}  // namespace nibble
