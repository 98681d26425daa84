// The gRPC front end: nibble.v1.Nibble (proto/nibble/v1/nibble.proto) on the
// sync API, plus grpc.health.v1 (default health service; NOT_SERVING while
// draining) and server reflection.
//
// Each Generate call runs on a gRPC worker thread that waits on a
// RequestStream fed by the scheduler callback (engine thread, never blocked).
// The call's deadline becomes the request's deadline (-> DEADLINE_EXCEEDED);
// client cancellation (ServerContext::IsCancelled, or a failed Write) cancels
// the request within one poll interval (50 ms) plus one engine step.
// Status codes: INVALID_ARGUMENT, OUT_OF_RANGE (can never fit the KV pool),
// RESOURCE_EXHAUSTED (queue full), UNAVAILABLE (draining), UNAUTHENTICATED
// (--api-key set and no "authorization: Bearer KEY" metadata), CANCELLED.
// Thread safety: Start() once, Stop() once, from any thread.
#pragma once

#include <chrono>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "server/server_core.h"

namespace grpc {
class Server;
}

namespace nibble::server {

class NibbleGrpcService;

class GrpcServer {
 public:
  explicit GrpcServer(ServerCore* core);
  ~GrpcServer();

  // Binds host:port (0: a free port) without TLS and starts serving.
  // Returns the bound port; UNAVAILABLE if the bind fails.
  absl::StatusOr<int> Start(const std::string& host, int port);
  // Marks the health service NOT_SERVING (draining).
  void SetNotServing();
  // Waits up to `grace` for calls in flight, then cancels the rest.
  void Stop(std::chrono::milliseconds grace);

 private:
  ServerCore* core_;
  std::unique_ptr<NibbleGrpcService> service_;
  std::unique_ptr<grpc::Server> server_;
};

}  // namespace nibble::server
