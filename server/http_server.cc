#include "server/http_server.h"

#include <chrono>

#include "absl/strings/str_cat.h"
#include "httplib.h"

namespace nibble::server {
namespace {

using Clock = std::chrono::steady_clock;
using nlohmann::json;

double SecondsSince(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

// The error a finished choice reports when it did not end with stop/length.
absl::Status FinalError(const GenerationEvent& ev) {
  switch (ev.finish_reason) {
    case FinishReason::kStop:
    case FinishReason::kLength: return absl::OkStatus();
    case FinishReason::kCancelled: return absl::UnavailableError("the request was cancelled (server shutting down)");
    case FinishReason::kDeadline: return absl::DeadlineExceededError("the request's deadline passed");
    default:
      return absl::InternalError(absl::StrCat("generation failed: ",
                                              ev.status.ok() ? "unknown error" : ev.status.message()));
  }
}

// Everything a streaming response needs between content-provider calls.
struct StreamState {
  ServerCore* core = nullptr;
  ParsedRequest req;
  std::shared_ptr<RequestStream> stream;
  std::vector<ChoiceResult> choices;
  std::vector<bool> first;
  std::vector<size_t> offset;
  std::string id;
  int64_t created = 0;
  RequestLog log;
  Clock::time_point start;
  Clock::time_point last_write;
  absl::Status error;
  bool logged = false;
  std::mutex mu;  // provider and releaser may not overlap, but be safe

  void Finish(int status, const std::string& err) {
    if (logged) return;
    logged = true;
    log.status = status;
    log.error = err;
    log.duration_s = SecondsSince(start);
    for (size_t i = 0; i < choices.size(); ++i) {
      if (i % std::max(req.n, 1) == 0) log.prompt_tokens += choices[i].usage.prompt_tokens;
      log.completion_tokens += choices[i].usage.completion_tokens;
    }
    core->LogRequest(log);
  }

  // SSE text for one event.
  std::string OnEvent(const RequestStream::Item& item) {
    const int i = item.index;
    const GenerationEvent& ev = item.ev;
    if (i < 0 || static_cast<size_t>(i) >= choices.size()) return "";
    Accumulate(req, core->tokenizer(), ev, &choices[i]);
    if (log.ttft_s < 0 && ev.time_to_first_token_s >= 0) log.ttft_s = ev.time_to_first_token_s;
    std::string text = ev.text;
    if (first[i] && req.echo) {
      const size_t p = i / std::max(req.n, 1);
      if (p < req.prompt_texts.size()) text = req.prompt_texts[p] + text;
    }
    std::vector<TokenInfo> tokens;
    if (!ev.final && ev.token >= 0 && req.logprobs) tokens.push_back(MakeTokenInfo(core->tokenizer(), ev));
    FinishReason finish = FinishReason::kNone;
    if (ev.final) {
      absl::Status s = FinalError(ev);
      if (!s.ok()) {
        if (error.ok()) error = s;
        return "";
      }
      finish = ev.finish_reason;
    } else if (text.empty() && tokens.empty()) {
      return "";
    }
    std::string out = SseData(BuildChunk(req, i, text, tokens, finish, first[i], offset[i], id, created));
    first[i] = false;
    offset[i] += text.size();
    return out;
  }
};

}  // namespace

HttpServer::HttpServer(ServerCore* core, int threads)
    : core_(core), threads_(threads), svr_(std::make_unique<httplib::Server>()) {}

HttpServer::~HttpServer() { Stop(); }

void HttpServer::Stop() {
  if (svr_ && svr_->is_running()) svr_->stop();
  if (thread_.joinable()) thread_.join();
}

absl::StatusOr<int> HttpServer::Start(const std::string& host, int port) {
  Routes();
  const int n = threads_;
  svr_->new_task_queue = [n] { return new httplib::ThreadPool(n); };
  svr_->set_payload_max_length(core_->options().max_body_bytes);
  int bound = port;
  if (port == 0) {
    bound = svr_->bind_to_any_port(host);
    if (bound <= 0) return absl::UnavailableError(absl::StrCat("http: cannot bind ", host, ":0"));
  } else if (!svr_->bind_to_port(host, port)) {
    return absl::UnavailableError(absl::StrCat("http: cannot bind ", host, ":", port));
  }
  thread_ = std::thread([this] { svr_->listen_after_bind(); });
  return bound;
}

void HttpServer::Routes() {
  ServerCore* core = core_;
  auto send_error = [core](const httplib::Request& rq, httplib::Response& res, const absl::Status& s,
                           RequestLog* log) {
    res.status = HttpStatusFor(s);
    res.set_content(Dump(ErrorJson(s)), "application/json");
    if (log != nullptr) {
      log->status = res.status;
      log->error = std::string(s.message());
      core->LogRequest(*log);
    }
  };
  // Bodies for errors httplib produces itself (404 route, 413 body too large, 400 bad request).
  svr_->set_error_handler(httplib::Server::HandlerWithResponse([](const httplib::Request&, httplib::Response& res) {
    if (!res.body.empty()) return httplib::Server::HandlerResponse::Unhandled;
    std::string msg = res.status == 413   ? "the request body is too large"
                      : res.status == 404 ? "no such route"
                                          : absl::StrCat("HTTP error ", res.status);
    res.set_content(Dump(ErrorJson(res.status, msg)), "application/json");
    return httplib::Server::HandlerResponse::Handled;
  }));

  auto generate = [core, send_error](Endpoint ep, const httplib::Request& rq, httplib::Response& res) {
    const Clock::time_point start = Clock::now();
    RequestLog log;
    log.id = core->NewId(ep == Endpoint::kChat ? "chatcmpl" : "cmpl");
    log.api = "http";
    log.route = rq.path;
    if (!core->Authorized(rq.get_header_value("Authorization"))) {
      return send_error(rq, res, absl::UnauthenticatedError("Incorrect or missing API key (Authorization: Bearer)"),
                        &log);
    }
    if (core->draining()) return send_error(rq, res, absl::UnavailableError("the server is shutting down"), &log);
    auto parsed = ParseRequest(ep, rq.body, core->model_context());
    if (!parsed.ok()) return send_error(rq, res, parsed.status(), &log);
    auto stream = core->SubmitAll(parsed->requests);
    if (!stream.ok()) return send_error(rq, res, stream.status(), &log);
    const size_t nchoices = parsed->requests.size();
    const int64_t created = ServerCore::UnixNow();

    if (!parsed->stream) {
      std::vector<ChoiceResult> choices(nchoices);
      absl::Status err;
      RequestStream::Item item;
      while (!(*stream)->AllFinalsPopped()) {
        if (!(*stream)->Pop(&item, std::chrono::milliseconds(200))) continue;
        if (item.index < 0 || static_cast<size_t>(item.index) >= nchoices) continue;
        Accumulate(*parsed, core->tokenizer(), item.ev, &choices[item.index]);
        if (log.ttft_s < 0 && item.ev.time_to_first_token_s >= 0) log.ttft_s = item.ev.time_to_first_token_s;
        if (item.ev.final && err.ok()) err = FinalError(item.ev);
      }
      for (size_t i = 0; i < nchoices; ++i) {
        if (i % parsed->n == 0) log.prompt_tokens += choices[i].usage.prompt_tokens;
        log.completion_tokens += choices[i].usage.completion_tokens;
      }
      log.duration_s = SecondsSince(start);
      if (!err.ok()) return send_error(rq, res, err, &log);
      res.status = 200;
      res.set_content(Dump(BuildResponse(*parsed, choices, log.id, created)), "application/json");
      log.status = 200;
      core->LogRequest(log);
      return;
    }

    auto st = std::make_shared<StreamState>();
    st->core = core;
    st->req = *std::move(parsed);
    st->stream = *std::move(stream);
    st->choices.resize(nchoices);
    st->first.assign(nchoices, true);
    st->offset.assign(nchoices, 0);
    st->id = log.id;
    st->created = created;
    st->log = log;
    st->start = start;
    st->last_write = Clock::now();
    res.set_header("Cache-Control", "no-cache");
    res.set_chunked_content_provider(
        "text/event-stream",
        [st](size_t, httplib::DataSink& sink) {
          std::lock_guard<std::mutex> lock(st->mu);
          std::string out;
          RequestStream::Item item;
          if (st->stream->Pop(&item, std::chrono::milliseconds(100))) {
            out += st->OnEvent(item);
            while (st->stream->Pop(&item, std::chrono::milliseconds(0))) out += st->OnEvent(item);
          }
          const bool done = st->stream->AllFinalsPopped();
          if (done) {
            if (!st->error.ok()) {
              out += SseData(ErrorJson(st->error));
            } else if (st->req.include_usage) {
              out += SseData(BuildUsageChunk(st->req, st->choices, st->id, st->created));
            }
            out += kSseDone;
          } else if (out.empty() && Clock::now() - st->last_write > std::chrono::seconds(1)) {
            out = ": keep-alive\n\n";  // lets a vanished client be noticed while queued
          }
          if (!out.empty()) {
            if (!sink.is_writable() || !sink.write(out.data(), out.size())) {
              st->stream->CancelAll();
              st->Finish(499, "client disconnected");
              return false;
            }
            st->last_write = Clock::now();
          }
          if (done) {
            sink.done();
            st->Finish(st->error.ok() ? 200 : HttpStatusFor(st->error), std::string(st->error.message()));
          }
          return true;
        },
        [st](bool success) {
          if (!success) {
            st->stream->CancelAll();
            std::lock_guard<std::mutex> lock(st->mu);
            st->Finish(499, "client disconnected");
          }
        });
  };

  svr_->Post("/v1/completions", [generate](const httplib::Request& rq, httplib::Response& res) {
    generate(Endpoint::kCompletions, rq, res);
  });
  svr_->Post("/v1/chat/completions", [generate](const httplib::Request& rq, httplib::Response& res) {
    generate(Endpoint::kChat, rq, res);
  });
  svr_->Get("/v1/models", [core, send_error](const httplib::Request& rq, httplib::Response& res) {
    if (!core->Authorized(rq.get_header_value("Authorization"))) {
      return send_error(rq, res, absl::UnauthenticatedError("Incorrect or missing API key"), nullptr);
    }
    res.set_content(Dump(ModelsJson(core->model_context().model_id, ServerCore::UnixNow())), "application/json");
  });
  svr_->Get(R"(/v1/models/(.+))", [core, send_error](const httplib::Request& rq, httplib::Response& res) {
    if (!core->Authorized(rq.get_header_value("Authorization"))) {
      return send_error(rq, res, absl::UnauthenticatedError("Incorrect or missing API key"), nullptr);
    }
    if (rq.matches[1] != core->model_context().model_id) {
      return send_error(rq, res, ApiError(absl::StatusCode::kNotFound, "no such model", "model"), nullptr);
    }
    res.set_content(Dump(ModelsJson(core->model_context().model_id, ServerCore::UnixNow())["data"][0]),
                    "application/json");
  });
  svr_->Get("/health", [core](const httplib::Request&, httplib::Response& res) {
    const bool draining = core->draining();
    res.status = draining ? 503 : 200;
    res.set_content(draining ? R"({"status":"draining"})" : R"({"status":"ok"})", "application/json");
  });
  svr_->Get("/metrics", [core](const httplib::Request&, httplib::Response& res) {
    res.set_content(core->MetricsText(), "text/plain; version=0.0.4; charset=utf-8");
  });
}

}  // namespace nibble::server
