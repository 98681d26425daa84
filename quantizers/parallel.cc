#include "quantizers/parallel.h"

#include <algorithm>
#include <atomic>
#include <thread>
#include <vector>

#include "kernels/cpu/thread_pool.h"

namespace nibble {

int ResolveThreads(int n_threads) { return n_threads > 0 ? n_threads : DefaultThreadCount(); }

void ParallelItems(int64_t n, int n_threads, double work, const std::function<void(int, int64_t)>& fn) {
  if (n <= 0) return;
  const int64_t t = work < kMinParallelWork ? 1 : std::min<int64_t>(ResolveThreads(n_threads), n);
  if (t <= 1) {
    for (int64_t i = 0; i < n; ++i) fn(0, i);
    return;
  }
  std::atomic<int64_t> next{0};
  auto worker = [&](int thread) {
    for (int64_t i = next++; i < n; i = next++) fn(thread, i);
  };
  std::vector<std::thread> threads;
  threads.reserve(static_cast<size_t>(t - 1));
  for (int i = 1; i < t; ++i) threads.emplace_back(worker, i);
  worker(0);
  for (std::thread& th : threads) th.join();
}

}  // namespace nibble
