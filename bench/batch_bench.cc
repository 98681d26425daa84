// nibble-batch-bench: aggregate decode throughput of the serving scheduler
// with 1, 4, 8, 16 (--streams) concurrent greedy streams.
//
// For each stream count N: N identical-length requests (the prompt, each with
// a distinct last token so the prefix cache cannot merge them completely) are
// submitted at once with ignore_eos and -n tokens each. Decode throughput is
// measured from the moment every stream has its first token (prefill done)
// to the last token: tokens emitted in that window / its length.
//
// Long-context decode: --context N pads the prompt (by repeating it) to N
// tokens, so every decode step attends over >= N positions; --kv-dtype int8
// runs the same with the int8 KV cache (compare f32 vs int8 attention cost).
// Besides wall-clock throughput, the process CPU time per generated token is
// printed (less sensitive to other jobs on a shared machine).
#include <algorithm>
#include <chrono>
#include <ctime>
#include <condition_variable>
#include <cstdio>
#include <mutex>
#include <sstream>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "engine/runtime/engine.h"
#include "engine/runtime/scheduler.h"

int main(int argc, char** argv) {
  CLI::App app{"nibble-batch-bench: scheduler decode throughput vs. concurrent streams"};
  std::string model_path, tokenizer_path, prompt = "Once upon a time, in a small village by the sea,";
  std::string streams_arg = "1,4,8,16";
  int threads = 0, n_predict = 64, context = 0;
  std::string kv_dtype_name = "f32";
  bool show = false;
  app.add_option("-m,--model", model_path, "model file")->required();
  app.add_option("--tokenizer", tokenizer_path, "tokenizer file (llama2.c models)");
  app.add_option("-t,--threads", threads, "CPU threads (default: all cores)");
  app.add_option("-n,--n-predict", n_predict, "tokens per stream")->check(CLI::Range(2, 4096));
  app.add_option("-p,--prompt", prompt, "prompt");
  app.add_option("--streams", streams_arg, "comma-separated stream counts");
  app.add_option("--context", context, "pad the prompt to this many tokens (long-context decode; 0 = as given)")
      ->check(CLI::Range(0, 1 << 20));
  app.add_option("--kv-dtype", kv_dtype_name, "KV-cache element type: f32, f16 or int8")
      ->check(CLI::IsMember({"f32", "f16", "int8"}))
      ->capture_default_str();
  app.add_flag("--show", show, "print stream 0's text for each stream count (stderr), to compare with nibble-generate");
  CLI11_PARSE(app, argc, argv);

  nibble::LoadOptions lo;
  lo.tokenizer_path = tokenizer_path;
  auto engine = nibble::OpenEngine(model_path, lo, threads);
  if (!engine.ok()) {
    fprintf(stderr, "error: %s\n", std::string(engine.status().message()).c_str());
    return 1;
  }
  nibble::LlamaModel& model = *engine->model;
  const nibble::Tokenizer& tok = *engine->tokenizer;
  auto ids = tok.Encode(prompt, {.add_bos = tok.ShouldAddBos()});
  if (!ids.ok() || ids->empty()) {
    fprintf(stderr, "error: cannot tokenize the prompt\n");
    return 1;
  }
  if (context > static_cast<int>(ids->size())) {
    const std::vector<int32_t> base_ids = *ids;
    while (static_cast<int>(ids->size()) < context) ids->push_back(base_ids[ids->size() % base_ids.size()]);
  }
  if (static_cast<int64_t>(ids->size()) + n_predict > model.config().max_seq_len) {
    fprintf(stderr, "error: prompt %zu + %d tokens exceed the context %d\n", ids->size(), n_predict,
            model.config().max_seq_len);
    return 1;
  }
  auto kv_dtype = nibble::ParseKvDtype(kv_dtype_name);
  if (!kv_dtype.ok()) {
    fprintf(stderr, "error: %s\n", std::string(kv_dtype.status().message()).c_str());
    return 1;
  }
  std::vector<int> counts;
  std::stringstream ss(streams_arg);
  for (std::string item; std::getline(ss, item, ',');) counts.push_back(std::stoi(item));
  fprintf(stderr, "batch-bench: %s, backend %s, %d threads, prompt %zu tokens, %d tokens per stream, KV %s\n",
          model_path.c_str(), model.backend().name().c_str(), model.backend().n_threads(), ids->size(), n_predict,
          nibble::KvDtypeName(*kv_dtype));
  printf("%8s %14s %14s %12s %10s %14s\n", "streams", "decode tok/s", "per stream", "vs 1 stream", "ttft ms",
         "cpu ms/token");
  double base = 0.0;
  using Clock = std::chrono::steady_clock;
  for (int n : counts) {
    nibble::SchedulerOptions so;
    so.max_running = std::max(n, 1);
    so.kv_cache_tokens = int64_t{n} * (static_cast<int64_t>(ids->size()) + n_predict + 16);
    so.kv_dtype = *kv_dtype;
    so.max_batch_tokens = std::max(so.max_batch_tokens, so.max_running);
    auto sched = nibble::Scheduler::Create(&model, &tok, so);
    if (!sched.ok()) {
      fprintf(stderr, "error: %s\n", std::string(sched.status().message()).c_str());
      return 1;
    }
    std::mutex mu;
    std::condition_variable cv;
    std::vector<Clock::time_point> first(n), events;
    std::vector<bool> has_first(n, false);
    int finished = 0;
    std::string text0;
    double ttft_sum = 0.0;
    int n_first = 0;
    double cpu_start = 0.0, cpu_end = 0.0;  // process CPU seconds: all streams decoding -> last token
    auto cpu_now = [] {
      timespec ts{};
      clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
      return double(ts.tv_sec) + 1e-9 * double(ts.tv_nsec);
    };
    for (int i = 0; i < n; ++i) {
      nibble::GenerationRequest r;
      r.prompt = *ids;
      r.prompt.back() = (r.prompt.back() + i) % model.config().vocab_size;
      r.max_tokens = n_predict;
      r.ignore_eos = true;
      r.sampling.temperature = 0.0f;
      auto id = (*sched)->Submit(r, [&, i](const nibble::GenerationEvent& e) {
        std::lock_guard<std::mutex> l(mu);
        const auto now = Clock::now();
        if (i == 0) text0 += e.text;
        if (e.final) {
          ++finished;
          cv.notify_all();
          return;
        }
        if (!has_first[i]) {
          has_first[i] = true;
          first[i] = now;
          ttft_sum += e.time_to_first_token_s;
          if (++n_first == n) cpu_start = cpu_now();
        }
        events.push_back(now);
        cpu_end = cpu_now();
      });
      if (!id.ok()) {
        fprintf(stderr, "error: %s\n", std::string(id.status().message()).c_str());
        return 1;
      }
    }
    {
      std::unique_lock<std::mutex> l(mu);
      cv.wait(l, [&] { return finished == n; });
    }
    const Clock::time_point start = *std::max_element(first.begin(), first.end());
    const Clock::time_point end = *std::max_element(events.begin(), events.end());
    const int64_t in_window = std::count_if(events.begin(), events.end(), [&](auto t) { return t > start; });
    const double secs = std::chrono::duration<double>(end - start).count();
    const double rate = secs > 0 ? in_window / secs : 0.0;
    if (base == 0.0) base = rate;
    const double cpu_ms = in_window > 0 ? 1e3 * (cpu_end - cpu_start) / double(in_window) : 0.0;
    printf("%8d %14.1f %14.1f %11.2fx %10.1f %14.2f\n", n, rate, rate / n, base > 0 ? rate / base : 0.0,
           1e3 * ttft_sum / n, cpu_ms);
    fflush(stdout);
    if (show) fprintf(stderr, "streams %d, stream 0: %s%s\n", n, prompt.c_str(), text0.c_str());
  }
  return 0;
}
