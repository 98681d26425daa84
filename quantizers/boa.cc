// BoaCollector and CalibrateBoa: the attention-aware statistics of BoA
// (quantizers/boa.h). The quantization routine is in boa_quantize.cc.
#include "quantizers/boa.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "kernels/cpu/ops.h"
#include "quantizers/parallel.h"

namespace nibble {

// Row Hessians of W_Q / W_K are accumulated in the "pair basis": dims
// permuted so that RoPE pair i is (i, i + rope_dim / 2) whatever the model's
// RopeStyle, and the dims from rope_dim on are not rotated. Every rotation is
// then a contiguous, vectorizable loop. Finish() permutes back.
struct BoaCollector::Layer {
  int hd = 0, nh = 0, nkv = 0, dim = 0;
  std::vector<double> qrow, krow;  // [nkv, hd, hd] running sums, pair basis (normalized in Finish)
  std::vector<double> gk;          // [nkv, hd, hd] Gram of the current sequence's keys so far, pair basis
  std::vector<std::unique_ptr<HessianAccumulator>> vcol;  // [nkv], width dim
  std::vector<float> x_pending;    // kAttnIn rows of the batch being forwarded
  int pending_rows = -1;           // -1: none since the last OnAttention
  std::vector<float> xhist;        // [seq_len, dim] attention inputs of the current sequence
  int64_t seq_len = 0;
  int64_t n_tokens = 0;            // query tokens accumulated
};

// One worker thread's buffers, grown on demand and reused across calls.
struct BoaCollector::Scratch {
  std::vector<double> a;      // hd x hd
  std::vector<double> v;      // gs x hd: vectors in the pair basis
  std::vector<double> tmp;    // 2 x hd
  std::vector<float> qh;      // [n, hd] one query head of the batch
  std::vector<float> sc;      // [kQueryBlock, end] scores, then probabilities
  std::vector<double> e;      // [end]
};

namespace {

constexpr int kQueryBlock = 32;  // queries per causal block of the attention GEMMs

#if defined(__x86_64__) && defined(__GNUC__)
#define BOA_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define BOA_CLONES
#endif

// out += Rᵀ G R for a hd x hd matrix G in the pair basis: dims i and
// i + half (i < half) rotate by the angle with cosine c[i] and sine s[i]
// (R maps (x, y) to (c x - s y, s x + c y)), dims from 2 * half on do not
// rotate. tmp: 2 * hd doubles.
BOA_CLONES void AddRotated(const double* g, int hd, int half, const double* c, const double* s, double* out,
                           double* tmp) {
  double* ta = tmp;
  double* tb = tmp + hd;
  const int rd = 2 * half;
  // Row i of G R: (x, y) pairs of columns j, j + half become (c x + s y, -s x + c y).
  for (int i = 0; i < half; ++i) {
    const double* ga = g + static_cast<size_t>(i) * hd;
    const double* gb = g + static_cast<size_t>(i + half) * hd;
    for (int j = 0; j < half; ++j) {
      const double xa = ga[j], ya = ga[j + half], xb = gb[j], yb = gb[j + half];
      ta[j] = c[j] * xa + s[j] * ya;
      ta[j + half] = c[j] * ya - s[j] * xa;
      tb[j] = c[j] * xb + s[j] * yb;
      tb[j + half] = c[j] * yb - s[j] * xb;
    }
    for (int j = rd; j < hd; ++j) ta[j] = ga[j], tb[j] = gb[j];
    const double ci = c[i], si = s[i];
    double* oa = out + static_cast<size_t>(i) * hd;
    double* ob = out + static_cast<size_t>(i + half) * hd;
    for (int j = 0; j < hd; ++j) {
      oa[j] += ci * ta[j] + si * tb[j];
      ob[j] += ci * tb[j] - si * ta[j];
    }
  }
  for (int i = rd; i < hd; ++i) {
    const double* gi = g + static_cast<size_t>(i) * hd;
    double* oi = out + static_cast<size_t>(i) * hd;
    for (int j = 0; j < half; ++j) {
      oi[j] += c[j] * gi[j] + s[j] * gi[j + half];
      oi[j + half] += c[j] * gi[j + half] - s[j] * gi[j];
    }
    for (int j = rd; j < hd; ++j) oi[j] += gi[j];
  }
}

// m += Σ_r v_r v_rᵀ over `count` vectors of length n (v: [count, n]).
BOA_CLONES void AddOuters(double* m, const double* v, int count, int n) {
  for (int i = 0; i < n; ++i) {
    double* row = m + static_cast<size_t>(i) * n;
    for (int r = 0; r < count; ++r) {
      const double* vr = v + static_cast<size_t>(r) * n;
      const double vi = vr[i];
      for (int j = 0; j < n; ++j) row[j] += vi * vr[j];
    }
  }
}

// The causal softmax of one query's scores: row[s] for s < len becomes
// softmax(row * scale) (computed in fp64), row[s] for len <= s < end becomes 0.
void CausalSoftmax(float* row, int len, int end, double scale, double* e) {
  double mx = -INFINITY;
  for (int s = 0; s < len; ++s) mx = std::max(mx, e[s] = row[s] * scale);
  double sum = 0.0;
  for (int s = 0; s < len; ++s) sum += (e[s] = std::exp(e[s] - mx));
  const double inv = 1.0 / sum;
  for (int s = 0; s < len; ++s) row[s] = static_cast<float>(e[s] * inv);
  std::fill(row + len, row + end, 0.0f);
}

Hessian ToHessian(const double* sum, int n, const std::vector<int>& pair_index, int64_t n_tokens, double scale) {
  Hessian h;
  h.dim = n;
  h.n_tokens = n_tokens;
  h.h.resize(static_cast<size_t>(n) * n);
  h.mean_sq.resize(n);
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j)
      h.h[static_cast<size_t>(i) * n + j] =
          static_cast<float>(sum[static_cast<size_t>(pair_index[i]) * n + pair_index[j]] * scale);
  for (int i = 0; i < n; ++i) h.mean_sq[i] = 0.5f * h.h[static_cast<size_t>(i) * n + i];
  return h;
}

template <typename T>
void Grow(std::vector<T>* v, size_t n) {
  if (v->size() < n) v->resize(n);
}

}  // namespace

BoaCollector::BoaCollector(const ModelConfig& config, const CollectorOptions& opts)
    : config_(config), opts_(opts), plain_(opts) {
  layers_.resize(static_cast<size_t>(std::max(config.n_layers, 0)));
  // The pair basis (see Layer). Only used once OnAttention has checked the config.
  const int hd = std::max(config.head_dim, 0), half = std::clamp(config.rope_dim, 0, hd) / 2;
  pair_index_.resize(static_cast<size_t>(hd));
  for (int j = 0; j < hd; ++j) pair_index_[j] = j;
  if (config.rope_style == RopeStyle::kInterleaved) {
    for (int i = 0; i < half; ++i) pair_index_[2 * i] = i, pair_index_[2 * i + 1] = i + half;
  }
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
      a.n_heads % a.n_kv_heads != 0 || a.n_tokens <= 0 || a.pos0 < 0 || c.rope_dim > c.head_dim ||
      c.rope_dim < 0 || c.dim <= 0) {
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
  const size_t hh = static_cast<size_t>(hd) * hd;
  if (L.hd == 0) {
    L.hd = hd, L.nh = nh, L.nkv = nkv, L.dim = dim;
    L.qrow.assign(static_cast<size_t>(nkv) * hh, 0.0);
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
  const double inv_sqrt = 1.0 / std::sqrt(static_cast<double>(hd));

  // Shared read-only inputs of the work items: keys by KV head, X transposed.
  Grow(&kg_, static_cast<size_t>(nkv) * end * hd);
  for (int g = 0; g < nkv; ++g)
    for (int s = 0; s < end; ++s)
      std::memcpy(kg_.data() + (static_cast<size_t>(g) * end + s) * hd, a.k_cache + s * kvd + g * hd,
                  sizeof(float) * hd);
  // Causal blocks of kQueryBlock queries: block b needs keys and inputs of
  // positions [0, pos0 + t1) only; xt_ holds, per block, X of those positions
  // transposed ([dim, pos0 + t1]), the last block's first.
  const int n_blocks = (n + kQueryBlock - 1) / kQueryBlock;
  std::vector<size_t> xt_off(static_cast<size_t>(n_blocks));
  size_t xt_size = static_cast<size_t>(dim) * end;
  for (int b = 0; b + 1 < n_blocks; ++b) {
    xt_off[b] = xt_size;
    xt_size += static_cast<size_t>(dim) * (pos0 + (b + 1) * kQueryBlock);
  }
  xt_off[n_blocks - 1] = 0;
  Grow(&xt_, xt_size);
  for (int s = 0; s < end; ++s) {
    const float* x = L.xhist.data() + static_cast<size_t>(s) * dim;
    for (int i = 0; i < dim; ++i) xt_[static_cast<size_t>(i) * end + s] = x[i];
  }
  for (int b = 0; b + 1 < n_blocks; ++b) {
    const int len = pos0 + (b + 1) * kQueryBlock;
    for (int i = 0; i < dim; ++i)
      std::memcpy(xt_.data() + xt_off[b] + static_cast<size_t>(i) * len, xt_.data() + static_cast<size_t>(i) * end,
                  sizeof(float) * len);
  }
  Grow(&z_, static_cast<size_t>(nh) * n * dim);
  const int threads = ResolveThreads(opts_.n_threads);
  while (static_cast<int>(scratch_.size()) < threads) scratch_.push_back(std::make_unique<Scratch>());
  for (auto& sp : scratch_) {
    Scratch& S = *sp;
    Grow(&S.a, hh);
    Grow(&S.v, static_cast<size_t>(gs) * hd);
    Grow(&S.tmp, 2 * static_cast<size_t>(hd));
    Grow(&S.qh, static_cast<size_t>(n) * hd);
    Grow(&S.sc, static_cast<size_t>(kQueryBlock) * end);
    Grow(&S.e, static_cast<size_t>(end));
  }
  const int* pidx = pair_index_.data();
  auto to_pair = [&](const float* v, double* out) {
    for (int j = 0; j < hd; ++j) out[pidx[j]] = v[j];
  };
  auto rot = [&](const double* m, int64_t p, double* out, double* tmp) {
    AddRotated(m, hd, half, cos_.data() + p * half, sin_.data() + p * half, out, tmp);
  };
  const double work = static_cast<double>(nh) * n * end * (hd + dim) +
                      static_cast<double>(nkv) * (2 * n + pos0) * hh * 6.0;
  // Items [0, nh): query head h's attention-weighted inputs; [nh, nh + nkv):
  // W_K's row Hessian of KV head g; [nh + nkv, nh + 2 nkv): W_Q's.
  ParallelItems(nh + 2 * nkv, threads, work, [&](int thread, int64_t item) {
    Scratch& S = *scratch_[thread];
    if (item < nh) {
      // W_V's column Hessian input: z_t = Σ_s a_ts x_s for query head qh.
      const int qh = static_cast<int>(item), g = qh / gs;
      for (int t = 0; t < n; ++t)
        std::memcpy(S.qh.data() + static_cast<size_t>(t) * hd, a.q + t * qd + qh * hd, sizeof(float) * hd);
      for (int b = 0; b < n_blocks; ++b) {
        const int t0 = b * kQueryBlock, t1 = std::min(n, t0 + kQueryBlock), len = pos0 + t1;
        // Scores [t1 - t0, len] (fp32 GEMM), probabilities in place, z = P X.
        cpu::MatMulF32(kg_.data() + static_cast<size_t>(g) * end * hd, len, hd,
                       S.qh.data() + static_cast<size_t>(t0) * hd, t1 - t0, S.sc.data(), nullptr);
        for (int t = t0; t < t1; ++t)
          CausalSoftmax(S.sc.data() + static_cast<size_t>(t - t0) * len, pos0 + t + 1, len, inv_sqrt, S.e.data());
        cpu::MatMulF32(xt_.data() + xt_off[b], dim, len, S.sc.data(), t1 - t0,
                       z_.data() + (static_cast<size_t>(qh) * n + t0) * dim, nullptr);
      }
      return;
    }
    const bool key = item < nh + nkv;
    const int g = static_cast<int>(item - nh - (key ? 0 : nkv));
    double* m = S.a.data();
    if (!key) {
      // W_Q's row Hessian: keys s <= t, rotated back by the query position t.
      double* gk = L.gk.data() + g * hh;
      double* qrow = L.qrow.data() + g * hh;
      for (int t = 0; t < n; ++t) {
        to_pair(a.k_cache + (pos0 + t) * kvd + g * hd, S.v.data());
        AddOuters(gk, S.v.data(), 1, hd);
        rot(gk, pos0 + t, qrow, S.tmp.data());
      }
      return;
    }
    // W_K's row Hessian: queries t >= s of the group's heads, rotated back by
    // the key position s; keys of earlier batches see all of this batch.
    double* krow = L.krow.data() + g * hh;
    std::fill(m, m + hh, 0.0);
    for (int t = n - 1; t >= 0; --t) {
      for (int h = 0; h < gs; ++h) to_pair(a.q + t * qd + (g * gs + h) * hd, S.v.data() + h * hd);
      AddOuters(m, S.v.data(), gs, hd);
      rot(m, pos0 + t, krow, S.tmp.data());
    }
    for (int s = 0; s < pos0; ++s) rot(m, s, krow, S.tmp.data());
  });
  for (int g = 0; g < nkv; ++g)
    L.vcol[g]->Add(z_.data() + static_cast<size_t>(g) * gs * n * dim, static_cast<int64_t>(gs) * n, threads);
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
      s.q_row.push_back(ToHessian(L->qrow.data() + g * hh, L->hd, pair_index_, L->n_tokens, scale));
      s.k_row.push_back(ToHessian(L->krow.data() + g * hh, L->hd, pair_index_, L->n_tokens, scale));
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
