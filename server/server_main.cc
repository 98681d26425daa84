// nibble-server: OpenAI-compatible HTTP and nibble.v1 gRPC over the
// continuous-batching scheduler. See server/README.md.
//
// Lifecycle: load the model, start the scheduler, bind HTTP then gRPC (port 0
// = any free port; the bound addresses are printed to stderr as
// "http listening on HOST:PORT" / "grpc listening on HOST:PORT"), then wait
// for SIGTERM/SIGINT. On the signal: stop admitting (HTTP 503, gRPC
// UNAVAILABLE, /health 503, gRPC health NOT_SERVING), let requests in flight
// finish for up to --grace seconds, cancel the rest, stop both servers, exit 0.
#include <pthread.h>
#include <signal.h>

#include <chrono>
#include <cstdio>
#include <future>
#include <string>

#include "CLI/CLI.hpp"
#include "absl/strings/str_cat.h"
#include "engine/runtime/engine.h"
#include "engine/runtime/scheduler.h"
#include "server/grpc_service.h"
#include "server/http_server.h"
#include "server/server_core.h"

namespace {

int Fail(const absl::Status& s) {
  fprintf(stderr, "nibble-server: error: %s\n", std::string(s.message()).c_str());
  return 1;
}

std::string Basename(const std::string& path) {
  std::string p = path;
  while (!p.empty() && p.back() == '/') p.pop_back();
  const size_t slash = p.rfind('/');
  std::string base = slash == std::string::npos ? p : p.substr(slash + 1);
  const size_t dot = base.rfind('.');
  if (dot != std::string::npos && dot > 0) base = base.substr(0, dot);
  return base;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"nibble-server: OpenAI-compatible HTTP + gRPC inference server"};
  std::string model_path, tokenizer_path, host = "127.0.0.1", api_key, model_id;
  int port = 8080, grpc_port = 50051, threads = 0, max_batch = 64, max_queue = 256, http_threads = 32;
  int64_t kv_blocks = 0, kv_cache_mib = 0;
  std::string kv_dtype_name = "f32";
  int max_tokens_limit = 4096;
  size_t max_body_bytes = 1 << 20;
  double grace_s = 10.0;
  app.add_option("-m,--model", model_path, "model file (GGUF, llama2.c .bin, HF directory)")->required();
  app.add_option("--tokenizer", tokenizer_path, "tokenizer file (llama2.c tok*.bin)");
  app.add_option("--host", host, "address to bind (default loopback)")->capture_default_str();
  app.add_option("--port", port, "HTTP port (0 = any free port; -1 = no HTTP)")->capture_default_str();
  app.add_option("--grpc-port", grpc_port, "gRPC port (0 = any free port; -1 = no gRPC)")->capture_default_str();
  app.add_option("--api-key", api_key, "require 'Authorization: Bearer KEY' (HTTP) / 'authorization' metadata (gRPC)");
  app.add_option("--max-batch", max_batch, "sequences batched together")->check(CLI::Range(1, 4096))->capture_default_str();
  app.add_option("--kv-blocks", kv_blocks, "KV-cache blocks of 16 tokens (0 = 4 contexts' worth)")
      ->check(CLI::Range(int64_t{0}, int64_t{1} << 24));
  app.add_option("--kv-dtype", kv_dtype_name,
                 "KV-cache element type: f32; f16 (K/V rounded to IEEE fp16: twice the tokens per byte); or "
                 "int8 (K/V quantized per token and head with one fp32 scale; ~3.7x the tokens per byte for "
                 "head_dim 64, slightly lower accuracy)")
      ->check(CLI::IsMember({"f32", "f16", "int8"}))
      ->capture_default_str();
  app.add_option("--kv-cache-mib", kv_cache_mib,
                 "KV-cache memory budget in MiB; the block count follows from --kv-dtype (overrides --kv-blocks)")
      ->check(CLI::Range(int64_t{0}, int64_t{1} << 24));
  app.add_option("--max-queue", max_queue, "waiting requests beyond which new ones get 429 / RESOURCE_EXHAUSTED")
      ->check(CLI::Range(0, 1 << 20))
      ->capture_default_str();
  app.add_option("--max-tokens-limit", max_tokens_limit, "largest max_tokens a request may ask for")
      ->check(CLI::Range(1, 1 << 24))
      ->capture_default_str();
  app.add_option("--max-body-bytes", max_body_bytes, "largest HTTP request body (413 beyond)")->capture_default_str();
  app.add_option("--grace", grace_s, "seconds to let requests finish after SIGTERM")->capture_default_str();
  app.add_option("--http-threads", http_threads, "HTTP worker threads (concurrent connections)")
      ->check(CLI::Range(1, 4096))
      ->capture_default_str();
  app.add_option("-t,--threads", threads, "CPU threads for the model (default: all cores)");
  app.add_option("--model-id", model_id, "model name clients use (default: the model file's base name)");
  CLI11_PARSE(app, argc, argv);

  // Block the shutdown signals in every thread; main waits for them with sigwait.
  sigset_t sigs;
  sigemptyset(&sigs);
  sigaddset(&sigs, SIGINT);
  sigaddset(&sigs, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &sigs, nullptr);
  signal(SIGPIPE, SIG_IGN);

  nibble::LoadOptions lo;
  lo.tokenizer_path = tokenizer_path;
  auto engine = nibble::OpenEngine(model_path, lo, threads);
  if (!engine.ok()) return Fail(engine.status());
  const nibble::ModelConfig& cfg = engine->model->config();

  nibble::SchedulerOptions so;
  so.max_running = max_batch;
  so.max_batch_tokens = std::max(so.max_batch_tokens, max_batch);
  so.max_queue = max_queue;
  if (kv_blocks > 0) so.kv_cache_tokens = kv_blocks * so.block_size;
  if (kv_cache_mib > 0) so.kv_cache_bytes = kv_cache_mib << 20;
  auto kv_dtype = nibble::ParseKvDtype(kv_dtype_name);
  if (!kv_dtype.ok()) return Fail(kv_dtype.status());
  so.kv_dtype = *kv_dtype;
  auto sched = nibble::Scheduler::Create(engine->model.get(), engine->tokenizer.get(), so);
  if (!sched.ok()) return Fail(sched.status());

  nibble::server::ServerOptions opts;
  opts.model_id = model_id.empty() ? Basename(model_path) : model_id;
  opts.api_key = api_key;
  opts.max_tokens_limit = max_tokens_limit;
  opts.max_body_bytes = max_body_bytes;
  opts.grace_s = grace_s;
  nibble::server::ServerCore core(engine->model.get(), engine->tokenizer.get(), sched->get(), opts);
  const nibble::SchedulerStats st = (*sched)->GetStats();
  fprintf(stderr,
          "nibble-server: model '%s' (%s): %d layers, dim %d, vocab %d, ctx %d; %lld KV blocks of %d; "
          "KV %s, %.1f MiB; max batch %d, max queue %d\n",
          opts.model_id.c_str(), model_path.c_str(), cfg.n_layers, cfg.dim, cfg.vocab_size, cfg.max_seq_len,
          static_cast<long long>(st.kv_blocks_total), st.block_size, nibble::KvDtypeName(st.kv_dtype),
          st.kv_bytes_total / 1048576.0, max_batch, max_queue);

  nibble::server::HttpServer http(&core, http_threads);
  nibble::server::GrpcServer grpc(&core);
  if (port >= 0) {
    auto p = http.Start(host, port);
    if (!p.ok()) return Fail(p.status());
    fprintf(stderr, "http listening on %s:%d\n", host.c_str(), *p);
  }
  if (grpc_port >= 0) {
    auto p = grpc.Start(host, grpc_port);
    if (!p.ok()) return Fail(p.status());
    fprintf(stderr, "grpc listening on %s:%d\n", host.c_str(), *p);
  }
  fflush(stderr);

  int sig = 0;
  sigwait(&sigs, &sig);
  fprintf(stderr, "nibble-server: signal %d: draining (grace %.1f s)\n", sig, grace_s);
  core.StartDraining();
  grpc.SetNotServing();
  auto drained = std::async(std::launch::async, [&] { (*sched)->Drain(); });
  if (drained.wait_for(std::chrono::duration<double>(grace_s)) != std::future_status::ready) {
    fprintf(stderr, "nibble-server: grace period over; cancelling requests in flight\n");
    (*sched)->Shutdown();
  }
  drained.wait();
  // Every request has delivered its final event; let the transports flush them.
  grpc.Stop(std::chrono::milliseconds(2000));
  http.Stop();
  (*sched)->Shutdown();
  fprintf(stderr, "nibble-server: stopped\n");
  return 0;
}
