#include "kernels/cpu/thread_pool.h"

#include <sched.h>

#include <algorithm>

#if defined(__x86_64__)
#include <immintrin.h>
#define NIBBLE_PAUSE() _mm_pause()
#else
#define NIBBLE_PAUSE() ((void)0)
#endif

namespace nibble {

// Fork/join protocol. The caller publishes a job under a new generation and
// opens it (open_ = generation); every participant, the caller included,
// claims chunks of the range from an atomic counter until none are left. A
// worker announces itself in active_ BEFORE checking that the job is still
// open; the caller closes the job (open_ = 0) and then waits for active_ to
// drain. With sequentially consistent atomics a worker either sees the job
// closed or is counted in active_, so a late worker (descheduled on a busy
// machine) never runs a finished job, and the caller never waits for a worker
// that has not started: it simply does the remaining chunks itself.

int DefaultThreadCount() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    const int n = CPU_COUNT(&set);
    if (n > 0) return n;
  }
  return std::max(1u, std::thread::hardware_concurrency());
}

ThreadPool::ThreadPool(int n_threads) : n_threads_(n_threads > 0 ? n_threads : DefaultThreadCount()) {
  workers_.reserve(n_threads_ - 1);
  for (int i = 1; i < n_threads_; ++i) workers_.emplace_back([this, i] { WorkerLoop(i); });
}

ThreadPool::~ThreadPool() {
  stop_.store(true);
  generation_.fetch_add(1);
  generation_.notify_all();
  for (auto& t : workers_) t.join();
}

void ThreadPool::WorkerLoop(int index) {
  uint64_t seen = 0;
  for (;;) {
    // Spin briefly before sleeping: decode issues many short regions back to back.
    uint64_t g = generation_.load();
    for (int spin = 0; g == seen && spin < 2000; ++spin) {
      NIBBLE_PAUSE();
      g = generation_.load();
    }
    while (g == seen) {
      generation_.wait(seen);
      g = generation_.load();
    }
    seen = g;
    if (stop_.load()) return;
    active_.fetch_add(1);
    if (open_.load() == g) (*job_)(index);
    active_.fetch_sub(1);
  }
}

void ThreadPool::RunJob(const std::function<void(int)>& job) {
  job_ = &job;
  const uint64_t g = generation_.fetch_add(1) + 1;
  open_.store(g);
  generation_.notify_all();
  job(0);
  open_.store(0);
  while (active_.load() != 0) NIBBLE_PAUSE();
  job_ = nullptr;
}

void ThreadPool::RunChunks(int64_t n_chunks, const std::function<void(int, int64_t)>& chunk_fn) {
  if (n_threads_ == 1 || n_chunks <= 1) {
    for (int64_t c = 0; c < n_chunks; ++c) chunk_fn(0, c);
    return;
  }
  next_chunk_.store(0);
  RunJob([&](int thread) {
    for (int64_t c = next_chunk_.fetch_add(1); c < n_chunks; c = next_chunk_.fetch_add(1)) chunk_fn(thread, c);
  });
}

void ThreadPool::RunOnAll(const std::function<void(int)>& fn) {
  // Each participant runs exactly one "chunk": its own index. A worker that
  // never wakes leaves its chunk to the caller, which runs it under index 0's
  // scratch-free contract: fn must not assume a particular OS thread.
  RunChunks(n_threads_, [&](int, int64_t c) { fn(static_cast<int>(c)); });
}

void ThreadPool::ParallelFor(int64_t n, int64_t grain,
                             const std::function<void(int, int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  grain = std::max<int64_t>(1, grain);
  const int64_t units = (n + grain - 1) / grain;
  if (n_threads_ == 1 || units <= 1) {
    fn(0, 0, n);
    return;
  }
  // Guided self-scheduling: each claim takes 1/(2 * threads) of the units
  // still unclaimed (at least one). Early chunks are long (few calls: a GEMV
  // keeps its prefetch stream), the last ones a single grain, so the threads
  // finish within about one grain of each other; a late (descheduled) thread
  // simply claims less. With fixed chunks of 1/(4 * threads) of the range the
  // tail was worth ~6% of a 2-thread decode step.
  const int64_t div = 2 * int64_t{n_threads_};
  next_chunk_.store(0);
  RunJob([&](int thread) {
    int64_t cur = next_chunk_.load(std::memory_order_relaxed);
    for (;;) {
      if (cur >= units) return;
      const int64_t take = std::max<int64_t>(1, (units - cur) / div);
      if (!next_chunk_.compare_exchange_weak(cur, cur + take)) continue;  // cur reloaded
      fn(thread, cur * grain, std::min(n, (cur + take) * grain));
      cur = next_chunk_.load(std::memory_order_relaxed);
    }
  });
}

}  // namespace nibble
