#include "quantizers/bit_allocation.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <memory>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/strings/ascii.h"
#include "kernels/cpu/ops.h"
#include "kernels/cpu/thread_pool.h"
#include "quantizers/parallel.h"
#include "quantizers/quant_error.h"
#include "quantizers/rtn.h"

namespace nibble {
namespace {

// Every block's argmin err + lambda * bits (ties: fewer bits, then lower index).
void PickAll(const std::vector<std::vector<KnapsackOption>>& blocks, double lambda, std::vector<int>* choice,
             double* bits, double* err) {
  *bits = 0;
  *err = 0;
  for (size_t b = 0; b < blocks.size(); ++b) {
    const auto& opts = blocks[b];
    int best = 0;
    double best_v = opts[0].err + lambda * opts[0].bits;
    for (size_t k = 1; k < opts.size(); ++k) {
      const double v = opts[k].err + lambda * opts[k].bits;
      if (v < best_v || (v == best_v && opts[k].bits < opts[best].bits)) {
        best = static_cast<int>(k);
        best_v = v;
      }
    }
    (*choice)[b] = best;
    *bits += opts[best].bits;
    *err += opts[best].err;
  }
}


HostTensor RowSlice(const HostTensor& w, int64_t r0, int64_t r1) {
  HostTensor s;
  s.name = absl::StrCat(w.name, "[rows ", r0, ":", r1, "]");
  s.shape = {r1 - r0, w.cols()};
  s.data.assign(w.data.begin() + r0 * w.cols(), w.data.begin() + r1 * w.cols());
  return s;
}

}  // namespace

// Per-row e^T H e of e = w - q. E H is one fp32 matmul on the engine's SIMD
// kernel (H is symmetric, so row r of (E H) is H e_r); each row's final dot
// e_r . (H e_r) accumulates in double. fp32 products over <= 16k terms keep
// ~1e-6 relative error, far below what an allocation estimate needs.
std::vector<double> RowProxyErrors(const float* w, const float* q, int64_t rows, int64_t cols, const Hessian& h,
                                   int n_threads) {
  std::vector<double> out(static_cast<size_t>(rows), 0.0);
  constexpr int64_t kRowsPerPass = 256;  // bounds the scratch to 2 * 256 * cols floats
  std::vector<float> e(static_cast<size_t>(std::min(rows, kRowsPerPass) * cols));
  std::vector<float> eh(e.size());
  std::unique_ptr<ThreadPool> pool;
  if (n_threads != 1) pool = std::make_unique<ThreadPool>(n_threads);
  for (int64_t r0 = 0; r0 < rows; r0 += kRowsPerPass) {
    const int64_t n = std::min(kRowsPerPass, rows - r0);
    for (int64_t i = 0; i < n * cols; ++i) e[i] = w[r0 * cols + i] - q[r0 * cols + i];
    cpu::MatMulF32(h.h.data(), cols, cols, e.data(), n, eh.data(), pool.get());
    for (int64_t r = 0; r < n; ++r) {
      double acc = 0;
      for (int64_t j = 0; j < cols; ++j) acc += static_cast<double>(e[r * cols + j]) * eh[r * cols + j];
      out[r0 + r] = std::max(acc, 0.0);  // H is PSD; clamp rounding noise
    }
  }
  return out;
}

absl::StatusOr<KnapsackSolution> SolveMultipleChoiceKnapsack(const std::vector<std::vector<KnapsackOption>>& blocks,
                                                              double budget_bits) {
  if (!(budget_bits >= 0 && std::isfinite(budget_bits)))
    return absl::InvalidArgumentError(absl::StrCat("knapsack: budget ", budget_bits, " bits is not finite and >= 0"));
  double min_bits = 0;
  for (size_t b = 0; b < blocks.size(); ++b) {
    if (blocks[b].empty()) return absl::InvalidArgumentError(absl::StrCat("knapsack: block ", b, " has no options"));
    double mb = std::numeric_limits<double>::infinity();
    for (const KnapsackOption& o : blocks[b]) {
      if (!(o.bits >= 0 && std::isfinite(o.bits) && o.err >= 0 && std::isfinite(o.err)))
        return absl::InvalidArgumentError(
            absl::StrCat("knapsack: block ", b, " has an option with bits ", o.bits, ", err ", o.err));
      mb = std::min(mb, o.bits);
    }
    min_bits += mb;
  }
  if (min_bits > budget_bits)
    return absl::OutOfRangeError(absl::StrFormat(
        "budget of %.0f bits is infeasible: the cheapest choice of every block needs %.0f bits", budget_bits,
        min_bits));

  KnapsackSolution s;
  s.choice.assign(blocks.size(), 0);
  double bits = 0, err = 0;
  PickAll(blocks, 0.0, &s.choice, &bits, &err);
  if (bits > budget_bits) {
    // Find a feasible hi by doubling, then bisect to the smallest feasible lambda.
    double lo = 0, hi = 1e-30;
    std::vector<int> tmp(blocks.size());
    for (int it = 0; it < 4000; ++it) {
      PickAll(blocks, hi, &tmp, &bits, &err);
      if (bits <= budget_bits) break;
      lo = hi;
      hi *= 2;
    }
    if (bits > budget_bits) {
      // Unreachable for finite inputs (huge lambda picks the cheapest options); be safe.
      return absl::InternalError("knapsack: no feasible Lagrange multiplier found");
    }
    for (int it = 0; it < 200 && hi > lo * (1 + 1e-15); ++it) {
      const double mid = lo == 0 ? hi / 2 : std::sqrt(lo) * std::sqrt(hi);
      if (!(mid > lo && mid < hi)) break;
      PickAll(blocks, mid, &tmp, &bits, &err);
      if (bits <= budget_bits) {
        hi = mid;
      } else {
        lo = mid;
      }
    }
    PickAll(blocks, hi, &s.choice, &bits, &err);
    s.lambda = hi;
  }
  s.lagrangian_bits = bits;
  s.lagrangian_err = err;
  s.gap_bound = s.lambda * (budget_bits - bits);

  // Greedy fill: best error reduction per extra bit that still fits.
  for (size_t guard = 0; guard < blocks.size() * 64 + 64; ++guard) {
    const double left = budget_bits - bits;
    int best_b = -1, best_k = -1;
    double best_ratio = 0, best_gain = 0;
    for (size_t b = 0; b < blocks.size(); ++b) {
      const KnapsackOption& cur = blocks[b][s.choice[b]];
      for (size_t k = 0; k < blocks[b].size(); ++k) {
        const KnapsackOption& o = blocks[b][k];
        const double gain = cur.err - o.err, extra = o.bits - cur.bits;
        if (!(gain > 0) || extra > left) continue;
        const double ratio = extra <= 0 ? std::numeric_limits<double>::infinity() : gain / extra;
        if (ratio > best_ratio || (ratio == best_ratio && gain > best_gain)) {
          best_ratio = ratio;
          best_gain = gain;
          best_b = static_cast<int>(b);
          best_k = static_cast<int>(k);
        }
      }
    }
    if (best_b < 0) break;
    bits += blocks[best_b][best_k].bits - blocks[best_b][s.choice[best_b]].bits;
    err -= best_gain;
    s.choice[best_b] = best_k;
  }
  // Recompute exactly (no drift from the incremental sums).
  s.bits = 0;
  s.err = 0;
  for (size_t b = 0; b < blocks.size(); ++b) {
    s.bits += blocks[b][s.choice[b]].bits;
    s.err += blocks[b][s.choice[b]].err;
  }
  return s;
}

std::vector<fmt::Format> DefaultAllocFormats() {
  std::vector<fmt::Format> out;
  for (const char* n : {"int2_g32", "int2_g64", "int2_g128", "int3_g32", "int3_g64", "int3_g128", "int4_g32",
                        "int4_g64", "int4_g128", "int8_g32", "int8_g64", "int8_g128"}) {
    for (const char* suffix : {"", "_sym"}) {
      auto f = fmt::Format::Parse(absl::StrCat(n, suffix));
      if (f) out.push_back(*f);
    }
  }
  for (const char* n : {"nl4_g32", "nl4_g64", "nl4_g128", "nl3_g32", "nl3_g64", "nl3_g128", "nl2_g32", "nl2_g64",
                        "nl2_g128"})
    out.push_back(*fmt::Format::Parse(n));
  return out;
}

absl::StatusOr<std::vector<fmt::Format>> ParseFormatList(const std::string& list) {
  std::vector<fmt::Format> out;
  for (absl::string_view part : absl::StrSplit(list, ',', absl::SkipWhitespace())) {
    const std::string name(absl::StripAsciiWhitespace(part));
    auto f = fmt::Format::Parse(name);
    if (!f) return absl::InvalidArgumentError(absl::StrCat("unknown format '", name, "' in list '", list, "'"));
    if (std::find(out.begin(), out.end(), *f) == out.end()) out.push_back(*f);
  }
  if (out.empty()) return absl::InvalidArgumentError(absl::StrCat("format list '", list, "' is empty"));
  return out;
}

std::vector<std::pair<int64_t, int64_t>> RowBlocks(int64_t rows, int block_rows) {
  std::vector<std::pair<int64_t, int64_t>> out;
  if (rows <= 0) return out;
  const int64_t b = std::max(block_rows, 1);
  if (rows < 2 * b) return {{0, rows}};
  for (int64_t r = 0; r < rows; r += b) out.push_back({r, std::min(rows, r + b)});
  return out;
}

absl::StatusOr<AllocEstimates> EstimateAllocation(const std::vector<AllocTensor>& tensors,
                                                  const BitAllocOptions& opts, const std::string& method,
                                                  const GptqOptions& gptq, int n_threads) {
  const std::string estimate = opts.estimate.empty() ? method : opts.estimate;
  if (estimate != "rtn" && estimate != "gptq")
    return absl::InvalidArgumentError(absl::StrCat("bit allocation: unknown estimate '", estimate, "' (rtn, gptq)"));
  if (opts.block_rows < 1)
    return absl::InvalidArgumentError(absl::StrCat("bit allocation: block rows ", opts.block_rows, " < 1"));
  AllocEstimates out;
  out.candidates = opts.candidates.empty() ? DefaultAllocFormats() : opts.candidates;
  const std::vector<fmt::Format>& cands = out.candidates;
  for (const fmt::Format& f : cands)
    if (auto s = CheckFormat(f, "bit allocation"); !s.ok()) return s;
  std::map<const Hessian*, std::unique_ptr<GptqFactor>> factors;
  GptqOptions go = gptq;
  go.n_threads = n_threads;
  for (size_t t = 0; t < tensors.size(); ++t) {
    const AllocTensor& at = tensors[t];
    if (at.w == nullptr) return absl::InvalidArgumentError(absl::StrCat(at.name, ": no weights"));
    const HostTensor& w = *at.w;
    if (auto s = CheckMatrix(w, "bit allocation"); !s.ok()) return s;
    const int64_t rows = w.rows(), cols = w.cols();
    if (at.h == nullptr || at.h->dim != cols || at.h->h.size() != static_cast<size_t>(cols * cols))
      return absl::FailedPreconditionError(
          absl::StrCat(at.name, ": bit allocation needs the input Hessian of width ", cols, " (calibration)"));
    const GptqFactor* factor = nullptr;
    if (estimate == "gptq") {
      auto& slot = factors[at.h];
      if (!slot) {
        auto f = FactorHessian(*at.h, go);
        if (!f.ok()) return absl::Status(f.status().code(), absl::StrCat(at.name, ": ", f.status().message()));
        slot = std::make_unique<GptqFactor>(*std::move(f));
      }
      factor = slot.get();
    }
    const auto rb = RowBlocks(rows, opts.block_rows);
    out.names.push_back(at.name);
    out.row_blocks.push_back(rb);
    auto& costs = out.costs.emplace_back(rb.size(), std::vector<KnapsackOption>(cands.size()));
    for (size_t k = 0; k < cands.size(); ++k) {
      std::vector<float> q;
      if (factor != nullptr) {
        auto g = GptqQuantize(w, *factor, cands[k], go, &q);
        if (!g.ok()) return absl::Status(g.status().code(), absl::StrCat(at.name, ": ", g.status().message()));
      } else {
        RtnOptions ro;
        ro.n_threads = n_threads;
        auto r = RtnQuantize(w, at.h->mean_sq, cands[k], ro);
        if (!r.ok()) return absl::Status(r.status().code(), absl::StrCat(at.name, ": ", r.status().message()));
        auto d = DequantizeAll(*r);
        if (!d.ok()) return absl::Status(d.status().code(), absl::StrCat(at.name, ": ", d.status().message()));
        q = *std::move(d);
      }
      const std::vector<double> row_err = RowProxyErrors(w.data.data(), q.data(), rows, cols, *at.h, n_threads);
      const double row_bits = 8.0 * static_cast<double>(cands[k].RowBytes(cols));
      for (size_t b = 0; b < rb.size(); ++b) {
        KnapsackOption& o = costs[b][k];
        o.bits = row_bits * static_cast<double>(rb[b].second - rb[b].first);
        o.err = 0;
        for (int64_t r = rb[b].first; r < rb[b].second; ++r) o.err += row_err[r];
      }
    }
  }
  return out;
}

absl::StatusOr<BitAllocation> SolveAllocation(const AllocEstimates& est, const std::vector<double>& weights,
                                              double budget_bits, const std::vector<AllocExtra>& extras) {
  const size_t n = est.costs.size();
  if (est.row_blocks.size() != n || est.names.size() != n || (!weights.empty() && weights.size() != n))
    return absl::InvalidArgumentError("bit allocation: estimates and weights disagree in size");
  for (double w : weights)
    if (!(std::isfinite(w) && w >= 0))
      return absl::InvalidArgumentError("bit allocation: a tensor weight is negative or not finite");
  // Feasibility first: the smallest option of every block.
  double min_bits = 0;
  std::vector<std::vector<KnapsackOption>> blocks;
  std::vector<std::pair<size_t, size_t>> where;  // knapsack block -> (tensor, block)
  for (size_t t = 0; t < n; ++t) {
    if (est.costs[t].size() != est.row_blocks[t].size())
      return absl::InvalidArgumentError(absl::StrCat("bit allocation: ", est.names[t], ": blocks disagree"));
    const double wt = weights.empty() ? 1.0 : weights[t];
    for (size_t b = 0; b < est.costs[t].size(); ++b) {
      if (est.costs[t][b].size() != est.candidates.size())
        return absl::InvalidArgumentError(absl::StrCat("bit allocation: ", est.names[t], ": options disagree"));
      blocks.push_back(est.costs[t][b]);
      for (KnapsackOption& o : blocks.back()) o.err *= wt;
      where.push_back({t, b});
      double mb = std::numeric_limits<double>::infinity();
      for (const KnapsackOption& o : est.costs[t][b]) mb = std::min(mb, o.bits);
      min_bits += mb;
    }
  }
  for (const AllocExtra& e : extras) {
    if (e.costs.empty() || e.costs.size() != e.formats.size())
      return absl::InvalidArgumentError(absl::StrCat("bit allocation: ", e.name, ": options and costs differ"));
    double mb = std::numeric_limits<double>::infinity();
    for (const KnapsackOption& o : e.costs) mb = std::min(mb, o.bits);
    min_bits += mb;
  }
  if (min_bits > budget_bits)
    return absl::OutOfRangeError(absl::StrFormat(
        "bit allocation: budget of %.0f bits is infeasible: the cheapest candidate for every matrix needs %.0f bits",
        budget_bits, min_bits));
  BitAllocation out;
  out.budget_bits = budget_bits;
  for (size_t t = 0; t < n; ++t) {
    out.plans.emplace_back();
    for (const auto& [r0, r1] : est.row_blocks[t])
      out.plans.back().push_back(AllocBlock{r0, r1, est.candidates[0], 0, 0});
  }
  const size_t n_linear_blocks = blocks.size();
  for (const AllocExtra& e : extras) blocks.push_back(e.costs);
  auto sol = SolveMultipleChoiceKnapsack(blocks, budget_bits);
  if (!sol.ok()) return absl::Status(sol.status().code(), absl::StrCat("bit allocation: ", sol.status().message()));
  for (size_t e = 0; e < extras.size(); ++e) {
    const int k = sol->choice[n_linear_blocks + e];
    out.extra_choice.push_back(k);
    out.est_error_total += extras[e].costs[k].err;
  }
  for (size_t i = 0; i < n_linear_blocks; ++i) {
    AllocBlock& ab = out.plans[where[i].first][where[i].second];
    const int k = sol->choice[i];
    ab.format = est.candidates[k];
    ab.bits = blocks[i][k].bits;
    ab.est_error = blocks[i][k].err;
    out.est_error_total += ab.est_error;
  }
  out.solution = *std::move(sol);
  return out;
}

absl::StatusOr<BitAllocation> AllocateBits(const std::vector<AllocTensor>& tensors, double budget_bits,
                                           const BitAllocOptions& opts, const std::string& method,
                                           const GptqOptions& gptq, int n_threads,
                                           const std::vector<AllocExtra>& extras) {
  // Cheap feasibility check before the expensive estimates.
  const std::vector<fmt::Format> cands = opts.candidates.empty() ? DefaultAllocFormats() : opts.candidates;
  double min_bits = 0;
  for (const AllocTensor& at : tensors) {
    if (at.w == nullptr || at.w->shape.size() != 2) continue;  // reported by the estimate
    double mb = std::numeric_limits<double>::infinity();
    for (const fmt::Format& f : cands) mb = std::min(mb, 8.0 * static_cast<double>(f.RowBytes(at.w->cols())));
    min_bits += mb * static_cast<double>(at.w->rows());
  }
  for (const AllocExtra& e : extras) {
    double mb = std::numeric_limits<double>::infinity();
    for (const KnapsackOption& o : e.costs) mb = std::min(mb, o.bits);
    if (!e.costs.empty()) min_bits += mb;
  }
  if (min_bits > budget_bits)
    return absl::OutOfRangeError(absl::StrFormat(
        "bit allocation: budget of %.0f bits is infeasible: the cheapest candidate for every matrix needs %.0f bits",
        budget_bits, min_bits));
  auto est = EstimateAllocation(tensors, opts, method, gptq, n_threads);
  if (!est.ok()) return est.status();
  std::vector<double> weights;
  for (const AllocTensor& at : tensors) weights.push_back(at.weight);
  return SolveAllocation(*est, weights, budget_bits, extras);
}

absl::StatusOr<QuantTensor> QuantizeBlocks(const HostTensor& w, const std::vector<AllocBlock>& plan,
                                           const GptqFactor* factor, std::span<const float> importance,
                                           const GptqOptions& gptq, int n_threads) {
  if (auto s = CheckMatrix(w, "QuantizeBlocks"); !s.ok()) return s;
  QuantTensor out;
  out.rows = w.rows();
  out.cols = w.cols();
  int64_t next = 0;
  for (const AllocBlock& b : plan) {
    if (b.row_begin != next || b.row_end <= b.row_begin || b.row_end > w.rows())
      return absl::InvalidArgumentError(absl::StrCat("QuantizeBlocks: block [", b.row_begin, ", ", b.row_end,
                                                     ") of '", w.name, "' does not continue at row ", next));
    next = b.row_end;
    const HostTensor slice = RowSlice(w, b.row_begin, b.row_end);
    absl::StatusOr<QuantTensor> q;
    if (factor != nullptr) {
      GptqOptions go = gptq;
      go.n_threads = n_threads;
      q = GptqQuantize(slice, *factor, b.format, go);
    } else {
      RtnOptions ro;
      ro.n_threads = n_threads;
      q = RtnQuantize(slice, importance, b.format, ro);
    }
    if (!q.ok()) return q.status();
    if (q->segments.size() != 1) return absl::InternalError("QuantizeBlocks: expected one segment per block");
    QuantSegment seg = q->segments[0];
    seg.row_begin = b.row_begin;
    seg.row_end = b.row_end;
    out.segments.push_back(seg);
    for (auto& o : q->owners) out.owners.push_back(std::move(o));
  }
  if (next != w.rows())
    return absl::InvalidArgumentError(
        absl::StrCat("QuantizeBlocks: plan covers ", next, " of ", w.rows(), " rows of '", w.name, "'"));
  return out;
}

std::string FormatMix(const std::vector<AllocBlock>& plan) {
  std::map<std::string, int> counts;
  for (const AllocBlock& b : plan) ++counts[b.format.Name()];
  std::string s;
  for (const auto& [name, n] : counts) absl::StrAppend(&s, s.empty() ? "" : ",", name, ":", n);
  return s;
}

}  // namespace nibble
