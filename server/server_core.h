// State shared by the HTTP and gRPC front ends: the scheduler, the parser's
// model context, the draining flag, request counters for /metrics, structured
// request logs, and RequestStream, the bridge from scheduler callbacks (engine
// thread, must not block) to a transport thread that waits for events.
//
// Thread safety: every ServerCore method may be called from any thread.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/model/llama_model.h"
#include "engine/runtime/scheduler.h"
#include "server/metrics.h"
#include "server/openai_api.h"

namespace nibble::server {

struct ServerOptions {
  std::string model_id;
  std::string api_key;           // "" = no authentication
  int max_tokens_limit = 4096;
  size_t max_body_bytes = 1 << 20;
  double grace_s = 10.0;         // drain time on SIGTERM before in-flight requests are cancelled
};

// Events of a group of scheduler requests (the n choices of one API call), in
// arrival order. Push is called on the engine thread (a mutex and a deque
// push only); Pop waits on a transport thread.
class RequestStream {
 public:
  struct Item {
    int index = 0;  // choice index
    GenerationEvent ev;
  };
  explicit RequestStream(Scheduler* sched) : sched_(sched) {}

  void Push(int index, const GenerationEvent& ev);
  // Waits up to `timeout` for the next event; false on timeout.
  bool Pop(Item* out, std::chrono::milliseconds timeout);
  // Cancels every request of the group that has not delivered its final event.
  void CancelAll();
  // True once the final event of every submitted request has been popped.
  bool AllFinalsPopped() const;
  // Sizes the group to `n` requests (before any Submit); SetId records choice i's id.
  void Reserve(int n);
  void SetId(int index, RequestId id);
  int size() const;

 private:
  Scheduler* sched_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Item> q_;
  std::vector<RequestId> ids_;
  std::vector<bool> finished_;  // by choice index, set when the final event is pushed
  int finals_popped_ = 0;
};

struct RequestLog {
  std::string id, api, route;
  int status = 0;            // HTTP status; for gRPC the numeric grpc::StatusCode
  std::string error;         // message when status is not OK
  int prompt_tokens = 0, completion_tokens = 0;
  double ttft_s = -1.0, duration_s = 0.0;
};

class ServerCore {
 public:
  ServerCore(LlamaModel* model, const Tokenizer* tok, Scheduler* sched, ServerOptions opts);

  const ModelContext& model_context() const { return ctx_; }
  const ServerOptions& options() const { return opts_; }
  const Tokenizer& tokenizer() const { return *tok_; }
  const LlamaModel& model() const { return *model_; }
  Scheduler* scheduler() { return sched_; }

  bool draining() const { return draining_.load(); }
  void StartDraining() { draining_.store(true); }

  // Submits every request (choice i gets index i) into one stream. On a
  // Submit error, cancels those already accepted and returns the error.
  absl::StatusOr<std::shared_ptr<RequestStream>> SubmitAll(std::vector<GenerationRequest> reqs);

  // Checks "Bearer KEY" against --api-key (always OK without one).
  bool Authorized(absl::string_view authorization_header) const;

  // One JSON line on stderr; also counts the request for /metrics.
  void LogRequest(const RequestLog& log);
  std::string MetricsText() const;
  std::string NewId(absl::string_view prefix);
  static int64_t UnixNow();

 private:
  LlamaModel* model_;
  const Tokenizer* tok_;
  Scheduler* sched_;
  ServerOptions opts_;
  ModelContext ctx_;
  std::atomic<bool> draining_{false};
  std::atomic<uint64_t> next_id_{1};
  mutable std::mutex mu_;  // guards counts_ and stderr lines
  RequestCounts counts_;
};

}  // namespace nibble::server
