// Hyper-parameters of a Llama-family decoder.
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "kernels/common/rope_style.h"

namespace nibble {


struct ModelConfig {
  std::string architecture = "llama";
  int dim = 0;          // residual width (hidden_size)
  int hidden_dim = 0;   // FFN width (intermediate_size)
  int n_layers = 0;
  int n_heads = 0;
  int n_kv_heads = 0;
  int head_dim = 0;     // usually dim / n_heads
  int vocab_size = 0;
  int max_seq_len = 0;  // context length the model was trained for
  float norm_eps = 1e-5f;
  float rope_theta = 10000.0f;
  int rope_dim = 0;     // rotated dims per head (== head_dim for Llama)
  RopeStyle rope_style = RopeStyle::kInterleaved;
  bool tied_embeddings = false;
  // Nonzero: the weights work on a rotated residual stream h' = R h with
  // R = StructuredRotation(dim, residual_rotation) (engine/core/rotation.h;
  // quantizers/rotation.h). The token embedding (tied with the head) stays in
  // the original basis: the model rotates each embedded token by R and the
  // last hidden state back by R^T before the final norm. 0: no rotation.
  // At most 2^53 (stored as a JSON number).
  uint64_t residual_rotation = 0;
  // Nonzero: w_down works on rotated FFN activations u' = R_f u, R_f =
  // StructuredRotation(hidden_dim, ffn_rotation), applied at run time to
  // silu(gate) * up (FastRotation). 0: none. At most 2^53.
  uint64_t ffn_rotation = 0;

  int q_dim() const { return n_heads * head_dim; }
  int kv_dim() const { return n_kv_heads * head_dim; }

  // Checks internal consistency (positive sizes, heads divide, GQA ratio).
  // `source` names the file for the error message.
  absl::Status Validate(const std::string& source) const;
};

}  // namespace nibble
