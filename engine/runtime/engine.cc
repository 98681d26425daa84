#include "engine/runtime/engine.h"

#include "absl/strings/str_cat.h"

namespace nibble {

absl::StatusOr<Engine> OpenEngine(const std::string& model_path, const LoadOptions& opts, int n_threads) {
  auto loaded = LoadModel(model_path, opts);
  if (!loaded.ok()) return loaded.status();
  auto tok = CreateTokenizer(loaded->vocab);
  if (!tok.ok()) return tok.status();
  // Fewer tokens than embedding rows is common (padded vocabularies); more
  // would feed ids the model has no row for.
  if ((*tok)->vocab_size() > loaded->config.vocab_size) {
    const std::string where = loaded->vocab.sp_model_path.empty() ? model_path : loaded->vocab.sp_model_path;
    return absl::InvalidArgumentError(absl::StrCat(where, ": the tokenizer has ", (*tok)->vocab_size(),
                                                   " tokens but the model's vocabulary is ",
                                                   loaded->config.vocab_size, " (wrong --tokenizer?)"));
  }
  auto model = LlamaModel::Create(*std::move(loaded), n_threads);
  if (!model.ok()) return model.status();
  Engine e;
  e.model = *std::move(model);
  e.tokenizer = *std::move(tok);
  return e;
}

}  // namespace nibble
