// nibble-cli: command-line gRPC client of nibble-server (nibble.v1.Nibble).
//
// Goals: stream a generation to the terminal as it is produced, a chat REPL
// (history kept client-side, rendered by the server's chat template),
// tokenize / detokenize, model info, and the standard grpc.health.v1 check;
// exit codes a script can use (0 ok, 1 RPC/usage error, 2 NOT_SERVING).
// Non-goals: TLS, load balancing, logprob display beyond --verbose.
//
// Commands:
//   nibble-cli [--addr HOST:PORT] [--api-key K] [--timeout S] generate -p TEXT [-n N] [--temp T] ...
//   nibble-cli chat [-p MESSAGE] [--system S]   (no -p: interactive, one user message per line)
//   nibble-cli tokenize TEXT [--no-bos] [--special]
//   nibble-cli detokenize ID...
//   nibble-cli info
//   nibble-cli health
#include <unistd.h>

#include <chrono>
#include <iterator>
#include <cstdio>
#include <future>
#include <iostream>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "grpcpp/generic/generic_stub.h"
#include "grpcpp/grpcpp.h"
#include "nibble/v1/nibble.grpc.pb.h"

namespace {

namespace pb = ::nibble::v1;

struct Common {
  std::string addr = "127.0.0.1:50051";
  std::string api_key;
  double timeout_s = 600.0;
};

void Prepare(const Common& c, grpc::ClientContext* ctx) {
  ctx->set_deadline(std::chrono::system_clock::now() +
                    std::chrono::milliseconds(static_cast<int64_t>(c.timeout_s * 1000)));
  if (!c.api_key.empty()) ctx->AddMetadata("authorization", "Bearer " + c.api_key);
}

const char* CodeName(grpc::StatusCode c) {
  static constexpr const char* kNames[] = {
      "OK",          "CANCELLED",           "UNKNOWN",           "INVALID_ARGUMENT", "DEADLINE_EXCEEDED",
      "NOT_FOUND",   "ALREADY_EXISTS",      "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
      "ABORTED",     "OUT_OF_RANGE",        "UNIMPLEMENTED",     "INTERNAL",         "UNAVAILABLE",
      "DATA_LOSS",   "UNAUTHENTICATED"};
  const int i = static_cast<int>(c);
  return i >= 0 && i < static_cast<int>(std::size(kNames)) ? kNames[i] : "UNKNOWN";
}

int RpcFail(const char* what, const grpc::Status& s) {
  fprintf(stderr, "error: %s: %s: %s\n", what, CodeName(s.error_code()), s.error_message().c_str());
  return 1;
}

struct GenFlags {
  std::string prompt, system;
  int max_tokens = 256;
  std::optional<float> temp, top_p, min_p, repeat_penalty;
  std::optional<int> top_k;
  std::optional<uint64_t> seed;
  std::vector<std::string> stop;
  bool ignore_eos = false, verbose = false;
};

void FillSampling(const GenFlags& f, pb::GenerateRequest* req) {
  req->set_max_tokens(f.max_tokens);
  pb::SamplingParams* sp = req->mutable_sampling();
  if (f.temp) sp->set_temperature(*f.temp);
  if (f.top_p) sp->set_top_p(*f.top_p);
  if (f.top_k) sp->set_top_k(*f.top_k);
  if (f.min_p) sp->set_min_p(*f.min_p);
  if (f.repeat_penalty) sp->set_repeat_penalty(*f.repeat_penalty);
  if (f.seed) sp->set_seed(*f.seed);
  for (const std::string& s : f.stop) req->add_stop(s);
  req->set_ignore_eos(f.ignore_eos);
}

// Streams one generation to stdout; returns the full text through *text.
int StreamGenerate(pb::Nibble::Stub* stub, const Common& c, const pb::GenerateRequest& req, bool verbose,
                   std::string* text) {
  grpc::ClientContext ctx;
  Prepare(c, &ctx);
  const auto t0 = std::chrono::steady_clock::now();
  auto reader = stub->Generate(&ctx, req);
  pb::GenerateResponse msg;
  pb::GenerateResponse final_msg;
  while (reader->Read(&msg)) {
    if (!msg.text().empty()) {
      fwrite(msg.text().data(), 1, msg.text().size(), stdout);
      fflush(stdout);
      if (text) *text += msg.text();
    }
    if (msg.final()) final_msg = msg;
  }
  grpc::Status s = reader->Finish();
  if (!s.ok()) {
    fputc('\n', stdout);
    return RpcFail("Generate", s);
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (verbose) {
    const pb::Usage& u = final_msg.usage();
    fprintf(stderr, "\n[finish %s; prompt %d tokens (%d cached), completion %d tokens; TTFT %.0f ms; %.1f tok/s]\n",
            final_msg.finish_reason().c_str(), u.prompt_tokens(), u.cached_prompt_tokens(), u.completion_tokens(),
            1e3 * final_msg.time_to_first_token_s(), secs > 0 ? u.completion_tokens() / secs : 0.0);
  }
  return 0;
}

int Chat(pb::Nibble::Stub* stub, const Common& c, const GenFlags& f) {
  std::vector<std::pair<std::string, std::string>> history;
  if (!f.system.empty()) history.emplace_back("system", f.system);
  auto turn = [&](const std::string& user) -> int {
    history.emplace_back("user", user);
    pb::GenerateRequest req;
    for (const auto& [role, content] : history) {
      pb::ChatMessage* m = req.mutable_chat()->add_messages();
      m->set_role(role);
      m->set_content(content);
    }
    FillSampling(f, &req);
    std::string reply;
    const int rc = StreamGenerate(stub, c, req, f.verbose, &reply);
    fputc('\n', stdout);
    fflush(stdout);
    if (rc != 0) {
      history.pop_back();
      return rc;
    }
    history.emplace_back("assistant", reply);
    return 0;
  };
  if (!f.prompt.empty()) return turn(f.prompt);
  const bool tty = isatty(STDIN_FILENO);
  int rc = 0;
  for (std::string line;;) {
    if (tty) {
      fputs("> ", stderr);
      fflush(stderr);
    }
    if (!std::getline(std::cin, line)) break;
    if (line.empty()) continue;
    if (line == "/exit" || line == "/quit") break;
    if (line == "/reset") {
      history.clear();
      if (!f.system.empty()) history.emplace_back("system", f.system);
      continue;
    }
    rc = turn(line);
  }
  return rc;
}

// grpc.health.v1.Health/Check with service "" over a generic stub (no
// health.proto needed): the request is empty, the response's field 1
// (varint) is the status; 1 = SERVING, 2 = NOT_SERVING.
int Health(const std::shared_ptr<grpc::Channel>& ch, const Common& c) {
  grpc::GenericStub stub(ch);
  grpc::ClientContext ctx;
  Prepare(c, &ctx);
  grpc::ByteBuffer req, resp;
  grpc::Slice empty;
  req = grpc::ByteBuffer(&empty, 1);
  std::promise<grpc::Status> done;
  stub.UnaryCall(&ctx, "/grpc.health.v1.Health/Check", grpc::StubOptions(), &req, &resp,
                 [&done](grpc::Status s) { done.set_value(std::move(s)); });
  grpc::Status s = done.get_future().get();
  if (!s.ok()) return RpcFail("Health/Check", s);
  std::vector<grpc::Slice> slices;
  std::string bytes;
  if (resp.Dump(&slices).ok()) {
    for (const grpc::Slice& sl : slices) bytes.append(reinterpret_cast<const char*>(sl.begin()), sl.size());
  }
  int status = 0;  // UNKNOWN (also: field absent = default 0)
  if (bytes.size() >= 2 && bytes[0] == 0x08) status = static_cast<unsigned char>(bytes[1]);
  const char* names[] = {"UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN"};
  printf("%s\n", status >= 0 && status < 4 ? names[status] : "UNKNOWN");
  return status == 1 ? 0 : 2;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"nibble-cli: gRPC client of nibble-server"};
  app.require_subcommand(1);
  Common c;
  app.add_option("--addr", c.addr, "server address HOST:PORT")->capture_default_str();
  app.add_option("--api-key", c.api_key, "API key (sent as 'authorization: Bearer KEY')");
  app.add_option("--timeout", c.timeout_s, "seconds per call")->capture_default_str();

  GenFlags f;
  auto add_gen_flags = [&f](CLI::App* sub) {
    sub->add_option("-n,--max-tokens", f.max_tokens, "tokens to generate")->capture_default_str();
    sub->add_option("--temp", f.temp, "temperature (server default 1; 0 = greedy)");
    sub->add_option("--top-p", f.top_p, "top-p");
    sub->add_option("--top-k", f.top_k, "top-k");
    sub->add_option("--min-p", f.min_p, "min-p");
    sub->add_option("--repeat-penalty", f.repeat_penalty, "repetition penalty");
    sub->add_option("-s,--seed", f.seed, "RNG seed");
    sub->add_option("--stop", f.stop, "stop string (repeatable)");
    sub->add_flag("--ignore-eos", f.ignore_eos, "keep generating past end-of-generation tokens");
    sub->add_flag("-v,--verbose", f.verbose, "print finish reason, usage and timing to stderr");
  };
  CLI::App* gen = app.add_subcommand("generate", "stream a completion of a text prompt");
  gen->add_option("-p,--prompt", f.prompt, "prompt text")->required();
  add_gen_flags(gen);
  CLI::App* chat = app.add_subcommand("chat", "chat (interactive without -p)");
  chat->add_option("-p,--prompt", f.prompt, "one user message (else read lines from stdin)");
  chat->add_option("--system", f.system, "system message");
  add_gen_flags(chat);
  std::string tok_text;
  bool no_bos = false, special = false;
  CLI::App* tokenize = app.add_subcommand("tokenize", "print the token ids of a text");
  tokenize->add_option("text", tok_text, "text")->required();
  tokenize->add_flag("--no-bos", no_bos, "do not add BOS");
  tokenize->add_flag("--special", special, "parse special-token texts");
  std::vector<int32_t> ids;
  CLI::App* detok = app.add_subcommand("detokenize", "print the text of token ids");
  detok->add_option("ids", ids, "token ids")->required();
  detok->add_flag("--special", special, "render control tokens");
  CLI::App* info = app.add_subcommand("info", "print model information");
  CLI::App* health = app.add_subcommand("health", "grpc.health.v1 check; exit 0 iff SERVING");
  CLI11_PARSE(app, argc, argv);

  auto channel = grpc::CreateChannel(c.addr, grpc::InsecureChannelCredentials());
  if (health->parsed()) return Health(channel, c);
  auto stub = pb::Nibble::NewStub(channel);
  if (gen->parsed()) {
    pb::GenerateRequest req;
    req.set_text(f.prompt);
    FillSampling(f, &req);
    const int rc = StreamGenerate(stub.get(), c, req, f.verbose, nullptr);
    if (rc == 0) fputc('\n', stdout);
    return rc;
  }
  if (chat->parsed()) return Chat(stub.get(), c, f);
  grpc::ClientContext ctx;
  Prepare(c, &ctx);
  if (tokenize->parsed()) {
    pb::TokenizeRequest req;
    req.set_text(tok_text);
    req.set_add_bos(!no_bos);
    req.set_parse_special(special);
    pb::TokenizeResponse resp;
    grpc::Status s = stub->Tokenize(&ctx, req, &resp);
    if (!s.ok()) return RpcFail("Tokenize", s);
    for (int i = 0; i < resp.ids_size(); ++i) printf(i ? " %d" : "%d", resp.ids(i));
    printf("\n");
    return 0;
  }
  if (detok->parsed()) {
    pb::DetokenizeRequest req;
    for (int32_t id : ids) req.add_ids(id);
    req.set_special(special);
    pb::DetokenizeResponse resp;
    grpc::Status s = stub->Detokenize(&ctx, req, &resp);
    if (!s.ok()) return RpcFail("Detokenize", s);
    printf("%s\n", resp.text().c_str());
    return 0;
  }
  if (info->parsed()) {
    pb::ModelInfoResponse resp;
    grpc::Status s = stub->ModelInfo(&ctx, pb::ModelInfoRequest(), &resp);
    if (!s.ok()) return RpcFail("ModelInfo", s);
    printf("model_id:             %s\n", resp.model_id().c_str());
    printf("vocab_size:           %d\n", resp.vocab_size());
    printf("context_length:       %d\n", resp.context_length());
    printf("n_layers:             %d\n", resp.n_layers());
    printf("dim:                  %d\n", resp.dim());
    printf("bos_id / eos_id:      %d / %d\n", resp.bos_id(), resp.eos_id());
    printf("chat_template_family: %s\n", resp.chat_template_family().c_str());
    printf("kv_blocks_total:      %lld (block size %d)\n", static_cast<long long>(resp.kv_blocks_total()),
           resp.kv_block_size());
    printf("max_tokens_limit:     %d\n", resp.max_tokens_limit());
    return 0;
  }
  return 1;
}
