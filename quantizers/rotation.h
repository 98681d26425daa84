// Rotation of a Llama model's weights before quantization (incoherence
// processing, as in QuIP / QuaRot): an orthogonal change of basis of the
// residual stream, h' = R h, and of every value head, v' = P v, folded into the
// fp32 weights so that the rotated model computes the same function. Outlier
// features of the residual stream are spread over all coordinates, so every
// linear layer's input (and the weights' columns) look more Gaussian and a
// low-bit grid fits them better.
//
// Folding (W is [out, in], y = W x):
//   norms:   the RMSNorm weights g of attn_norm / ffn_norm go into the next
//            layers' columns (W diag(g)); the norms become 1, since
//            rmsnorm(R h) = R rmsnorm(h) only for an all-ones weight.
//   inputs:  wq, wk, wv, w_gate, w_up  -> W diag(g) R^T
//   outputs: wo, w_down                -> R W
//   values:  wv rows of kv head k      -> P wv_k;  wo columns of head h -> wo_h P^T
//   FFN:     w_down columns            -> w_down R_f^T, the engine rotating
//            silu(gate) * up by R_f (config.ffn_rotation, FastRotation)
//   embedding / head: see RotateModel.
//
// Measured (docs/QUALITY.md): helps GPTQ at int2 on SmolLM2-135M, hurts RTN
// and hurts the tiny stories260K; an option, not a default.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "engine/core/loaded_model.h"
#include "engine/core/rotation.h"

namespace nibble {

struct RotationOptions {
  uint64_t seed = 0x6e6962626c65ULL;  // in [1, 2^53]
  bool value_heads = true;            // also rotate each value head (P above)
  // Also rotate w_down's input (the FFN activations) by R_f at run time
  // (config.ffn_rotation; w_down -> w_down R_f^T): an O(hidden log hidden)
  // transform per token and layer. Off by default: every --rotate row in
  // docs/QUALITY.md was measured without it; its quality effect is unmeasured.
  bool ffn = false;
};

// Rotates m's fp32 weights in place (REQUIRES: no tensor quantized yet).
// Untied models: the lookup table becomes E R^T (rows R e_t) and the head
// E_out diag(g_final) R^T with final_norm = 1, so the engine runs them as any
// model. Tied embeddings stay shared and unrotated: the config's
// residual_rotation is set to the seed and the engine rotates each embedded
// token by R and the last hidden state back by R^T (two dim x dim products
// per token).
absl::Status RotateModel(LoadedModel* m, const RotationOptions& opt, int n_threads);

}  // namespace nibble
