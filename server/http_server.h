// The OpenAI-compatible HTTP front end (cpp-httplib): routes, auth, body
// limits, SSE streaming. Request/response bodies are built by openai_api.h.
//
// Routes: POST /v1/completions, POST /v1/chat/completions (stream or not),
// GET /v1/models, GET /v1/models/{id}, GET /health (200 ok / 503 draining),
// GET /metrics (Prometheus text). Errors use OpenAI's error shape.
// A client that disconnects during a stream has its requests cancelled (the
// failed SSE write, or the response releaser, calls RequestStream::CancelAll).
// Non-goals: TLS (bind loopback or put a proxy in front), HTTP/2.
//
// Thread safety: Start() once; Stop() from any thread.
#pragma once

#include <memory>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "server/server_core.h"

namespace httplib {
class Server;
}

namespace nibble::server {

class HttpServer {
 public:
  explicit HttpServer(ServerCore* core, int threads = 32);
  ~HttpServer();  // Stop()

  // Binds host:port (port 0: any free port) and serves on a background
  // thread. Returns the bound port. Errors: UNAVAILABLE if the bind fails.
  absl::StatusOr<int> Start(const std::string& host, int port);
  // Stops accepting and waits for the handlers in flight to return.
  void Stop();

 private:
  void Routes();
  ServerCore* core_;
  int threads_;
  std::unique_ptr<httplib::Server> svr_;
  std::thread thread_;
};

}  // namespace nibble::server
