// The compute interface the Llama decoder is written against.
//
// A backend executes the decoder's operators on buffers it understands. The
// CPU backend works on host fp32 buffers; a CUDA backend implements the same
// calls on device buffers. The model (llama_model.cc) only sequences calls.
//
// Shapes: activations [n_tokens, width] row-major; weights [out, in].
// Thread safety: a backend instance is used by one forward pass at a time.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "engine/core/config.h"
#include "engine/core/weights.h"
#include "kernels/cpu/paged_attention.h"

namespace nibble {

class ThreadPool;

// Attention over a contiguous per-layer KV cache.
struct AttentionArgs {
  const float* q;        // [n_tokens, n_heads * head_dim], RoPE applied
  const float* k_cache;  // [>= pos0 + n_tokens, kv_dim] for this layer
  const float* v_cache;  // same layout as k_cache
  float* out;            // [n_tokens, n_heads * head_dim]
  int n_tokens;
  int pos0;              // position of the first query token
  int n_heads, n_kv_heads, head_dim;
  // Optional: K transposed (cpu::ContiguousKtIndex layout), read instead of
  // k_cache when set; the same values, so the same output.
  const float* k_t = nullptr;
  // fp16 cache instead (k_cache / v_cache / k_t unused): K^T and V rows in
  // IEEE fp16 (cpu::ContiguousAttentionF16).
  const uint16_t* k_t16 = nullptr;
  const uint16_t* v16 = nullptr;
};

// Attention over a paged KV cache (serving): one sequence's query rows and
// its block table (see kernels/cpu/paged_attention.h for the layout).
using PagedAttentionArgs = cpu::PagedAttentionArgs;

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;
  virtual int n_threads() const = 0;

  // y = x W^T for n_tokens rows of x.
  virtual void MatMul(const HostTensor& w, const float* x, int n_tokens, float* y) = 0;
  // ys[i] = x ws[i]^T for several weights of the same input width on one x
  // (a layer's wq/wk/wv, w_gate/w_up). Must equal the MatMul calls bit for
  // bit; a backend may fuse them (one fork/join, one activation rounding).
  // Default: MatMul for each.
  virtual void MatMulMany(std::span<const HostTensor* const> ws, const float* x, int n_tokens,
                          std::span<float* const> ys);
  // Row-wise RMSNorm of n_tokens rows of width dim.
  virtual void RmsNorm(const float* x, const float* weight, int n_tokens, int dim, float eps, float* out) = 0;
  // RoPE on n_tokens rows, row t at position pos0 + t, n_heads heads per row.
  virtual void Rope(float* x, int n_tokens, int pos0, int n_heads, const ModelConfig& c) = 0;
  // Causal attention of the query rows over cache positions [0, pos0 + t].
  virtual void Attention(const AttentionArgs& a) = 0;
  // gate = silu(gate) * up, element-wise over n values.
  virtual void SwiGLU(float* gate, const float* up, int64_t n) = 0;

  // Causal attention of one sequence's query rows over its paged cache
  // (added for the serving scheduler). Default: the host CPU kernel
  // (kernels/cpu/paged_attention.h), on a pool of n_threads() threads that the
  // base class creates on first use; a device backend overrides it.
  virtual void PagedAttention(const PagedAttentionArgs& a);

 private:
  std::shared_ptr<ThreadPool> paged_pool_;  // lazily created by the default PagedAttention
  std::vector<float> paged_scores_;
};

// The fp32 CPU backend (kernels/cpu), multi-threaded over n_threads (<= 0: all cores).
std::unique_ptr<Backend> MakeCpuBackend(int n_threads);

}  // namespace nibble
