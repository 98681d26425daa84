#include "engine/runtime/engine.h"

#include <string>

#include "absl/strings/str_cat.h"
#include "engine/core/huge_pages.h"

namespace nibble {

absl::StatusOr<Engine> OpenEngine(const std::string& model_path, const LoadOptions& opts, int n_threads) {
  auto loaded = LoadModel(model_path, opts);
  if (!loaded.ok()) return loaded.status();
  // Serving only reads the weights: fp32 matrices join the quantized ones in
  // huge-page memory (decode streams them ~15% faster where THP is "madvise").
  if (opts.huge_pages && HugePagesAllowedByEnv()) {
    if (const size_t moved = MoveF32ToHugePages(&loaded->weights); moved > 0)
      loaded->metadata["load.huge_page_f32_bytes"] = std::to_string(moved);
  }
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
