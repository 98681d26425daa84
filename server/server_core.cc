#include "server/server_core.h"

#include <cstdio>
#include <ctime>

#include "absl/strings/str_format.h"

namespace nibble::server {

void RequestStream::Push(int index, const GenerationEvent& ev) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    q_.push_back({index, ev});
    if (ev.final && index >= 0 && static_cast<size_t>(index) < finished_.size()) finished_[index] = true;
  }
  cv_.notify_one();
}

bool RequestStream::Pop(Item* out, std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> lock(mu_);
  if (!cv_.wait_for(lock, timeout, [&] { return !q_.empty(); })) return false;
  *out = std::move(q_.front());
  q_.pop_front();
  if (out->ev.final) ++finals_popped_;
  return true;
}

void RequestStream::CancelAll() {
  std::vector<RequestId> live;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (size_t i = 0; i < ids_.size(); ++i) {
      if (!finished_[i] && ids_[i] != 0) live.push_back(ids_[i]);
    }
  }
  for (RequestId id : live) sched_->Cancel(id);
}

bool RequestStream::AllFinalsPopped() const {
  std::lock_guard<std::mutex> lock(mu_);
  return finals_popped_ >= static_cast<int>(ids_.size());
}

void RequestStream::Reserve(int n) {
  std::lock_guard<std::mutex> lock(mu_);
  ids_.assign(n, 0);
  finished_.assign(n, false);
}

void RequestStream::SetId(int index, RequestId id) {
  std::lock_guard<std::mutex> lock(mu_);
  ids_[index] = id;
}

int RequestStream::size() const {
  std::lock_guard<std::mutex> lock(mu_);
  return static_cast<int>(ids_.size());
}

ServerCore::ServerCore(LlamaModel* model, const Tokenizer* tok, Scheduler* sched, ServerOptions opts)
    : model_(model), tok_(tok), sched_(sched), opts_(std::move(opts)) {
  ctx_.tokenizer = tok_;
  ctx_.chat_template = model_->loaded().chat_template;
  ctx_.context_length = model_->config().max_seq_len;
  ctx_.model_id = opts_.model_id;
  ctx_.max_tokens_limit = opts_.max_tokens_limit;
}

absl::StatusOr<std::shared_ptr<RequestStream>> ServerCore::SubmitAll(std::vector<GenerationRequest> reqs) {
  if (draining()) return absl::UnavailableError("the server is shutting down");
  auto stream = std::make_shared<RequestStream>(sched_);
  stream->Reserve(static_cast<int>(reqs.size()));  // the callback may run before Submit returns
  for (size_t i = 0; i < reqs.size(); ++i) {
    const int index = static_cast<int>(i);
    auto id = sched_->Submit(std::move(reqs[i]),
                             [stream, index](const GenerationEvent& ev) { stream->Push(index, ev); });
    if (!id.ok()) {
      stream->CancelAll();
      // Wait for the finals of the accepted ones so no callback outlives the call's bookkeeping.
      RequestStream::Item item;
      int finals = 0;
      const int accepted = index;
      while (finals < accepted && stream->Pop(&item, std::chrono::milliseconds(5000))) finals += item.ev.final;
      return id.status();
    }
    stream->SetId(index, *id);
  }
  return stream;
}

bool ServerCore::Authorized(absl::string_view header) const {
  if (opts_.api_key.empty()) return true;
  constexpr absl::string_view kBearer = "Bearer ";
  if (header.size() != kBearer.size() + opts_.api_key.size() || header.substr(0, kBearer.size()) != kBearer) {
    return false;
  }
  // Constant-time comparison of the key.
  unsigned diff = 0;
  for (size_t i = 0; i < opts_.api_key.size(); ++i) diff |= header[kBearer.size() + i] ^ opts_.api_key[i];
  return diff == 0;
}

void ServerCore::LogRequest(const RequestLog& log) {
  nlohmann::json j = {{"ts", UnixNow()},
                      {"id", log.id},
                      {"api", log.api},
                      {"route", log.route},
                      {"status", log.status},
                      {"prompt_tokens", log.prompt_tokens},
                      {"completion_tokens", log.completion_tokens},
                      {"ttft_s", log.ttft_s < 0 ? nlohmann::json(nullptr) : nlohmann::json(log.ttft_s)},
                      {"duration_s", log.duration_s}};
  if (!log.error.empty()) j["error"] = log.error;
  const std::string line = Dump(j) + "\n";
  std::lock_guard<std::mutex> lock(mu_);
  ++counts_[{log.api, std::to_string(log.status)}];
  fwrite(line.data(), 1, line.size(), stderr);
  fflush(stderr);
}

std::string ServerCore::MetricsText() const {
  RequestCounts counts;
  {
    std::lock_guard<std::mutex> lock(mu_);
    counts = counts_;
  }
  return PrometheusText(sched_->GetStats(), counts);
}

std::string ServerCore::NewId(absl::string_view prefix) {
  return absl::StrFormat("%s-%x%06x", prefix, static_cast<uint64_t>(UnixNow()), next_id_.fetch_add(1));
}

int64_t ServerCore::UnixNow() { return static_cast<int64_t>(std::time(nullptr)); }

}  // namespace nibble::server
