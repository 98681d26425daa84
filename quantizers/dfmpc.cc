#include "quantizers/dfmpc.h"

#include <chrono>
#include <cmath>
#include <initializer_list>
#include <memory>
#include <tuple>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "engine/core/quant_tensor.h"
#include "engine/model/llama_model.h"
#include "engine/tokenizer/tokenizer.h"
#include "kernels/cpu/ops.h"
#include "engine/util/log.h"
#include "quantizers/calibration.h"
#include "quantizers/linalg.h"
#include "quantizers/model_quantizer.h"
#include "quantizers/quant_error.h"
#include "quantizers/rtn.h"

namespace nibble {
namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point since) { return std::chrono::duration<double>(Clock::now() - since).count(); }

inline double Weight(std::span<const float> w, int64_t j) { return w.empty() ? 1.0 : static_cast<double>(w[j]); }

absl::Status CheckWeights(std::span<const float> w, int64_t cols, double ridge, const char* who) {
  if (!w.empty() && static_cast<int64_t>(w.size()) != cols)
    return absl::InvalidArgumentError(
        absl::StrCat(who, ": ", w.size(), " column weights for ", cols, " input columns"));
  for (size_t j = 0; j < w.size(); ++j)
    if (!(std::isfinite(w[j]) && w[j] >= 0.0f))
      return absl::InvalidArgumentError(absl::StrCat(who, ": column weight ", j, " is ", w[j], " (need finite >= 0)"));
  if (!(std::isfinite(ridge) && ridge >= 0.0))
    return absl::InvalidArgumentError(absl::StrCat(who, ": ridge ", ridge, " is not finite and >= 0"));
  return absl::OkStatus();
}

// Sum_j a[j] w_j b[j] in double.
double WDot(const float* a, const float* b, int64_t n, std::span<const float> w) {
  double s = 0;
  for (int64_t j = 0; j < n; ++j) s += static_cast<double>(a[j]) * Weight(w, j) * static_cast<double>(b[j]);
  return s;
}

// X Y^T weighted by w: out[a * ry + b] = <x_a, y_b>_w; x: [rx, n], y: [ry, n].
std::vector<double> WGram(const float* x, int64_t rx, const float* y, int64_t ry, int64_t n, std::span<const float> w) {
  std::vector<double> out(static_cast<size_t>(rx * ry));
  for (int64_t a = 0; a < rx; ++a)
    for (int64_t b = 0; b < ry; ++b) out[a * ry + b] = WDot(x + a * n, y + b * n, n, w);
  return out;
}

// Column block [c0, c0 + hd) of the row-major [rows, ld] matrix w: Wᵀ W' (hd x hd).
std::vector<double> BlockGram(const float* w, const float* w2, int64_t rows, int64_t ld, int64_t c0, int hd) {
  std::vector<double> g(static_cast<size_t>(hd) * hd, 0.0);
  for (int64_t r = 0; r < rows; ++r) {
    const float* a = w + r * ld + c0;
    const float* b = w2 + r * ld + c0;
    for (int i = 0; i < hd; ++i) {
      const double ai = a[i];
      for (int k = 0; k < hd; ++k) g[i * hd + k] += ai * b[k];
    }
  }
  return g;
}

// tr(X Y) for hd x hd row-major X, Y.
double TraceProduct(const std::vector<double>& x, const std::vector<double>& y, int hd) {
  double s = 0;
  for (int a = 0; a < hd; ++a)
    for (int b = 0; b < hd; ++b) s += x[a * hd + b] * y[b * hd + a];
  return s;
}

}  // namespace

absl::StatusOr<std::vector<double>> DfmpcHeadMap(const float* v, const float* q, int64_t hd, int64_t cols,
                                                 std::span<const float> col_weight, double ridge) {
  if (hd <= 0 || cols <= 0 || hd > 4096 || v == nullptr || q == nullptr)
    return absl::InvalidArgumentError(absl::StrCat("DfmpcHeadMap: bad sizes hd=", hd, " cols=", cols));
  if (auto s = CheckWeights(col_weight, cols, ridge, "DfmpcHeadMap"); !s.ok()) return s;
  std::vector<double> a = WGram(q, hd, q, hd, cols, col_weight);  // Q D Qᵀ
  std::vector<double> b = WGram(v, hd, q, hd, cols, col_weight);  // V D Qᵀ
  std::vector<double> m(static_cast<size_t>(hd * hd), 0.0);
  double mean_diag = 0;
  for (int64_t i = 0; i < hd; ++i) mean_diag += a[i * hd + i];
  mean_diag /= static_cast<double>(hd);
  if (!(mean_diag > 0.0) || !std::isfinite(mean_diag)) {  // Q = 0: nothing to compensate with
    for (int64_t i = 0; i < hd; ++i) m[i * hd + i] = 1.0;
    return m;
  }
  const double lambda = ridge * mean_diag;
  for (int64_t i = 0; i < hd; ++i) {
    a[i * hd + i] += lambda;
    b[i * hd + i] += lambda;
  }
  // A = Uᵀ U; damp if Q D Qᵀ is (numerically) singular.
  std::vector<double> u;
  bool ok = false;
  for (double damp : {0.0, 1e-9, 1e-6, 1e-3}) {
    u = a;
    for (int64_t i = 0; i < hd; ++i) u[i * hd + i] += damp * mean_diag;
    if (CholeskyUpper(u.data(), hd, 1)) {
      ok = true;
      break;
    }
  }
  if (!ok) return absl::InternalError("DfmpcHeadMap: Q D Qᵀ is not positive definite even when damped");
  // Row r of M = B A⁻¹ is A⁻¹ (row r of B) since A is symmetric.
  std::vector<double> y(static_cast<size_t>(hd));
  for (int64_t r = 0; r < hd; ++r) {
    const double* br = b.data() + r * hd;
    for (int64_t i = 0; i < hd; ++i) {  // Uᵀ y = b
      double s = br[i];
      for (int64_t k = 0; k < i; ++k) s -= u[k * hd + i] * y[k];
      y[i] = s / u[i * hd + i];
    }
    double* mr = m.data() + r * hd;
    for (int64_t i = hd - 1; i >= 0; --i) {  // U x = y
      double s = y[i];
      for (int64_t k = i + 1; k < hd; ++k) s -= u[i * hd + k] * mr[k];
      mr[i] = s / u[i * hd + i];
    }
  }
  for (double x : m)
    if (!std::isfinite(x)) return absl::InternalError("DfmpcHeadMap: the head map is not finite");
  return m;
}

double DfmpcChannelScale(const float* u, const float* q, int64_t cols, std::span<const float> col_weight,
                         double ridge) {
  const double qq = WDot(q, q, cols, col_weight);
  if (!(qq > 0.0) || !std::isfinite(qq)) return 1.0;
  const double lambda = ridge * qq;
  const double c = (WDot(u, q, cols, col_weight) + lambda) / (qq + lambda);
  return std::isfinite(c) ? c : 1.0;
}

absl::Status DfmpcCompensateAttention(const float* wv, const float* qv, int n_heads, int n_kv_heads, int hd,
                                      std::span<const float> col_weight, double ridge, HostTensor* wo) {
  if (n_heads <= 0 || n_kv_heads <= 0 || hd <= 0 || n_heads % n_kv_heads != 0)
    return absl::InvalidArgumentError(absl::StrCat("dfmpc attention: ", n_heads, " query heads, ", n_kv_heads,
                                                   " KV heads, head_dim ", hd, " are not a valid GQA layout"));
  if (auto s = CheckMatrix(*wo, "dfmpc attention"); !s.ok()) return s;
  const int64_t dim = wo->rows(), qdim = int64_t{n_heads} * hd;
  if (wo->cols() != qdim)
    return absl::InvalidArgumentError(absl::StrCat("dfmpc attention: '", wo->name, "' has ", wo->cols(),
                                                   " columns, expected n_heads * head_dim = ", qdim));
  const int group = n_heads / n_kv_heads;
  std::vector<double> tmp(static_cast<size_t>(hd));
  for (int g = 0; g < n_kv_heads; ++g) {
    const int64_t off = int64_t{g} * hd * dim;
    auto mg = DfmpcHeadMap(wv + off, qv + off, hd, dim, col_weight, ridge);
    if (!mg.ok())
      return absl::Status(mg.status().code(), absl::StrCat(wo->name, " (KV head ", g, "): ", mg.status().message()));
    const std::vector<double>& mm = *mg;
    for (int h = g * group; h < (g + 1) * group; ++h) {
      for (int64_t r = 0; r < dim; ++r) {
        float* row = wo->data.data() + r * qdim + int64_t{h} * hd;
        std::fill(tmp.begin(), tmp.end(), 0.0);
        for (int b = 0; b < hd; ++b) {
          const double x = row[b];
          const double* mb = mm.data() + int64_t{b} * hd;
          for (int a = 0; a < hd; ++a) tmp[a] += x * mb[a];
        }
        for (int a = 0; a < hd; ++a) row[a] = static_cast<float>(tmp[a]);
      }
    }
  }
  return absl::OkStatus();
}

absl::Status DfmpcCompensateFfn(const float* w_up, const float* q_up, int64_t hidden, int64_t dim,
                                std::span<const float> col_weight, double ridge, HostTensor* w_down) {
  if (auto s = CheckMatrix(*w_down, "dfmpc ffn"); !s.ok()) return s;
  if (w_down->rows() != dim || w_down->cols() != hidden)
    return absl::InvalidArgumentError(absl::StrCat("dfmpc ffn: '", w_down->name, "' is [", w_down->rows(), ", ",
                                                   w_down->cols(), "], expected [", dim, ", ", hidden, "]"));
  if (auto s = CheckWeights(col_weight, dim, ridge, "dfmpc ffn"); !s.ok()) return s;
  for (int64_t i = 0; i < hidden; ++i) {
    const float c = static_cast<float>(DfmpcChannelScale(w_up + i * dim, q_up + i * dim, dim, col_weight, ridge));
    for (int64_t r = 0; r < dim; ++r) w_down->data[r * hidden + i] *= c;
  }
  return absl::OkStatus();
}

double DfmpcAttentionError(const float* wo, const float* wo_hat, const float* wv, const float* qv, int64_t dim,
                           int n_heads, int n_kv_heads, int hd, std::span<const float> col_weight) {
  const int group = n_heads / n_kv_heads;
  const int64_t qdim = int64_t{n_heads} * hd;
  double err = 0, ref = 0;
  for (int g = 0; g < n_kv_heads; ++g) {
    const int64_t off = int64_t{g} * hd * dim;
    const std::vector<double> vv = WGram(wv + off, hd, wv + off, hd, dim, col_weight);
    const std::vector<double> vq = WGram(wv + off, hd, qv + off, hd, dim, col_weight);
    const std::vector<double> qq = WGram(qv + off, hd, qv + off, hd, dim, col_weight);
    for (int h = g * group; h < (g + 1) * group; ++h) {
      const int64_t c0 = int64_t{h} * hd;
      const std::vector<double> ww = BlockGram(wo, wo, dim, qdim, c0, hd);
      const std::vector<double> hw = BlockGram(wo_hat, wo, dim, qdim, c0, hd);  // Ŵᵀ W
      const std::vector<double> hh = BlockGram(wo_hat, wo_hat, dim, qdim, c0, hd);
      const double t_ref = TraceProduct(ww, vv, hd);
      ref += t_ref;
      err += t_ref - 2.0 * TraceProduct(hw, vq, hd) + TraceProduct(hh, qq, hd);
    }
  }
  if (ref <= 0) return 0;
  return std::sqrt(std::max(0.0, err) / ref);
}

double DfmpcFfnError(const float* w_down, const float* w_down_hat, const float* w_up, const float* q_up,
                     int64_t dim, int64_t hidden, std::span<const float> col_weight) {
  double err = 0, ref = 0;
  for (int64_t i = 0; i < hidden; ++i) {
    double dd = 0, dh = 0, hh = 0;
    for (int64_t r = 0; r < dim; ++r) {
      const double d = w_down[r * hidden + i], e = w_down_hat[r * hidden + i];
      dd += d * d;
      dh += d * e;
      hh += e * e;
    }
    const float* u = w_up + i * dim;
    const float* q = q_up + i * dim;
    const double uu = WDot(u, u, dim, col_weight);
    ref += dd * uu;
    err += dd * uu - 2.0 * dh * WDot(u, q, dim, col_weight) + hh * WDot(q, q, dim, col_weight);
  }
  if (ref <= 0) return 0;
  return std::sqrt(std::max(0.0, err) / ref);
}

namespace {

// Per-tensor bookkeeping of the driver.
struct Quantized {
  QuantTensor q;
  std::vector<float> decoded;
};

absl::StatusOr<Quantized> QuantizeRtn(const HostTensor& w, const fmt::Format& f, int n_threads) {
  RtnOptions ro;
  ro.n_threads = n_threads;
  auto q = RtnQuantize(w, {}, f, ro);
  if (!q.ok()) return absl::Status(q.status().code(), absl::StrCat(w.name, ": ", q.status().message()));
  auto d = DequantizeAll(*q);
  if (!d.ok()) return absl::Status(d.status().code(), absl::StrCat(w.name, ": ", d.status().message()));
  return Quantized{*std::move(q), *std::move(d)};
}

// Replaces w's fp32 data by qt and records it.
void Finish(HostTensor& w, Quantized qt, const std::string& name, const fmt::Format& f, const char* method,
            Clock::time_point since, QuantizeReport* report) {
  TensorReport tr;
  tr.name = name;
  tr.format = f.Name();
  tr.method = method;
  tr.rows = w.rows();
  tr.cols = w.cols();
  tr.bpw = qt.q.BitsPerWeight();
  tr.rel_error = RelativeWeightError(w.data.data(), qt.decoded.data(), w.rows(), w.cols());
  w.quant = std::make_shared<const QuantTensor>(std::move(qt.q));
  w.data.clear();
  w.data.shrink_to_fit();
  tr.seconds = Seconds(since);
  report->tensors.push_back(tr);
}

// g_j² of an RMSNorm gain (the data-free input-column weights), or empty.
absl::StatusOr<std::vector<float>> NormWeights(const HostTensor& norm, int64_t dim, bool enabled) {
  if (!enabled) return std::vector<float>{};
  if (norm.is_quantized() || norm.data.size() != static_cast<size_t>(dim))
    return absl::InvalidArgumentError(
        absl::StrCat("dfmpc: norm '", norm.name, "' holds ", norm.data.size(), " fp32 values, expected ", dim));
  std::vector<float> w(norm.data.size());
  for (size_t j = 0; j < w.size(); ++j) {
    if (!std::isfinite(norm.data[j]))
      return absl::InvalidArgumentError(absl::StrCat("dfmpc: norm '", norm.name, "' value ", j, " is not finite"));
    w[j] = norm.data[j] * norm.data[j];
  }
  return w;
}

}  // namespace

absl::StatusOr<std::vector<float>> DfmpcHessianFactor(const Hessian& h, int64_t dim, double damp,
                                                      const std::string& what) {
  if (h.dim != dim || h.h.size() != static_cast<size_t>(dim * dim))
    return absl::InvalidArgumentError(absl::StrCat("dfmpc: calibration Hessian of ", what, " is ", h.dim,
                                                   "-wide, expected ", dim));
  std::vector<double> a(h.h.begin(), h.h.end());
  double mean_diag = 0;
  for (int64_t i = 0; i < dim; ++i) mean_diag += a[i * dim + i];
  mean_diag /= static_cast<double>(dim);
  if (!(mean_diag > 0.0) || !std::isfinite(mean_diag))
    return absl::InvalidArgumentError(absl::StrCat("dfmpc: calibration Hessian of ", what, " is zero or not finite"));
  for (double d : {damp, 1e-2, 1e-1}) {
    std::vector<double> u = a;
    for (int64_t i = 0; i < dim; ++i) u[i * dim + i] += std::max(d, 1e-6) * mean_diag;
    if (CholeskyUpper(u.data(), dim, 1)) return std::vector<float>(u.begin(), u.end());
  }
  return absl::InternalError(absl::StrCat("dfmpc: calibration Hessian of ", what, " is not positive definite"));
}

std::vector<float> DfmpcWhiten(const float* x, int64_t n, int64_t dim, const std::vector<float>& u) {
  std::vector<float> y(static_cast<size_t>(n * dim));
  cpu::MatMulF32(u.data(), dim, dim, x, n, y.data(), nullptr);
  return y;
}

absl::StatusOr<QuantizeReport> QuantizeModelDfmpc(
    LoadedModel* m, const QuantizeConfig& cfg,
    const std::function<void(int done, int total, const std::string& tensor)>& progress) {
  const auto t0 = Clock::now();
  const DfmpcOptions& o = cfg.dfmpc;
  if (cfg.target_bpw != 0.0) return absl::InvalidArgumentError("method dfmpc cannot be combined with bit allocation (--bpw)");
  if (cfg.outlier_fraction != 0.0) return absl::InvalidArgumentError("method dfmpc cannot be combined with --outliers");
  if (auto s = CheckFormat(cfg.format, "dfmpc low format (--format)"); !s.ok()) return s;
  if (auto s = CheckFormat(o.high, "dfmpc high format (--dfmpc-high)"); !s.ok()) return s;
  const fmt::Format rest = o.rest ? *o.rest : cfg.format;
  if (auto s = CheckFormat(rest, "dfmpc rest format (--dfmpc-rest)"); !s.ok()) return s;
  if (!(std::isfinite(o.ridge) && o.ridge >= 0.0))
    return absl::InvalidArgumentError(absl::StrCat("dfmpc ridge ", o.ridge, " is not finite and >= 0"));
  if (!cfg.calib_path.empty() && !o.calibrated)
    NIBBLE_LOG(WARNING) << "dfmpc is data-free: calibration text " << cfg.calib_path << " is ignored";
  if (o.calibrated && cfg.calib_path.empty())
    return absl::InvalidArgumentError("dfmpc with calibrated weighting needs calibration text (--calib FILE)");
  const ModelConfig& c = m->config;
  if (c.n_heads <= 0 || c.n_kv_heads <= 0 || c.head_dim <= 0 || c.n_heads % c.n_kv_heads != 0 || c.dim <= 0 ||
      c.hidden_dim <= 0 || static_cast<int>(m->weights.layers.size()) != c.n_layers)
    return absl::InvalidArgumentError(absl::StrCat("dfmpc: model config (", c.n_layers, " layers, ", c.n_heads,
                                                   " heads, ", c.n_kv_heads, " KV heads, head_dim ", c.head_dim,
                                                   ") does not match its weights or is not a valid GQA layout"));
  const int64_t dim = c.dim, hidden = c.hidden_dim, hd = c.head_dim;
  const int64_t kv_dim = int64_t{c.n_kv_heads} * hd, q_dim = int64_t{c.n_heads} * hd;

  QuantizeReport report;
  report.method = "dfmpc";
  report.format = cfg.format.Name();
  const int total = c.n_layers * 7 + (cfg.embed_format ? 1 : 0) +
                    (!c.tied_embeddings && (cfg.output_format || cfg.embed_format) ? 1 : 0);
  int done = 0;
  auto tick = [&](const std::string& name) {
    if (progress) progress(done, total, name);
    ++done;
  };
  auto shape_is = [](const HostTensor& w, int64_t r, int64_t cc) -> absl::Status {
    if (auto s = CheckMatrix(w, "dfmpc"); !s.ok()) return s;
    if (w.rows() != r || w.cols() != cc)
      return absl::InvalidArgumentError(absl::StrCat("dfmpc: tensor '", w.name, "' is [", w.rows(), ", ", w.cols(),
                                                     "], expected [", r, ", ", cc, "]"));
    return absl::OkStatus();
  };

  // Validate every layer before touching any (a failed call leaves the model as it was).
  for (int l = 0; l < c.n_layers; ++l) {
    const LayerWeights& L = m->weights.layers[l];
    using Shape = std::tuple<const HostTensor*, int64_t, int64_t>;
    for (auto [w, r, cc] : std::initializer_list<Shape>{{&L.wq, q_dim, dim}, {&L.wk, kv_dim, dim},
                                                         {&L.wv, kv_dim, dim}, {&L.wo, dim, q_dim},
                                                         {&L.w_gate, hidden, dim}, {&L.w_up, hidden, dim},
                                                         {&L.w_down, dim, hidden}})
      if (auto s = shape_is(*w, r, cc); !s.ok()) return s;
    for (const HostTensor* n : {&L.attn_norm, &L.ffn_norm})
      if (auto s = NormWeights(*n, dim, true); !s.ok()) return s.status();
  }
  for (const auto& [w, f] : {std::pair<const HostTensor*, std::optional<fmt::Format>>{&m->weights.tok_embeddings,
                                                                                      cfg.embed_format},
                             {&m->weights.output, cfg.output_format ? cfg.output_format : cfg.embed_format}}) {
    if (f && !(w == &m->weights.output && c.tied_embeddings)) {
      if (auto s = CheckFormat(*f, "dfmpc embedding/output format"); !s.ok()) return s;
      if (auto s = CheckMatrix(*w, "dfmpc"); !s.ok()) return s;
    }
  }

  // Calibrated weighting: the input Hessians of the full-precision model.
  std::optional<CalibrationStats> calib;
  if (o.calibrated) {
    const auto tc = Clock::now();
    auto tok = CreateTokenizer(m->vocab);
    if (!tok.ok()) return tok.status();
    auto model = LlamaModel::Create(*m, cfg.n_threads);
    if (!model.ok()) return model.status();
    CalibrateOptions copts;
    copts.n_tokens = cfg.calib_tokens;
    copts.ctx = cfg.calib_ctx;
    copts.collector.n_threads = cfg.n_threads;
    auto s = Calibrate(**model, **tok, cfg.calib_path, copts);
    if (!s.ok()) return s.status();
    calib = *std::move(s);
    report.calib_tokens = calib->n_tokens;
    report.calib_seconds = Seconds(tc);
  }
  // The rows of (w, q) to fit with: as stored (D weighting) or whitened by the
  // layer input's Hessian factor (calibrated).
  auto fit_rows = [&](int layer, LinearInput in, const float* w, const float* q, int64_t rows,
                      std::vector<float>* w_out, std::vector<float>* q_out) -> absl::Status {
    if (!calib) return absl::OkStatus();
    const Hessian* h = calib->Get(layer, in);
    if (h == nullptr) return absl::InternalError(absl::StrCat("dfmpc: no calibration Hessian for layer ", layer));
    auto u = DfmpcHessianFactor(*h, dim, cfg.gptq.percdamp, absl::StrCat("layer ", layer));
    if (!u.ok()) return u.status();
    *w_out = DfmpcWhiten(w, rows, dim, *u);
    *q_out = DfmpcWhiten(q, rows, dim, *u);
    return absl::OkStatus();
  };

  for (int l = 0; l < c.n_layers; ++l) {
    LayerWeights& L = m->weights.layers[l];
    const std::string p = absl::StrCat("blk.", l, ".");
    auto attn_w = NormWeights(L.attn_norm, dim, o.norm_weighted);
    if (!attn_w.ok()) return attn_w.status();
    auto ffn_w = NormWeights(L.ffn_norm, dim, o.norm_weighted);
    if (!ffn_w.ok()) return ffn_w.status();
    // Error measures always use the norm weighting (the data-free input model).
    auto attn_m = NormWeights(L.attn_norm, dim, true);
    if (!attn_m.ok()) return attn_m.status();
    auto ffn_m = NormWeights(L.ffn_norm, dim, true);
    if (!ffn_m.ok()) return ffn_m.status();
    DfmpcLayerError le;

    for (auto [w, name] : std::initializer_list<std::pair<HostTensor*, const char*>>{{&L.wq, "wq"}, {&L.wk, "wk"}}) {
      const auto tt = Clock::now();
      tick(p + name);
      auto q = QuantizeRtn(*w, rest, cfg.n_threads);
      if (!q.ok()) return q.status();
      Finish(*w, *std::move(q), p + name, rest, "rtn", tt, &report);
    }
    {  // W_V (low) -> W_O (high, compensated)
      auto tt = Clock::now();
      tick(p + "wv");
      auto qv = QuantizeRtn(L.wv, cfg.format, cfg.n_threads);
      if (!qv.ok()) return qv.status();
      const double tv = Seconds(tt);
      tt = Clock::now();
      tick(p + "wo");
      const std::vector<float> wo_fp = L.wo.data;
      if (o.compensate) {
        std::vector<float> vw, qw;
        if (auto s = fit_rows(l, LinearInput::kAttnIn, L.wv.data.data(), qv->decoded.data(), kv_dim, &vw, &qw);
            !s.ok())
          return s;
        if (auto s = calib ? DfmpcCompensateAttention(vw.data(), qw.data(), c.n_heads, c.n_kv_heads, c.head_dim, {},
                                                      o.ridge, &L.wo)
                           : DfmpcCompensateAttention(L.wv.data.data(), qv->decoded.data(), c.n_heads,
                                                      c.n_kv_heads, c.head_dim, *attn_w, o.ridge, &L.wo);
            !s.ok())
          return s;
      }
      auto qo = QuantizeRtn(L.wo, o.high, cfg.n_threads);
      if (!qo.ok()) return qo.status();
      le.attn = DfmpcAttentionError(wo_fp.data(), qo->decoded.data(), L.wv.data.data(), qv->decoded.data(), dim,
                                    c.n_heads, c.n_kv_heads, c.head_dim, *attn_m);
      Finish(L.wv, *std::move(qv), p + "wv", cfg.format, "rtn", Clock::now(), &report);
      report.tensors.back().seconds = tv;
      Finish(L.wo, *std::move(qo), p + "wo", o.high, o.compensate ? "dfmpc" : "rtn", tt, &report);
    }
    {
      const auto tt = Clock::now();
      tick(p + "w_gate");
      auto q = QuantizeRtn(L.w_gate, rest, cfg.n_threads);
      if (!q.ok()) return q.status();
      Finish(L.w_gate, *std::move(q), p + "w_gate", rest, "rtn", tt, &report);
    }
    {  // W_up (low) -> W_down (high, compensated)
      auto tt = Clock::now();
      tick(p + "w_up");
      auto qu = QuantizeRtn(L.w_up, cfg.format, cfg.n_threads);
      if (!qu.ok()) return qu.status();
      const double tu = Seconds(tt);
      tt = Clock::now();
      tick(p + "w_down");
      const std::vector<float> wd_fp = L.w_down.data;
      if (o.compensate) {
        std::vector<float> uw, qw;
        if (auto s = fit_rows(l, LinearInput::kFfnIn, L.w_up.data.data(), qu->decoded.data(), hidden, &uw, &qw);
            !s.ok())
          return s;
        if (auto s = calib ? DfmpcCompensateFfn(uw.data(), qw.data(), hidden, dim, {}, o.ridge, &L.w_down)
                           : DfmpcCompensateFfn(L.w_up.data.data(), qu->decoded.data(), hidden, dim, *ffn_w,
                                                o.ridge, &L.w_down);
            !s.ok())
          return s;
      }
      auto qd = QuantizeRtn(L.w_down, o.high, cfg.n_threads);
      if (!qd.ok()) return qd.status();
      le.ffn = DfmpcFfnError(wd_fp.data(), qd->decoded.data(), L.w_up.data.data(), qu->decoded.data(), dim, hidden,
                             *ffn_m);
      Finish(L.w_up, *std::move(qu), p + "w_up", cfg.format, "rtn", Clock::now(), &report);
      report.tensors.back().seconds = tu;
      Finish(L.w_down, *std::move(qd), p + "w_down", o.high, o.compensate ? "dfmpc" : "rtn", tt, &report);
    }
    report.dfmpc_layers.push_back(le);
  }

  // Embeddings / output head exactly as QuantizeModel treats them.
  std::vector<std::pair<HostTensor*, std::pair<std::string, fmt::Format>>> extra;
  if (cfg.embed_format) extra.push_back({&m->weights.tok_embeddings, {"token_embd", *cfg.embed_format}});
  if (!c.tied_embeddings) {
    std::optional<fmt::Format> f = cfg.output_format ? cfg.output_format : cfg.embed_format;
    if (f) extra.push_back({&m->weights.output, {"output", *f}});
  }
  for (auto& [w, nf] : extra) {
    const auto tt = Clock::now();
    tick(nf.first);
    if (auto s = CheckFormat(nf.second, nf.first.c_str()); !s.ok()) return s;
    auto q = QuantizeRtn(*w, nf.second, cfg.n_threads);
    if (!q.ok()) return q.status();
    Finish(*w, *std::move(q), nf.first, nf.second, "rtn", tt, &report);
  }
  if (progress) progress(total, total, "");

  AccountBits(*m, &report);  // every scale/zero byte counted
  report.seconds = Seconds(t0);

  m->metadata["quant.method"] = "dfmpc";
  m->metadata["quant.format"] = report.format;
  m->metadata["quant.dfmpc.high"] = o.high.Name();
  m->metadata["quant.dfmpc.rest"] = rest.Name();
  m->metadata["quant.dfmpc.ridge"] = absl::StrCat(o.ridge);
  m->metadata["quant.dfmpc.compensate"] = o.compensate ? "true" : "false";
  m->metadata["quant.dfmpc.weighting"] = o.calibrated ? "calib" : o.norm_weighted ? "norm" : "none";
  m->metadata["quant.embed_format"] = cfg.embed_format ? cfg.embed_format->Name() : "f32";
  m->metadata["quant.bpw_all"] = absl::StrFormat("%.4f", report.bpw_all);
  m->metadata["quant.bpw_linear"] = absl::StrFormat("%.4f", report.bpw_linear);
  return report;
}


}  // namespace nibble
