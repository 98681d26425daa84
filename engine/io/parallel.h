// Tiny fork-join helper for the model readers (dequantizing/converting many
// independent tensors). Goals: no dependency, deterministic error reporting.
// Non-goals: a thread pool; nested use.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <functional>
#include <thread>
#include <vector>

#include "absl/status/status.h"

namespace nibble::io {

// Calls fn(0..n-1) on up to `max_threads` threads (the caller's included) and
// returns the error of the lowest failing index, or OK.
// REQUIRES: fn is safe to call concurrently for distinct indices.
inline absl::Status ParallelFor(size_t n, const std::function<absl::Status(size_t)>& fn,
                                unsigned max_threads = 8) {
  std::vector<absl::Status> status(n);
  std::atomic<size_t> next{0};
  auto worker = [&]() {
    for (size_t i = next++; i < n; i = next++) status[i] = fn(i);
  };
  const unsigned hw = std::max(1u, std::thread::hardware_concurrency());
  const unsigned n_threads = static_cast<unsigned>(std::min<size_t>({hw, max_threads, std::max<size_t>(n, 1)}));
  std::vector<std::thread> threads;
  for (unsigned i = 1; i < n_threads; ++i) threads.emplace_back(worker);
  worker();
  for (std::thread& t : threads) t.join();
  for (const absl::Status& s : status) {
    if (!s.ok()) return s;
  }
  return absl::OkStatus();
}

}  // namespace nibble::io
