// Bit allocation under a budget: choose, per (linear matrix, block of rows),
// one packed format so the model meets a target bits-per-weight at the least
// estimated loss increase. Post-training analogue of DiffQ's learnt per-group
// bit depths.
//
// Units: every linear matrix is split into row blocks of `block_rows` rows
// (the last block takes the remainder; a matrix with < 2 * block_rows rows is
// one block). A QuantTensor holds one segment per block, each in its own
// fmt::Format, and the nibble file stores segments as they are, so per-row-
// block formats cost nothing beyond their packed bytes.
//
// Cost of a choice: its exact storage, rows * RowBytes(cols) * 8 bits (every
// scale/zero byte and partial-group padding counted). Embeddings, output head
// and norms are a fixed cost the caller subtracts from the budget.
//
// Sensitivity: for block b and candidate f, err(b, f) = s_t * sum over the
// block's rows r of e_r^T H e_r with e_r = w_r - q_r (q: what f would store),
// H the calibration Hessian of the layer input (quantizers/hessian.h) and s_t
// the matrix's loss sensitivity (AllocTensor::weight). The Hessian term is the
// second-order estimate of the block's own output-error increase; s_t (from
// KLD probes, quantizers/sensitivity.h) converts it to the end-to-end KLD it
// causes, so blocks of different layers -- and the token embedding, whose
// candidates carry their measured KLD directly (AllocExtra) -- compete on one
// scale. With sensitivity "none" every s_t is 1.
// q comes from the method that will really quantize (estimate "gptq": GPTQ on
// the whole matrix with the layer's shared factor; rows are independent in
// GPTQ, so the per-row errors are exactly those of the final per-block
// quantization; cost: one GPTQ per candidate) or from RTN with diag(H) as
// importance ("rtn": cheaper; exact when the method is rtn, an estimate for gptq).
//
// Solver: multiple-choice knapsack, min sum err s.t. sum bits <= budget, by
// Lagrangian relaxation: for lambda every block takes argmin err + lambda *
// bits (ties: fewer bits, then lower index), lambda is bisected to the
// smallest value whose total bits fit; leftover bits are then spent greedily
// on the upgrade with the best error reduction per extra bit that still fits,
// until none fits. Guarantee: never over budget; the total error is at most
// optimum + lambda * (budget - bits of the Lagrangian point) ("gap bound",
// from weak duality), and never above the Lagrangian point's error.
//
// Measured (stories260K, GPTQ, tinystories-val 200 documents): the Hessian
// proxy alone (every s_t = 1) allocated 3.56 bpw at PPL 7.04, worse than the
// uniform int3_g64_sym + int4_g64 embedding at the same size (5.40): the proxy
// measures each layer's own output error on fp32 inputs and misses how much of
// it reaches the logits. With KLD-probe sensitivities the same budget gives
// 5.25 (and 45.2 vs 46.3 at 2.54 bpw).
// Non-goals: side-cars/outliers together with allocation; learning bits;
// interactions between matrices (errors are assumed to add).
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/core/quant_tensor.h"
#include "engine/core/weights.h"
#include "kernels/formats/format.h"
#include "quantizers/gptq.h"
#include "quantizers/hessian.h"

namespace nibble {

// ---- The solver (independent of models).

// One option of one block: storage bits and estimated error (both >= 0, finite).
struct KnapsackOption {
  double bits = 0;
  double err = 0;
};

struct KnapsackSolution {
  std::vector<int> choice;  // per block: index into its options
  double bits = 0;          // sum of the chosen options' bits (<= budget)
  double err = 0;           // sum of the chosen options' errors
  double lambda = 0;        // the Lagrange multiplier of the bisection's point
  double lagrangian_bits = 0, lagrangian_err = 0;  // that point before the greedy fill
  double gap_bound = 0;     // err - optimum <= gap_bound
};

// Errors: INVALID_ARGUMENT for a block without options or a negative/non-
// finite bits/err/budget; OUT_OF_RANGE if even the cheapest choice of every
// block exceeds budget_bits (the message states that minimum in bits).
absl::StatusOr<KnapsackSolution> SolveMultipleChoiceKnapsack(
    const std::vector<std::vector<KnapsackOption>>& blocks, double budget_bits);

// ---- Model-level allocation.

// Default candidates: int2, int3, int4 and int8 at groups 32, 64 and 128,
// asym and _sym, and nl4, nl3, nl2 at groups 32, 64 and 128 (33 formats;
// dominated ones are never chosen by the solver).
// int2_g128 lets budgets near 2.1 linear bpw be met; the groups of 32 and 64
// matter on narrow or odd rows (stories260K's 64 and 172 columns), where a
// 128-column group pads each row to 128 or 256 codes (int8_g128 on a 64-wide
// row costs 16.25 bits per weight). Binary/ternary formats can be passed
// explicitly.
std::vector<fmt::Format> DefaultAllocFormats();
// Parses "a,b,c" format names; errors name the unknown one.
absl::StatusOr<std::vector<fmt::Format>> ParseFormatList(const std::string& list);

struct BitAllocOptions {
  int block_rows = 64;                  // rows per allocation block (>= 1)
  std::vector<fmt::Format> candidates;  // empty: DefaultAllocFormats()
  std::string estimate;                 // "gptq" | "rtn" | "" (= the method)
  // Loss sensitivity (quantizers/sensitivity.h): "kld" weighs each matrix's
  // proxy errors by KLD probes (KLD per unit proxy error, measured with the
  // matrix alone quantized to probe_format by RTN); "none": all weigh 1.
  std::string sensitivity = "kld";
  fmt::Format probe_format{fmt::Kind::kInt, 3, 64, false};
  int probe_tokens = 256;  // calibration tokens per probe pass
  int probe_ctx = 128;     // tokens per probe chunk
  // Token embedding / output head candidates, chosen by the solver with
  // their measured KLD as error (needs sensitivity "kld"). Empty: they keep
  // the configured embed/output format as a fixed cost.
  std::vector<fmt::Format> embed_candidates;
  // Non-empty: reuse/store the probes and estimates in this file
  // (quantizers/alloc_cache.h), so later budgets skip them.
  std::string cache_path;
};

// Per-row e_r^T H e_r of e = w - q ([rows, cols] each), in double, clamped >= 0.
std::vector<double> RowProxyErrors(const float* w, const float* q, int64_t rows, int64_t cols, const Hessian& h,
                                   int n_threads);

// The row blocks [begin, end) of a matrix of `rows` rows (see "Units").
std::vector<std::pair<int64_t, int64_t>> RowBlocks(int64_t rows, int block_rows);

// A linear matrix to allocate: fp32 weights and its input Hessian (required).
struct AllocTensor {
  std::string name;
  const HostTensor* w = nullptr;
  const Hessian* h = nullptr;
  // Loss sensitivity: every block's proxy error is multiplied by this
  // (quantizers/sensitivity.h: KLD per unit of proxy error; 1 = none).
  double weight = 1.0;
};

// A unit allocated as a whole with externally measured costs (e.g. the token
// embedding: each candidate's bits and its measured KLD, on the same scale
// as the weighted proxy errors). The solver picks one option.
struct AllocExtra {
  std::string name;
  std::vector<fmt::Format> formats;     // the options
  std::vector<KnapsackOption> costs;    // per option: bits and error
};

struct AllocBlock {
  int64_t row_begin = 0, row_end = 0;
  fmt::Format format;
  double bits = 0;  // storage bits of this block in `format`
  double est_error = 0;
};

struct BitAllocation {
  std::vector<std::vector<AllocBlock>> plans;  // per AllocTensor, blocks in row order
  KnapsackSolution solution;
  double budget_bits = 0;      // for the linear matrices
  double est_error_total = 0;  // sum of the chosen blocks' est_error
  std::vector<int> extra_choice;  // per AllocExtra: index of the chosen option
};

// The expensive half of AllocateBits: every (tensor, row block, candidate)
// storage bits and UNWEIGHTED proxy error (AllocTensor::weight is not applied).
struct AllocEstimates {
  std::vector<fmt::Format> candidates;
  std::vector<std::string> names;                                   // per tensor
  std::vector<std::vector<std::pair<int64_t, int64_t>>> row_blocks;  // per tensor
  std::vector<std::vector<std::vector<KnapsackOption>>> costs;      // [tensor][block][candidate]
};
absl::StatusOr<AllocEstimates> EstimateAllocation(const std::vector<AllocTensor>& tensors,
                                                  const BitAllocOptions& opts, const std::string& method,
                                                  const GptqOptions& gptq, int n_threads);
// The cheap half: weighs tensor t's errors by weights[t] (empty: all 1) and
// solves the knapsack with the extras. Errors: sizes that disagree, negative
// or non-finite weights, OUT_OF_RANGE for an infeasible budget.
absl::StatusOr<BitAllocation> SolveAllocation(const AllocEstimates& est, const std::vector<double>& weights,
                                              double budget_bits, const std::vector<AllocExtra>& extras = {});

// Estimates every (block, candidate) error and solves the knapsack for
// `budget_bits` over the given matrices. `method` is "rtn" or "gptq" (the
// final quantizer; decides the default estimate). Errors name the tensor.
absl::StatusOr<BitAllocation> AllocateBits(const std::vector<AllocTensor>& tensors, double budget_bits,
                                           const BitAllocOptions& opts, const std::string& method,
                                           const GptqOptions& gptq, int n_threads,
                                           const std::vector<AllocExtra>& extras = {});

// Quantizes w block by block as `plan` says (contiguous, covering all rows),
// with GPTQ (factor != null: the layer's factor) or RTN with `importance`
// (may be empty), into one multi-segment QuantTensor owning its bytes.
absl::StatusOr<QuantTensor> QuantizeBlocks(const HostTensor& w, const std::vector<AllocBlock>& plan,
                                           const GptqFactor* factor, std::span<const float> importance,
                                           const GptqOptions& gptq, int n_threads);

// "int3_g64:12,int4_g128:4": segments per format, sorted by name.
std::string FormatMix(const std::vector<AllocBlock>& plan);

}  // namespace nibble
