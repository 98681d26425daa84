// Llama models from Hugging Face transformers checkpoints (safetensors).
//
// Layout: a directory with config.json and either model.safetensors or shards
// listed in model.safetensors.index.json ("weight_map": tensor -> file);
// optionally tokenizer.model (SentencePiece), tokenizer.json (byte-level BPE),
// tokenizer_config.json (bos/eos, add_bos_token, chat_template).
// Goals: model_type "llama"/"mistral" with F32/F16/BF16 weights into a
// LoadedModel; weights used as stored, so rope_style = kHalf ("rotate_half":
// HF's Q/K rows are permuted relative to GGUF/llama2.c); errors name the file.
// Non-goals: other architectures (UNIMPLEMENTED), biases, RoPE scaling (logged
// and ignored), quantized checkpoints, .bin (pickle) weights.
#pragma once

#include <string>

#include "absl/status/statusor.h"
#include "engine/core/loaded_model.h"

namespace nibble::io {

// `path`: the checkpoint directory, or any file inside it (config.json, a
// .safetensors file). Thread safety: reentrant; uses worker threads internally.
// keep_16bit: F16 / BF16 matrices are kept as they are (HostTensor::f16 /
// bf16) instead of being widened to fp32.
absl::StatusOr<LoadedModel> LoadHfModel(const std::string& path, bool keep_16bit = false);

}  // namespace nibble::io
