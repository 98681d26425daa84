// BoaCollector and CalibrateBoa: the attention-aware statistics of BoA
// (quantizers/boa.h). The quantization routine is in boa_quantize.cc.
#include "quantizers/boa.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "quantizers/parallel.h"

namespace nibble {

struct BoaCollector::Layer {
  int hd = 0, nh = 0, nkv = 0, dim = 0;
  std::vector<double> qrow, krow;  // [nkv, hd, hd] running sums (normalized in Finish)
  std::vector<double> gk;          // [nkv, hd, hd] Gram of the current sequence's keys so far
  std::vector<std::unique_ptr<HessianAccumulator>> vcol;  // [nkv], width dim
  std::vector<float> x_pending;    // kAttnIn rows of the batch being forwarded
  int pending_rows = -1;           // -1: none since the last OnAttention
  std::vector<float> xhist;        // [seq_len, dim] attention inputs of the current sequence
  int64_t seq_len = 0;
  int64_t n_tokens = 0;            // query tokens accumulated
};

namespace {

// M := R_pᵀ M R_p for a symmetric hd x hd matrix M (R_p: RoPE at position p,
// with cos/sin of the rope_dim/2 pairs in c, s).
void RotateSym(double* m, int hd, int rope_dim, RopeStyle style, const float* c, const float* s) {
  const int half = rope_dim / 2;
  auto pair = [&](int i, int* a, int* b) {
    if (style == RopeStyle::kInterleaved) {
      *a = 2 * i;
      *b = 2 * i + 1;
    } else {
      *a = i;
      *b = i + half;
    }
  };
  for (int i = 0; i < half; ++i) {  // columns: M R
    int a, b;
    pair(i, &a, &b);
    const double ci = c[i], si = s[i];
    for (int r = 0; r < hd; ++r) {
      double* row = m + static_cast<size_t>(r) * hd;
      const double x = row[a], y = row[b];
      row[a] = ci * x + si * y;
      row[b] = -si * x + ci * y;
    }
  }
  for (int i = 0; i < half; ++i) {  // rows: R^T (M R)
    int a, b;
    pair(i, &a, &b);
    const double ci = c[i], si = s[i];
    double* ra = m + static_cast<size_t>(a) * hd;
    double* rb = m + static_cast<size_t>(b) * hd;
    for (int j = 0; j < hd; ++j) {
      const double x = ra[j], y = rb[j];
      ra[j] = ci * x + si * y;
      rb[j] = -si * x + ci * y;
    }
  }
}

void AddOuter(double* m, const float* v, int n) {
  for (int i = 0; i < n; ++i) {
    const double vi = v[i];
    double* row = m + static_cast<size_t>(i) * n;
    for (int j = 0; j < n; ++j) row[j] += vi * v[j];
  }
}

Hessian ToHessian(const double* sum, int n, int64_t n_tokens, double scale) {
  Hessian h;
  h.dim = n;
  h.n_tokens = n_tokens;
  h.h.resize(static_cast<size_t>(n) * n);
  h.mean_sq.resize(n);
  for (size_t i = 0; i < h.h.size(); ++i) h.h[i] = static_cast<float>(sum[i] * scale);
  for (int i = 0; i < n; ++i) h.mean_sq[i] = 0.5f * h.h[static_cast<size_t>(i) * n + i];
  return h;
}

}  // namespace

BoaCollector::BoaCollector(const ModelConfig& config, const CollectorOptions& opts)
    : config_(config), opts_(opts), plain_(opts) {
  layers_.resize(static_cast<size_t>(std::max(config.n_layers, 0)));
}

BoaCollector::~BoaCollector() = default;

const absl::Status& BoaCollector::status() const { return status_.ok() ? plain_.status() : status_; }

bool BoaCollector::InRange(int layer) const {
  const int end = opts_.layer_end < 0 ? config_.n_layers : std::min(opts_.layer_end, config_.n_layers);
  return layer >= std::max(opts_.layer_begin, 0) && layer < end;
}

void BoaCollector::EnsureRotations(int64_t positions) {
  const int half = config_.rope_dim / 2;
  const int64_t have = half > 0 ? static_cast<int64_t>(cos_.size()) / half : 0;
  if (half <= 0 || positions <= have) return;
  cos_.resize(static_cast<size_t>(positions * half));
  sin_.resize(static_cast<size_t>(positions * half));
  for (int64_t p = have; p < positions; ++p) {
    for (int i = 0; i < half; ++i) {
      // The same float expression as the RoPE kernel (kernels/cpu/ops.cc).
      const float freq =
          1.0f / std::pow(config_.rope_theta, static_cast<float>(2 * i) / static_cast<float>(config_.rope_dim));
      const float angle = static_cast<float>(p) * freq;
      cos_[p * half + i] = std::cos(angle);
      sin_[p * half + i] = std::sin(angle);
    }
  }
}

void BoaCollector::OnLinearInput(int layer, LinearInput which, const float* x, int n_tokens, int width) {
  plain_.OnLinearInput(layer, which, x, n_tokens, width);
  if (which != LinearInput::kAttnIn || !status_.ok() || !InRange(layer) ||
      layer >= static_cast<int>(layers_.size()))
    return;
  if (width != config_.dim || n_tokens < 0) {
    status_ = absl::InvalidArgumentError(absl::StrCat("BoaCollector: layer ", layer, " attention input has width ",
                                                      width, ", the model's dim is ", config_.dim));
    return;
  }
  auto& L = layers_[layer];
  if (!L) L = std::make_unique<Layer>();
  L->x_pending.assign(x, x + static_cast<size_t>(n_tokens) * width);
  L->pending_rows = n_tokens;
}

void BoaCollector::OnAttention(int layer, const AttentionObservation& a) {
  if (!status_.ok() || !InRange(layer) || layer >= static_cast<int>(layers_.size())) return;
  const ModelConfig& c = config_;
  if (a.n_heads != c.n_heads || a.n_kv_heads != c.n_kv_heads || a.head_dim != c.head_dim || a.n_kv_heads <= 0 ||
      a.n_heads % a.n_kv_heads != 0 || a.n_tokens <= 0 || a.pos0 < 0 || c.rope_dim > c.head_dim) {
    status_ = absl::InvalidArgumentError(absl::StrCat(
        "BoaCollector: layer ", layer, " attention of ", a.n_tokens, " tokens at ", a.pos0, " with ", a.n_heads, "/",
        a.n_kv_heads, " heads of ", a.head_dim, " does not match the model (", c.n_heads, "/", c.n_kv_heads,
        " heads of ", c.head_dim, ")"));
    return;
  }
  auto& Lp = layers_[layer];
  if (!Lp || Lp->pending_rows != a.n_tokens) {
    status_ = absl::FailedPreconditionError(absl::StrCat(
        "BoaCollector: layer ", layer, " attention of ", a.n_tokens, " tokens without the matching attention input"));
    return;
  }
  Layer& L = *Lp;
  const int hd = c.head_dim, nkv = c.n_kv_heads, nh = c.n_heads, gs = nh / nkv, dim = c.dim;
  if (L.hd == 0) {
    L.hd = hd, L.nh = nh, L.nkv = nkv, L.dim = dim;
    L.qrow.assign(static_cast<size_t>(nkv) * hd * hd, 0.0);
    L.krow.assign(L.qrow.size(), 0.0);
    L.gk.assign(L.qrow.size(), 0.0);
    for (int g = 0; g < nkv; ++g) L.vcol.push_back(std::make_unique<HessianAccumulator>(dim));
  }
  if (a.pos0 == 0) {
    L.seq_len = 0;
    std::fill(L.gk.begin(), L.gk.end(), 0.0);
  } else if (a.pos0 != L.seq_len) {
    status_ = absl::FailedPreconditionError(absl::StrCat("BoaCollector: layer ", layer, " batch at position ", a.pos0,
                                                         " does not continue the sequence of ", L.seq_len,
                                                         " tokens (batches must arrive in order)"));
    return;
  }
  const int n = a.n_tokens, pos0 = a.pos0, end = pos0 + n;
  L.xhist.resize(static_cast<size_t>(end) * dim);
  std::memcpy(L.xhist.data() + static_cast<size_t>(pos0) * dim, L.x_pending.data(),
              static_cast<size_t>(n) * dim * sizeof(float));
  L.pending_rows = -1;
  L.seq_len = end;
  L.n_tokens += n;
  EnsureRotations(end);
  const int half = c.rope_dim / 2;
  const int64_t qd = static_cast<int64_t>(nh) * hd, kvd = static_cast<int64_t>(nkv) * hd;
  const float* cs = cos_.data();
  const float* sn = sin_.data();
  auto rot = [&](double* m, int64_t p) {
    if (half > 0) RotateSym(m, hd, c.rope_dim, c.rope_style, cs + p * half, sn + p * half);
  };
  const double inv_sqrt = 1.0 / std::sqrt(static_cast<double>(hd));
  const double work = static_cast<double>(nh) * n * (static_cast<double>(end) * (hd + dim) + dim * dim) +
                      static_cast<double>(nkv) * (n + pos0) * hd * hd * 4.0;

  ParallelItems(nkv, opts_.n_threads, work, [&](int, int64_t g) {
    const size_t hh = static_cast<size_t>(hd) * hd;
    std::vector<double> m(hh), p(hh, 0.0);
    double* gk = L.gk.data() + g * hh;
    double* qrow = L.qrow.data() + g * hh;
    double* krow = L.krow.data() + g * hh;
    // W_Q's row Hessian: keys s <= t, rotated back by the query position t.
    for (int t = 0; t < n; ++t) {
      AddOuter(gk, a.k_cache + (pos0 + t) * kvd + g * hd, hd);
      std::copy_n(gk, hh, m.data());
      rot(m.data(), pos0 + t);
      for (size_t i = 0; i < hh; ++i) qrow[i] += m[i];
    }
    // W_K's row Hessian: queries t >= s of the group's heads, rotated back by
    // the key position s; keys of earlier batches see all of this batch.
    for (int t = n - 1; t >= 0; --t) {
      for (int h = 0; h < gs; ++h) AddOuter(p.data(), a.q + t * qd + (g * gs + h) * hd, hd);
      std::copy_n(p.data(), hh, m.data());
      rot(m.data(), pos0 + t);
      for (size_t i = 0; i < hh; ++i) krow[i] += m[i];
    }
    for (int s = 0; s < pos0; ++s) {
      std::copy_n(p.data(), hh, m.data());
      rot(m.data(), s);
      for (size_t i = 0; i < hh; ++i) krow[i] += m[i];
    }
    // W_V's column Hessian: attention-weighted inputs z_t = sum_s a_ts x_s.
    std::vector<float> z(static_cast<size_t>(gs) * n * dim, 0.0f);
    std::vector<double> sc(static_cast<size_t>(end));
    for (int h = 0; h < gs; ++h) {
      const int qh = static_cast<int>(g) * gs + h;
      for (int t = 0; t < n; ++t) {
        const float* q = a.q + t * qd + qh * hd;
        const int len = pos0 + t + 1;
        double mx = -INFINITY;
        for (int s = 0; s < len; ++s) {
          const float* k = a.k_cache + s * kvd + g * hd;
          double d = 0.0;
          for (int i = 0; i < hd; ++i) d += static_cast<double>(q[i]) * k[i];
          sc[s] = d * inv_sqrt;
          mx = std::max(mx, sc[s]);
        }
        double sum = 0.0;
        for (int s = 0; s < len; ++s) sum += (sc[s] = std::exp(sc[s] - mx));
        float* zt = z.data() + (static_cast<size_t>(h) * n + t) * dim;
        for (int s = 0; s < len; ++s) {
          const float w = static_cast<float>(sc[s] / sum);
          const float* x = L.xhist.data() + static_cast<size_t>(s) * dim;
          for (int i = 0; i < dim; ++i) zt[i] += w * x[i];
        }
      }
    }
    L.vcol[g]->Add(z.data(), static_cast<int64_t>(gs) * n, 1);
  });
}

absl::StatusOr<BoaStats> BoaCollector::Finish() const {
  if (!status().ok()) return status();
  auto plain = plain_.Finish();
  if (!plain.ok()) return plain.status();
  BoaStats out;
  out.plain = *std::move(plain);
  out.layers.resize(layers_.size());
  for (size_t l = 0; l < layers_.size(); ++l) {
    const Layer* L = layers_[l].get();
    if (L == nullptr || L->hd == 0 || L->n_tokens == 0) continue;
    BoaLayerStats& s = out.layers[l];
    s.head_dim = L->hd, s.n_heads = L->nh, s.n_kv_heads = L->nkv;
    const size_t hh = static_cast<size_t>(L->hd) * L->hd;
    const double scale = 1.0 / (static_cast<double>(L->n_tokens) * L->hd);
    for (int g = 0; g < L->nkv; ++g) {
      s.q_row.push_back(ToHessian(L->qrow.data() + g * hh, L->hd, L->n_tokens, scale));
      s.k_row.push_back(ToHessian(L->krow.data() + g * hh, L->hd, L->n_tokens, scale));
      s.v_col.push_back(L->vcol[g]->Finish());
    }
  }
  return out;
}

absl::StatusOr<BoaStats> CalibrateBoa(LlamaModel& model, const Tokenizer& tokenizer, const std::string& text_path,
                                      const CalibrateOptions& opts) {
  const ModelConfig& c = model.config();
  BoaCollector collector(c, opts.collector);
  auto run = RunCalibration(model, tokenizer, text_path, opts, &collector, [&] { return collector.status(); });
  if (!run.ok()) return run.status();
  auto stats = collector.Finish();
  if (!stats.ok()) return stats.status();
  stats->plain.n_tokens = run->n_tokens;
  stats->plain.n_chunks = run->n_chunks;
  return stats;
}

}  // namespace nibble
