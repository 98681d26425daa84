// BoA (Kim et al., "BoA: Attention-aware Post-training Quantization without
// Backpropagation", ICML 2025, arXiv 2406.13474): GPTQ-style quantization of
// W_Q, W_K, W_V with attention-aware Hessians that carry the interaction of
// the projections inside the attention, head by head.
//
// Objective per attention head (Kronecker relaxation of the attention-output
// reconstruction error): for a head's block of rows ΔW [head_dim, d_in],
//   loss(ΔW) = tr(ΔW H_col ΔWᵀ H_row).
//   * W_Q (query head h, KV group g): H_col = GPTQ's H of the attention input,
//     H_row = 1/(N d_h) Σ_t Σ_{s<=t} (R_tᵀ k_s)(R_tᵀ k_s)ᵀ — the score
//     q_t·k_s/√d_h changes by ((R_t ΔW x_t)·k_s)/√d_h, so the post-RoPE keys,
//     rotated back by the query's position, weight the head dims. Identical for
//     the query heads of one KV group (GQA).
//   * W_K (KV head g): H_col = GPTQ's H, H_row = 1/(N d_h) Σ_{h in g}
//     Σ_s Σ_{t>=s} (R_sᵀ q_t^h)(R_sᵀ q_t^h)ᵀ with the post-RoPE queries.
//   * W_V (KV head g): the value error reaches the output mixed over tokens by
//     the attention probabilities A (o_t = Σ_s a_ts v_s), so they enter the
//     COLUMN Hessian: H_col = 2/(N·|g|) Σ_{h in g} Σ_t z_t zᵀ_t with
//     z_t = Σ_s a^h_ts x_s (x: attention input), H_row = I (head dims of V do
//     not interact). Per KV head, so W_V is GPTQ with a per-head H_col.
//   W_O and the FFN weights keep plain GPTQ (their Hessians are exact already).
// Quantization of one head (BoaQuantize): rows in order; each row is
// quantized by GPTQ's column sweep with H_col (GptqQuantize on that row), then
// its total error δ_r = w_r − q_r is compensated on the head's remaining rows
// through H_row: w_k −= U_rk / U_rr · δ_r, U the upper Cholesky factor of
// (H_row + damp I)⁻¹ (the OBS update for a Kronecker Hessian). H_row = I
// gives GPTQ bit for bit.
//
// Non-goals: sequential (quantized-input) calibration, the paper's
// weight-activation (QuaRot-style) combination, act_order across rows.
// Every fmt::Format GPTQ supports is supported (the row sweep is GPTQ's).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/core/config.h"
#include "engine/core/quant_tensor.h"
#include "engine/core/weights.h"
#include "engine/model/llama_model.h"
#include "engine/tokenizer/tokenizer.h"
#include "kernels/formats/format.h"
#include "quantizers/calibration.h"
#include "quantizers/gptq.h"
#include "quantizers/hessian.h"

namespace nibble {

// Attention-aware statistics of one decoder layer (see the header comment).
struct BoaLayerStats {
  int head_dim = 0, n_heads = 0, n_kv_heads = 0;  // 0: not collected
  std::vector<Hessian> q_row;  // [n_kv_heads] head_dim x head_dim, shared by the group's query heads
  std::vector<Hessian> k_row;  // [n_kv_heads] head_dim x head_dim
  std::vector<Hessian> v_col;  // [n_kv_heads] dim x dim
};

struct BoaStats {
  CalibrationStats plain;             // GPTQ Hessians of every linear input
  std::vector<BoaLayerStats> layers;  // [n_layers]
};

// An ActivationObserver collecting the plain GPTQ Hessians (a HessianCollector
// inside) and the attention-aware ones. A sequence starts with a batch at
// pos0 == 0; batches of one sequence must arrive in order (LlamaModel::Forward
// does that). Memory: dim^2 doubles per KV head and layer for H_col of W_V,
// plus the current sequence's attention inputs, plus per-batch scratch
// (n_heads * n_tokens * dim floats of attention-weighted inputs).
// Speed: one OnAttention runs n_heads + 2 * n_kv_heads independent work items
// (per query head: scores and z = A X as fp32 GEMMs; per KV head: the query
// and the key row Hessian) on opts.n_threads threads, then the W_V Hessians
// as blocked syrks; every item owns its output, so the result does not depend
// on the thread count. Scratch is reused across calls (no per-token
// allocation).
// Thread safety: forwarding thread only.
class BoaCollector : public ActivationObserver {
 public:
  BoaCollector(const ModelConfig& config, const CollectorOptions& opts = {});
  ~BoaCollector() override;

  void OnLinearInput(int layer, LinearInput which, const float* x, int n_tokens, int width) override;
  void OnAttention(int layer, const AttentionObservation& a) override;

  // The first inconsistency seen (shapes that do not match the config, a
  // batch out of sequence order, a missing attention input), or OK.
  const absl::Status& status() const;
  absl::StatusOr<BoaStats> Finish() const;

 private:
  struct Layer;
  ModelConfig config_;
  CollectorOptions opts_;
  HessianCollector plain_;
  struct Scratch;
  std::vector<std::unique_ptr<Layer>> layers_;
  std::vector<double> cos_, sin_;  // [pos, rope_dim / 2] rotation table (fp32 values), grown on demand
  std::vector<int> pair_index_;    // [head_dim] original dim -> index in the pair basis (see boa.cc)
  std::vector<float> kg_;          // [n_kv_heads, positions, head_dim] keys by KV head
  std::vector<float> xt_;          // [dim, positions] attention inputs, transposed
  std::vector<float> z_;           // [n_heads, n_tokens, dim] attention-weighted inputs of the batch
  std::vector<std::unique_ptr<Scratch>> scratch_;  // per worker thread
  absl::Status status_;

  bool InRange(int layer) const;
  void EnsureRotations(int64_t positions);
};

// Calibrate() with a BoaCollector (same chunks and options).
absl::StatusOr<BoaStats> CalibrateBoa(LlamaModel& model, const Tokenizer& tokenizer, const std::string& text_path,
                                      const CalibrateOptions& opts);

// Head-wise factors for BoaQuantize: the rows of w are n = rows / head_dim
// heads; head i uses column factor col[i] (cols == w.cols()) and row factor
// row[i] (cols == head_dim; null or an empty `row`: identity, i.e. GPTQ).
struct BoaHeads {
  int64_t head_dim = 0;
  std::vector<const GptqFactor*> col;  // [n]
  std::vector<const GptqFactor*> row;  // [n] or empty
};

// Quantizes w (see the header comment). `chosen` receives the decoded values.
// Errors (naming w.name): malformed w/format, heads that do not tile the rows,
// factors of the wrong size.
absl::StatusOr<QuantTensor> BoaQuantize(const HostTensor& w, const BoaHeads& heads, const fmt::Format& f,
                                        const GptqOptions& opts, std::vector<float>* chosen = nullptr);

// BoA for one attention projection of a layer (which: kWq, kWk or kWv);
// attn_in: the factor of the layer's kAttnIn Hessian. Row factors use
// opts.percdamp and natural order. Errors: another weight, missing stats.
absl::StatusOr<QuantTensor> BoaQuantizeAttention(const HostTensor& w, LinearWeight which, const BoaLayerStats& s,
                                                 const GptqFactor& attn_in, const fmt::Format& f,
                                                 const GptqOptions& opts);

// True for the weights BoA handles itself (wq, wk, wv); the rest use GPTQ.
inline bool BoaHandles(LinearWeight w) {
  return w == LinearWeight::kWq || w == LinearWeight::kWk || w == LinearWeight::kWv;
}

}  // namespace nibble
