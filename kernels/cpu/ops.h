// fp32 CPU operators of the Llama decoder: the reference path.
//
// Each op has a scalar `*Ref` version that defines its numerics; optimized
// variants (AVX2 / AVX-512, chosen at run time) must agree with it within the
// tolerances named in ops_test.cc. Shapes: activations are [n_tokens, width]
// row-major; weights [out, in] row-major (y = W x).
#pragma once

#include <cstdint>
#include <functional>
#include <string_view>

#include "kernels/common/rope_style.h"

namespace nibble {

class ThreadPool;

namespace cpu {

// y[t, r] = sum_c w[r, c] * x[t, c]   for t < n_tokens, r < rows.
// Parallel over rows on `pool` (may be null for single-threaded).
void MatMulF32(const float* w, int64_t rows, int64_t cols, const float* x, int64_t n_tokens, float* y,
               ThreadPool* pool);
void MatMulF32Ref(const float* w, int64_t rows, int64_t cols, const float* x, int64_t n_tokens, float* y);

// From this many tokens on, MatMulF32 at AVX2/AVX-512 runs the packed-panel
// kernel, whose every output is exactly MatMulF32PackedOrderRef's: one
// sequential fma chain over c = 0 .. cols-1 from 0, whatever the thread count,
// n_tokens or ISA. Below it (decode) a dot-product order applies.
inline constexpr int64_t kMatMulF32PackedMinTokens = 8;
void MatMulF32PackedOrderRef(const float* w, int64_t rows, int64_t cols, const float* x, int64_t n_tokens, float* y);

// MatMulF32 over a matrix whose rows are produced on demand, e.g. dequantized
// from a packed format for prefill: fill(r0, nr, dst) writes rows
// [r0, r0 + nr) (nr <= 32) row-major into dst (nr * cols floats); it runs on
// the pool's threads concurrently for disjoint rows. For n_tokens >=
// kMatMulF32PackedMinTokens on AVX2/AVX-512 every output is exactly
// MatMulF32PackedOrderRef's on the filled matrix (the same packed-panel
// kernel); otherwise each output is the dispatched DotF32 of its row.
using RowFill = std::function<void(int64_t r0, int64_t nr, float* dst)>;
void MatMulF32Filled(const RowFill& fill, int64_t rows, int64_t cols, const float* x, int64_t n_tokens, float* y,
                     ThreadPool* pool);

// fp16 weights (IEEE binary16, e.g. GGUF F16 tensors) times fp32 activations,
// accumulated in fp32. fp16 -> fp32 is exact, so each output is exactly what
// the fp32 kernels give on the widened matrix: MatMulF32Filled's with a
// widening fill (n_tokens >= kMatMulF32PackedMinTokens at AVX2/AVX-512: the
// packed-panel GEMM; otherwise DotF32 of each widened row). Half the bytes
// of fp32 weights per decode step.
void MatMulF16(const uint16_t* w, int64_t rows, int64_t cols, const float* x, int64_t n_tokens, float* y,
               ThreadPool* pool);
// Scalar reference: DotF32's scalar order on the widened rows.
void MatMulF16Ref(const uint16_t* w, int64_t rows, int64_t cols, const float* x, int64_t n_tokens, float* y);
// DotF32(widen(w), x) (dispatched), and the widening itself.
float DotF16(const uint16_t* w, const float* x, int64_t n);
void WidenF16(const uint16_t* src, float* dst, int64_t n);

// The same for bfloat16 weights (uint16_t = the upper half of an fp32; e.g.
// HF BF16 checkpoints, GGUF BF16 tensors): widening is a shift, so again
// every output equals the fp32 kernels' on the widened matrix.
void MatMulBF16(const uint16_t* w, int64_t rows, int64_t cols, const float* x, int64_t n_tokens, float* y,
                ThreadPool* pool);
void MatMulBF16Ref(const uint16_t* w, int64_t rows, int64_t cols, const float* x, int64_t n_tokens, float* y);
float DotBF16(const uint16_t* w, const float* x, int64_t n);
void WidenBF16(const uint16_t* src, float* dst, int64_t n);

// Dot product of two fp32 vectors (dispatched).
float DotF32(const float* a, const float* b, int64_t n);

// out = x * rsqrt(mean(x^2) + eps) * weight, one row of n values (out may alias x).
void RmsNorm(const float* x, const float* weight, int64_t n, float eps, float* out);

// Rotates the first rope_dim dims of each of n_heads heads (stride head_dim) of
// `v` for position `pos`, in the given pairing convention.
void Rope(float* v, int n_heads, int head_dim, int rope_dim, int pos, float theta, RopeStyle style);

// In-place softmax over n values (max-subtracted).
void Softmax(float* x, int64_t n);

// gate[i] = silu(gate[i]) * up[i].
void SwiGLU(float* gate, const float* up, int64_t n);

// Which SIMD level the dispatched kernels use: "avx512", "avx2" or "scalar".
// NIBBLE_FORCE_ISA=scalar|avx2|avx512 in the environment caps it (for tests).
const char* ActiveIsa();

// Tests: run the dispatched kernels at `isa` ("scalar", "avx2", "avx512"; ""
// restores the default). Returns false if this CPU lacks it.
bool ForceIsaForTesting(std::string_view isa);

}  // namespace cpu
}  // namespace nibble
