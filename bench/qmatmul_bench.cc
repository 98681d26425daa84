// Speed of the packed-weight matmul (kernels/cpu/qmatmul.h) at 1 thread on
// SmolLM2-135M shapes: GEMV (1 token: decode), 4-, 8- and 16-token GEMMs
// (short prefill chunks, around the AMX threshold of 8) and 512-token GEMMs (prefill: q/k/v/o
// 576x576 and 192x576, gate/up 1536x576, down 576x1536), AVX-512 VNNI vs AMX.
// Reports bytes_per_second = packed weight bytes streamed per second (GEMVs
// also pct_of_read_bw: that over the read bandwidth measured on a buffer of
// the same size at 1 thread, bench/membw.h; mem_read/<bytes> prints that
// bound), plus the fp32 dequantize-then-dot reference for scale. f32/... and
// f16/..., bf16/... time the dense MatMulF32 / MatMulF16 / MatMulBF16 (ops.h) on the same shapes (GFLOP/s,
// bytes/s, GEMVs also pct_of_read_bw);
// <format>/dequant-f32 times QuantMatMulDequantF32 (the prefill path of CPUs
// without AMX) at 16 and 512 tokens.
//
//   build/bin/qmatmul_bench --benchmark_filter='int4_g32/' --benchmark_min_time=0.2
// Args: {rows, cols, n_tokens, isa (0 scalar, 1 avx2, 2 avx512, 3 amx)}.
// Before timing, the first 16 tokens are checked bit for bit against the
// scalar kernel (amx: against QuantMatMulAmxOrderRef, its order in scalar
// code); every token's output depends on that token alone.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "bench/membw.h"
#include "kernels/common/fp16.h"
#include "kernels/cpu/ops.h"
#include "kernels/cpu/qmatmul.h"
#include "kernels/formats/format.h"

namespace nibble::cpu {
namespace {

struct Packed {
  std::vector<uint8_t> bytes;
  QSegmentView seg;
  QMatrixView view;
};

Packed MakePacked(const fmt::Format& f, int64_t rows, int64_t cols) {
  Packed p;
  const int64_t rb = f.RowBytes(cols);
  p.bytes.resize(static_cast<size_t>(rows * rb));
  std::mt19937 rng(1);
  std::normal_distribution<float> nd(0.0f, 0.05f);
  std::vector<float> w(static_cast<size_t>(cols));
  // Quantize a few distinct rows and tile them (quantizing 49152 rows is slow).
  const int64_t distinct = std::min<int64_t>(rows, 64);
  for (int64_t r = 0; r < distinct; ++r) {
    for (float& v : w) v = nd(rng);
    fmt::QuantizeRowRef(f, w.data(), cols, nullptr, p.bytes.data() + r * rb);
  }
  for (int64_t r = distinct; r < rows; ++r)
    std::copy_n(p.bytes.data() + (r % distinct) * rb, rb, p.bytes.data() + r * rb);
  p.seg = {0, rows, f, p.bytes.data()};
  p.view.rows = rows;
  p.view.cols = cols;
  p.view.segments = std::span<const QSegmentView>(&p.seg, 1);
  return p;
}

// n standard-normal activations (fixed seed).
std::vector<float> RandomActs(int64_t n) {
  std::vector<float> x(static_cast<size_t>(n));
  std::mt19937 rng(2);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  for (float& v : x) v = nd(rng);
  return x;
}

// MeasureReadBandwidth at 1 thread, once per buffer size.
double ReadBandwidth(size_t bytes) {
  static std::map<size_t, double>* cache = new std::map<size_t, double>();
  auto it = cache->find(bytes);
  if (it == cache->end()) it = cache->emplace(bytes, bench::MeasureReadBandwidth(bytes, 1)).first;
  return it->second;
}

void BM_MemRead(benchmark::State& state) {
  const size_t bytes = static_cast<size_t>(state.range(0));
  for (auto _ : state) state.counters["GB/s"] = bench::MeasureReadBandwidth(bytes, 1);
}

void BM_QMatMul(benchmark::State& state, fmt::Format f) {
  const int64_t rows = state.range(0), cols = state.range(1), n_tokens = state.range(2);
  const QIsa isa = static_cast<QIsa>(state.range(3));
  if (!QIsaSupported(isa)) {
    state.SkipWithError("ISA not supported");
    return;
  }
  const Packed p = MakePacked(f, rows, cols);
  const std::vector<float> x = RandomActs(n_tokens * cols);
  std::vector<float> y(static_cast<size_t>(n_tokens * rows));
  QMatMulScratch scratch;
  // Guard: every ISA must equal the scalar kernel bit for bit on this shape
  // (qmatmul.h's contract; the unit test covers small shapes only).
  // (NIBBLE_QMM_BENCH_NO_CHECK=1 skips it: timing experiments only.)
  if (isa != QIsa::kScalar && std::getenv("NIBBLE_QMM_BENCH_NO_CHECK") == nullptr) {
    const int64_t nc = std::min<int64_t>(n_tokens, 16);
    std::vector<float> ref(static_cast<size_t>(nc * rows)), got(ref.size());
    if (isa == QIsa::kAmx) {
      QuantMatMulAmxOrderRef(p.view, x.data(), nc, ref.data());
    } else {
      QuantMatMulIsa(QIsa::kScalar, p.view, x.data(), nc, ref.data(), nullptr, &scratch);
    }
    QuantMatMulIsa(isa, p.view, x.data(), nc, got.data(), nullptr, &scratch);
    if (std::memcmp(ref.data(), got.data(), got.size() * sizeof(float)) != 0) {
      state.SkipWithError("result differs from the scalar reference");
      return;
    }
  }
  const double bw = n_tokens == 1 ? ReadBandwidth(p.bytes.size()) : 0.0;  // before the timed loop
  const auto t0 = std::chrono::steady_clock::now();
  for (auto _ : state) {
    QuantMatMulIsa(isa, p.view, x.data(), n_tokens, y.data(), nullptr, &scratch);
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  state.SetBytesProcessed(state.iterations() * static_cast<int64_t>(p.bytes.size()));
  // GEMV: percent of the read bandwidth measured on a buffer of the same size.
  if (bw > 0 && secs > 0)
    state.counters["pct_of_read_bw"] =
        100.0 * static_cast<double>(state.iterations()) * static_cast<double>(p.bytes.size()) / secs / (bw * 1e9);
  state.SetLabel(QIsaName(isa));
}

void BM_F32Ref(benchmark::State& state, fmt::Format f) {
  const int64_t rows = state.range(0), cols = state.range(1);
  const Packed p = MakePacked(f, rows, cols);
  std::vector<float> x(static_cast<size_t>(cols), 0.5f), y(static_cast<size_t>(rows));
  for (auto _ : state) {
    QuantMatMulF32Ref(p.view, x.data(), 1, y.data());
    benchmark::DoNotOptimize(y.data());
  }
  state.SetBytesProcessed(state.iterations() * static_cast<int64_t>(p.bytes.size()));
}

// QuantMatMulDequantF32 (prefill where no AMX unit runs: rows dequantized into
// the fp32 packed-panel GEMM) at 1 thread. Args: {rows, cols, n_tokens, isa
// (1 avx2, 2 avx512)}; GFLOP/s counts 2 rows cols n_tokens.
void BM_DequantF32(benchmark::State& state, fmt::Format f) {
  const int64_t rows = state.range(0), cols = state.range(1), n_tokens = state.range(2);
  const char* isa = state.range(3) == 2 ? "avx512" : "avx2";
  if (!ForceIsaForTesting(isa)) {
    state.SkipWithError("ISA not supported");
    return;
  }
  const Packed p = MakePacked(f, rows, cols);
  const std::vector<float> x = RandomActs(n_tokens * cols);
  std::vector<float> y(static_cast<size_t>(n_tokens * rows));
  for (auto _ : state) {
    QuantMatMulDequantF32(p.view, x.data(), n_tokens, y.data(), nullptr);
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  ForceIsaForTesting("");
  state.SetBytesProcessed(state.iterations() * static_cast<int64_t>(p.bytes.size()));
  state.counters["GFLOP/s"] = benchmark::Counter(2.0 * static_cast<double>(rows * cols * n_tokens),
                                                 benchmark::Counter::kIsIterationInvariantRate,
                                                 benchmark::Counter::kIs1000);
  state.SetLabel(isa);
}

// Dense weights at 1 thread: fp32 MatMulF32, fp16 MatMulF16 or bf16 MatMulBF16 (ops.h); kind 0 / 1 / 2.
// Args: {rows, cols, n_tokens, isa (1 avx2, 2 avx512)}. Reports GFLOP/s, the
// weight bytes streamed per second and, for GEMVs, pct_of_read_bw.
void BM_DenseMatMul(benchmark::State& state, int kind) {
  const bool f16 = kind != 0;  // a 16-bit kind
  const int64_t rows = state.range(0), cols = state.range(1), n_tokens = state.range(2);
  const char* isa = state.range(3) == 2 ? "avx512" : "avx2";
  if (!ForceIsaForTesting(isa)) {
    state.SkipWithError("ISA not supported");
    return;
  }
  std::mt19937 rng(3);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> w(static_cast<size_t>(rows * cols)), x(static_cast<size_t>(n_tokens * cols));
  std::vector<uint16_t> wh(f16 ? w.size() : 0);
  std::vector<float> y(static_cast<size_t>(n_tokens * rows));
  for (float& v : w) v = nd(rng);
  for (float& v : x) v = nd(rng);
  for (size_t i = 0; i < wh.size(); ++i) wh[i] = kind == 2 ? Fp32ToBf16(w[i]) : Fp32ToFp16(w[i]);
  const int64_t bytes = rows * cols * (f16 ? 2 : 4);
  const double bw = n_tokens == 1 ? ReadBandwidth(static_cast<size_t>(bytes)) : 0.0;
  const auto t0 = std::chrono::steady_clock::now();
  for (auto _ : state) {
    if (kind == 2) {
      MatMulBF16(wh.data(), rows, cols, x.data(), n_tokens, y.data(), nullptr);
    } else if (f16) {
      MatMulF16(wh.data(), rows, cols, x.data(), n_tokens, y.data(), nullptr);
    } else {
      MatMulF32(w.data(), rows, cols, x.data(), n_tokens, y.data(), nullptr);
    }
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  ForceIsaForTesting("");
  state.SetBytesProcessed(state.iterations() * bytes);
  if (bw > 0 && secs > 0)
    state.counters["pct_of_read_bw"] =
        100.0 * static_cast<double>(state.iterations()) * static_cast<double>(bytes) / secs / (bw * 1e9);
  state.counters["GFLOP/s"] = benchmark::Counter(2.0 * static_cast<double>(rows * cols * n_tokens),
                                                 benchmark::Counter::kIsIterationInvariantRate,
                                                 benchmark::Counter::kIs1000);
  state.SetLabel(isa);
}

const char* const kBenchFormats[] = {"int8_g32", "int4_g32", "int4_g64_sym", "int4_g128", "int3_g64", "int2_g64",
                                     "int2_g128_sym", "ternary_g64", "binary_g64", "bintern_g64"};

int Register() {
  const int64_t shapes[][2] = {{576, 576}, {1536, 576}, {576, 1536}, {49152, 576}};
  // The bounds of the GEMV shapes' int4_g32 sizes (in cache .. DRAM).
  benchmark::RegisterBenchmark("mem_read", BM_MemRead)
      ->Arg(576 * 360)->Arg(1536 * 360)->Arg(49152 * 360)->Iterations(1);
  for (int kind : {0, 1, 2}) {
    auto* d = benchmark::RegisterBenchmark(kind == 2 ? "bf16/matmul" : kind == 1 ? "f16/matmul" : "f32/matmul",
                                           BM_DenseMatMul, kind);
    for (const auto& s : {std::array<int64_t, 2>{576, 576}, {192, 576}, {1536, 576}, {576, 1536}})
      for (int n : {1, 4, 8, 16, 512}) d->Args({s[0], s[1], n, 2});
    d->Args({49152, 576, 1, 2})->Args({1536, 576, 1, 1})->Args({1536, 576, 512, 1})->Args({1536, 576, 16, 1});
  }
  for (const char* name : kBenchFormats) {
    const fmt::Format f = *fmt::Format::Parse(name);
    auto* b = benchmark::RegisterBenchmark((std::string(name) + "/gemv").c_str(), BM_QMatMul, f);
    for (const auto& s : shapes)
      for (int isa : {2, 1}) b->Args({s[0], s[1], 1, isa});
    // L1/L2-resident (64 rows): the kernel's compute cost without the weight stream.
    b->Args({64, 576, 1, 2});
    b->Args({576, 576, 1, 0});
    auto* g = benchmark::RegisterBenchmark((std::string(name) + "/gemm16").c_str(), BM_QMatMul, f);
    g->Args({1536, 576, 16, 2})->Args({1536, 576, 16, 1})->Args({1536, 576, 16, 3});
    for (int n : {4, 8}) {
      auto* gn = benchmark::RegisterBenchmark((std::string(name) + "/gemm" + std::to_string(n)).c_str(), BM_QMatMul, f);
      gn->Args({1536, 576, n, 2})->Args({1536, 576, n, 3});
    }
    auto* pp = benchmark::RegisterBenchmark((std::string(name) + "/prefill512").c_str(), BM_QMatMul, f);
    for (const auto& s : {std::array<int64_t, 2>{576, 576}, {192, 576}, {1536, 576}, {576, 1536}})
      for (int isa : {2, 3}) pp->Args({s[0], s[1], 512, isa});
    auto* dq = benchmark::RegisterBenchmark((std::string(name) + "/dequant-f32").c_str(), BM_DequantF32, f);
    for (int n : {16, 512}) dq->Args({1536, 576, n, 2})->Args({1536, 576, n, 1});
    benchmark::RegisterBenchmark((std::string(name) + "/f32ref").c_str(), BM_F32Ref, f)->Args({1536, 576});
  }
  return 0;
}
const int kRegistered = Register();

}  // namespace
}  // namespace nibble::cpu

BENCHMARK_MAIN();
