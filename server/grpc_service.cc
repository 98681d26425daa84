#include "server/grpc_service.h"

#include <functional>

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>

#include "absl/strings/str_cat.h"
#include "engine/runtime/chat_template.h"
#include "engine/tokenizer/utf8.h"
#include "nibble/v1/nibble.grpc.pb.h"

namespace nibble::server {
namespace {

using Clock = std::chrono::steady_clock;
constexpr int kDefaultMaxTokens = 16;

grpc::Status ToGrpc(const absl::Status& s) {
  if (s.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(s.code()), std::string(s.message()));
}

absl::StatusOr<GenerationRequest> ToGeneration(const ServerCore& core, const v1::GenerateRequest& in) {
  const ModelContext& ctx = core.model_context();
  const Tokenizer& tok = core.tokenizer();
  if (!in.model().empty() && in.model() != ctx.model_id) {
    return absl::NotFoundError(absl::StrCat("model '", in.model(), "' is not served here (", ctx.model_id, ")"));
  }
  GenerationRequest g;
  switch (in.prompt_case()) {
    case v1::GenerateRequest::kText: {
      auto ids = tok.Encode(in.text(), {.add_bos = tok.ShouldAddBos(), .parse_special = false});
      if (!ids.ok()) return absl::InvalidArgumentError(absl::StrCat("text: ", ids.status().message()));
      g.prompt = *std::move(ids);
      break;
    }
    case v1::GenerateRequest::kChat: {
      std::vector<ChatMessage> msgs;
      for (const auto& m : in.chat().messages()) msgs.push_back({m.role(), m.content()});
      if (msgs.empty()) return absl::InvalidArgumentError("chat: no messages");
      auto text = ApplyChatTemplate(ctx.chat_template, msgs, true, nullptr);
      if (!text.ok()) return absl::InvalidArgumentError(absl::StrCat("chat: ", text.status().message()));
      auto ids = tok.Encode(*text, {.add_bos = tok.ShouldAddBos(), .parse_special = true});
      if (!ids.ok()) return absl::InvalidArgumentError(absl::StrCat("chat: ", ids.status().message()));
      g.prompt = *std::move(ids);
      break;
    }
    case v1::GenerateRequest::kTokens:
      for (int32_t id : in.tokens().ids()) {
        if (id < 0 || id >= tok.vocab_size()) {
          return absl::InvalidArgumentError(absl::StrCat("tokens: id ", id, " is outside [0, ", tok.vocab_size(), ")"));
        }
        g.prompt.push_back(id);
      }
      break;
    default: return absl::InvalidArgumentError("prompt: set one of text, chat or tokens");
  }
  if (g.prompt.empty()) return absl::InvalidArgumentError("prompt: empty (and the model adds no BOS)");
  if (static_cast<int64_t>(g.prompt.size()) >= ctx.context_length) {
    return absl::InvalidArgumentError(
        absl::StrCat("prompt: ", g.prompt.size(), " tokens; the context length is ", ctx.context_length));
  }
  const int mt = in.max_tokens() == 0 ? std::min(kDefaultMaxTokens, ctx.max_tokens_limit) : in.max_tokens();
  if (mt < 1 || mt > ctx.max_tokens_limit) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_tokens: ", in.max_tokens(), " is outside [1, ", ctx.max_tokens_limit, "]"));
  }
  g.max_tokens = mt;
  SamplingParams& sp = g.sampling;
  sp.temperature = 1.0f;
  sp.top_p = 1.0f;
  sp.top_k = 0;
  sp.min_p = 0.0f;
  const v1::SamplingParams& s = in.sampling();
  if (s.has_temperature()) sp.temperature = s.temperature();
  if (s.has_top_p()) sp.top_p = s.top_p();
  if (s.has_top_k()) sp.top_k = s.top_k();
  if (s.has_min_p()) sp.min_p = s.min_p();
  if (s.has_repeat_penalty()) sp.repeat_penalty = s.repeat_penalty();
  if (s.has_repeat_last_n()) sp.repeat_last_n = s.repeat_last_n();
  if (s.has_frequency_penalty()) sp.frequency_penalty = s.frequency_penalty();
  if (s.has_presence_penalty()) sp.presence_penalty = s.presence_penalty();
  if (s.has_seed()) sp.seed = s.seed();
  if (absl::Status st = sp.Validate(); !st.ok()) return absl::InvalidArgumentError(st.message());
  for (const auto& stop : in.stop()) g.stop.push_back(stop);
  g.ignore_eos = in.ignore_eos();
  if (in.top_logprobs() < 0 || in.top_logprobs() > kMaxTopLogprobs) {
    return absl::InvalidArgumentError(absl::StrCat("top_logprobs: must be in [0, ", kMaxTopLogprobs, "]"));
  }
  g.top_logprobs = in.top_logprobs();
  return g;
}

void FillUsage(const Usage& u, v1::Usage* out) {
  out->set_prompt_tokens(u.prompt_tokens);
  out->set_completion_tokens(u.completion_tokens);
  out->set_total_tokens(u.prompt_tokens + u.completion_tokens);
  out->set_cached_prompt_tokens(u.cached_prompt_tokens);
}

}  // namespace

class NibbleGrpcService final : public v1::Nibble::Service {
 public:
  explicit NibbleGrpcService(ServerCore* core) : core_(core) {}

  grpc::Status Generate(grpc::ServerContext* ctx, const v1::GenerateRequest* req,
                        grpc::ServerWriter<v1::GenerateResponse>* writer) override {
    return Run(ctx, *req, "/nibble.v1.Nibble/Generate", [&](const GenerationEvent& ev) {
      v1::GenerateResponse msg;
      msg.set_text(ev.text);
      if (!ev.final) {
        msg.add_token_ids(ev.token);
        msg.add_logprobs(ev.logprob);
        for (const TokenLogprob& t : ev.top_logprobs) {
          auto* tl = msg.add_top_logprobs();
          tl->set_token(t.token);
          tl->set_text(utf8::Sanitize(core_->tokenizer().TokenBytes(t.token, true)));
          tl->set_logprob(t.logprob);
        }
      } else {
        msg.set_final(true);
        msg.set_finish_reason(FinishReasonName(ev.finish_reason));
        FillUsage(ev.usage, msg.mutable_usage());
        msg.set_time_to_first_token_s(ev.time_to_first_token_s);
      }
      return writer->Write(msg);
    });
  }

  grpc::Status GenerateUnary(grpc::ServerContext* ctx, const v1::GenerateRequest* req,
                             v1::GenerateUnaryResponse* resp) override {
    return Run(ctx, *req, "/nibble.v1.Nibble/GenerateUnary", [&](const GenerationEvent& ev) {
      resp->mutable_text()->append(ev.text);
      if (!ev.final) {
        resp->add_token_ids(ev.token);
        resp->add_logprobs(ev.logprob);
      } else {
        resp->set_finish_reason(FinishReasonName(ev.finish_reason));
        FillUsage(ev.usage, resp->mutable_usage());
        resp->set_time_to_first_token_s(ev.time_to_first_token_s);
      }
      return true;
    });
  }

  grpc::Status Tokenize(grpc::ServerContext* ctx, const v1::TokenizeRequest* req,
                        v1::TokenizeResponse* resp) override {
    if (!Authorized(ctx)) return Unauthenticated();
    const Tokenizer& tok = core_->tokenizer();
    auto ids = tok.Encode(req->text(), {.add_bos = req->add_bos() && tok.ShouldAddBos(),
                                        .parse_special = req->parse_special()});
    if (!ids.ok()) return ToGrpc(absl::InvalidArgumentError(ids.status().message()));
    for (int32_t id : *ids) resp->add_ids(id);
    return grpc::Status::OK;
  }

  grpc::Status Detokenize(grpc::ServerContext* ctx, const v1::DetokenizeRequest* req,
                          v1::DetokenizeResponse* resp) override {
    if (!Authorized(ctx)) return Unauthenticated();
    const Tokenizer& tok = core_->tokenizer();
    std::vector<int32_t> ids;
    for (int32_t id : req->ids()) {
      if (id < 0 || id >= tok.vocab_size()) {
        return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                            absl::StrCat("ids: ", id, " is outside [0, ", tok.vocab_size(), ")"));
      }
      ids.push_back(id);
    }
    const std::string text = utf8::Sanitize(tok.Decode(ids, req->special()));
    resp->set_text(text);
    return grpc::Status::OK;
  }

  grpc::Status ModelInfo(grpc::ServerContext* ctx, const v1::ModelInfoRequest*, v1::ModelInfoResponse* resp) override {
    if (!Authorized(ctx)) return Unauthenticated();
    const ModelConfig& cfg = core_->model().config();
    const SchedulerStats stats = core_->scheduler()->GetStats();
    resp->set_model_id(core_->model_context().model_id);
    resp->set_vocab_size(core_->tokenizer().vocab_size());
    resp->set_context_length(cfg.max_seq_len);
    resp->set_n_layers(cfg.n_layers);
    resp->set_dim(cfg.dim);
    resp->set_bos_id(core_->tokenizer().bos_id());
    resp->set_eos_id(core_->tokenizer().eos_id());
    resp->set_chat_template_family(ChatTemplateFamilyName(core_->model_context().chat_template));
    resp->set_kv_blocks_total(stats.kv_blocks_total);
    resp->set_kv_block_size(stats.block_size);
    resp->set_max_tokens_limit(core_->model_context().max_tokens_limit);
    return grpc::Status::OK;
  }

 private:
  bool Authorized(grpc::ServerContext* ctx) const {
    const auto& md = ctx->client_metadata();
    auto it = md.find("authorization");
    absl::string_view v = it == md.end() ? absl::string_view() : absl::string_view(it->second.data(), it->second.size());
    return core_->Authorized(v);
  }
  static grpc::Status Unauthenticated() {
    return grpc::Status(grpc::StatusCode::UNAUTHENTICATED, "missing or wrong 'authorization: Bearer KEY' metadata");
  }

  // Submits `req` and feeds its events to `emit` (false = the client is gone).
  grpc::Status Run(grpc::ServerContext* ctx, const v1::GenerateRequest& in, const char* route,
                   const std::function<bool(const GenerationEvent&)>& emit) {
    const Clock::time_point start = Clock::now();
    RequestLog log;
    log.id = core_->NewId("gen");
    log.api = "grpc";
    log.route = route;
    auto finish = [&](const grpc::Status& s) {
      log.status = s.error_code();
      log.error = s.error_message();
      log.duration_s = std::chrono::duration<double>(Clock::now() - start).count();
      core_->LogRequest(log);
      return s;
    };
    if (!Authorized(ctx)) return finish(Unauthenticated());
    if (core_->draining()) return finish(grpc::Status(grpc::StatusCode::UNAVAILABLE, "the server is shutting down"));
    auto g = ToGeneration(*core_, in);
    if (!g.ok()) return finish(ToGrpc(g.status()));
    const auto deadline = ctx->deadline();
    const auto sys_now = std::chrono::system_clock::now();
    if (deadline < sys_now + std::chrono::hours(24 * 365)) {
      g->deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(deadline - sys_now);
    }
    std::vector<GenerationRequest> reqs;
    reqs.push_back(*std::move(g));
    auto stream = core_->SubmitAll(std::move(reqs));
    if (!stream.ok()) return finish(ToGrpc(stream.status()));
    bool cancelled = false;
    GenerationEvent final_ev;
    RequestStream::Item item;
    while (!(*stream)->AllFinalsPopped()) {
      if (!cancelled && ctx->IsCancelled()) {
        cancelled = true;
        (*stream)->CancelAll();
      }
      if (!(*stream)->Pop(&item, std::chrono::milliseconds(50))) continue;
      const GenerationEvent& ev = item.ev;
      if (log.ttft_s < 0 && ev.time_to_first_token_s >= 0) log.ttft_s = ev.time_to_first_token_s;
      log.prompt_tokens = ev.usage.prompt_tokens;
      log.completion_tokens = ev.usage.completion_tokens;
      if (ev.final) {
        final_ev = ev;
        break;
      }
      if (!cancelled && !emit(ev)) {
        cancelled = true;
        (*stream)->CancelAll();
      }
    }
    switch (final_ev.finish_reason) {
      case FinishReason::kStop:
      case FinishReason::kLength:
        if (cancelled || !emit(final_ev)) return finish(grpc::Status(grpc::StatusCode::CANCELLED, "client cancelled"));
        return finish(grpc::Status::OK);
      case FinishReason::kDeadline:
        return finish(grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED, "the call's deadline passed"));
      case FinishReason::kCancelled:
        if (!cancelled && core_->draining()) {
          return finish(grpc::Status(grpc::StatusCode::UNAVAILABLE, "cancelled: the server is shutting down"));
        }
        return finish(grpc::Status(grpc::StatusCode::CANCELLED, "cancelled"));
      default:
        return finish(grpc::Status(grpc::StatusCode::INTERNAL,
                                   absl::StrCat("generation failed: ", final_ev.status.message())));
    }
  }

  ServerCore* core_;
};

GrpcServer::GrpcServer(ServerCore* core) : core_(core), service_(std::make_unique<NibbleGrpcService>(core)) {}

GrpcServer::~GrpcServer() { Stop(std::chrono::milliseconds(0)); }

absl::StatusOr<int> GrpcServer::Start(const std::string& host, int port) {
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  int bound = 0;
  const std::string addr = absl::StrCat(host.find(':') != std::string::npos ? "[" + host + "]" : host, ":", port);
  builder.AddListeningPort(addr, grpc::InsecureServerCredentials(), &bound);
  builder.RegisterService(service_.get());
  server_ = builder.BuildAndStart();
  if (server_ == nullptr || bound == 0) return absl::UnavailableError(absl::StrCat("grpc: cannot bind ", addr));
  server_->GetHealthCheckService()->SetServingStatus(true);
  return bound;
}

void GrpcServer::SetNotServing() {
  if (server_) server_->GetHealthCheckService()->SetServingStatus(false);
}

void GrpcServer::Stop(std::chrono::milliseconds grace) {
  if (!server_) return;
  server_->Shutdown(std::chrono::system_clock::now() + grace);
  server_->Wait();
  server_.reset();
}

}  // namespace nibble::server
