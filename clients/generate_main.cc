// nibble-generate: text generation from the command line (llama.cpp-style flags).
// stdout holds the prompt followed by the generated text and nothing else; logs
// and timings go to stderr.
#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "absl/strings/str_cat.h"
#include "engine/runtime/chat_template.h"
#include "engine/runtime/engine.h"
#include "engine/runtime/sampler.h"
#include "engine/runtime/stop_strings.h"

namespace {

int Fail(const absl::Status& s) {
  fprintf(stderr, "error: %s\n", std::string(s.message()).c_str());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"nibble-generate: generate text with a model"};
  std::string model_path, tokenizer_path, prompt, system_prompt;
  int n_predict = 128, threads = 0;
  bool chat = false, verbose_prompt = false;
  std::vector<std::string> stops;
  nibble::SamplingParams sp;
  int64_t seed = -1;
  app.add_option("-m,--model", model_path, "model file (GGUF, llama2.c .bin, HF directory)")->required();
  app.add_option("--tokenizer", tokenizer_path, "tokenizer file (llama2.c tok*.bin or SentencePiece .model)");
  app.add_option("-p,--prompt", prompt, "prompt (with --chat: the user message)");
  app.add_option("-n,--n-predict", n_predict, "number of tokens to generate")->check(CLI::Range(0, 1 << 24));
  app.add_option("--temp", sp.temperature, "temperature (0 = greedy)")->capture_default_str();
  app.add_option("--top-k", sp.top_k, "top-k (0 = off)")->capture_default_str();
  app.add_option("--top-p", sp.top_p, "top-p (1 = off)")->capture_default_str();
  app.add_option("--min-p", sp.min_p, "min-p (0 = off)")->capture_default_str();
  app.add_option("--repeat-penalty", sp.repeat_penalty, "repetition penalty (1 = off)")->capture_default_str();
  app.add_option("--repeat-last-n", sp.repeat_last_n, "tokens considered by the repetition penalty")
      ->capture_default_str();
  app.add_option("--frequency-penalty", sp.frequency_penalty, "OpenAI-style frequency penalty")->capture_default_str();
  app.add_option("--presence-penalty", sp.presence_penalty, "OpenAI-style presence penalty")->capture_default_str();
  app.add_option("-s,--seed", seed, "RNG seed (-1 = random)");
  app.add_option("-t,--threads", threads, "CPU threads (default: all cores)");
  app.add_option("--stop", stops, "stop string (repeatable); not printed");
  app.add_flag("--chat", chat, "wrap the prompt in the model's chat template");
  app.add_option("--system", system_prompt, "with --chat: system message");
  app.add_flag("--verbose-prompt", verbose_prompt, "log the prompt's token ids to stderr");
  std::string kv_dtype_name = "f32";
  app.add_option("--kv-dtype", kv_dtype_name, "KV-cache element type: f32 or f16 (half the memory)")
      ->check(CLI::IsMember({"f32", "f16"}))
      ->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  if (seed >= 0) sp.seed = static_cast<uint64_t>(seed);
  if (auto s = sp.Validate(); !s.ok()) return Fail(s);

  nibble::LoadOptions opts;
  opts.tokenizer_path = tokenizer_path;
  auto engine = nibble::OpenEngine(model_path, opts, threads);
  if (!engine.ok()) return Fail(engine.status());
  nibble::LlamaModel& model = *engine->model;
  const nibble::Tokenizer& tok = *engine->tokenizer;
  const nibble::ModelConfig& cfg = model.config();
  fprintf(stderr, "generate: %s: %d layers, dim %d, vocab %d, ctx %d; backend %s, %d threads\n",
          model_path.c_str(), cfg.n_layers, cfg.dim, cfg.vocab_size, cfg.max_seq_len, model.backend().name().c_str(),
          model.backend().n_threads());

  std::string text = prompt;
  bool parse_special = false;
  if (chat) {
    std::vector<nibble::ChatMessage> msgs;
    if (!system_prompt.empty()) msgs.push_back({"system", system_prompt});
    msgs.push_back({"user", prompt});
    std::string warning;
    auto rendered = nibble::ApplyChatTemplate(model.loaded().chat_template, msgs, true, &warning);
    if (!rendered.ok()) return Fail(rendered.status());
    if (!warning.empty()) fprintf(stderr, "warning: %s\n", warning.c_str());
    text = *rendered;
    parse_special = true;
  }
  auto ids_or = tok.Encode(text, {.add_bos = tok.ShouldAddBos(), .parse_special = parse_special});
  if (!ids_or.ok()) return Fail(ids_or.status());
  std::vector<int32_t> ids = *std::move(ids_or);
  if (ids.empty()) return Fail(absl::InvalidArgumentError("the prompt is empty and the model adds no BOS"));
  if (verbose_prompt) {
    fprintf(stderr, "prompt tokens (%zu):", ids.size());
    for (int32_t id : ids) fprintf(stderr, " %d", id);
    fprintf(stderr, "\n");
  }
  const int64_t limit = std::min<int64_t>(cfg.max_seq_len, static_cast<int64_t>(ids.size()) + n_predict);
  if (static_cast<int64_t>(ids.size()) > cfg.max_seq_len) {
    return Fail(absl::InvalidArgumentError(
        absl::StrCat("the prompt has ", ids.size(), " tokens; the model's context is ", cfg.max_seq_len)));
  }
  if (limit < static_cast<int64_t>(ids.size()) + n_predict) {
    fprintf(stderr, "warning: generation capped at the model's context of %d tokens\n", cfg.max_seq_len);
  }

  // stdout: the prompt, then the generated text (with --chat, separated by a newline).
  fputs(prompt.c_str(), stdout);
  if (chat) fputc('\n', stdout);
  fflush(stdout);

  auto cache = model.NewKVCache(static_cast<int>(limit),
                                kv_dtype_name == "f16" ? nibble::KvDtype::kF16 : nibble::KvDtype::kF32);
  std::vector<float> logits(cfg.vocab_size);
  nibble::Sampler sampler(sp, cfg.vocab_size);
  nibble::StreamingDetokenizer detok(tok);
  nibble::StopStringMatcher stop(stops);
  std::vector<int32_t> history = ids;

  const auto t0 = std::chrono::steady_clock::now();
  if (auto s = model.Forward(ids, 0, cache.get(), logits); !s.ok()) return Fail(s);
  const auto t1 = std::chrono::steady_clock::now();
  int generated = 0;
  bool stopped = false;
  while (generated < n_predict && static_cast<int64_t>(history.size()) < limit) {
    const int32_t next = sampler.Sample(logits, history);
    ++generated;
    if (tok.IsEndOfGeneration(next)) break;
    history.push_back(next);
    auto r = stop.Push(detok.Push(next));
    fputs(r.text.c_str(), stdout);
    fflush(stdout);
    if (r.stopped) {
      stopped = true;
      break;
    }
    if (generated == n_predict || static_cast<int64_t>(history.size()) >= limit) break;
    if (auto s = model.Forward({&history.back(), 1}, static_cast<int>(history.size()) - 1, cache.get(), logits);
        !s.ok()) {
      return Fail(s);
    }
  }
  if (!stopped) {
    auto r = stop.Push(detok.Flush());
    fputs(r.text.c_str(), stdout);
    if (!r.stopped) fputs(stop.Flush().c_str(), stdout);
  }
  fflush(stdout);
  const auto t2 = std::chrono::steady_clock::now();
  const double prefill_s = std::chrono::duration<double>(t1 - t0).count();
  const double decode_s = std::chrono::duration<double>(t2 - t1).count();
  fprintf(stderr, "\ngenerate: prompt %zu tokens in %.3f s (%.1f tok/s); generated %d tokens in %.3f s (%.1f tok/s)\n",
          ids.size(), prefill_s, ids.size() / std::max(prefill_s, 1e-9), generated, decode_s,
          generated / std::max(decode_s, 1e-9));
  return 0;
}
