// Public entry point for embedding the engine: open a model file (any format
// LoadModel reads) together with its tokenizer.
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "engine/model/llama_model.h"
#include "engine/model/model_loader.h"
#include "engine/tokenizer/tokenizer.h"

namespace nibble {

struct Engine {
  std::unique_ptr<LlamaModel> model;
  std::unique_ptr<Tokenizer> tokenizer;
};

// Loads weights and tokenizer and builds the model on `n_threads` CPU threads
// (<= 0: all cores). Errors name the offending file.
absl::StatusOr<Engine> OpenEngine(const std::string& model_path, const LoadOptions& opts = {},
                                  int n_threads = 0);

}  // namespace nibble
