// RoPE pairing conventions, shared by kernels and the model config.
#pragma once

namespace nibble {

// How RoPE pairs the dimensions of a head.
enum class RopeStyle {
  // Rotate adjacent pairs (x[2i], x[2i+1]): llama2.c, GGUF "llama" (LLAMA_ROPE_TYPE_NORM).
  kInterleaved,
  // Rotate (x[i], x[i + d/2]) ("rotate_half"): Hugging Face transformers checkpoints, GPT-NeoX.
  kHalf,
};

}  // namespace nibble
