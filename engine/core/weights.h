// Host-side fp32 weights of a Llama-family decoder, as every reader produces them.
//
// Convention: a linear layer's weight is [out_features, in_features] row-major
// (GGUF ne = {in, out}; HF/PyTorch nn.Linear layout), y = W x.
// Readers of foreign formats dequantize to fp32; nibble's own model file carries
// packed matrices in `quant` (engine/core/quant_tensor.h).
#pragma once

#include <cstdint>
#include <memory>
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

  int64_t numel() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return shape.empty() ? 0 : n;
  }
  int64_t rows() const { return shape.empty() ? 0 : shape[0]; }
  int64_t cols() const { return shape.size() < 2 ? 0 : shape[1]; }
  bool empty() const { return data.empty() && quant == nullptr; }
  bool is_quantized() const { return quant != nullptr; }
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
};

}  // namespace nibble
