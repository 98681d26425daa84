#include "bench/membw.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <numeric>
#include <thread>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#define NIBBLE_MEMBW_PAUSE() _mm_pause()
#else
#define NIBBLE_MEMBW_PAUSE() ((void)0)
#endif

namespace nibble::bench {
namespace {

double SumPlain(const float* p, size_t n) {
  float acc[16] = {};
  for (size_t i = 0; i + 16 <= n; i += 16)
    for (int j = 0; j < 16; ++j) acc[j] += p[i + j];
  return std::accumulate(acc, acc + 16, 0.0);
}

#if defined(__x86_64__)
bool HasAvx512() { return __builtin_cpu_supports("avx512f"); }
// 64-byte loads, 4 independent adds: the core's load bandwidth where the
// buffer is cache-resident (the plain loop compiles to 16-byte SSE loads).
__attribute__((target("avx512f"))) double SumAvx512(const float* p, size_t n) {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  size_t i = 0;
  for (; i + 64 <= n; i += 64) {
    a0 = _mm512_add_ps(a0, _mm512_loadu_ps(p + i));
    a1 = _mm512_add_ps(a1, _mm512_loadu_ps(p + i + 16));
    a2 = _mm512_add_ps(a2, _mm512_loadu_ps(p + i + 32));
    a3 = _mm512_add_ps(a3, _mm512_loadu_ps(p + i + 48));
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3))) + SumPlain(p + i, n - i);
}
#else
bool HasAvx512() { return false; }
double SumAvx512(const float* p, size_t n) { return SumPlain(p, n); }
#endif

}  // namespace

double MeasureReadBandwidth(size_t bytes, int threads) {
  using Clock = std::chrono::steady_clock;
  threads = std::max(threads, 1);
  const size_t n = std::max<size_t>(bytes / sizeof(float), size_t{1} << 14);
  std::vector<float> buf(n);
  for (size_t i = 0; i < n; ++i) buf[i] = static_cast<float>(i & 1023);
  // Each timed pass sums the buffer `reps` times (>= 16 MiB read per pass),
  // so that a small, cache-resident buffer is not timed against the start-up
  // of the pass.
  const int reps = static_cast<int>(std::max<size_t>(1, (size_t{16} << 20) / (n * sizeof(float))));
  std::vector<double> sink(static_cast<size_t>(threads));
  const bool avx512 = HasAvx512();
  auto sum_slice = [&](int t) {
    const size_t b = n * t / threads, e = n * (t + 1) / threads;
    for (int r = 0; r < reps; ++r) sink[t] += avx512 ? SumAvx512(buf.data() + b, e - b) : SumPlain(buf.data() + b, e - b);
  };
  // Workers 1 .. threads - 1 start once and run a pass per generation; the
  // caller runs slice 0 and times the pass until every slice is done.
  std::atomic<int> generation{0}, done{0};
  std::atomic<bool> stop{false};
  std::vector<std::thread> workers;
  for (int t = 1; t < threads; ++t) {
    workers.emplace_back([&, t] {
      int seen = 0;
      for (;;) {
        int g;
        while ((g = generation.load()) == seen && !stop.load()) NIBBLE_MEMBW_PAUSE();
        if (stop.load()) return;
        seen = g;
        sum_slice(t);
        done.fetch_add(1);
      }
    });
  }
  double best = 0;
  for (int pass = 0; pass < 6; ++pass) {
    done.store(0);
    const auto t0 = Clock::now();
    generation.fetch_add(1);
    sum_slice(0);
    while (done.load() != threads - 1) NIBBLE_MEMBW_PAUSE();
    const double s = std::chrono::duration<double>(Clock::now() - t0).count();
    if (pass > 0) best = std::max(best, static_cast<double>(reps) * static_cast<double>(n * sizeof(float)) / s / 1e9);
  }
  stop.store(true);
  for (auto& w : workers) w.join();
  if (std::accumulate(sink.begin(), sink.end(), 0.0) == -1.0) std::printf(" ");  // keep the sums alive
  return best;
}

}  // namespace nibble::bench
