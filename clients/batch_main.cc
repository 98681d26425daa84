// nibble-batch: offline batch generation of a JSONL file of prompts through the
// serving Scheduler (continuous batching), with resumable, crash-safe output.
//
// Goals: the same prompt building as nibble-generate (BOS by the vocabulary's
// rule; --chat or a "messages" array: the model's chat template with special
// tokens parsed), so greedy/seeded results equal nibble-generate's for the same
// settings; a bounded number of requests in flight (--max-batch), so memory
// stays bounded whatever the input size (input is streamed, never loaded
// whole); every finished result appended to the output and fsync()ed at once;
// on restart, ids already in the output are skipped (a torn last line from a
// crash is cut off and redone); bad input lines become error lines and the
// batch goes on.
// Non-goals: n > 1, logprobs, ordering of output lines (they are written in
// completion order; join on "id"), retrying failed requests.
//
// Input line:  {"id": "a" | 7, "prompt": "..." | "messages": [{"role","content"}...],
//               optional "max_tokens", "temperature", "top_p", "top_k", "min_p",
//               "seed", "stop": "s" | ["s", ...]}
// Output line: {"id", "text", "finish_reason", "usage": {"prompt_tokens",
//               "completion_tokens", "total_tokens", "cached_prompt_tokens"}}
//               plus "error" for failed requests. Input errors are
//               {"id": <id or null>, "line": N, "error": "..."}; on resume they
//               are recognised by "line" (so a duplicate id's error line never
//               marks the first occurrence as done).
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <deque>
#include <fstream>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "CLI/CLI.hpp"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "engine/runtime/chat_template.h"
#include "engine/runtime/engine.h"
#include "engine/runtime/sampler.h"
#include "engine/runtime/scheduler.h"
#include "nlohmann/json.hpp"

namespace {

using json = nlohmann::ordered_json;
using Clock = std::chrono::steady_clock;

std::string Dump(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

// Settings from the command line that a line may override.
struct Defaults {
  int max_tokens = 128;
  nibble::SamplingParams sampling;
  std::vector<std::string> stop;
  bool chat = false;
  std::string system;
};

// What resume learned from an existing output file.
struct ResumeState {
  std::unordered_set<std::string> done_ids;  // Dump(id) of finished requests
  std::set<int64_t> done_lines;              // input-error lines already reported
};

// Reads `path` (if it exists), collects finished ids, and cuts off a torn last
// line (no trailing newline, e.g. from a crash mid-write) so appends start clean.
absl::StatusOr<ResumeState> LoadResume(const std::string& path) {
  ResumeState st;
  std::ifstream in(path, std::ios::binary);
  if (!in) return st;  // no file yet
  std::string data((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  in.close();
  const size_t keep = data.rfind('\n') == std::string::npos ? 0 : data.rfind('\n') + 1;
  if (keep < data.size()) {
    fprintf(stderr, "batch: %s: dropping a truncated last line (%zu bytes); it will be redone\n", path.c_str(),
            data.size() - keep);
    if (truncate(path.c_str(), static_cast<off_t>(keep)) != 0) {
      return absl::InternalError(absl::StrCat(path, ": cannot truncate the torn last line: ", strerror(errno)));
    }
  }
  size_t pos = 0;
  int64_t lineno = 0;
  while (pos < keep) {
    const size_t nl = data.find('\n', pos);
    const std::string_view line(data.data() + pos, nl - pos);
    pos = nl + 1;
    ++lineno;
    if (line.find_first_not_of(" \t\r") == std::string_view::npos) continue;
    json j = json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded() || !j.is_object()) {
      fprintf(stderr, "batch: warning: %s line %lld is not a JSON object; ignored\n", path.c_str(),
              static_cast<long long>(lineno));
      continue;
    }
    if (j.contains("line") && j["line"].is_number_integer()) {
      st.done_lines.insert(j["line"].get<int64_t>());
    } else if (j.contains("id") && (j["id"].is_string() || j["id"].is_number_integer())) {
      st.done_ids.insert(Dump(j["id"]));
    }
  }
  return st;
}

// A parsed input line, ready to tokenize.
struct Job {
  json id;
  std::string text;  // prompt text (chat template applied if any)
  bool parse_special = false;
  int max_tokens = 0;
  nibble::SamplingParams sampling;
  std::vector<std::string> stop;
};

absl::Status FieldError(const std::string& field, const std::string& problem) {
  return absl::InvalidArgumentError(absl::StrCat("field \"", field, "\": ", problem));
}

// Fills `job` from line object `j` (id already validated).
absl::Status ParseJob(const json& j, const Defaults& d, const std::string& chat_template, Job* job) {
  job->max_tokens = d.max_tokens;
  job->sampling = d.sampling;
  job->stop = d.stop;
  const bool has_prompt = j.contains("prompt"), has_messages = j.contains("messages");
  if (has_prompt == has_messages) return absl::InvalidArgumentError("need exactly one of \"prompt\" and \"messages\"");
  std::vector<nibble::ChatMessage> msgs;
  if (has_prompt) {
    if (!j["prompt"].is_string()) return FieldError("prompt", "must be a string");
    const std::string prompt = j["prompt"].get<std::string>();
    if (!d.chat) {
      job->text = prompt;
    } else {
      if (!d.system.empty()) msgs.push_back({"system", d.system});
      msgs.push_back({"user", prompt});
    }
  } else {
    const json& m = j["messages"];
    if (!m.is_array() || m.empty()) return FieldError("messages", "must be a non-empty array");
    for (size_t i = 0; i < m.size(); ++i) {
      if (!m[i].is_object() || !m[i].contains("role") || !m[i]["role"].is_string() || !m[i].contains("content") ||
          !m[i]["content"].is_string()) {
        return FieldError(absl::StrCat("messages[", i, "]"), "must be {\"role\": string, \"content\": string}");
      }
      msgs.push_back({m[i]["role"].get<std::string>(), m[i]["content"].get<std::string>()});
    }
  }
  if (!msgs.empty()) {
    std::string warning;
    auto rendered = nibble::ApplyChatTemplate(chat_template, msgs, /*add_generation_prompt=*/true, &warning);
    if (!rendered.ok()) return rendered.status();
    job->text = *std::move(rendered);
    job->parse_special = true;
  }
  if (j.contains("max_tokens")) {
    const json& v = j["max_tokens"];
    if (!v.is_number_integer() || v.get<int64_t>() < 1 || v.get<int64_t>() > (1 << 24)) {
      return FieldError("max_tokens", "must be an integer in [1, 16777216]");
    }
    job->max_tokens = static_cast<int>(v.get<int64_t>());
  }
  for (const char* f : {"temperature", "top_p", "min_p"}) {
    if (!j.contains(f)) continue;
    if (!j[f].is_number()) return FieldError(f, "must be a number");
    const float v = j[f].get<float>();
    if (std::string(f) == "temperature") job->sampling.temperature = v;
    if (std::string(f) == "top_p") job->sampling.top_p = v;
    if (std::string(f) == "min_p") job->sampling.min_p = v;
  }
  if (j.contains("top_k")) {
    if (!j["top_k"].is_number_integer() || j["top_k"].get<int64_t>() < 0 || j["top_k"].get<int64_t>() > (1 << 30)) {
      return FieldError("top_k", "must be a non-negative integer");
    }
    job->sampling.top_k = static_cast<int>(j["top_k"].get<int64_t>());
  }
  if (j.contains("seed")) {
    if (!j["seed"].is_number_unsigned()) return FieldError("seed", "must be a non-negative integer");
    job->sampling.seed = j["seed"].get<uint64_t>();
  }
  if (j.contains("stop")) {
    const json& s = j["stop"];
    job->stop.clear();
    if (s.is_string()) {
      job->stop.push_back(s.get<std::string>());
    } else if (s.is_array()) {
      for (const json& e : s) {
        if (!e.is_string()) return FieldError("stop", "must be a string or an array of strings");
        job->stop.push_back(e.get<std::string>());
      }
    } else if (!s.is_null()) {
      return FieldError("stop", "must be a string or an array of strings");
    }
  }
  return job->sampling.Validate();
}

// Appends lines to the output file, each followed by fsync().
class ResultWriter {
 public:
  static absl::StatusOr<ResultWriter> Open(const std::string& path) {
    const int fd = open(path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (fd < 0) return absl::NotFoundError(absl::StrCat(path, ": cannot open for appending: ", strerror(errno)));
    return ResultWriter(path, fd);
  }
  ResultWriter(ResultWriter&& o) noexcept : path_(std::move(o.path_)), fd_(o.fd_) { o.fd_ = -1; }
  ~ResultWriter() {
    if (fd_ >= 0) close(fd_);
  }
  absl::Status Write(std::string line) {
    line.push_back('\n');
    size_t off = 0;
    while (off < line.size()) {
      const ssize_t n = write(fd_, line.data() + off, line.size() - off);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) return absl::InternalError(absl::StrCat(path_, ": write failed: ", strerror(errno)));
      off += static_cast<size_t>(n);
    }
    if (fsync(fd_) != 0) return absl::InternalError(absl::StrCat(path_, ": fsync failed: ", strerror(errno)));
    return absl::OkStatus();
  }

 private:
  ResultWriter(std::string path, int fd) : path_(std::move(path)), fd_(fd) {}
  std::string path_;
  int fd_ = -1;
};

// Progress on stderr: a redrawn bar on a TTY, else a plain line every few seconds.
class Progress {
 public:
  Progress(int64_t total) : total_(total), tty_(isatty(STDERR_FILENO) == 1), start_(Clock::now()) {}
  void Update(int64_t done, int64_t errors, int64_t tokens, bool last) {
    const auto now = Clock::now();
    const double secs = std::chrono::duration<double>(now - start_).count();
    if (!last && now - last_print_ < (tty_ ? std::chrono::milliseconds(100) : std::chrono::seconds(5))) return;
    last_print_ = now;
    const double frac = total_ > 0 ? static_cast<double>(done) / total_ : 1.0;
    const double tps = secs > 0 ? tokens / secs : 0.0;
    if (tty_) {
      constexpr int kWidth = 30;
      const int fill = static_cast<int>(frac * kWidth);
      fprintf(stderr, "\r[%s%s] %lld/%lld  %lld errors  %.1f tok/s  %.0fs", std::string(fill, '#').c_str(),
              std::string(kWidth - fill, '.').c_str(), static_cast<long long>(done), static_cast<long long>(total_),
              static_cast<long long>(errors), tps, secs);
      if (last) fputc('\n', stderr);
    } else {
      fprintf(stderr, "batch: %lld/%lld done, %lld errors, %.1f tok/s, %.0fs\n", static_cast<long long>(done),
              static_cast<long long>(total_), static_cast<long long>(errors), tps, secs);
    }
    fflush(stderr);
  }

 private:
  int64_t total_;
  bool tty_;
  Clock::time_point start_, last_print_{};
};

// State shared between the main thread and scheduler callbacks.
struct Shared {
  std::mutex mu;
  std::condition_variable cv;
  int64_t in_flight = 0;
  std::deque<std::string> pending;  // finished output lines to write
  int64_t generated_tokens = 0, request_errors = 0;
};

int Fail(const absl::Status& s) {
  fprintf(stderr, "error: %s\n", std::string(s.message()).c_str());
  return 1;
}

int64_t CountLines(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  int64_t n = 0;
  for (std::string line; std::getline(in, line);) {
    if (line.find_first_not_of(" \t\r") != std::string::npos) ++n;
  }
  return n;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"nibble-batch: batch generation of a JSONL prompt file (resumable)"};
  std::string model_path, tokenizer_path, input_path, output_path;
  int threads = 0, max_batch = 16;
  int64_t kv_tokens = 0, seed = -1;
  std::string kv_dtype_name = "f32";
  Defaults d;
  app.add_option("-m,--model", model_path, "model file (GGUF, llama2.c .bin, HF directory)")->required();
  app.add_option("--tokenizer", tokenizer_path, "tokenizer file (llama2.c tok*.bin or SentencePiece .model)");
  app.add_option("-i,--input", input_path, "input JSONL: {\"id\", \"prompt\" | \"messages\", ...} per line")
      ->required();
  app.add_option("-o,--output", output_path, "output JSONL (appended; finished ids are skipped on restart)")
      ->required();
  app.add_option("-t,--threads", threads, "CPU threads (default: all cores)");
  app.add_option("--max-batch", max_batch, "requests in flight at once (batched together)")
      ->check(CLI::Range(1, 256))->capture_default_str();
  app.add_option("--kv-cache-tokens", kv_tokens, "KV pool size in tokens (0: 4 x context)")->capture_default_str();
  app.add_option("--kv-dtype", kv_dtype_name, "KV-cache element type: f32, f16 (half the memory) or int8 (per-token/head scales, ~4x smaller)")
      ->check(CLI::IsMember({"f32", "f16", "int8"}))
      ->capture_default_str();
  app.add_option("-n,--max-tokens", d.max_tokens, "default tokens to generate per prompt")
      ->check(CLI::Range(1, 1 << 24))->capture_default_str();
  app.add_option("--temp", d.sampling.temperature, "default temperature (0 = greedy)")->capture_default_str();
  app.add_option("--top-k", d.sampling.top_k, "default top-k (0 = off)")->capture_default_str();
  app.add_option("--top-p", d.sampling.top_p, "default top-p (1 = off)")->capture_default_str();
  app.add_option("--min-p", d.sampling.min_p, "default min-p (0 = off)")->capture_default_str();
  app.add_option("--repeat-penalty", d.sampling.repeat_penalty, "repetition penalty (1 = off)")->capture_default_str();
  app.add_option("--repeat-last-n", d.sampling.repeat_last_n, "tokens seen by the repetition penalty")
      ->capture_default_str();
  app.add_option("-s,--seed", seed, "default RNG seed (-1 = random per prompt)");
  app.add_option("--stop", d.stop, "default stop string (repeatable)");
  app.add_flag("--chat", d.chat, "wrap \"prompt\" lines in the model's chat template");
  app.add_option("--system", d.system, "with --chat: system message for \"prompt\" lines");
  CLI11_PARSE(app, argc, argv);
  if (seed >= 0) d.sampling.seed = static_cast<uint64_t>(seed);
  if (auto s = d.sampling.Validate(); !s.ok()) return Fail(s);
  if (!std::ifstream(input_path)) return Fail(absl::NotFoundError(absl::StrCat(input_path, ": cannot open input")));

  auto resume = LoadResume(output_path);
  if (!resume.ok()) return Fail(resume.status());
  auto writer = ResultWriter::Open(output_path);
  if (!writer.ok()) return Fail(writer.status());

  nibble::LoadOptions lo;
  lo.tokenizer_path = tokenizer_path;
  auto engine = nibble::OpenEngine(model_path, lo, threads);
  if (!engine.ok()) return Fail(engine.status());
  nibble::LlamaModel& model = *engine->model;
  const nibble::Tokenizer& tok = *engine->tokenizer;
  nibble::SchedulerOptions so;
  so.max_running = max_batch;
  so.max_queue = max_batch;
  so.kv_cache_tokens = kv_tokens;
  auto kv_dtype = nibble::ParseKvDtype(kv_dtype_name);
  if (!kv_dtype.ok()) return Fail(kv_dtype.status());
  so.kv_dtype = *kv_dtype;
  auto sched_or = nibble::Scheduler::Create(&model, &tok, so);
  if (!sched_or.ok()) return Fail(sched_or.status());
  nibble::Scheduler& sched = **sched_or;
  const std::string& chat_template = model.loaded().chat_template;

  const int64_t total = CountLines(input_path);
  const int64_t skipped = static_cast<int64_t>(resume->done_ids.size() + resume->done_lines.size());
  fprintf(stderr, "batch: %s: %lld prompts, %lld already done in %s; max %d in flight, %d threads\n",
          input_path.c_str(), static_cast<long long>(total), static_cast<long long>(skipped), output_path.c_str(),
          max_batch, model.backend().n_threads());
  Progress progress(total);
  int64_t done = 0, errors = 0;  // this run + resumed
  done = skipped;
  Shared sh;
  absl::Status write_status;

  // Writes finished lines (outside the lock); with wait_slot, first blocks until
  // fewer than max_batch requests are in flight.
  auto drain = [&](bool wait_slot, bool wait_all) {
    std::deque<std::string> lines;
    int64_t tokens = 0, req_errors = 0;
    {
      std::unique_lock<std::mutex> l(sh.mu);
      if (wait_slot) sh.cv.wait(l, [&] { return sh.in_flight < max_batch || !sh.pending.empty(); });
      if (wait_all) sh.cv.wait(l, [&] { return sh.in_flight == 0 || !sh.pending.empty(); });
      lines.swap(sh.pending);
      tokens = sh.generated_tokens;
      req_errors = sh.request_errors;
    }
    for (std::string& line : lines) {
      if (auto s = writer->Write(std::move(line)); !s.ok() && write_status.ok()) write_status = s;
      ++done;
    }
    progress.Update(done, errors + req_errors, tokens, false);
  };
  auto write_now = [&](json j) {
    if (auto s = writer->Write(Dump(j)); !s.ok() && write_status.ok()) write_status = s;
    ++done;
    ++errors;
  };
  auto input_error = [&](const json& id, int64_t lineno, const std::string& msg) {
    fprintf(stderr, "%sbatch: %s line %lld: %s\n", isatty(STDERR_FILENO) ? "\n" : "", input_path.c_str(),
            static_cast<long long>(lineno), msg.c_str());
    write_now(json{{"id", id}, {"line", lineno}, {"error", msg}});
  };

  std::ifstream in(input_path, std::ios::binary);
  std::unordered_set<std::string> seen;
  int64_t lineno = 0;
  for (std::string line; std::getline(in, line) && write_status.ok();) {
    ++lineno;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    drain(false, false);
    json j = json::parse(line, nullptr, /*allow_exceptions=*/false);
    json id = nullptr;
    if (!j.is_discarded() && j.is_object() && j.contains("id") &&
        (j["id"].is_string() || j["id"].is_number_integer())) {
      id = j["id"];
    }
    const bool dup = !id.is_null() && !seen.insert(Dump(id)).second;
    if (resume->done_lines.count(lineno)) continue;  // its input error was already reported
    if (j.is_discarded() || !j.is_object()) {
      input_error(id, lineno, "malformed JSON (expected one object per line)");
      continue;
    }
    if (id.is_null()) {
      input_error(id, lineno, "missing or invalid \"id\" (a string or an integer)");
      continue;
    }
    if (dup) {
      input_error(id, lineno, absl::StrCat("duplicate id ", Dump(id), " (only its first line is run)"));
      continue;
    }
    if (resume->done_ids.count(Dump(id))) continue;
    Job job;
    job.id = id;
    if (auto s = ParseJob(j, d, chat_template, &job); !s.ok()) {
      input_error(id, lineno, std::string(s.message()));
      continue;
    }
    auto ids = tok.Encode(job.text, {.add_bos = tok.ShouldAddBos(), .parse_special = job.parse_special});
    nibble::GenerationRequest req;
    if (ids.ok()) req.prompt = *std::move(ids);
    req.max_tokens = job.max_tokens;
    req.sampling = job.sampling;
    req.stop = job.stop;
    drain(/*wait_slot=*/true, false);
    // The text accumulates in the callback (engine thread); the final event
    // turns it into an output line.
    auto text = std::make_shared<std::string>();
    auto cb = [&sh, text, id](const nibble::GenerationEvent& e) {
      if (!e.final) {
        *text += e.text;
        std::lock_guard<std::mutex> l(sh.mu);
        ++sh.generated_tokens;
        return;
      }
      *text += e.text;
      json out = {{"id", id},
                  {"text", *text},
                  {"finish_reason", nibble::FinishReasonName(e.finish_reason)},
                  {"usage",
                   {{"prompt_tokens", e.usage.prompt_tokens},
                    {"completion_tokens", e.usage.completion_tokens},
                    {"total_tokens", e.usage.prompt_tokens + e.usage.completion_tokens},
                    {"cached_prompt_tokens", e.usage.cached_prompt_tokens}}}};
      if (!e.status.ok()) out["error"] = std::string(e.status.message());
      std::lock_guard<std::mutex> l(sh.mu);
      if (!e.status.ok()) ++sh.request_errors;
      --sh.in_flight;
      sh.pending.push_back(Dump(out));
      sh.cv.notify_all();
    };
    absl::Status submit = ids.status();
    if (submit.ok() && req.prompt.empty()) submit = absl::InvalidArgumentError("the prompt is empty and the model adds no BOS");
    if (submit.ok()) {
      std::lock_guard<std::mutex> l(sh.mu);
      ++sh.in_flight;  // before Submit: the callback may run before it returns
    }
    if (submit.ok()) {
      auto rid = sched.Submit(std::move(req), cb);
      if (!rid.ok()) {
        submit = rid.status();
        std::lock_guard<std::mutex> l(sh.mu);
        --sh.in_flight;
      }
    }
    if (!submit.ok()) {
      write_now(json{{"id", id},
                     {"text", ""},
                     {"finish_reason", "error"},
                     {"usage", {{"prompt_tokens", 0}, {"completion_tokens", 0}, {"total_tokens", 0}}},
                     {"error", std::string(submit.message())}});
    }
  }
  for (;;) {
    drain(false, /*wait_all=*/true);
    std::lock_guard<std::mutex> l(sh.mu);
    if (sh.in_flight == 0 && sh.pending.empty()) break;
  }
  if (!write_status.ok()) {
    sched.Shutdown();
    return Fail(write_status);
  }
  int64_t req_errors, tokens;
  {
    std::lock_guard<std::mutex> l(sh.mu);
    req_errors = sh.request_errors;
    tokens = sh.generated_tokens;
  }
  progress.Update(done, errors + req_errors, tokens, true);
  fprintf(stderr, "batch: wrote %s: %lld results (%lld skipped as done), %lld errors\n", output_path.c_str(),
          static_cast<long long>(done), static_cast<long long>(skipped), static_cast<long long>(errors + req_errors));
  return 0;
}
