// Entry point to read any supported checkpoint into a LoadedModel.
//
// Formats, detected by content (magic bytes / directory layout):
//   GGUF v2/v3             .gguf file                      (engine/io/gguf_model.h)
//   HF transformers        directory with config.json + *.safetensors, or a
//                          .safetensors file beside its config.json (engine/io/hf_model.h)
//   llama2.c               .bin checkpoint (+ tokenizer path)   (engine/io/llama2c.h)
// Every error names the offending file and what is wrong with it.
#pragma once

#include <string>

#include "absl/status/statusor.h"
#include "engine/core/loaded_model.h"

namespace nibble {

struct LoadOptions {
  // Tokenizer file: llama2.c tok*.bin or a SentencePiece .model. Required for
  // llama2.c checkpoints; overrides the embedded vocabulary for other formats.
  std::string tokenizer_path;
  // Copy the packed bytes of quantized matrices out of the mapped file into
  // transparent-huge-page memory (engine/core/huge_pages.h): faster decode
  // streams, at the cost of holding the packed weights in anonymous memory
  // (NIBBLE_HUGE_PAGES=0 in the environment turns it off for every load).
  bool huge_pages = true;
  // Keep matrices stored as 16-bit floats (GGUF / HF F16 and BF16 tensors,
  // nibble files with fp16 storage) at 16 bits: the engine runs them in the
  // fp16 / bf16 kernels, half the bytes of fp32 per decode step with the same
  // values. False widens them to fp32 in HostTensor::data (the quantizer
  // works on fp32).
  bool keep_f16 = true;
};

absl::StatusOr<LoadedModel> LoadModel(const std::string& path, const LoadOptions& opts = {});

// Fills `vocab` from a standalone tokenizer file (llama2.c tok*.bin with
// `vocab_size` entries, or a SentencePiece .model detected by name/content).
absl::Status LoadTokenizerFile(const std::string& path, int32_t vocab_size, VocabSpec* vocab);
absl::Status LoadTokenizerFile(const std::string& path, VocabSpec* vocab);

}  // namespace nibble
