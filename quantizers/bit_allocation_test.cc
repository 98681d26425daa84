// Bit allocation: the knapsack solver against brute force on tiny random
// instances; on real stories260K weights and Hessians, allocations at a
// uniform format's exact size must not be worse (measured absolute proxy
// error after quantization) than that uniform format, must stay under the
// budget, and a whole allocated model must survive the nibble file and run.
#include "quantizers/bit_allocation.h"

#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <random>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "engine/io/nibble_file.h"
#include "engine/model/model_loader.h"
#include "quantizers/alloc_cache.h"
#include "quantizers/calibration.h"
#include "quantizers/model_quantizer.h"
#include "tests/test_util.h"

namespace nibble {
namespace {

fmt::Format F(const char* name) {
  auto f = fmt::Format::Parse(name);
  EXPECT_TRUE(f.has_value()) << name;
  return f.value_or(fmt::Format{});
}

// ---- Solver vs brute force.

TEST(Knapsack, MatchesBruteForceWithinGapBound) {
  std::mt19937 rng(7);
  int exact = 0, trials = 0;
  for (int t = 0; t < 300; ++t) {
    const int nb = 1 + rng() % 5;
    std::vector<std::vector<KnapsackOption>> blocks(nb);
    double min_bits = 0, max_bits = 0;
    for (auto& b : blocks) {
      const int no = 1 + rng() % 4;
      double lo = 1e30, hi = 0;
      for (int k = 0; k < no; ++k) {
        KnapsackOption o;
        o.bits = static_cast<double>(1 + rng() % 20);
        o.err = std::uniform_real_distribution<double>(0.0, 10.0)(rng);
        b.push_back(o);
        lo = std::min(lo, o.bits);
        hi = std::max(hi, o.bits);
      }
      min_bits += lo;
      max_bits += hi;
    }
    const double budget = min_bits + std::floor((max_bits - min_bits + 1) * (rng() % 1000) / 1000.0);
    // Brute force over every combination.
    double best = 1e300;
    std::vector<int> idx(nb, 0);
    while (true) {
      double bits = 0, err = 0;
      for (int b = 0; b < nb; ++b) {
        bits += blocks[b][idx[b]].bits;
        err += blocks[b][idx[b]].err;
      }
      if (bits <= budget) best = std::min(best, err);
      int b = 0;
      while (b < nb && ++idx[b] == static_cast<int>(blocks[b].size())) idx[b++] = 0;
      if (b == nb) break;
    }
    auto s = SolveMultipleChoiceKnapsack(blocks, budget);
    ASSERT_TRUE(s.ok()) << s.status();
    double bits = 0, err = 0;
    for (int b = 0; b < nb; ++b) {
      ASSERT_GE(s->choice[b], 0);
      ASSERT_LT(s->choice[b], static_cast<int>(blocks[b].size()));
      bits += blocks[b][s->choice[b]].bits;
      err += blocks[b][s->choice[b]].err;
    }
    EXPECT_DOUBLE_EQ(bits, s->bits);
    EXPECT_NEAR(err, s->err, 1e-9);
    EXPECT_LE(bits, budget) << "trial " << t;
    EXPECT_GE(err, best - 1e-9) << "trial " << t;
    EXPECT_LE(err, best + s->gap_bound + 1e-9) << "trial " << t;
    EXPECT_LE(err, s->lagrangian_err + 1e-9) << "trial " << t;
    exact += std::fabs(err - best) < 1e-9;
    ++trials;
  }
  std::cout << "knapsack: exact optimum in " << exact << " of " << trials << " trials\n";
  EXPECT_GE(exact, trials * 3 / 4);
}

TEST(Knapsack, RejectsInfeasibleAndMalformed) {
  std::vector<std::vector<KnapsackOption>> blocks = {{{10, 1}, {20, 0.5}}, {{5, 2}, {8, 1}}};
  auto s = SolveMultipleChoiceKnapsack(blocks, 14);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.status().code(), absl::StatusCode::kOutOfRange);
  EXPECT_NE(std::string(s.status().message()).find("15"), std::string::npos) << s.status();
  EXPECT_TRUE(SolveMultipleChoiceKnapsack(blocks, 15).ok());
  auto big = SolveMultipleChoiceKnapsack(blocks, 1000);
  ASSERT_TRUE(big.ok());
  EXPECT_EQ(big->choice, (std::vector<int>{1, 1}));
  EXPECT_FALSE(SolveMultipleChoiceKnapsack({{}}, 10).ok());
  EXPECT_FALSE(SolveMultipleChoiceKnapsack({{{-1, 1}}}, 10).ok());
  EXPECT_FALSE(SolveMultipleChoiceKnapsack({{{1, NAN}}}, 10).ok());
  EXPECT_FALSE(SolveMultipleChoiceKnapsack(blocks, -1).ok());
}

TEST(RowBlocks, SplitsAndKeepsSmallMatricesWhole) {
  using V = std::vector<std::pair<int64_t, int64_t>>;
  EXPECT_EQ(RowBlocks(172, 64), (V{{0, 64}, {64, 128}, {128, 172}}));
  EXPECT_EQ(RowBlocks(127, 64), (V{{0, 127}}));
  EXPECT_EQ(RowBlocks(128, 64), (V{{0, 64}, {64, 128}}));
  EXPECT_EQ(RowBlocks(5, 0), (V{{0, 1}, {1, 2}, {2, 3}, {3, 4}, {4, 5}}));
  EXPECT_TRUE(RowBlocks(0, 64).empty());
}

TEST(FormatList, ParsesAndRejects) {
  auto l = ParseFormatList("int3_g64, int4_g128,int3_g64");
  ASSERT_TRUE(l.ok());
  EXPECT_EQ(*l, (std::vector<fmt::Format>{F("int3_g64"), F("int4_g128")}));
  EXPECT_FALSE(ParseFormatList("int3_g64,int5_g64").ok());
  EXPECT_FALSE(ParseFormatList("").ok());
}

// ---- Real weights, real Hessians.

class Stories260KAlloc : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    LoadOptions lo;
    lo.tokenizer_path = ::nibble::testing::Stories260KTokenizer();
    auto loaded = LoadModel(::nibble::testing::Stories260KModel(), lo);
    ASSERT_TRUE(loaded.ok()) << loaded.status();
    auto tok = CreateTokenizer(loaded->vocab);
    ASSERT_TRUE(tok.ok());
    auto model = LlamaModel::Create(*std::move(loaded), 1);
    ASSERT_TRUE(model.ok());
    model_ = model->release();
    auto stats = Calibrate(*model_, **tok, ::nibble::testing::SharedDir() + "/data/tinystories-val.txt", 2048, 256);
    ASSERT_TRUE(stats.ok()) << stats.status();
    stats_ = new CalibrationStats(*std::move(stats));
  }
  static void TearDownTestSuite() {
    delete stats_;
    delete model_;
  }
  // The linear matrices of layers 0 and 4 (first and last; keeps the test fast).
  static std::vector<AllocTensor> Tensors() {
    std::vector<AllocTensor> out;
    for (int l : {0, model_->config().n_layers - 1})
      for (LinearWeight w : kAllLinearWeights)
        out.push_back({absl::StrCat("blk.", l, ".", LinearWeightName(w)), &WeightOf(model_->loaded().weights.layers[l], w),
                       stats_->Get(l, w)});
    return out;
  }
  static LlamaModel* model_;
  static CalibrationStats* stats_;
};
LlamaModel* Stories260KAlloc::model_ = nullptr;
CalibrationStats* Stories260KAlloc::stats_ = nullptr;

// Absolute tr(E H E^T), naive double loops (independent of the allocator's code).
double AbsProxy(const HostTensor& w, const QuantTensor& q, const Hessian& h) {
  const int64_t rows = w.rows(), cols = w.cols();
  std::vector<float> row(cols);
  double total = 0;
  for (int64_t r = 0; r < rows; ++r) {
    q.DequantizeRow(r, row.data());
    for (int64_t i = 0; i < cols; ++i) {
      const double ei = static_cast<double>(w.data[r * cols + i]) - row[i];
      for (int64_t j = 0; j < cols; ++j)
        total += ei * h.at(i, j) * (static_cast<double>(w.data[r * cols + j]) - row[j]);
    }
  }
  return total;
}

TEST_F(Stories260KAlloc, BeatsUniformFormatAtItsSize) {
  ASSERT_NE(stats_, nullptr);
  const std::vector<AllocTensor> tensors = Tensors();
  for (const char* method : {"rtn", "gptq"}) {
    for (const char* uniform : {"int2_g64", "int3_g64"}) {
      const fmt::Format u = F(uniform);
      GptqOptions go;
      go.n_threads = 1;
      double budget = 0, err_uniform = 0;
      std::map<const Hessian*, GptqFactor> factors;
      for (const AllocTensor& t : tensors) {
        budget += 8.0 * t.w->rows() * u.RowBytes(t.w->cols());
        if (!factors.count(t.h)) factors.emplace(t.h, FactorHessian(*t.h, go).value());
        auto q = std::string(method) == "gptq" ? GptqQuantize(*t.w, factors.at(t.h), u, go)
                                               : RtnQuantize(*t.w, t.h->mean_sq, u);
        ASSERT_TRUE(q.ok()) << q.status();
        err_uniform += AbsProxy(*t.w, *q, *t.h);
      }
      BitAllocOptions ao;  // a smaller candidate set than the default, for speed
      ao.candidates = {F("int2_g32"), F("int2_g64"), F("int2_g64_sym"), F("int3_g32"),
                       F("int3_g64"),  F("int3_g64_sym"), F("int4_g64"), F("int4_g64_sym")};
      auto a = AllocateBits(tensors, budget, ao, method, go, 1);
      ASSERT_TRUE(a.ok()) << a.status();
      ASSERT_EQ(a->plans.size(), tensors.size());
      double bits = 0, err = 0;
      int segments = 0;
      for (size_t i = 0; i < tensors.size(); ++i) {
        const AllocTensor& t = tensors[i];
        auto q = QuantizeBlocks(*t.w, a->plans[i], std::string(method) == "gptq" ? &factors.at(t.h) : nullptr,
                                t.h->mean_sq, go, 1);
        ASSERT_TRUE(q.ok()) << q.status();
        ASSERT_EQ(q->segments.size(), a->plans[i].size());
        segments += static_cast<int>(q->segments.size());
        bits += q->BitsPerWeight() * static_cast<double>(t.w->numel());
        err += AbsProxy(*t.w, *q, *t.h);
      }
      std::cout << absl::StrFormat("  %-4s budget of %-14s %8.0f bits: allocated %8.0f bits, %d segments, "
                                   "error %.4f vs uniform %.4f (x%.3f)\n",
                                   method, uniform, budget, bits, segments, err, err_uniform, err / err_uniform);
      EXPECT_LE(bits, budget + 1e-6) << method << " " << uniform;
      EXPECT_GE(bits, 0.98 * budget) << method << " " << uniform;
      EXPECT_NEAR(bits, a->solution.bits, 1e-6);
      // The estimate is the method's own per-row error: measured == estimated.
      EXPECT_NEAR(err, a->est_error_total, 1e-4 * err) << method << " " << uniform;
      EXPECT_LE(err, err_uniform * (1 + 1e-9)) << method << " " << uniform;
    }
  }
}

TEST_F(Stories260KAlloc, RejectsMissingHessianAndBadOptions) {
  std::vector<AllocTensor> tensors = Tensors();
  tensors[0].h = nullptr;
  EXPECT_FALSE(AllocateBits(tensors, 1e9, {}, "rtn", {}, 1).ok());
  BitAllocOptions o;
  o.estimate = "magic";
  EXPECT_FALSE(AllocateBits(Tensors(), 1e9, o, "rtn", {}, 1).ok());
  auto tiny = AllocateBits(Tensors(), 1000, {}, "rtn", {}, 1);
  ASSERT_FALSE(tiny.ok());
  EXPECT_EQ(tiny.status().code(), absl::StatusCode::kOutOfRange);
  EXPECT_NE(std::string(tiny.status().message()).find("infeasible"), std::string::npos) << tiny.status();
}

// The allocation cache and its sensitivity half: a second run with the same
// settings takes everything from the cache and writes the same bytes; a run
// with other candidates (the full cache's key differs) reuses the probes and
// the embedding costs measured so far from the sensitivity cache, measures
// only the new embedding format, and writes exactly what an uncached run
// with those candidates writes.
TEST(BitAllocE2E, CachesReuseProbesAcrossCandidateLists) {
  LoadOptions lo;
  lo.tokenizer_path = ::nibble::testing::Stories260KTokenizer();
  const std::string dir = ::nibble::testing::MakeTempDir("alloccache");
  auto run = [&](const std::vector<fmt::Format>& cands, const std::vector<fmt::Format>& embeds,
                 const std::string& cache, LoadedModel* out) -> absl::StatusOr<QuantizeReport> {
    auto m = LoadModel(::nibble::testing::Stories260KModel(), lo);
    if (!m.ok()) return m.status();
    QuantizeConfig cfg;
    cfg.method = "gptq";
    cfg.target_bpw = 4.0;
    cfg.calib_path = ::nibble::testing::SharedDir() + "/data/tinystories-val.txt";
    cfg.calib_tokens = 512;
    cfg.alloc.candidates = cands;
    cfg.alloc.embed_candidates = embeds;
    cfg.alloc.probe_tokens = 128;
    cfg.alloc.cache_path = cache;
    cfg.n_threads = 1;
    auto r = QuantizeModel(&*m, cfg);
    *out = *std::move(m);
    return r;
  };
  auto bytes = [](const LoadedModel& m) {
    std::string all;
    for (const LayerWeights& l : m.weights.layers)
      for (LinearWeight w : kAllLinearWeights)
        for (const QuantSegment& s : WeightOf(l, w).quant->segments)
          all += s.format.Name() + std::string(s.data.begin(), s.data.end());
    for (const QuantSegment& s : m.weights.tok_embeddings.quant->segments)
      all += s.format.Name() + std::string(s.data.begin(), s.data.end());
    return all;
  };
  const std::vector<fmt::Format> a = {F("int3_g64"), F("int4_g64_sym"), F("int8_g64")};
  const std::vector<fmt::Format> b = {F("nl3_g64"), F("int4_g32"), F("int8_g64")};
  const std::vector<fmt::Format> ea = {F("int4_g32"), F("int8_g32")}, eb = {F("int4_g32"), F("nl4_g32")};
  const std::string cache = dir + "/c.json";
  LoadedModel m1, m2, m3, m4;
  auto r1 = run(a, ea, cache, &m1);
  ASSERT_TRUE(r1.ok()) << r1.status();
  EXPECT_FALSE(r1->alloc_cache_hit);
  ASSERT_TRUE(std::filesystem::exists(cache + ".sens.json"));
  auto r2 = run(a, ea, cache, &m2);
  ASSERT_TRUE(r2.ok()) << r2.status();
  EXPECT_TRUE(r2->alloc_cache_hit);
  EXPECT_EQ(bytes(m1), bytes(m2));
  auto r3 = run(b, eb, cache, &m3);  // other candidates: sensitivity cache only
  ASSERT_TRUE(r3.ok()) << r3.status();
  EXPECT_FALSE(r3->alloc_cache_hit);
  auto r4 = run(b, eb, dir + "/fresh.json", &m4);  // the same, nothing cached
  ASSERT_TRUE(r4.ok()) << r4.status();
  EXPECT_EQ(r3->alloc_mix, r4->alloc_mix);
  EXPECT_EQ(r3->alloc_embed, r4->alloc_embed);
  EXPECT_EQ(bytes(m3), bytes(m4));
  // The sensitivity cache now holds both embedding formats lists' union.
  auto sc = LoadSensitivityCache(cache + ".sens.json", "no such key");
  EXPECT_EQ(sc.status().code(), absl::StatusCode::kNotFound);
  std::ifstream in(cache + ".sens.json");
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  for (const char* f : {"\"int4_g32\"", "\"int8_g32\"", "\"nl4_g32\""}) EXPECT_NE(text.find(f), std::string::npos) << f;
}

// The driver at --bpw 3.5: meets the budget, writes multi-segment tensors
// that survive the nibble file, and the model runs with identical logits.
TEST(BitAllocE2E, AllocatedModelRoundTripsAndRuns) {
  LoadOptions lo;
  lo.tokenizer_path = ::nibble::testing::Stories260KTokenizer();
  const std::string calib = ::nibble::testing::SharedDir() + "/data/tinystories-val.txt";
  {
    auto m = LoadModel(::nibble::testing::Stories260KModel(), lo);
    ASSERT_TRUE(m.ok());
    QuantizeConfig cfg;
    cfg.target_bpw = 3.5;
    cfg.n_threads = 1;
    EXPECT_FALSE(QuantizeModel(&*m, cfg).ok());  // no calibration text
    cfg.calib_path = calib;
    cfg.calib_tokens = 512;
    cfg.target_bpw = 2.0;  // below what int2 + int8 embeddings can reach
    auto r = QuantizeModel(&*m, cfg);
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.status().code(), absl::StatusCode::kOutOfRange);
    EXPECT_NE(std::string(r.status().message()).find("infeasible"), std::string::npos) << r.status();
  }
  auto m = LoadModel(::nibble::testing::Stories260KModel(), lo);
  ASSERT_TRUE(m.ok());
  QuantizeConfig cfg;
  cfg.method = "gptq";
  cfg.target_bpw = 3.5;
  cfg.calib_path = calib;
  cfg.calib_tokens = 1024;
  cfg.alloc.candidates = {F("int2_g64_sym"), F("int3_g64"), F("int3_g64_sym"), F("int4_g64_sym"), F("int8_g64")};
  cfg.n_threads = 1;
  auto report = QuantizeModel(&*m, cfg);
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_LE(report->bpw_all, 3.5);
  EXPECT_GE(report->bpw_all, 3.45);
  EXPECT_EQ(m->metadata["quant.format"], "mixed");
  EXPECT_EQ(m->metadata["quant.alloc.mix"], report->alloc_mix);
  std::cout << "  bpw 3.5: achieved " << report->bpw_all << " (" << report->alloc_mix << ")\n";
  // Independent bit count: every tensor's bytes.
  double bits = 0;
  int64_t params = 0;
  int multi = 0;
  auto count = [&](const HostTensor& t) {
    params += t.numel();
    if (!t.quant) {
      bits += 32.0 * t.numel();
      return;
    }
    multi += t.quant->segments.size() > 1;
    for (const QuantSegment& s : t.quant->segments) bits += 8.0 * s.data.size();
  };
  count(m->weights.tok_embeddings);
  count(m->weights.final_norm);
  if (!m->config.tied_embeddings) count(m->weights.output);
  for (const LayerWeights& l : m->weights.layers) {
    count(l.attn_norm);
    count(l.ffn_norm);
    for (LinearWeight w : kAllLinearWeights) count(WeightOf(l, w));
  }
  EXPECT_NEAR(bits / params, report->bpw_all, 1e-9);
  EXPECT_LE(bits, 3.5 * params);
  EXPECT_GT(multi, 0);  // 172-row matrices are split into row blocks

  const std::string path = ::nibble::testing::MakeTempDir("bitalloc") + "/m.nbl";
  ASSERT_TRUE(io::WriteNibbleFile(*m, path, {.fsync = false}).ok());
  auto back = io::LoadNibbleFile(path);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->metadata["quant.alloc.mix"], report->alloc_mix);
  for (size_t l = 0; l < m->weights.layers.size(); ++l)
    for (LinearWeight w : kAllLinearWeights) {
      const QuantTensor& a = *WeightOf(m->weights.layers[l], w).quant;
      const QuantTensor& b = *WeightOf(back->weights.layers[l], w).quant;
      ASSERT_EQ(a.segments.size(), b.segments.size());
      for (size_t s = 0; s < a.segments.size(); ++s) {
        EXPECT_EQ(a.segments[s].format, b.segments[s].format);
        EXPECT_EQ(a.segments[s].row_end, b.segments[s].row_end);
        EXPECT_TRUE(std::equal(a.segments[s].data.begin(), a.segments[s].data.end(), b.segments[s].data.begin()));
      }
    }
  auto ma = LlamaModel::Create(*std::move(m), 1);
  auto mb = LlamaModel::Create(*std::move(back), 1);
  ASSERT_TRUE(ma.ok() && mb.ok());
  const std::vector<int32_t> tokens = {1, 403, 73, 261, 30, 480, 5};
  const int vocab = (*ma)->config().vocab_size;
  std::vector<float> la(tokens.size() * vocab), lb(la.size());
  auto ca = (*ma)->NewKVCache(), cb = (*mb)->NewKVCache();
  ASSERT_TRUE((*ma)->Forward(tokens, 0, ca.get(), la, true).ok());
  ASSERT_TRUE((*mb)->Forward(tokens, 0, cb.get(), lb, true).ok());
  EXPECT_EQ(la, lb);
  for (float v : la) ASSERT_TRUE(std::isfinite(v));
}

}  // namespace
}  // namespace nibble

namespace nibble {
namespace {

// The SIMD-matmul proxy against a naive fp64 e^T H e, odd sizes.
TEST(RowProxyErrors, MatchesNaiveDouble) {
  for (const auto [rows, cols] : {std::pair<int64_t, int64_t>{3, 17}, {300, 64}, {7, 172}}) {
    std::mt19937 rng(static_cast<uint32_t>(rows * cols));
    std::normal_distribution<float> nd(0.0f, 1.0f);
    std::vector<float> x(static_cast<size_t>(40 * cols));
    for (float& v : x) v = nd(rng);
    HessianAccumulator acc(cols);
    acc.Add(x.data(), 40, 1);
    const Hessian h = acc.Finish();
    std::vector<float> w(static_cast<size_t>(rows * cols)), q(w.size());
    for (size_t i = 0; i < w.size(); ++i) {
      w[i] = nd(rng);
      q[i] = w[i] + 0.1f * nd(rng);
    }
    for (int threads : {1, 2}) {
      const std::vector<double> got = RowProxyErrors(w.data(), q.data(), rows, cols, h, threads);
      ASSERT_EQ(got.size(), static_cast<size_t>(rows));
      for (int64_t r = 0; r < rows; ++r) {
        double want = 0;
        for (int64_t i = 0; i < cols; ++i)
          for (int64_t j = 0; j < cols; ++j)
            want += (double{w[r * cols + i]} - q[r * cols + i]) * h.at(i, j) * (double{w[r * cols + j]} - q[r * cols + j]);
        EXPECT_NEAR(got[r], want, 1e-4 * want + 1e-9) << rows << "x" << cols << " row " << r;
      }
    }
  }
}

}  // namespace
}  // namespace nibble
