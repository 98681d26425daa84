#include "server/metrics.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace nibble::server {
namespace {

void Header(std::string* out, const char* name, const char* type, const char* help) {
  absl::StrAppend(out, "# HELP ", name, " ", help, "\n# TYPE ", name, " ", type, "\n");
}

void Gauge(std::string* out, const char* name, const char* help, int64_t v) {
  Header(out, name, "gauge", help);
  absl::StrAppend(out, name, " ", v, "\n");
}

void Counter(std::string* out, const char* name, const char* help, int64_t v) {
  Header(out, name, "counter", help);
  absl::StrAppend(out, name, " ", v, "\n");
}

// Prometheus buckets are cumulative; LatencyHistogram's are per bucket.
void Histogram(std::string* out, const char* name, const char* help, const LatencyHistogram& h) {
  Header(out, name, "histogram", help);
  int64_t cum = 0;
  for (int i = 0; i < LatencyHistogram::kBuckets; ++i) {
    cum += h.counts[i];
    const std::string le = i + 1 < LatencyHistogram::kBuckets
                               ? absl::StrFormat("%g", LatencyHistogram::kBounds[i])
                               : std::string("+Inf");
    absl::StrAppend(out, name, "_bucket{le=\"", le, "\"} ", cum, "\n");
  }
  absl::StrAppend(out, name, "_sum ", absl::StrFormat("%.9g", h.sum), "\n");
  absl::StrAppend(out, name, "_count ", h.count, "\n");
}

std::string Escape(const std::string& v) {
  std::string r;
  for (char c : v) {
    if (c == '\\' || c == '"') r.push_back('\\');
    if (c == '\n') {
      r += "\\n";
      continue;
    }
    r.push_back(c);
  }
  return r;
}

}  // namespace

std::string PrometheusText(const SchedulerStats& s, const RequestCounts& requests) {
  std::string out;
  Gauge(&out, "nibble_queue_depth", "Requests waiting for admission (preempted ones included).", s.queue_depth);
  Gauge(&out, "nibble_running_sequences", "Sequences holding KV-cache blocks.", s.running);
  Gauge(&out, "nibble_kv_blocks_used", "KV-cache blocks in use by running sequences.", s.kv_blocks_used);
  Gauge(&out, "nibble_kv_blocks_total", "KV-cache blocks in the pool.", s.kv_blocks_total);
  Gauge(&out, "nibble_kv_cache_bytes", "Memory of the KV-cache block pool (blocks x block bytes; int8 blocks are smaller).",
        s.kv_bytes_total);
  Gauge(&out, "nibble_kv_block_bytes", "Memory of one KV-cache block.", s.kv_block_bytes);
  Gauge(&out, "nibble_kv_blocks_cached", "Free KV-cache blocks holding reusable prefix-cache entries.",
        s.kv_blocks_cached);
  Histogram(&out, "nibble_time_to_first_token_seconds", "Submit to first token.", s.time_to_first_token);
  Histogram(&out, "nibble_inter_token_latency_seconds", "Between consecutive tokens of a request.", s.inter_token);
  Histogram(&out, "nibble_request_duration_seconds", "Submit to final event.", s.request_duration);
  Counter(&out, "nibble_prompt_tokens_total", "Prompt tokens of accepted requests.", s.prompt_tokens);
  Counter(&out, "nibble_generation_tokens_total", "Sampled tokens.", s.generated_tokens);
  Counter(&out, "nibble_prefix_cache_hit_tokens_total", "Prompt tokens served by the prefix cache.",
          s.prefix_cache_hit_tokens);
  Counter(&out, "nibble_preemptions_total", "Sequences preempted for lack of KV blocks.", s.preemptions);
  Header(&out, "nibble_requests_total", "counter", "Finished API requests by API and status.");
  for (const auto& [key, n] : requests) {
    absl::StrAppend(&out, "nibble_requests_total{api=\"", Escape(key.first), "\",status=\"", Escape(key.second),
                    "\"} ", n, "\n");
  }
  return out;
}

}  // namespace nibble::server
