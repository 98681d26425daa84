// Host-side fp32 weights of a Llama-family decoder, as every reader produces them.
//
// Convention: a linear layer's weight is [out_features, in_features] row-major
// (GGUF ne = {in, out}; HF/PyTorch nn.Linear layout), y = W x.
// Readers of foreign formats dequantize to fp32; nibble's own model file carries
// packed matrices in `quant` (engine/core/quant_tensor.h). Matrices stored as
// IEEE fp16 (GGUF F16, HF F16, nibble files written with fp16 storage) or
// bfloat16 (GGUF / HF BF16) may be kept at 16 bits in `f16` / `bf16` when the
// loader is asked to (LoadOptions::keep_f16): the engine then runs them in
// the 16-bit kernels (cpu::MatMulF16 / MatMulBF16).
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/status/status.h"

namespace nibble {

struct QuantTensor;

struct HostTensor {
  std::string name;
  std::vector<int64_t> shape;  // outermost first: {rows, cols} for matrices
  std::vector<float> data;     // fp32 values; empty when `quant` holds the matrix
  // Set for quantized matrices (engine/core/quant_tensor.h); `data` is then empty.
  std::shared_ptr<const QuantTensor> quant;
  // Matrices held outside `data` (which is then empty), row-major rows * cols
  // values kept alive by `owner`: `f16` / `bf16` for matrices kept in IEEE
  // fp16 / bfloat16 bits; `f32` for fp32 matrices moved into huge-page memory
  // (MoveF32ToHugePages).
  std::span<const uint16_t> f16;
  std::span<const uint16_t> bf16;
  std::span<const float> f32;
  std::shared_ptr<const void> owner;

  int64_t numel() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return shape.empty() ? 0 : n;
  }
  int64_t rows() const { return shape.empty() ? 0 : shape[0]; }
  int64_t cols() const { return shape.size() < 2 ? 0 : shape[1]; }
  bool empty() const { return data.empty() && quant == nullptr && f16.empty() && bf16.empty() && f32.empty(); }
  bool is_quantized() const { return quant != nullptr; }
  bool is_f16() const { return !f16.empty(); }
  bool is_bf16() const { return !bf16.empty(); }
  // The fp32 values wherever they are held (`f32` or `data`); nullptr for
  // quantized and fp16 matrices.
  const float* fp32() const { return !f32.empty() ? f32.data() : data.empty() ? nullptr : data.data(); }
  size_t fp32_size() const { return !f32.empty() ? f32.size() : data.size(); }
  // Replaces fp16 / bf16 values by their exact fp32 widening in `data` (no-op otherwise).
  void WidenHalf();
  // Holds a copy of n 16-bit values (IEEE fp16 bits, or bfloat16 with `bf16`) in `f16` / `bf16`.
  void CopyHalf(const void* src, size_t n, bool bf16);
};

struct LayerWeights {
  HostTensor attn_norm;                // [dim]
  HostTensor wq, wk, wv, wo;           // [q_dim, dim], [kv_dim, dim], [kv_dim, dim], [dim, q_dim]
  HostTensor ffn_norm;                 // [dim]
  HostTensor w_gate, w_up, w_down;     // [hidden, dim], [hidden, dim], [dim, hidden]
};

struct ModelConfig;

struct ModelWeights {
  HostTensor tok_embeddings;  // [vocab, dim]
  std::vector<LayerWeights> layers;
  HostTensor final_norm;      // [dim]
  HostTensor output;          // [vocab, dim]; empty when tied to tok_embeddings

  // Checks every tensor's shape against `config`; errors name `source` and the tensor.
  absl::Status Validate(const ModelConfig& config, const std::string& source) const;
  // HostTensor::WidenHalf on every matrix.
  void WidenHalf();
};

}  // namespace nibble
