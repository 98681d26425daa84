// Prometheus text exposition (format 0.0.4) of the scheduler's stats and the
// server's request counters, written by hand (prometheus-cpp is not packaged
// in Debian bookworm).
//
// Series: gauges nibble_queue_depth, nibble_running_sequences,
// nibble_kv_blocks_used, nibble_kv_blocks_total, nibble_kv_blocks_cached;
// histograms (seconds) nibble_time_to_first_token_seconds,
// nibble_inter_token_latency_seconds, nibble_request_duration_seconds;
// counters nibble_prompt_tokens_total, nibble_generation_tokens_total,
// nibble_prefix_cache_hit_tokens_total, nibble_preemptions_total,
// nibble_requests_total{api,status} (HTTP status codes / gRPC code names).
// Thread safety: pure function.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <utility>

#include "engine/runtime/scheduler.h"

namespace nibble::server {

// Key: (api, status), e.g. ("http", "200") or ("grpc", "OK").
using RequestCounts = std::map<std::pair<std::string, std::string>, int64_t>;

std::string PrometheusText(const SchedulerStats& stats, const RequestCounts& requests);

}  // namespace nibble::server
