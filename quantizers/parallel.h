// Fork-join helper for the quantizers: a few large, independent work items
// (row blocks, Hessian tiles, Cholesky row blocks).
//
// Goals: no idle spinning threads left behind (calibration runs inside the
// model's forward pass, whose own ThreadPool must keep the cores), dynamic
// hand-out of unequal items, work-size gating so tiny jobs stay serial.
// Non-goals: nesting, low-latency fine-grained regions (use kernels' ThreadPool).
#pragma once

#include <cstdint>
#include <functional>

namespace nibble {

// n_threads <= 0 means every core available to the process.
int ResolveThreads(int n_threads);

// Calls fn(thread, item) for every item in [0, n) on min(ResolveThreads(n_threads), n)
// threads, the caller's included (thread 0); items are handed out in increasing
// order as threads become free. Runs serially when `work` (any unit; e.g.
// multiply-adds) is below kMinParallelWork.
// REQUIRES: fn is safe to call concurrently for distinct items.
inline constexpr double kMinParallelWork = 4e6;
void ParallelItems(int64_t n, int n_threads, double work, const std::function<void(int thread, int64_t item)>& fn);

}  // namespace nibble
