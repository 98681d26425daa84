#include "engine/runtime/engine.h"

namespace nibble {

absl::StatusOr<Engine> OpenEngine(const std::string& model_path, const LoadOptions& opts, int n_threads) {
  auto loaded = LoadModel(model_path, opts);
  if (!loaded.ok()) return loaded.status();
  auto tok = CreateTokenizer(loaded->vocab);
  if (!tok.ok()) return tok.status();
  auto model = LlamaModel::Create(*std::move(loaded), n_threads);
  if (!model.ok()) return model.status();
  Engine e;
  e.model = *std::move(model);
  e.tokenizer = *std::move(tok);
  return e;
}

}  // namespace nibble
