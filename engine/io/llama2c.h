// Reader for llama2.c checkpoints (Karpathy's legacy "version 0" export):
// a header of 7 int32 {dim, hidden_dim, n_layers, n_heads, n_kv_heads,
// vocab_size (negative: separate classifier), seq_len} followed by fp32 arrays
// token_embedding, rms_att, wq, wk, wv, wo, rms_ffn, w1 (gate), w2 (down),
// w3 (up), rms_final, freq_cis_real, freq_cis_imag [, wcls].
// RoPE pairs adjacent dims; norm eps 1e-5; theta 10000.
// Non-goals: the later versioned exports ("ak42" magic) are rejected clearly.
#pragma once

#include <string>

#include "absl/status/statusor.h"
#include "engine/core/loaded_model.h"

namespace nibble::io {

// Reads weights and config; the vocabulary is left empty (llama2.c keeps the
// tokenizer in a separate tok*.bin, see engine/tokenizer/llama2c_vocab.h).
absl::StatusOr<LoadedModel> LoadLlama2cModel(const std::string& path);

// True if the first bytes look like a llama2.c legacy header (plausible sizes).
bool LooksLikeLlama2c(const uint8_t* data, size_t size);

}  // namespace nibble::io
