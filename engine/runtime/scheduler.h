// Serving scheduler: continuous batching of many generation requests over one
// LlamaModel and one paged KV cache. The API the gRPC/HTTP servers build on.
//
// Goals: Submit() from any thread, a stream of per-token events per request
// (token id, UTF-8-safe text delta, logprobs, finish reason, usage, timing);
// one engine thread that runs steps in which every running sequence advances
// together (decodes: 1 token; prefills: chunks sharing a per-step token
// budget, so a long prompt never stalls running streams); new requests join
// between steps; admission control with a bounded waiting queue; Cancel(),
// per-request deadlines, Drain()/Shutdown(); prefix caching of full prompt
// blocks; preemption when the KV pool runs out; a stats snapshot for metrics.
// Greedy output is token-for-token what clients/generate_main.cc produces
// (same stopping rules), up to fp32 rounding differences of the batched matmul.
// Non-goals: tokenization and chat templates (the caller submits token ids),
// beam search / n > 1, speculative decoding, LoRA, multiple models, fairness
// beyond FCFS, priorities.
//
// Step, in order: (1) apply cancellations and expired deadlines (their blocks
// are freed before anything else runs); (2) admit waiting requests FCFS while
// the pool has blocks for their whole current token list (prefix-cache hits
// are reused, not recomputed); (3) give every decoding sequence one new slot,
// preempting if the pool is full (below); (4) fill the step's token budget:
// all decodes first, then prefill chunks, oldest request first; (5) one
// LlamaModel::ForwardBatched; (6) sample, detokenize, match stop strings and
// deliver events; finished sequences release their blocks.
//
// Preemption (recompute): when a decoding sequence needs a new block and none
// is available, the most recently admitted running sequence is preempted: its
// blocks are released and it goes back to the FRONT of the waiting queue with
// its prompt + generated tokens as the new "prompt". On re-admission those
// tokens are recomputed (mostly prefix-cache hits) and generation continues
// where it stopped; the client sees no gap in the event stream (only latency).
// Sampler, detokenizer and stop-string state are kept, so seeded output is
// unchanged by preemption.
//
// Stopping rules (as generate_main.cc): each step samples one token (history
// = prompt + generated tokens); an end-of-generation token finishes with kStop
// (it is counted in usage but not streamed, unless ignore_eos); a stop string
// finishes with kStop (its text and anything after are not streamed);
// max_tokens sampled tokens, or the context (max_seq_len) filling up, finish
// with kLength.
//
// Thread safety: every public method may be called from any thread, except
// that Drain(), Shutdown() and the destructor must not be called from an
// event callback (they wait for the engine thread). Callbacks run on the
// engine thread, never concurrently with each other, without internal locks
// held: they may call Submit(), Cancel() and GetStats(), and must return
// quickly (the whole batch waits for them).
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_set>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/model/llama_model.h"
#include "engine/model/paged_kv_cache.h"
#include "engine/runtime/sampler.h"
#include "engine/tokenizer/tokenizer.h"

namespace nibble {

using SchedulerClock = std::chrono::steady_clock;
using RequestId = uint64_t;  // > 0, unique per Scheduler

enum class FinishReason {
  kNone = 0,    // not finished (token events)
  kStop,        // end-of-generation token or a stop string
  kLength,      // max_tokens reached or the context is full
  kCancelled,   // Cancel() or Shutdown()
  kDeadline,    // GenerationRequest::deadline passed
  kError,       // internal failure; see GenerationEvent::status
};
// "stop", "length", "cancelled", "deadline", "error" ("" for kNone).
const char* FinishReasonName(FinishReason r);

struct GenerationRequest {
  std::vector<int32_t> prompt;  // token ids, non-empty, each in [0, vocab); < max_seq_len tokens
  int max_tokens = 128;         // >= 1 sampled tokens at most (the EOS included)
  SamplingParams sampling;      // temperature 0 = greedy; seed for reproducibility
  std::vector<std::string> stop;  // stop strings (excluded from the output)
  bool ignore_eos = false;      // true: end-of-generation tokens are ordinary tokens
  int top_logprobs = 0;         // [0, kMaxTopLogprobs] alternatives reported per token
  SchedulerClock::time_point deadline = SchedulerClock::time_point::max();  // finish with kDeadline after it
};

struct Usage {
  int prompt_tokens = 0;
  int completion_tokens = 0;     // sampled tokens (an EOS that ended the stream counts)
  int cached_prompt_tokens = 0;  // prompt tokens served by the prefix cache (first admission)
};

// One event of a request's stream. Every accepted request gets zero or more
// token events (final == false, token >= 0) and then exactly one final event
// (final == true, token == -1), which is the last callback for that id. By
// the time the final event is delivered the request's blocks are freed, the
// stats count it as finished and Cancel(id) returns false.
struct GenerationEvent {
  RequestId id = 0;
  int32_t token = -1;
  // Text that became safe to emit (UTF-8 complete, not part of a possible stop
  // string). May be empty. On the final event: any held-back remainder.
  std::string text;
  float logprob = 0.0f;                   // of `token` (natural log; see SampleResult)
  std::vector<TokenLogprob> top_logprobs; // up to request.top_logprobs, best first
  bool final = false;
  FinishReason finish_reason = FinishReason::kNone;  // set on the final event
  absl::Status status;  // final event: OK for kStop/kLength, else CANCELLED / DEADLINE_EXCEEDED / the error
  Usage usage;          // counts so far (complete on the final event)
  // Seconds from Submit() to the first token event; < 0 until there is one.
  double time_to_first_token_s = -1.0;
};

using EventCallback = std::function<void(const GenerationEvent&)>;

struct SchedulerOptions {
  int block_size = 16;            // KV positions per block
  int64_t kv_cache_tokens = 0;    // pool size in tokens (rounded up to blocks); 0: 4 * max_seq_len
  // > 0: pool size as a memory budget in bytes instead (overrides
  // kv_cache_tokens): floor(kv_cache_bytes / block bytes) blocks, so an int8
  // pool holds ~3.7x the blocks of an fp32 one (PagedKVCache::BlockBytes).
  int64_t kv_cache_bytes = 0;
  // Element type of the KV pool: kF32, or kInt8 (K/V quantized per (token,
  // kv head) with one fp32 scale; see engine/model/paged_kv_cache.h).
  KvDtype kv_dtype = KvDtype::kF32;
  int max_running = 64;           // sequences batched together, <= max_batch_tokens
  int max_batch_tokens = 256;     // tokens per step (decodes + prefill chunks), <= LlamaModel::kMaxBatch
  int max_queue = 256;            // waiting requests beyond which Submit() fails
  bool prefix_caching = true;
};

// A histogram with fixed upper bounds (seconds), Prometheus-style:
// counts[i] = samples <= bounds[i] (non-cumulative per bucket; the last bucket is +inf).
struct LatencyHistogram {
  static constexpr int kBuckets = 14;
  static constexpr double kBounds[kBuckets - 1] = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                                   0.25,  0.5,    1.0,   2.5,  5.0,  10.0};
  int64_t counts[kBuckets] = {};
  int64_t count = 0;
  double sum = 0.0;
  void Add(double seconds);
};

struct SchedulerStats {
  // Gauges.
  int64_t queue_depth = 0;        // waiting (incl. preempted) requests
  int64_t running = 0;            // sequences holding KV blocks
  int64_t kv_blocks_total = 0, kv_blocks_used = 0, kv_blocks_cached = 0;
  int block_size = 0;
  int64_t kv_block_bytes = 0;     // memory of one block (smaller for int8)
  int64_t kv_bytes_total = 0;     // kv_blocks_total * kv_block_bytes
  KvDtype kv_dtype = KvDtype::kF32;
  // Counters (since Create).
  int64_t requests_submitted = 0;  // accepted by Submit
  int64_t requests_rejected = 0;   // refused by Submit (any reason)
  int64_t requests_finished[6] = {};  // indexed by FinishReason
  int64_t prompt_tokens = 0;       // prompt tokens of accepted requests
  int64_t prefill_tokens = 0;      // tokens run through prefill (recompute included)
  int64_t prefix_cache_hit_tokens = 0;
  int64_t generated_tokens = 0;    // sampled tokens
  int64_t preemptions = 0;
  int64_t steps = 0;               // ForwardBatched calls
  double busy_s = 0.0;             // engine time inside steps
  // Latencies.
  LatencyHistogram time_to_first_token;  // Submit -> first token event
  LatencyHistogram inter_token;          // between consecutive token events of a request
  LatencyHistogram request_duration;     // Submit -> final event
};

class Scheduler {
 public:
  // `model` and `tokenizer` are not owned and must outlive the Scheduler; the
  // engine thread is the model's only user while the Scheduler exists.
  // Allocates the KV pool and starts the engine thread.
  // Errors: INVALID_ARGUMENT for bad options or a tokenizer/model mismatch;
  // RESOURCE_EXHAUSTED if the pool cannot be allocated.
  static absl::StatusOr<std::unique_ptr<Scheduler>> Create(LlamaModel* model, const Tokenizer* tokenizer,
                                                           const SchedulerOptions& opts = {});
  ~Scheduler();  // Shutdown()
  Scheduler(const Scheduler&) = delete;
  Scheduler& operator=(const Scheduler&) = delete;

  // Queues a request; `on_event` receives its events on the engine thread.
  // Errors (no event is ever delivered then):
  //   INVALID_ARGUMENT   empty prompt, token id outside the vocabulary, bad
  //                      sampling params / max_tokens / top_logprobs, or a
  //                      prompt of >= max_seq_len tokens;
  //   OUT_OF_RANGE       prompt + max_tokens (capped at max_seq_len) can never
  //                      fit in the KV pool;
  //   RESOURCE_EXHAUSTED the waiting queue holds max_queue requests;
  //   UNAVAILABLE        Drain() or Shutdown() was called.
  absl::StatusOr<RequestId> Submit(GenerationRequest request, EventCallback on_event);

  // Asks to stop request `id`: within one step its blocks are freed and its
  // final event (kCancelled, status CANCELLED) delivered. Returns false if the
  // id is unknown or already finished (its final event is then not repeated).
  bool Cancel(RequestId id);

  // Stops accepting requests and blocks until every accepted one has finished.
  void Drain();
  // Stops accepting requests, cancels all in-flight ones (their final events
  // are delivered: kCancelled) and joins the engine thread. Idempotent.
  void Shutdown();

  SchedulerStats GetStats() const;
  const SchedulerOptions& options() const { return opts_; }
  // Tokens the KV pool holds (num_blocks * block_size).
  int64_t kv_capacity_tokens() const;

 private:
  struct Sequence;
  Scheduler(LlamaModel* model, const Tokenizer* tokenizer, const SchedulerOptions& opts,
            std::unique_ptr<PagedKVCache> cache);
  void EngineLoop();
  // Engine-thread helpers.
  void Step();
  void ApplyCancelsAndDeadlines(const std::vector<RequestId>& cancels);
  void Admit();
  void EnsureDecodeSlots();
  void SweepFinished();
  void Finish(std::unique_ptr<Sequence> s);
  void FinishAll(std::deque<std::unique_ptr<Sequence>>* q, FinishReason r, const absl::Status& st);
  void SampleAndEmit(Sequence* s, std::span<float> logits);
  void PublishStats(double step_s, int64_t prefill_tokens);

  LlamaModel* model_;
  const Tokenizer* tok_;
  SchedulerOptions opts_;
  std::unique_ptr<PagedKVCache> cache_;  // engine thread only

  // Engine-thread state.
  std::deque<std::unique_ptr<Sequence>> waiting_;
  std::vector<std::unique_ptr<Sequence>> running_;  // in admission order
  std::vector<float> logits_;
  int64_t admit_counter_ = 0;
  std::vector<RequestId> cancels_;  // taken from cancel_requests_ for this step

  // Shared state, guarded by mu_.
  mutable std::mutex mu_;
  std::condition_variable work_cv_;   // engine thread: new work / cancel / shutdown
  std::condition_variable idle_cv_;   // Drain(): a request finished
  std::deque<std::unique_ptr<Sequence>> incoming_;
  std::vector<RequestId> cancel_requests_;
  std::unordered_set<RequestId> live_;  // accepted, final event not yet delivered
  int64_t queued_ = 0;                  // incoming + waiting (admission bound)
  int64_t finals_in_flight_ = 0;        // final callbacks running (Drain waits for them)
  RequestId next_id_ = 1;
  bool accepting_ = true;
  bool stop_ = false;
  SchedulerStats stats_;
  std::thread engine_;
  std::mutex join_mu_;  // serializes Shutdown()'s join
  // Engine-thread latency samples, merged into stats_ once per step.
  std::vector<double> ttft_samples_, itl_samples_;
  int64_t step_generated_ = 0;
};

}  // namespace nibble
