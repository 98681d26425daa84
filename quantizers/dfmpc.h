// DF-MPC: data-free mixed-precision compensation (Chen et al., "Data-Free
// Quantization via Mixed-Precision Compensation without Fine-Tuning", Pattern
// Recognition 2023, arXiv 2307.00498), transferred to the Llama block.
//
// The paper pairs an ultra-low-precision layer with the higher-precision layer
// that follows it and, without any data, rescales the high layer's input
// channels in closed form so that the pair's composite output matches the
// full-precision pair as closely as possible (a regularised least-squares
// problem on the weights; conv + BN + ReLU there, where positive homogeneity
// lets a per-channel factor pass through BN/ReLU). In a Llama decoder the
// pairs through which a linear map passes exactly are:
//
//  * W_V -> W_O, per KV head g (attention is a convex mix over the token axis,
//    so it commutes with any map on the head_dim axis): every query head h
//    reading g gets W_O'[:, h] = W_O[:, h] M_g with
//        M_g = (V D Qᵀ + λ I)(Q D Qᵀ + λ I)⁻¹,   V = W_V[g], Q = Q(W_V[g]),
//    the minimiser of ||W_O[:, h] (V - M Q) D^½||² + λ ||W_O[:, h] (M - I)||²
//    (independent of W_O[:, h] since it has full column rank, so one M_g
//    serves all query heads of a GQA group). λ -> ∞ gives M = I (plain RTN).
//  * W_up -> W_down, per hidden channel i: silu(gate·x) is a data-dependent
//    per-channel factor, so only a scalar c_i passes through it:
//        c_i = (<u_i, q_i>_D + λ_i) / (||q_i||²_D + λ_i),
//    the paper's per-channel closed form; W_down[:, i] *= c_i.
//
// D = diag(w) weighs input columns: with norm weighting, w_j = g_j², g the
// RMSNorm gain in front of W_V / W_up (the normalised activations have unit
// RMS, so channel j's input variance is ∝ g_j² under the data-free isotropy
// assumption); otherwise w = 1. λ = ridge × mean diagonal of Q D Qᵀ (resp.
// ||q_i||²_D). W_O / W_down are compensated in fp32, then RTN-quantized in
// their higher format. wq, wk, w_gate (nothing linear can absorb their error:
// softmax / silu follow) are RTN-quantized in `rest`.
//
// Caveat (measured): the objective assumes isotropic (norm-weighted)
// inputs. On stories260K it lowers PPL at equal bits; on SmolLM2 (int2 wv/w_up)
// it lowers this composite error yet raises PPL: real attention inputs are
// far from isotropic, and the fitted map amplifies error along them.
//
// Goals: the closed forms, the composite-error measures, and the whole-model
// driver behind `nibble-quantize --method dfmpc`. Data-free by default
// (calibration text is ignored); DfmpcOptions::calibrated is the
// data-dependent variant (H instead of D, via a factor H = Uᵀ U: rows x -> x Uᵀ
// make the D = I closed forms compute x H yᵀ). Non-goals: bit allocation, outliers, GPTQ on either side of a
// pair, compensating through softmax/silu nonlinearly.
// Thread safety: all functions are reentrant.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/core/loaded_model.h"
#include "kernels/formats/format.h"

namespace nibble {

struct DfmpcOptions {
  // Compensating (higher-precision) layers wo and w_down.
  fmt::Format high = fmt::Format{fmt::Kind::kInt, 4, 64, false};
  // wq, wk, w_gate; nullopt: QuantizeConfig::format (the low format).
  std::optional<fmt::Format> rest;
  // Relative ridge toward "no compensation" (see above); >= 0, finite.
  double ridge = 0.0;
  // false: the same per-tensor formats without compensation (the equal-bits RTN baseline).
  bool compensate = true;
  // Weigh input columns by the preceding RMSNorm gain squared.
  bool norm_weighted = true;
  // Not data-free: replace D by the calibration Hessian H of the layer input
  // (wv: the attention input, w_up: the FFN input; full matrix, damped by
  // QuantizeConfig::gptq.percdamp x its mean diagonal), i.e. M_g = (V H Qᵀ)(Q H Qᵀ)⁻¹
  // and c_i = u_i H q_iᵀ / q_i H q_iᵀ: the least-squares optimum on the
  // calibration activations. Needs QuantizeConfig::calib_path; overrides
  // norm_weighted for the fits (the composite-error measures keep norm weights).
  bool calibrated = false;
};

// The head map M (hd x hd, row-major, double) for V, Q: [hd, cols] row-major.
// col_weight: cols positive weights, or empty (all ones). Errors: sizes, a
// negative/non-finite weight or ridge. A singular Q D Qᵀ (λ = 0) is damped by
// 1e-9 × its mean diagonal (1e-6, 1e-3 on retry); all-zero Q gives M = I.
absl::StatusOr<std::vector<double>> DfmpcHeadMap(const float* v, const float* q, int64_t hd, int64_t cols,
                                                 std::span<const float> col_weight, double ridge);
// The channel scale c for one row u and its quantized q (cols values each);
// 1 when q is all zero.
double DfmpcChannelScale(const float* u, const float* q, int64_t cols, std::span<const float> col_weight,
                         double ridge);

// In place on fp32 wo [dim, n_heads*hd]: column block h becomes wo[:, h] M_{h / group}.
// wv, qv: [n_kv_heads*hd, dim]. REQUIRES n_heads % n_kv_heads == 0 (checked).
absl::Status DfmpcCompensateAttention(const float* wv, const float* qv, int n_heads, int n_kv_heads, int hd,
                                      std::span<const float> col_weight, double ridge, HostTensor* wo);
// In place on fp32 w_down [dim, hidden]: column i *= c_i of (w_up row i, q_up row i).
absl::Status DfmpcCompensateFfn(const float* w_up, const float* q_up, int64_t hidden, int64_t dim,
                                std::span<const float> col_weight, double ridge, HostTensor* w_down);

// Relative composite errors (sqrt of ratio of squared Frobenius norms, D-weighted):
//  attention: Σ_h ||Wo_h V_g - Ŵo_h Q_g||² / Σ_h ||Wo_h V_g||² (heads independent),
//  FFN:       Σ_i ||d_i u_iᵀ - d̂_i q_iᵀ||² / Σ_i ||d_i u_iᵀ||²  (the expected error
//             for independent zero-mean unit-variance silu factors per channel).
// wo/wo_hat: [dim, n_heads*hd]; wv/qv: [n_kv_heads*hd, dim]; w_down/w_down_hat:
// [dim, hidden]; w_up/q_up: [hidden, dim]. REQUIRES valid sizes (unchecked).
double DfmpcAttentionError(const float* wo, const float* wo_hat, const float* wv, const float* qv, int64_t dim,
                           int n_heads, int n_kv_heads, int hd, std::span<const float> col_weight);
double DfmpcFfnError(const float* w_down, const float* w_down_hat, const float* w_up, const float* q_up,
                     int64_t dim, int64_t hidden, std::span<const float> col_weight);

// Calibrated weighting: the upper factor U (float, [dim, dim], row-major) of
// H + δ I = Uᵀ U with δ = damp x mean diagonal of H (raised to 1e-2, 1e-1 of
// it if needed for positive definiteness); `what` names H in errors (wrong
// width, zero or non-finite H).
struct Hessian;
absl::StatusOr<std::vector<float>> DfmpcHessianFactor(const Hessian& h, int64_t dim, double damp,
                                                      const std::string& what);
// Rows of x [n, dim] -> x Uᵀ: then <x'_a, y'_b> = x_a (H + δI) y_bᵀ, so the
// D = I closed forms above fit the calibration data.
std::vector<float> DfmpcWhiten(const float* x, int64_t n, int64_t dim, const std::vector<float>& u);

// Per-layer composite errors of the quantized model against the fp32 one.
struct DfmpcLayerError {
  double attn = 0, ffn = 0;
};

struct QuantizeConfig;
struct QuantizeReport;
// The whole-model driver (QuantizeModel dispatches here for method "dfmpc"):
// wv/w_up in cfg.format, wo/w_down in cfg.dfmpc.high (compensated first),
// wq/wk/w_gate in cfg.dfmpc.rest, embeddings/output as QuantizeModel does.
// Fills report.dfmpc_layers. Errors: bit allocation / outliers requested,
// unsupported formats, malformed tensors (named).
absl::StatusOr<QuantizeReport> QuantizeModelDfmpc(
    LoadedModel* m, const QuantizeConfig& cfg,
    const std::function<void(int done, int total, const std::string& tensor)>& progress);

}  // namespace nibble
