// nibble-bench: prefill and decode throughput of a model, like llama-bench.
//
//   nibble-bench -m MODEL [-p 512] [-n 128] [-d DEPTH] [-t THREADS] [-r REPS] [--kv-dtype f32|f16] [--json]
//
// pp<P>: one Forward over P tokens from position 0 (a fresh context), the
// prefill path (batched matmuls). tg<N>: N single-token Forward calls from
// position 0, the decode path (GEMV). With -d D (llama-bench's depth), both
// start at position D of a context whose first D positions were filled once
// by an untimed prefill: attention then reads D + i cached positions. Token ids are fixed pseudo-random ids
// (seeded), as llama-bench does. Each test runs once untimed (warm-up: page
// faults, caches), then REPS timed repetitions; the table shows mean ±
// sample standard deviation of tokens/s.
//
// Bandwidth: "weight bytes per token" is what one decode step must stream:
// every linear matrix in its stored format (packed bytes, or 4 bytes per fp32
// weight), the output head (the tied embedding matrix when tied), and the
// norms; the embedding lookup reads one row and is ignored. The achieved GB/s
// is that times decode tokens/s. The bound is measured on this machine by a
// multi-threaded read of a buffer of the same size as the weights (so it is
// the DRAM bound for large models and the cache bound when the weights fit in
// L3); "% of bound" = achieved / measured.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "CLI/CLI.hpp"
#include "bench/membw.h"
#include "engine/core/quant_tensor.h"
#include "engine/runtime/engine.h"
#include "nlohmann/json.hpp"

namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double>(b - a).count(); }

double TensorBytes(const nibble::HostTensor& t) {
  if (t.quant != nullptr) {
    double bytes = 0;
    for (const auto& s : t.quant->segments) bytes += static_cast<double>(s.data.size());
    return bytes + t.quant->sidecar.Bits(t.quant->rows) / 8.0;
  }
  return (t.is_f16() || t.is_bf16() ? 2.0 : 4.0) * static_cast<double>(t.numel());
}

// Bytes one decode step streams (see the file comment).
double DecodeBytesPerToken(const nibble::LoadedModel& m) {
  const nibble::ModelWeights& w = m.weights;
  double bytes = TensorBytes(m.config.tied_embeddings ? w.tok_embeddings : w.output) + TensorBytes(w.final_norm);
  for (const nibble::LayerWeights& l : w.layers) {
    for (const nibble::HostTensor* t : {&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down, &l.attn_norm,
                                        &l.ffn_norm})
      bytes += TensorBytes(*t);
  }
  return bytes;
}

struct Stat {
  double mean = 0, sd = 0;
  std::vector<double> samples;
};

Stat Summarize(std::vector<double> v) {
  Stat s;
  s.samples = v;
  if (v.empty()) return s;
  s.mean = std::accumulate(v.begin(), v.end(), 0.0) / v.size();
  if (v.size() > 1) {
    double ss = 0;
    for (double x : v) ss += (x - s.mean) * (x - s.mean);
    s.sd = std::sqrt(ss / (v.size() - 1));
  }
  return s;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"nibble-bench: prefill / decode throughput (llama-bench style)"};
  std::string model_path, tokenizer_path;
  int n_prompt = 512, n_gen = 128, depth = 0, threads = 0, reps = 3;
  bool json = false, no_bw = false;
  std::string kv_dtype_name = "f32";
  app.add_option("-m,--model", model_path, "model file (nibble .nbl, GGUF, llama2.c .bin, HF directory)")->required();
  app.add_option("--tokenizer", tokenizer_path, "tokenizer file (llama2.c models)");
  app.add_option("-p,--n-prompt", n_prompt, "prefill tokens (0: skip)")->capture_default_str();
  app.add_option("-n,--n-gen", n_gen, "decode tokens (0: skip)")->capture_default_str();
  app.add_option("-d,--depth", depth, "context depth: pp and tg start at this position (filled once, untimed)")
      ->capture_default_str();
  app.add_option("-t,--threads", threads, "CPU threads (default: all cores)");
  app.add_option("-r,--repetitions", reps, "timed repetitions per test")->capture_default_str();
  app.add_option("--kv-dtype", kv_dtype_name, "KV-cache element type: f32 or f16 (llama-bench's -ctk/-ctv f16)")
      ->check(CLI::IsMember({"f32", "f16"}))
      ->capture_default_str();
  app.add_flag("--json", json, "print one JSON object on stdout instead of the table");
  app.add_flag("--no-bandwidth", no_bw, "skip the memory bandwidth measurement");
  CLI11_PARSE(app, argc, argv);
  if (n_prompt < 0 || n_gen < 0 || depth < 0 || reps < 1) {
    std::fprintf(stderr, "error: -p, -n and -d must be >= 0 and -r >= 1\n");
    return 2;
  }
  if (threads <= 0) threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  nibble::LoadOptions lo;
  lo.tokenizer_path = tokenizer_path;
  auto engine = nibble::OpenEngine(model_path, lo, threads);
  if (!engine.ok()) {
    std::fprintf(stderr, "error: %s\n", std::string(engine.status().message()).c_str());
    return 1;
  }
  nibble::LlamaModel& model = *engine->model;
  const nibble::ModelConfig& c = model.config();
  const int ctx = depth + std::max(n_prompt, n_gen);
  if (c.max_seq_len > 0 && ctx > c.max_seq_len) {
    std::fprintf(stderr, "error: -d + max(-p, -n) = %d exceeds the model's context length %d\n", ctx, c.max_seq_len);
    return 2;
  }
  const nibble::KvDtype kv_dtype = kv_dtype_name == "f16" ? nibble::KvDtype::kF16 : nibble::KvDtype::kF32;
  auto cache = model.NewKVCache(std::max(ctx, 1), kv_dtype);
  std::mt19937 rng(1234);
  std::uniform_int_distribution<int32_t> tok(0, c.vocab_size - 1);
  std::vector<int32_t> tokens(static_cast<size_t>(std::max(ctx, 1)));
  for (int32_t& t : tokens) t = tok(rng);
  std::vector<float> logits(static_cast<size_t>(c.vocab_size));

  auto run_pp = [&]() -> double {
    const auto t0 = Clock::now();
    auto s = model.Forward(std::span<const int32_t>(tokens.data() + depth, n_prompt), depth, cache.get(), logits);
    if (!s.ok()) {
      std::fprintf(stderr, "error: %s\n", std::string(s.message()).c_str());
      std::exit(1);
    }
    return n_prompt / Seconds(t0, Clock::now());
  };
  auto run_tg = [&]() -> double {
    const auto t0 = Clock::now();
    for (int i = 0; i < n_gen; ++i) {
      auto s = model.Forward(std::span<const int32_t>(&tokens[depth + i], 1), depth + i, cache.get(), logits);
      if (!s.ok()) {
        std::fprintf(stderr, "error: %s\n", std::string(s.message()).c_str());
        std::exit(1);
      }
    }
    return n_gen / Seconds(t0, Clock::now());
  };
  if (depth > 0) {
    auto s = model.Forward(std::span<const int32_t>(tokens.data(), depth), 0, cache.get(), logits);
    if (!s.ok()) {
      std::fprintf(stderr, "error: %s\n", std::string(s.message()).c_str());
      return 1;
    }
  }
  Stat pp, tg;
  if (n_prompt > 0) {
    run_pp();
    std::vector<double> v;
    for (int r = 0; r < reps; ++r) v.push_back(run_pp());
    pp = Summarize(v);
  }
  if (n_gen > 0) {
    run_tg();
    std::vector<double> v;
    for (int r = 0; r < reps; ++r) v.push_back(run_tg());
    tg = Summarize(v);
  }
  const double bytes = DecodeBytesPerToken(model.loaded());
  // At least 4 MiB (the weights of a real model are larger than that anyway).
  const double bw =
      no_bw ? 0.0 : nibble::bench::MeasureReadBandwidth(std::max<size_t>(static_cast<size_t>(bytes), size_t{4} << 20), threads);
  const double achieved = tg.mean * bytes / 1e9;
  const std::string fmt_name =
      model.loaded().metadata.count("quant.format") ? model.loaded().metadata.at("quant.format") : "source";
  if (json) {
    nlohmann::json j;
    j["model"] = model_path;
    j["format"] = fmt_name;
    j["threads"] = threads;
    j["backend"] = model.backend().name();
    j["n_prompt"] = n_prompt;
    j["n_gen"] = n_gen;
    j["depth"] = depth;
    j["kv_dtype"] = kv_dtype_name;
    j["reps"] = reps;
    j["pp_tps"] = pp.mean;
    j["pp_tps_sd"] = pp.sd;
    j["pp_samples"] = pp.samples;
    j["tg_tps"] = tg.mean;
    j["tg_tps_sd"] = tg.sd;
    j["tg_samples"] = tg.samples;
    j["weight_bytes_per_token"] = bytes;
    j["tg_gbps"] = achieved;
    j["read_bw_gbps"] = bw;
    j["tg_pct_of_bw"] = bw > 0 ? 100.0 * achieved / bw : 0.0;
    std::printf("%s\n", j.dump().c_str());
    return 0;
  }
  std::printf("| model | format | backend | threads | test | t/s | weights MB/token | GB/s | %% of read bw |\n");
  std::printf("|---|---|---|---:|---|---:|---:|---:|---:|\n");
  const std::string at = depth > 0 ? " @ d" + std::to_string(depth) : "";
  if (n_prompt > 0)
    std::printf("| %s | %s | %s | %d | pp%d%s | %.2f ± %.2f | | | |\n", model_path.c_str(), fmt_name.c_str(),
                model.backend().name().c_str(), threads, n_prompt, at.c_str(), pp.mean, pp.sd);
  if (n_gen > 0)
    std::printf("| %s | %s | %s | %d | tg%d%s | %.2f ± %.2f | %.1f | %.2f | %.0f%% of %.1f |\n", model_path.c_str(),
                fmt_name.c_str(), model.backend().name().c_str(), threads, n_gen, at.c_str(), tg.mean, tg.sd,
                bytes / 1e6, achieved, bw > 0 ? 100.0 * achieved / bw : 0.0, bw);
  return 0;
}
