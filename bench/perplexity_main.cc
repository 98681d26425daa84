// nibble-perplexity: perplexity (and KL divergence against a reference model)
// of a model on a text file.
//
// Chunk mode (default) follows llama.cpp's llama-perplexity so numbers are
// comparable: the whole text is tokenized once (BOS first when the vocabulary
// adds one), cut into non-overlapping chunks of CTX tokens, each chunk's first
// token replaced by BOS (when the vocabulary adds BOS), evaluated from a fresh
// context, and the second half of each chunk scored (positions CTX/2 .. CTX-2
// predict the next token).
// Document mode (--doc-separator STR) scores every document from BOS in a fresh
// context, truncated to the model's context length.
// With --ref-model, every scored position also gets KL(P_ref || P_model) and
// whether both models' top-1 tokens agree (the reference must share the vocabulary).
#include <chrono>
#include <cmath>
#include <cstring>
#include <cstdio>
#include <optional>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "engine/io/mapped_file.h"
#include "engine/runtime/engine.h"
#include "nlohmann/json.hpp"

namespace {

// log-softmax of one row of logits, in double.
void LogSoftmax(const float* logits, int n, std::vector<double>* out) {
  out->resize(n);
  double mx = logits[0];
  for (int i = 1; i < n; ++i) mx = std::max(mx, double(logits[i]));
  double sum = 0.0;
  for (int i = 0; i < n; ++i) sum += std::exp(double(logits[i]) - mx);
  const double lse = mx + std::log(sum);
  for (int i = 0; i < n; ++i) (*out)[i] = double(logits[i]) - lse;
}

int Argmax(const float* v, int n) { return static_cast<int>(std::max_element(v, v + n) - v); }

struct Totals {
  double nll = 0, kld = 0;
  int64_t scored = 0, top1_same = 0;
  std::vector<double> unit_nll;  // mean NLL per chunk / document
};

// Evaluates `ids` with the model (and the reference) in fresh contexts and scores
// positions [first, ids.size() - 1): logits at j predict ids[j + 1].
// Reference logits saved by an earlier run (--save-logits) instead of a live
// reference model: per unit, the token ids and the fp32 logits of the scored rows.
class LogitsFile {
 public:
  static constexpr char kMagic[8] = {'N', 'B', 'L', 'L', 'O', 'G', 'T', '1'};

  static absl::StatusOr<LogitsFile> Create(const std::string& path, int vocab) {
    LogitsFile f;
    f.path_ = path;
    f.vocab_ = vocab;
    f.fp_ = std::fopen(path.c_str(), "wb");
    if (f.fp_ == nullptr) return absl::PermissionDeniedError(absl::StrCat(path, ": cannot create"));
    std::fwrite(kMagic, 1, 8, f.fp_);
    std::fwrite(&vocab, 4, 1, f.fp_);
    return f;
  }
  static absl::StatusOr<LogitsFile> Open(const std::string& path, int vocab) {
    LogitsFile f;
    f.path_ = path;
    f.vocab_ = vocab;
    f.fp_ = std::fopen(path.c_str(), "rb");
    if (f.fp_ == nullptr) return absl::NotFoundError(absl::StrCat(path, ": cannot open"));
    char magic[8];
    int v = 0;
    if (std::fread(magic, 1, 8, f.fp_) != 8 || std::memcmp(magic, kMagic, 8) != 0 || std::fread(&v, 4, 1, f.fp_) != 1)
      return absl::InvalidArgumentError(absl::StrCat(path, ": not a nibble logits file"));
    if (v != vocab)
      return absl::InvalidArgumentError(absl::StrCat(path, ": saved with vocabulary ", v, ", model has ", vocab));
    return f;
  }
  LogitsFile() = default;
  LogitsFile(LogitsFile&& o) noexcept { *this = std::move(o); }
  LogitsFile& operator=(LogitsFile&& o) noexcept {
    std::swap(fp_, o.fp_);
    path_ = o.path_;
    vocab_ = o.vocab_;
    return *this;
  }
  ~LogitsFile() {
    if (fp_) std::fclose(fp_);
  }

  absl::Status Write(const std::vector<int32_t>& ids, size_t first, const float* rows) {
    const uint32_t n = static_cast<uint32_t>(ids.size()), f = static_cast<uint32_t>(first);
    std::fwrite(&n, 4, 1, fp_);
    std::fwrite(&f, 4, 1, fp_);
    std::fwrite(ids.data(), 4, n, fp_);
    const size_t count = (ids.size() - 1 - first) * size_t(vocab_);
    if (std::fwrite(rows, 4, count, fp_) != count) return absl::DataLossError(absl::StrCat(path_, ": write failed"));
    return absl::OkStatus();
  }
  // Reads the next unit; it must be for the same ids and first position.
  absl::Status Read(const std::vector<int32_t>& ids, size_t first, std::vector<float>* rows) {
    uint32_t n = 0, f = 0;
    if (std::fread(&n, 4, 1, fp_) != 1 || std::fread(&f, 4, 1, fp_) != 1)
      return absl::OutOfRangeError(absl::StrCat(path_, ": has fewer units than this run scores"));
    std::vector<int32_t> saved(n);
    if (std::fread(saved.data(), 4, n, fp_) != n || saved != ids || f != first)
      return absl::InvalidArgumentError(
          absl::StrCat(path_, ": saved tokens differ from this run's (different text, -c, or tokenizer)"));
    rows->resize((ids.size() - 1 - first) * size_t(vocab_));
    if (std::fread(rows->data(), 4, rows->size(), fp_) != rows->size())
      return absl::DataLossError(absl::StrCat(path_, ": truncated"));
    return absl::OkStatus();
  }

 private:
  std::FILE* fp_ = nullptr;
  std::string path_;
  int vocab_ = 0;
};

// kv_dtype: the scored model's KV-cache type (--kv-dtype); the reference model always uses fp32.
absl::Status Score(nibble::LlamaModel& model, nibble::KvDtype kv_dtype, nibble::LlamaModel* ref, LogitsFile* save,
                   LogitsFile* base,
                   const std::vector<int32_t>& ids, size_t first, std::vector<float>* logits,
                   std::vector<float>* ref_logits, Totals* t) {
  const int vocab = model.config().vocab_size;
  auto cache = model.NewKVCache(static_cast<int>(ids.size()), kv_dtype);
  logits->resize(ids.size() * vocab);
  if (auto s = model.Forward(ids, 0, cache.get(), *logits, /*all_logits=*/true); !s.ok()) return s;
  if (save != nullptr) {
    if (auto s = save->Write(ids, first, logits->data() + first * vocab); !s.ok()) return s;
  }
  // ref_logits rows are indexed from `first` (row j - first).
  if (ref != nullptr) {
    auto rcache = ref->NewKVCache(static_cast<int>(ids.size()));
    ref_logits->resize(ids.size() * vocab);
    if (auto s = ref->Forward(ids, 0, rcache.get(), *ref_logits, true); !s.ok()) return s;
    ref_logits->erase(ref_logits->begin(), ref_logits->begin() + first * vocab);
  } else if (base != nullptr) {
    if (auto s = base->Read(ids, first, ref_logits); !s.ok()) return s;
  }
  const bool kld = ref != nullptr || base != nullptr;
  std::vector<double> lp, lq;
  double unit = 0;
  for (size_t j = first; j + 1 < ids.size(); ++j) {
    const float* row = logits->data() + j * vocab;
    LogSoftmax(row, vocab, &lq);
    unit -= lq[ids[j + 1]];
    if (kld) {
      const float* rrow = ref_logits->data() + (j - first) * vocab;
      LogSoftmax(rrow, vocab, &lp);
      double kl = 0;
      for (int i = 0; i < vocab; ++i) kl += std::exp(lp[i]) * (lp[i] - lq[i]);
      t->kld += kl;
      t->top1_same += Argmax(row, vocab) == Argmax(rrow, vocab);
    }
  }
  const int64_t n = static_cast<int64_t>(ids.size() - 1 - first);
  t->nll += unit;
  t->scored += n;
  t->unit_nll.push_back(unit / double(n));
  return absl::OkStatus();
}

int Fail(const absl::Status& s) {
  fprintf(stderr, "error: %s\n", std::string(s.message()).c_str());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"nibble-perplexity: perplexity / KLD of a model on a text file (llama-perplexity compatible)"};
  std::string model_path, tokenizer_path, text_path, doc_sep, ref_path, save_logits, kld_base;
  int ctx = 512, chunks = -1, max_docs = -1, threads = 0;
  bool json = false;
  app.add_option("-m,--model", model_path, "model file (nibble, GGUF, llama2.c .bin, HF directory)")->required();
  app.add_option("--tokenizer", tokenizer_path, "tokenizer file (llama2.c tok*.bin or SentencePiece .model)");
  app.add_option("-f,--file", text_path, "text file to score")->required();
  app.add_option("-c,--ctx-size", ctx, "context (chunk) size in tokens")->check(CLI::Range(8, 1 << 20));
  app.add_option("--chunks", chunks, "score at most N chunks (default: all)");
  app.add_option("--doc-separator", doc_sep, "document mode: split the text on STR and score each document");
  app.add_option("--max-docs", max_docs, "document mode: score at most N documents");
  app.add_option("--ref-model", ref_path, "reference model for KL divergence and top-1 agreement");
  app.add_option("--save-logits", save_logits, "write this run's scored logits (a KLD base for later runs)");
  app.add_option("--kld-base", kld_base, "KL divergence against logits saved with --save-logits");
  app.add_option("-t,--threads", threads, "CPU threads (default: all cores)");
  app.add_flag("--json", json, "print one JSON object with ppl, mean_nll, tokens (and kld, top1)");
  std::string kv_dtype_name = "f32";
  app.add_option("--kv-dtype", kv_dtype_name, "KV-cache element type of the scored model: f32 or f16")
      ->check(CLI::IsMember({"f32", "f16"}))
      ->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  const nibble::KvDtype kv_dtype = kv_dtype_name == "f16" ? nibble::KvDtype::kF16 : nibble::KvDtype::kF32;

  auto text = nibble::io::ReadFileToString(text_path);
  if (!text.ok()) return Fail(text.status());
  nibble::LoadOptions opts;
  opts.tokenizer_path = tokenizer_path;
  auto engine = nibble::OpenEngine(model_path, opts, threads);
  if (!engine.ok()) return Fail(engine.status());
  nibble::LlamaModel& model = *engine->model;
  const nibble::Tokenizer& tok = *engine->tokenizer;
  const int vocab = model.config().vocab_size;
  std::optional<nibble::Engine> ref_engine;
  if (!ref_path.empty()) {
    auto r = nibble::OpenEngine(ref_path, opts, threads);
    if (!r.ok()) return Fail(r.status());
    if (r->model->config().vocab_size != vocab) {
      return Fail(absl::InvalidArgumentError(absl::StrCat(ref_path, ": reference vocabulary ",
                                                          r->model->config().vocab_size, " != model's ", vocab)));
    }
    ref_engine = *std::move(r);
  }
  nibble::LlamaModel* ref = ref_engine ? ref_engine->model.get() : nullptr;
  std::optional<LogitsFile> save, base;
  if (!save_logits.empty()) {
    auto f = LogitsFile::Create(save_logits, vocab);
    if (!f.ok()) return Fail(f.status());
    save = *std::move(f);
  }
  if (!kld_base.empty()) {
    if (ref != nullptr) return Fail(absl::InvalidArgumentError("use either --ref-model or --kld-base"));
    auto f = LogitsFile::Open(kld_base, vocab);
    if (!f.ok()) return Fail(f.status());
    base = *std::move(f);
  }
  LogitsFile* save_ptr = save ? &*save : nullptr;
  LogitsFile* base_ptr = base ? &*base : nullptr;
  const bool has_kld = ref != nullptr || base_ptr != nullptr;
  const bool add_bos = tok.ShouldAddBos();
  fprintf(stderr, "perplexity: model %s (%d layers, dim %d, vocab %d), backend %s, %d threads%s\n",
          model_path.c_str(), model.config().n_layers, model.config().dim, vocab, model.backend().name().c_str(),
          model.backend().n_threads(), ref ? (", reference " + ref_path).c_str() : "");

  const auto t0 = std::chrono::steady_clock::now();
  Totals tot;
  std::vector<float> logits, ref_logits;
  if (doc_sep.empty()) {
    auto tokens = tok.Encode(*text, {.add_bos = add_bos});
    if (!tokens.ok()) return Fail(tokens.status());
    const int64_t available = static_cast<int64_t>(tokens->size()) / ctx;
    if (available < 1) {
      return Fail(absl::InvalidArgumentError(absl::StrCat(text_path, " has ", tokens->size(),
                                                          " tokens, need at least ", ctx, " (one chunk of -c ", ctx,
                                                          ")")));
    }
    if (ctx > model.config().max_seq_len) {
      fprintf(stderr, "warning: -c %d exceeds the model's trained context %d\n", ctx, model.config().max_seq_len);
    }
    const int64_t n_chunks = chunks > 0 ? std::min<int64_t>(chunks, available) : available;
    fprintf(stderr, "perplexity: %zu tokens, %lld chunks of %d\n", tokens->size(), (long long)n_chunks, ctx);
    for (int64_t c = 0; c < n_chunks; ++c) {
      std::vector<int32_t> batch(tokens->begin() + c * ctx, tokens->begin() + (c + 1) * ctx);
      if (add_bos) batch[0] = tok.bos_id();
      // llama-perplexity scores targets batch[ctx/2 + 1 ..] against the original tokens; replacing
      // batch[0] by BOS never touches a target since ctx/2 >= 1.
      if (auto s = Score(model, kv_dtype, ref, save_ptr, base_ptr, batch, ctx / 2, &logits, &ref_logits, &tot); !s.ok()) return Fail(s);
      fprintf(stderr, "[%lld]%.4f ", (long long)(c + 1), std::exp(tot.nll / tot.scored));
      fflush(stderr);
    }
    fprintf(stderr, "\n");
  } else {
    const int max_len = model.config().max_seq_len;
    int docs = 0;
    for (absl::string_view doc : absl::StrSplit(*text, doc_sep)) {
      doc = absl::StripAsciiWhitespace(doc);
      if (doc.empty()) continue;
      if (max_docs > 0 && docs >= max_docs) break;
      auto t = tok.Encode(std::string_view(doc.data(), doc.size()), {.add_bos = true});
      if (!t.ok()) return Fail(t.status());
      std::vector<int32_t> ids = *std::move(t);
      if (ids.empty() || ids[0] != tok.bos_id()) ids.insert(ids.begin(), tok.bos_id());
      if (static_cast<int>(ids.size()) > max_len) ids.resize(max_len);
      if (ids.size() < 2) continue;
      if (auto s = Score(model, kv_dtype, ref, save_ptr, base_ptr, ids, 0, &logits, &ref_logits, &tot); !s.ok()) return Fail(s);
      ++docs;
      if (docs % 50 == 0) fprintf(stderr, "[%d docs] ppl %.4f\n", docs, std::exp(tot.nll / tot.scored));
    }
    if (docs == 0) return Fail(absl::InvalidArgumentError(absl::StrCat(text_path, ": no documents with at least 2 tokens")));
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const double mean_nll = tot.nll / double(tot.scored);
  const double ppl = std::exp(mean_nll);
  if (json) {
    nlohmann::json j = {{"model", model_path},         {"file", text_path},
                        {"mode", doc_sep.empty() ? "chunks" : "documents"},
                        {"ctx", ctx},                  {"ppl", ppl},
                        {"mean_nll", mean_nll},        {"tokens", tot.scored},
                        {"units", tot.unit_nll.size()}, {"unit_mean_nll", tot.unit_nll},
                        {"seconds", secs},             {"threads", model.backend().n_threads()}};
    if (has_kld) {
      j["ref_model"] = ref != nullptr ? ref_path : kld_base;
      j["kld"] = tot.kld / double(tot.scored);
      j["top1"] = double(tot.top1_same) / double(tot.scored);
    }
    printf("%s\n", j.dump().c_str());
  } else {
    printf("Final estimate: PPL = %.4f (mean NLL %.6f over %lld tokens, %.1f s)\n", ppl, mean_nll,
           (long long)tot.scored, secs);
    if (has_kld) {
      printf("KL divergence vs %s: %.6f (top-1 agreement %.2f%%)\n", (ref ? ref_path : kld_base).c_str(), tot.kld / double(tot.scored),
             100.0 * double(tot.top1_same) / double(tot.scored));
    }
  }
  return 0;
}
