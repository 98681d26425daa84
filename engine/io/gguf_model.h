// Llama models from GGUF files (llama.cpp's format).
//
// Goals: read architecture "llama" GGUF v2/v3 files into a LoadedModel:
// ModelConfig from the llama.* keys, every weight dequantized to fp32 (see
// ggml_types.h for the supported tensor types), the embedded vocabulary
// (tokenizer.ggml.*: SentencePiece-style "llama" or byte-level BPE "gpt2")
// and the chat template. Tensors keep GGUF's RoPE layout: llama.cpp's
// converter permutes Q/K rows so RoPE rotates adjacent pairs, hence
// rope_style = kInterleaved and no un-permutation.
// Non-goals: other architectures (UNIMPLEMENTED naming the arch), RoPE
// scaling (logged and ignored), keeping weights quantized.
#pragma once

#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/io/gguf.h"
#include "engine/core/loaded_model.h"

namespace nibble::io {

// Loads `path`. Every error names the path and the offending key or tensor.
// Tensors are dequantized to fp32, except F16 / BF16 matrices with `keep_f16`:
// those are copied as they are into HostTensor::f16 / bf16.
// Thread safety: reentrant; uses a few worker threads internally.
absl::StatusOr<LoadedModel> LoadGgufModel(const std::string& path, bool keep_f16 = false);

// Fills `vocab` from the tokenizer.ggml.* keys. Leaves kind = kNone if the
// file has no tokenizer.ggml.model; UNIMPLEMENTED for tokenizer models other
// than "llama" and "gpt2".
absl::Status ReadGgufVocab(const GgufFile& file, VocabSpec* vocab);

}  // namespace nibble::io
