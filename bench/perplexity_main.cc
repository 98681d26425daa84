// nibble-perplexity: perplexity of a model on a text file.
//
// Chunk mode (default) follows llama.cpp's llama-perplexity so numbers are
// comparable: the whole text is tokenized once (BOS first when the vocabulary
// adds one), cut into non-overlapping chunks of CTX tokens, each chunk's first
// token replaced by BOS (when the vocabulary adds BOS), evaluated from a fresh
// context, and the second half of each chunk scored (positions CTX/2 .. CTX-2
// predict the next token).
// Document mode (--doc-separator STR) scores every document from BOS in a fresh
// context, truncated to the model's context length.
#include <chrono>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/strings/ascii.h"
#include "engine/io/mapped_file.h"
#include "engine/runtime/engine.h"
#include "nlohmann/json.hpp"

namespace {

// Negative log-likelihood of `target` under softmax(logits).
double Nll(const float* logits, int n, int target) {
  float mx = logits[0];
  for (int i = 1; i < n; ++i) mx = std::max(mx, logits[i]);
  double sum = 0.0;
  for (int i = 0; i < n; ++i) sum += std::exp(double(logits[i]) - mx);
  return -(double(logits[target]) - mx - std::log(sum));
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"nibble-perplexity: perplexity of a model on a text file (llama-perplexity compatible)"};
  std::string model_path, tokenizer_path, text_path, doc_sep;
  int ctx = 512, chunks = -1, max_docs = -1, threads = 0;
  bool json = false;
  app.add_option("-m,--model", model_path, "model file (GGUF, llama2.c .bin, HF directory)")->required();
  app.add_option("--tokenizer", tokenizer_path, "tokenizer file (llama2.c tok*.bin or SentencePiece .model)");
  app.add_option("-f,--file", text_path, "text file to score")->required();
  app.add_option("-c,--ctx-size", ctx, "context (chunk) size in tokens")->check(CLI::Range(8, 1 << 20));
  app.add_option("--chunks", chunks, "score at most N chunks (default: all)");
  app.add_option("--doc-separator", doc_sep, "document mode: split the text on STR and score each document");
  app.add_option("--max-docs", max_docs, "document mode: score at most N documents");
  app.add_option("-t,--threads", threads, "CPU threads (default: all cores)");
  app.add_flag("--json", json, "print one JSON object with ppl, mean_nll, tokens");
  CLI11_PARSE(app, argc, argv);

  auto text = nibble::io::ReadFileToString(text_path);
  if (!text.ok()) {
    fprintf(stderr, "error: %s\n", std::string(text.status().message()).c_str());
    return 1;
  }
  nibble::LoadOptions opts;
  opts.tokenizer_path = tokenizer_path;
  auto engine = nibble::OpenEngine(model_path, opts, threads);
  if (!engine.ok()) {
    fprintf(stderr, "error: %s\n", std::string(engine.status().message()).c_str());
    return 1;
  }
  nibble::LlamaModel& model = *engine->model;
  const nibble::Tokenizer& tok = *engine->tokenizer;
  const int vocab = model.config().vocab_size;
  const bool add_bos = tok.ShouldAddBos();
  fprintf(stderr, "perplexity: model %s (%d layers, dim %d, vocab %d), backend %s, %d threads\n",
          model_path.c_str(), model.config().n_layers, model.config().dim, vocab, model.backend().name().c_str(),
          model.backend().n_threads());

  const auto t0 = std::chrono::steady_clock::now();
  double nll_sum = 0.0;
  int64_t scored = 0;
  std::vector<double> unit_nll;  // mean NLL per chunk / document
  std::vector<float> logits;

  auto fail = [](const absl::Status& s) {
    fprintf(stderr, "error: %s\n", std::string(s.message()).c_str());
    return 1;
  };

  if (doc_sep.empty()) {
    auto tokens = tok.Encode(*text, {.add_bos = add_bos});
    if (!tokens.ok()) return fail(tokens.status());
    const int64_t available = static_cast<int64_t>(tokens->size()) / ctx;
    if (available < 1) {
      fprintf(stderr, "error: %s has %zu tokens, need at least %d (one chunk of -c %d)\n", text_path.c_str(),
              tokens->size(), ctx, ctx);
      return 1;
    }
    if (ctx > model.config().max_seq_len) {
      fprintf(stderr, "warning: -c %d exceeds the model's trained context %d\n", ctx, model.config().max_seq_len);
    }
    const int64_t n_chunks = chunks > 0 ? std::min<int64_t>(chunks, available) : available;
    fprintf(stderr, "perplexity: %zu tokens, %lld chunks of %d\n", tokens->size(), (long long)n_chunks, ctx);
    auto cache = model.NewKVCache(ctx);
    logits.resize(size_t(ctx) * vocab);
    const int first = ctx / 2;
    for (int64_t c = 0; c < n_chunks; ++c) {
      std::vector<int32_t> batch(tokens->begin() + c * ctx, tokens->begin() + (c + 1) * ctx);
      if (add_bos) batch[0] = tok.bos_id();
      if (auto s = model.Forward(batch, 0, cache.get(), logits, /*all_logits=*/true); !s.ok()) return fail(s);
      double chunk_nll = 0.0;
      for (int j = first; j < ctx - 1; ++j) {
        chunk_nll += Nll(&logits[size_t(j) * vocab], vocab, (*tokens)[c * ctx + j + 1]);
      }
      const int n = ctx - 1 - first;
      nll_sum += chunk_nll;
      scored += n;
      unit_nll.push_back(chunk_nll / n);
      fprintf(stderr, "[%lld]%.4f ", (long long)(c + 1), std::exp(nll_sum / scored));
      fflush(stderr);
    }
    fprintf(stderr, "\n");
  } else {
    const int max_len = model.config().max_seq_len;
    auto cache = model.NewKVCache(max_len);
    logits.resize(size_t(max_len) * vocab);
    int docs = 0;
    for (absl::string_view doc : absl::StrSplit(*text, doc_sep)) {
      doc = absl::StripAsciiWhitespace(doc);
      if (doc.empty()) continue;
      if (max_docs > 0 && docs >= max_docs) break;
      auto t = tok.Encode(std::string_view(doc.data(), doc.size()), {.add_bos = true});
      if (!t.ok()) return fail(t.status());
      std::vector<int32_t> ids = *std::move(t);
      if (ids.empty() || ids[0] != tok.bos_id()) ids.insert(ids.begin(), tok.bos_id());
      if (static_cast<int>(ids.size()) > max_len) ids.resize(max_len);
      if (ids.size() < 2) continue;
      if (auto s = model.Forward(ids, 0, cache.get(), logits, /*all_logits=*/true); !s.ok()) return fail(s);
      double doc_nll = 0.0;
      for (size_t j = 0; j + 1 < ids.size(); ++j) doc_nll += Nll(&logits[j * vocab], vocab, ids[j + 1]);
      nll_sum += doc_nll;
      scored += static_cast<int64_t>(ids.size()) - 1;
      unit_nll.push_back(doc_nll / double(ids.size() - 1));
      ++docs;
      if (docs % 50 == 0) fprintf(stderr, "[%d docs] ppl %.4f\n", docs, std::exp(nll_sum / scored));
    }
    if (docs == 0) {
      fprintf(stderr, "error: %s: no documents with at least 2 tokens\n", text_path.c_str());
      return 1;
    }
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const double mean_nll = nll_sum / double(scored);
  const double ppl = std::exp(mean_nll);
  if (json) {
    nlohmann::json j = {{"model", model_path},   {"file", text_path},       {"mode", doc_sep.empty() ? "chunks" : "documents"},
                        {"ctx", ctx},            {"ppl", ppl},              {"mean_nll", mean_nll},
                        {"tokens", scored},      {"units", unit_nll.size()}, {"unit_mean_nll", unit_nll},
                        {"seconds", secs},       {"threads", model.backend().n_threads()}};
    printf("%s\n", j.dump().c_str());
  } else {
    printf("Final estimate: PPL = %.4f (mean NLL %.6f over %lld tokens, %.1f s)\n", ppl, mean_nll, (long long)scored,
           secs);
  }
  return 0;
}
