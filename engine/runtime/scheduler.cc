// Scheduler: public API, admission and the engine loop (see scheduler.h).
#include "engine/runtime/scheduler.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "engine/runtime/stop_strings.h"

namespace nibble {

struct Scheduler::Sequence {
  Sequence(RequestId id_, GenerationRequest r, EventCallback callback, const Tokenizer& tok, int vocab)
      : id(id_), req(std::move(r)), cb(std::move(callback)), sampler(req.sampling, vocab), detok(tok),
        stop(req.stop) {}
  RequestId id;
  GenerationRequest req;
  EventCallback cb;
  std::vector<int32_t> tokens;  // prompt + generated (the EOS that ended the stream excluded)
  int prompt_len = 0;
  int computed = 0;             // positions [0, computed) have K/V in `blocks`
  int generated = 0;            // sampled tokens
  int cached_prompt_tokens = 0;
  bool counted_in_queue = true; // still counts against max_queue (never admitted)
  bool admitted_once = false;
  int64_t admit_order = 0;
  BlockTable blocks;
  Sampler sampler;
  StreamingDetokenizer detok;
  StopStringMatcher stop;
  SchedulerClock::time_point submitted, last_token;
  double ttft_s = -1.0;
  // Set when the sequence is to be finished at the end of the step.
  FinishReason done = FinishReason::kNone;
  absl::Status done_status;
  std::string final_text;
};

const char* FinishReasonName(FinishReason r) {
  switch (r) {
    case FinishReason::kStop: return "stop";
    case FinishReason::kLength: return "length";
    case FinishReason::kCancelled: return "cancelled";
    case FinishReason::kDeadline: return "deadline";
    case FinishReason::kError: return "error";
    default: return "";
  }
}

void LatencyHistogram::Add(double seconds) {
  int i = 0;
  while (i < kBuckets - 1 && seconds > kBounds[i]) ++i;
  ++counts[i];
  ++count;
  sum += seconds;
}

absl::StatusOr<std::unique_ptr<Scheduler>> Scheduler::Create(LlamaModel* model, const Tokenizer* tokenizer,
                                                             const SchedulerOptions& opts) {
  if (model == nullptr || tokenizer == nullptr) return absl::InvalidArgumentError("Scheduler: null model or tokenizer");
  const ModelConfig& c = model->config();
  if (tokenizer->vocab_size() > c.vocab_size)
    return absl::InvalidArgumentError(absl::StrCat("Scheduler: tokenizer has ", tokenizer->vocab_size(),
                                                   " tokens, the model's vocabulary ", c.vocab_size));
  if (opts.max_batch_tokens < 1 || opts.max_batch_tokens > LlamaModel::kMaxBatch)
    return absl::InvalidArgumentError(absl::StrCat("Scheduler: max_batch_tokens ", opts.max_batch_tokens,
                                                   " is not in [1, ", LlamaModel::kMaxBatch, "]"));
  if (opts.max_running < 1 || opts.max_running > opts.max_batch_tokens)
    return absl::InvalidArgumentError(absl::StrCat("Scheduler: max_running ", opts.max_running,
                                                   " is not in [1, max_batch_tokens = ", opts.max_batch_tokens, "]"));
  if (opts.max_queue < 0) return absl::InvalidArgumentError("Scheduler: max_queue must be >= 0");
  if (opts.kv_cache_tokens < 0 || opts.kv_cache_tokens > (int64_t{1} << 31))
    return absl::InvalidArgumentError(absl::StrCat("Scheduler: kv_cache_tokens ", opts.kv_cache_tokens,
                                                   " is not in [0, 2^31]"));
  if (opts.block_size < 1 || opts.block_size > 1024)
    return absl::InvalidArgumentError(absl::StrCat("Scheduler: block_size ", opts.block_size, " is not in [1, 1024]"));
  if (opts.kv_cache_bytes < 0)
    return absl::InvalidArgumentError(absl::StrCat("Scheduler: kv_cache_bytes ", opts.kv_cache_bytes, " is < 0"));
  if (opts.kv_dtype != KvDtype::kF32 && opts.kv_dtype != KvDtype::kInt8 && opts.kv_dtype != KvDtype::kF16)
    return absl::InvalidArgumentError(absl::StrCat("Scheduler: unknown kv_dtype ", static_cast<int>(opts.kv_dtype)));
  PagedKVCache::Options co;
  co.block_size = opts.block_size;
  co.prefix_caching = opts.prefix_caching;
  co.dtype = opts.kv_dtype;
  if (opts.kv_cache_bytes > 0) {
    auto block_bytes = PagedKVCache::BlockBytes(c, opts.block_size, opts.kv_dtype);
    if (!block_bytes.ok()) return block_bytes.status();
    const int64_t blocks = opts.kv_cache_bytes / *block_bytes;
    if (blocks < 1)
      return absl::InvalidArgumentError(absl::StrCat("Scheduler: kv_cache_bytes ", opts.kv_cache_bytes,
                                                     " is less than one ", KvDtypeName(opts.kv_dtype), " KV block of ",
                                                     *block_bytes, " bytes"));
    if (blocks > (int64_t{1} << 31) / opts.block_size)
      return absl::InvalidArgumentError(absl::StrCat("Scheduler: kv_cache_bytes ", opts.kv_cache_bytes,
                                                     " gives more than 2^31 KV positions"));
    co.num_blocks = static_cast<int>(blocks);
  } else {
    const int64_t tokens = opts.kv_cache_tokens > 0 ? opts.kv_cache_tokens : int64_t{4} * c.max_seq_len;
    co.num_blocks = static_cast<int>((tokens + opts.block_size - 1) / opts.block_size);
  }
  auto cache = PagedKVCache::Create(c, co);
  if (!cache.ok()) return cache.status();
  return std::unique_ptr<Scheduler>(new Scheduler(model, tokenizer, opts, *std::move(cache)));
}

Scheduler::Scheduler(LlamaModel* model, const Tokenizer* tokenizer, const SchedulerOptions& opts,
                     std::unique_ptr<PagedKVCache> cache)
    : model_(model), tok_(tokenizer), opts_(opts), cache_(std::move(cache)) {
  stats_.kv_blocks_total = cache_->num_blocks();
  stats_.block_size = cache_->block_size();
  stats_.kv_block_bytes = cache_->block_bytes();
  stats_.kv_bytes_total = cache_->block_bytes() * cache_->num_blocks();
  stats_.kv_dtype = cache_->dtype();
  engine_ = std::thread([this] { EngineLoop(); });
}

Scheduler::~Scheduler() { Shutdown(); }

int64_t Scheduler::kv_capacity_tokens() const { return int64_t{cache_->num_blocks()} * cache_->block_size(); }

absl::StatusOr<RequestId> Scheduler::Submit(GenerationRequest req, EventCallback on_event) {
  const ModelConfig& c = model_->config();
  absl::Status bad;
  const int64_t plen = static_cast<int64_t>(req.prompt.size());
  if (plen == 0) {
    bad = absl::InvalidArgumentError("Submit: the prompt is empty");
  } else if (plen >= c.max_seq_len) {
    bad = absl::InvalidArgumentError(absl::StrCat("Submit: the prompt has ", plen,
                                                  " tokens; the model's context is ", c.max_seq_len));
  } else if (req.max_tokens < 1) {
    bad = absl::InvalidArgumentError(absl::StrCat("Submit: max_tokens ", req.max_tokens, " must be >= 1"));
  } else if (req.top_logprobs < 0 || req.top_logprobs > kMaxTopLogprobs) {
    bad = absl::InvalidArgumentError(absl::StrCat("Submit: top_logprobs ", req.top_logprobs, " is not in [0, ",
                                                  kMaxTopLogprobs, "]"));
  } else if (!on_event) {
    bad = absl::InvalidArgumentError("Submit: no event callback");
  } else if (auto s = req.sampling.Validate(); !s.ok()) {
    bad = s;
  } else {
    for (int64_t i = 0; i < plen; ++i) {
      if (req.prompt[i] < 0 || req.prompt[i] >= c.vocab_size) {
        bad = absl::InvalidArgumentError(absl::StrCat("Submit: prompt token ", i, " has id ", req.prompt[i],
                                                      ", outside the vocabulary [0, ", c.vocab_size, ")"));
        break;
      }
    }
  }
  if (bad.ok()) {
    const int64_t worst = std::min<int64_t>(plen + req.max_tokens, c.max_seq_len);
    if (cache_->BlocksFor(worst) > cache_->num_blocks())
      bad = absl::OutOfRangeError(absl::StrCat("Submit: prompt (", plen, ") + max_tokens (", req.max_tokens,
                                               ") needs ", worst, " KV positions; the pool holds ",
                                               kv_capacity_tokens()));
  }
  std::unique_ptr<Sequence> s;
  if (bad.ok()) {
    s = std::make_unique<Sequence>(0, std::move(req), std::move(on_event), *tok_, c.vocab_size);
    s->tokens = s->req.prompt;
    s->prompt_len = static_cast<int>(plen);
    s->submitted = SchedulerClock::now();
  }
  std::lock_guard<std::mutex> l(mu_);
  if (bad.ok() && !accepting_) bad = absl::UnavailableError("Submit: the scheduler is draining or shut down");
  if (bad.ok() && queued_ >= opts_.max_queue)
    bad = absl::ResourceExhaustedError(absl::StrCat("Submit: the waiting queue is full (", opts_.max_queue,
                                                    " requests)"));
  if (!bad.ok()) {
    ++stats_.requests_rejected;
    return bad;
  }
  const RequestId id = next_id_++;
  s->id = id;
  live_.insert(id);
  ++queued_;
  ++stats_.requests_submitted;
  stats_.prompt_tokens += plen;
  incoming_.push_back(std::move(s));
  work_cv_.notify_one();
  return id;
}

bool Scheduler::Cancel(RequestId id) {
  std::lock_guard<std::mutex> l(mu_);
  if (!live_.contains(id)) return false;
  cancel_requests_.push_back(id);
  work_cv_.notify_one();
  return true;
}

void Scheduler::Drain() {
  std::unique_lock<std::mutex> l(mu_);
  accepting_ = false;
  idle_cv_.wait(l, [&] { return live_.empty() && finals_in_flight_ == 0; });
}

void Scheduler::Shutdown() {
  std::lock_guard<std::mutex> j(join_mu_);
  {
    std::lock_guard<std::mutex> l(mu_);
    accepting_ = false;
    stop_ = true;
  }
  work_cv_.notify_all();
  if (engine_.joinable()) engine_.join();
}

SchedulerStats Scheduler::GetStats() const {
  std::lock_guard<std::mutex> l(mu_);
  SchedulerStats s = stats_;
  s.queue_depth += static_cast<int64_t>(incoming_.size());
  return s;
}

// ---- engine thread ----

void Scheduler::EngineLoop() {
  for (;;) {
    bool stopping = false;
    cancels_.clear();
    {
      std::unique_lock<std::mutex> l(mu_);
      work_cv_.wait(l, [&] {
        return stop_ || !incoming_.empty() || !cancel_requests_.empty() || !waiting_.empty() || !running_.empty();
      });
      while (!incoming_.empty()) {
        waiting_.push_back(std::move(incoming_.front()));
        incoming_.pop_front();
      }
      cancels_.swap(cancel_requests_);
      stopping = stop_;
    }
    if (stopping) {
      const absl::Status st = absl::CancelledError("the scheduler was shut down");
      std::deque<std::unique_ptr<Sequence>> all;
      for (auto& s : running_) all.push_back(std::move(s));
      running_.clear();
      for (auto& s : waiting_) all.push_back(std::move(s));
      waiting_.clear();
      FinishAll(&all, FinishReason::kCancelled, st);
      PublishStats(0.0, 0);
      return;
    }
    Step();
  }
}

void Scheduler::FinishAll(std::deque<std::unique_ptr<Sequence>>* q, FinishReason r, const absl::Status& st) {
  for (auto& s : *q) {
    s->done = r;
    s->done_status = st;
    Finish(std::move(s));
  }
  q->clear();
}

void Scheduler::ApplyCancelsAndDeadlines(const std::vector<RequestId>& cancels) {
  const SchedulerClock::time_point now = SchedulerClock::now();
  auto mark = [&](Sequence* s) {
    if (std::find(cancels.begin(), cancels.end(), s->id) != cancels.end()) {
      s->done = FinishReason::kCancelled;
      s->done_status = absl::CancelledError(absl::StrCat("request ", s->id, " was cancelled"));
    } else if (s->req.deadline <= now) {
      s->done = FinishReason::kDeadline;
      s->done_status = absl::DeadlineExceededError(absl::StrCat("request ", s->id, " passed its deadline"));
    }
  };
  for (auto& s : running_) mark(s.get());
  for (auto& s : waiting_) mark(s.get());
  SweepFinished();
}

void Scheduler::SweepFinished() {
  auto sweep = [&](auto& container) {
    for (auto& s : container)
      if (s->done != FinishReason::kNone) Finish(std::move(s));
    container.erase(std::remove(container.begin(), container.end(), nullptr), container.end());
  };
  sweep(running_);
  sweep(waiting_);
}

void Scheduler::Finish(std::unique_ptr<Sequence> s) {
  cache_->Free(&s->blocks);
  if (s->done == FinishReason::kStop || s->done == FinishReason::kLength) {
    // Whatever the detokenizer and the stop matcher still hold.
    if (!s->stop.stopped()) {
      auto r = s->stop.Push(s->detok.Flush());
      s->final_text += r.text;
      if (!r.stopped) s->final_text += s->stop.Flush();
    }
  }
  GenerationEvent e;
  e.id = s->id;
  e.text = std::move(s->final_text);
  e.final = true;
  e.finish_reason = s->done;
  e.status = s->done_status;
  e.usage = {s->prompt_len, s->generated, s->cached_prompt_tokens};
  e.time_to_first_token_s = s->ttft_s;
  const double dur = std::chrono::duration<double>(SchedulerClock::now() - s->submitted).count();
  const int64_t used = cache_->stats().blocks_used;
  const int64_t running = std::count_if(running_.begin(), running_.end(), [](const auto& p) { return p != nullptr; });
  {
    // Bookkeeping first, so that when the final callback runs the request is
    // gone from stats and Cancel(id) returns false.
    std::lock_guard<std::mutex> l(mu_);
    if (s->counted_in_queue) --queued_;
    live_.erase(s->id);
    ++finals_in_flight_;
    ++stats_.requests_finished[static_cast<int>(s->done)];
    stats_.request_duration.Add(dur);
    stats_.kv_blocks_used = used;
    stats_.running = running;
  }
  s->cb(e);
  std::lock_guard<std::mutex> l(mu_);
  --finals_in_flight_;
  idle_cv_.notify_all();
}

void Scheduler::Admit() {
  while (!waiting_.empty() && static_cast<int>(running_.size()) < opts_.max_running) {
    Sequence* s = waiting_.front().get();
    const int64_t n = static_cast<int64_t>(s->tokens.size());
    BlockTable bt;
    // Keep >= 1 token to compute: its logits give the next token.
    const int64_t hit = cache_->MatchPrefix(s->tokens, n - 1, &bt);
    const int64_t need = cache_->BlocksFor(n) - static_cast<int64_t>(bt.blocks.size());
    const int64_t headroom = running_.empty() ? 0 : 1;  // a block for the running decodes to grow into
    if (need + headroom > cache_->available() || !cache_->Reserve(&bt, n).ok()) {
      cache_->Free(&bt);
      if (running_.empty()) {  // cannot happen (Submit checks the worst case); never spin on it
        s->done = FinishReason::kError;
        s->done_status = absl::InternalError("the request does not fit in the empty KV pool");
        Finish(std::move(waiting_.front()));
        waiting_.pop_front();
        continue;
      }
      break;
    }
    s->blocks = std::move(bt);
    s->computed = static_cast<int>(hit);
    s->admit_order = ++admit_counter_;
    if (!s->admitted_once) s->cached_prompt_tokens = static_cast<int>(hit);
    s->admitted_once = true;
    {
      std::lock_guard<std::mutex> l(mu_);
      if (s->counted_in_queue) --queued_;
      stats_.prefix_cache_hit_tokens += hit;
    }
    s->counted_in_queue = false;
    running_.push_back(std::move(waiting_.front()));
    waiting_.pop_front();
  }
}

void Scheduler::EnsureDecodeSlots() {
  for (size_t i = 0; i < running_.size(); ++i) {
    Sequence* s = running_[i].get();
    const int64_t n = static_cast<int64_t>(s->tokens.size());
    if (n - s->computed != 1) continue;  // prefills hold their blocks since admission
    while (!cache_->Reserve(&s->blocks, n).ok()) {
      // Preempt the most recently admitted sequence (maybe s itself).
      std::unique_ptr<Sequence> victim = std::move(running_.back());
      running_.pop_back();
      cache_->Free(&victim->blocks);
      victim->computed = 0;
      waiting_.push_front(std::move(victim));
      {
        std::lock_guard<std::mutex> l(mu_);
        ++stats_.preemptions;
      }
      if (i >= running_.size()) return;  // s was the victim
    }
  }
}


void Scheduler::Step() {
  const SchedulerClock::time_point t0 = SchedulerClock::now();
  ApplyCancelsAndDeadlines(cancels_);
  Admit();
  EnsureDecodeSlots();
  if (running_.empty()) {
    PublishStats(0.0, 0);
    return;
  }
  // Decodes first (one token each), then prefill chunks, oldest first.
  std::vector<BatchSequence> batch;
  std::vector<Sequence*> who;
  int budget = opts_.max_batch_tokens;
  int64_t prefill = 0;
  for (int pass = 0; pass < 2; ++pass) {
    for (auto& sp : running_) {
      Sequence* s = sp.get();
      const int remaining = static_cast<int>(s->tokens.size()) - s->computed;
      const bool decode = remaining == 1;
      if (decode != (pass == 0) || budget == 0) continue;
      const int n = std::min(remaining, budget);
      budget -= n;
      if (!decode) prefill += n;
      const bool last = s->computed + n == static_cast<int>(s->tokens.size());
      batch.push_back({std::span<const int32_t>(s->tokens).subspan(s->computed, n), s->computed, &s->blocks, last});
      who.push_back(s);
    }
  }
  const size_t vocab = static_cast<size_t>(model_->config().vocab_size);
  if (logits_.size() < batch.size() * vocab) logits_.resize(batch.size() * vocab);
  const absl::Status st = model_->ForwardBatched(batch, cache_.get(), logits_);
  size_t row = 0;
  for (size_t i = 0; i < batch.size(); ++i) {
    Sequence* s = who[i];
    if (!st.ok()) {
      s->done = FinishReason::kError;
      s->done_status = st;
      continue;
    }
    s->computed += static_cast<int>(batch[i].tokens.size());
    cache_->Publish(s->tokens, s->computed, &s->blocks);
    if (batch[i].want_logits) SampleAndEmit(s, std::span<float>(logits_).subspan(row++ * vocab, vocab));
  }
  SweepFinished();
  PublishStats(std::chrono::duration<double>(SchedulerClock::now() - t0).count(), prefill);
}

void Scheduler::SampleAndEmit(Sequence* s, std::span<float> logits) {
  SampleResult r;
  s->sampler.SampleWithLogprobs(logits, s->tokens, s->req.top_logprobs, &r);
  ++s->generated;
  ++step_generated_;
  const SchedulerClock::time_point now = SchedulerClock::now();
  if (!s->req.ignore_eos && tok_->IsEndOfGeneration(r.token)) {
    s->done = FinishReason::kStop;
    return;
  }
  s->tokens.push_back(r.token);
  StopStringMatcher::Result text = s->stop.Push(s->detok.Push(r.token));
  GenerationEvent e;
  e.id = s->id;
  e.token = r.token;
  e.text = std::move(text.text);
  e.logprob = r.logprob;
  e.top_logprobs = std::move(r.top);
  e.usage = {s->prompt_len, s->generated, s->cached_prompt_tokens};
  if (s->ttft_s < 0) {
    s->ttft_s = std::chrono::duration<double>(now - s->submitted).count();
    ttft_samples_.push_back(s->ttft_s);
  } else {
    itl_samples_.push_back(std::chrono::duration<double>(now - s->last_token).count());
  }
  s->last_token = now;
  e.time_to_first_token_s = s->ttft_s;
  s->cb(e);
  if (text.stopped) {
    s->done = FinishReason::kStop;
  } else if (s->generated >= s->req.max_tokens ||
             static_cast<int64_t>(s->tokens.size()) >= model_->config().max_seq_len) {
    s->done = FinishReason::kLength;
  }
}

void Scheduler::PublishStats(double step_s, int64_t prefill_tokens) {
  const PagedKVCache::Stats cs = cache_->stats();
  std::lock_guard<std::mutex> l(mu_);
  if (step_s > 0) {
    ++stats_.steps;
    stats_.busy_s += step_s;
  }
  stats_.prefill_tokens += prefill_tokens;
  for (double x : ttft_samples_) stats_.time_to_first_token.Add(x);
  for (double x : itl_samples_) stats_.inter_token.Add(x);
  stats_.generated_tokens += step_generated_;
  step_generated_ = 0;
  ttft_samples_.clear();
  itl_samples_.clear();
  stats_.queue_depth = static_cast<int64_t>(waiting_.size());
  stats_.running = static_cast<int64_t>(running_.size());
  stats_.kv_blocks_used = cs.blocks_used;
  stats_.kv_blocks_cached = cs.blocks_cached;
}

}  // namespace nibble
