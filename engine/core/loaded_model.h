// A model as read from disk, in any supported source format, ready to build
// an executable model from. See model_loader.h for the entry point.
#pragma once

#include <map>
#include <string>

#include "engine/core/config.h"
#include "engine/core/weights.h"
#include "engine/tokenizer/vocab.h"

namespace nibble {

struct LoadedModel {
  ModelConfig config;
  ModelWeights weights;
  VocabSpec vocab;
  std::string chat_template;  // Jinja source from the checkpoint, if any
  std::string source_path;
  std::string source_format;  // "llama2c", "gguf", "hf"
  std::map<std::string, std::string> metadata;  // informational key/values (stringified)
};

}  // namespace nibble
