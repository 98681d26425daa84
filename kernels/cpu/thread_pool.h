// A fixed-size pool of worker threads for data-parallel kernels.
//
// Goals: low-latency fork/join for the hundreds of small parallel regions a
// decode step runs (workers spin briefly, then sleep on an atomic wait), no
// allocation per region. Non-goals: task graphs, work stealing, nesting.
//
// Thread safety: ParallelFor may be called from one thread at a time (the
// owner); calls must not nest.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <thread>
#include <vector>

namespace nibble {

class ThreadPool {
 public:
  // n_threads <= 0 picks the number of hardware threads. The calling thread
  // is one of the n_threads, so n_threads - 1 workers are started.
  explicit ThreadPool(int n_threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return n_threads_; }

  // Calls fn(thread_index, begin, end) over [0, n) split into contiguous chunks
  // (multiples of `grain` items, so threads never share a cache line of output
  // when grain is chosen for it), claimed dynamically with shrinking sizes
  // (guided scheduling): a thread that is late (descheduled) simply gets fewer
  // chunks. The split is not deterministic: fn's results must not depend on it. thread_index < size() identifies
  // the calling participant (for per-thread scratch). Returns when all are done.
  void ParallelFor(int64_t n, int64_t grain,
                   const std::function<void(int thread, int64_t begin, int64_t end)>& fn);

  // Calls fn(i) once for every i < size(), spread over the threads (a late
  // worker's share is run by another participant).
  void RunOnAll(const std::function<void(int thread)>& fn);

 private:
  void WorkerLoop(int index);
  // Publishes job to the workers, runs job(0) on the caller, returns when every
  // participant has left it.
  void RunJob(const std::function<void(int)>& job);
  // Runs chunk_fn(thread, c) for every c < n_chunks across the participants.
  void RunChunks(int64_t n_chunks, const std::function<void(int thread, int64_t chunk)>& chunk_fn);

  int n_threads_;
  std::vector<std::thread> workers_;
  const std::function<void(int)>* job_ = nullptr;
  std::atomic<uint64_t> generation_{0};
  std::atomic<uint64_t> open_{0};     // generation of the job being run; 0: none
  std::atomic<int> active_{0};        // workers inside (or about to check) the current job
  std::atomic<int64_t> next_chunk_{0};  // next chunk (RunChunks) or unit (ParallelFor)
  std::atomic<bool> stop_{false};
};

// Hardware threads available to this process (sched affinity aware).
int DefaultThreadCount();

}  // namespace nibble
