#include "quantizers/gptq.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kernels/common/fp16.h"
#include "kernels/formats/blocks.h"
#include "quantizers/linalg.h"
#include "quantizers/parallel.h"

namespace nibble {
namespace {

constexpr int64_t kRowBlock = 16;  // rows quantized together (share each U row load)
constexpr int kDampRetries = 4;    // extra attempts, damping x10 each

// Per-thread buffers for one row block.
struct Scratch {
  std::vector<float> w;    // [kRowBlock, cols] current weights, processing order
  std::vector<float> atq;  // [kRowBlock, cols] weight at quantization time, original order
  std::vector<float> q;    // [kRowBlock, cols] chosen value, original order
  std::vector<float> err;  // [kRowBlock, block_size] scaled errors of the current block
  std::vector<float> gbuf;
  std::vector<float> gimp;               // [group] fit importance with kept weights zeroed
  std::vector<fmt::GroupParams> params;  // [kRowBlock, n_groups]
  std::vector<uint8_t> fitted;           // [n_groups]
  // RefitRow's buffers.
  std::vector<double> lev, wv, rhs, fixed, A, A0, b0, th0, th1;
  std::vector<float> hp;
  std::vector<uint8_t> free;
  std::vector<float> nv;
  std::vector<fmt::GroupParams> np;
  // CdPass's buffer.
  std::vector<float> cd_g;
};

// Solves A x = b in place (b := x) for a symmetric positive definite n x n A
// (row-major, overwritten by its Cholesky factor). False if A is not SPD.
bool CholeskySolveInPlace(std::vector<double>& A, int64_t n, std::vector<double>& b) {
  for (int64_t j = 0; j < n; ++j) {
    double d = A[j * n + j];
    for (int64_t k = 0; k < j; ++k) d -= A[j * n + k] * A[j * n + k];
    if (!(d > 0.0) || !std::isfinite(d)) return false;
    const double ljj = std::sqrt(d);
    A[j * n + j] = ljj;
    for (int64_t i = j + 1; i < n; ++i) {
      double v = A[i * n + j];
      for (int64_t k = 0; k < j; ++k) v -= A[i * n + k] * A[j * n + k];
      A[i * n + j] = v / ljj;
    }
  }
  for (int64_t i = 0; i < n; ++i) {  // L y = b
    double v = b[i];
    for (int64_t k = 0; k < i; ++k) v -= A[i * n + k] * b[k];
    b[i] = v / A[i * n + i];
  }
  for (int64_t i = n - 1; i >= 0; --i) {  // L^T x = y
    double v = b[i];
    for (int64_t k = i + 1; k < n; ++k) v -= A[k * n + i] * b[k];
    b[i] = v / A[i * n + i];
  }
  return true;
}

// One GPTQ column sweep over a block of rows (see gptq.h for the algorithm).
struct Sweep {
  Sweep(const HostTensor& w, const GptqFactor& factor, const fmt::Format& f, const GptqOptions& opts)
      : w(w), factor(factor), f(f), opts(opts) {}

  const HostTensor& w;
  const GptqFactor& factor;
  const fmt::Format& f;
  const GptqOptions& opts;
  const uint8_t* keep = nullptr;    // [rows, cols] original order, or null
  const float* i8_scale = nullptr;  // [rows] or null (fp16 kept values)
  int64_t cols = 0, group = 0, n_groups = 0, bsz = 0, row_bytes = 0;
  std::vector<int32_t> pos;  // pos[original column] = processing index
  uint8_t* bytes = nullptr;
  float* chosen = nullptr;

  void Run(int64_t r0, int64_t R, Scratch* s) const {
    if (s->w.empty()) {
      s->w.resize(kRowBlock * cols);
      s->atq.resize(kRowBlock * cols);
      s->q.resize(kRowBlock * cols);
      s->err.resize(kRowBlock * bsz);
      s->gbuf.resize(group);
      s->gimp.resize(group);
      s->params.resize(kRowBlock * n_groups);
      s->fitted.resize(n_groups);
    }
    const float* U = factor.u.data();
    for (int64_t r = 0; r < R; ++r) {
      const float* src = w.data.data() + (r0 + r) * cols;
      for (int64_t k = 0; k < cols; ++k) {
        const int32_t j = factor.order[k];
        s->w[r * cols + k] = factor.dead[j] ? 0.0f : src[j];
      }
    }
    std::fill(s->fitted.begin(), s->fitted.end(), 0);
    for (int64_t i1 = 0; i1 < cols; i1 += bsz) {
      const int64_t i2 = std::min(cols, i1 + bsz);
      for (int64_t i = i1; i < i2; ++i) {
        const int32_t j = factor.order[i];
        const int64_t g = j / group;
        if (!s->fitted[g]) FitGroup(g, i1, i2, i, r0, R, s);
        const float* ui = U + i * cols;
        const float d = ui[i];
        for (int64_t r = 0; r < R; ++r) {
          float* wr = s->w.data() + r * cols;
          const float x = wr[i];
          const bool kept = keep != nullptr && keep[(r0 + r) * cols + j] != 0;
          const float q = kept ? KeptValue(x, i8_scale != nullptr ? i8_scale + r0 + r : nullptr)
                               : fmt::QuantizeValueRef(f, s->params[r * n_groups + g], x);
          s->atq[r * cols + j] = x;
          s->q[r * cols + j] = q;
          const float e = (x - q) / d;
          s->err[r * bsz + (i - i1)] = e;
          Axpy(wr + i + 1, -e, ui + i + 1, i2 - i - 1);
        }
      }
      if (i2 < cols) {  // lazy batch: the rest of every row at once
        for (int64_t k = i1; k < i2; ++k) {
          const float* uk = U + k * cols + i2;
          for (int64_t r = 0; r < R; ++r)
            Axpy(s->w.data() + r * cols + i2, -s->err[r * bsz + (k - i1)], uk, cols - i2);
        }
      }
    }
    if (keep == nullptr && !factor.h.empty() && (opts.cd_passes > 0 || opts.refit_scales)) {
      // Block coordinate descent on each row's output error: codes (cd, one
      // pass) and group parameters (refit) in turn, cd_passes rounds at most.
      for (int64_t r = 0; r < R; ++r) {
        float* q = s->q.data() + r * cols;
        float* atq = s->atq.data() + r * cols;
        fmt::GroupParams* params = s->params.data() + r * n_groups;
        const int rounds = std::max(1, opts.cd_passes);
        for (int round = 0; round < rounds; ++round) {
          const bool moved = opts.cd_passes > 0 && CdPass(r0 + r, q, atq, params, s);
          if (opts.refit_scales) RefitRow(r0 + r, q, atq, params, s);
          // Nothing moved: done, unless the first refit changed the levels.
          if (!moved && (round > 0 || !opts.refit_scales)) break;
        }
      }
    }
    const int64_t block_bytes = f.BlockBytes();
    for (int64_t r = 0; r < R; ++r) {
      uint8_t* dst = bytes + (r0 + r) * row_bytes;
      for (int64_t g = 0; g < n_groups; ++g) {
        const int64_t gs = g * group, gn = std::min(group, cols - gs);
        fmt::PackGroupRef(f, s->params[r * n_groups + g], s->atq.data() + r * cols + gs, static_cast<int>(gn),
                          dst + g * block_bytes);
      }
      if (chosen != nullptr) std::copy_n(s->q.data() + r * cols, cols, chosen + (r0 + r) * cols);
    }
  }

  // One pass of greedy coordinate descent on one row's values (GptqOptions::
  // cd_passes); true if any value moved. q: the row's chosen values (original
  // order), updated; atq: the values packing reads, set to each new value (a
  // level, so it packs to its code).
  bool CdPass(int64_t row, float* q, float* atq, const fmt::GroupParams* params, Scratch* s) const {
    const float* H = factor.h.data();
    const float ridge = static_cast<float>(opts.cd_percdamp * factor.mean_diag);
    const float* src = w.data.data() + row * cols;
    // g = A (w - v), recomputed every pass so round-off cannot accumulate.
    std::vector<float>& g = s->cd_g;
    g.assign(cols, 0.0f);
    for (int64_t j = 0; j < cols; ++j) {
      const float e = (factor.dead[j] ? 0.0f : src[j]) - q[j];
      g[j] += ridge * e;
      if (e != 0.0f) Axpy(g.data(), e, H + j * cols, cols);
    }
    bool moved = false;
    for (int64_t j = 0; j < cols; ++j) {
      if (factor.dead[j]) continue;
      const float ajj = H[j * cols + j] + ridge;
      if (!(ajj > 0.0f)) continue;
      const float nv = fmt::QuantizeValueRef(f, params[j / group], q[j] + g[j] / ajj);
      const float d = nv - q[j];
      if (d == 0.0f || !std::isfinite(nv)) continue;
      // Change of (w - v)^T A (w - v) when v_j moves by d.
      const double df = -2.0 * static_cast<double>(d) * g[j] + static_cast<double>(d) * d * ajj;
      if (!(df < -1e-12 * static_cast<double>(ajj) * d * d)) continue;
      q[j] = atq[j] = nv;
      Axpy(g.data(), -d, H + j * cols, cols);
      g[j] -= d * ridge;
      moved = true;
    }
    return moved;
  }

  // The least-squares refit of one row's group parameters (GptqOptions::
  // refit_scales). Every value is v_i = theta_u * l_i (+ theta_u' for the
  // minimum of int asym groups), l_i the group's fixed level: with Phi the
  // [cols, unknowns] basis, theta solves Phi^T H Phi theta = Phi^T H w (w:
  // the row's original weights). The new parameters are rounded to fp16 and
  // the values re-decoded from the same levels; the row keeps them only if
  // its proxy error (w - v)^T H (w - v) goes down. q: the row's chosen
  // values (original order), replaced; atq: the values packing reads, set to
  // the new values (each packs to its old code); params: replaced.
  void RefitRow(int64_t row, float* q, float* atq, fmt::GroupParams* params, Scratch* s) const {
    const float* H = factor.h.data();
    const bool asym = f.kind == fmt::Kind::kInt && !f.symmetric;
    const int K = asym ? 2 : 1;
    // Levels and the unknowns' layout: group g owns unknowns [K g, K g + K) if it is free.
    std::vector<double>& lev = s->lev;
    std::vector<uint8_t>& free = s->free;
    lev.assign(cols, 0.0);
    free.assign(n_groups, 0);
    for (int64_t g = 0; g < n_groups; ++g) {
      const int64_t gs = g * group, gn = std::min(group, cols - gs);
      const float d = fmt::RoundToF16(params[g].scale), m = asym ? fmt::RoundToF16(params[g].zero) : 0.0f;
      if (!(d != 0.0f) || !std::isfinite(d) || !std::isfinite(m)) continue;
      bool ok = true;
      for (int64_t c = 0; c < gn && ok; ++c) {
        const double l = asym ? std::rint((static_cast<double>(q[gs + c]) - m) / d) : static_cast<double>(q[gs + c]) / d;
        lev[gs + c] = l;
        ok = std::isfinite(l);
      }
      free[g] = ok ? 1 : 0;
    }
    const int64_t nu = K * n_groups;
    const float* src = w.data.data() + row * cols;
    std::vector<double>& wv = s->wv;
    wv.resize(cols);
    for (int64_t i = 0; i < cols; ++i) wv[i] = factor.dead[i] ? 0.0 : src[i];
    // Phi columns: unknown K g + 0 has l_i on group g; K g + 1 (asym) has 1.
    auto phi = [&](int64_t u, int64_t i) { return (u % K == 0) ? lev[i] : 1.0; };
    // HPhi[u][j] = sum_{i in group(u)} H[j][i] phi(u, i) (H symmetric: rows of H).
    std::vector<float>& hp = s->hp;
    hp.assign(static_cast<size_t>(nu * cols), 0.0f);
    std::vector<double>& rhs = s->rhs;
    rhs.assign(nu, 0.0);
    // Fixed part: values of groups that are not free stay as they are.
    std::vector<double>& fixed = s->fixed;
    fixed.assign(cols, 0.0);
    for (int64_t g = 0; g < n_groups; ++g) {
      const int64_t gs = g * group, gn = std::min(group, cols - gs);
      if (!free[g])
        for (int64_t c = 0; c < gn; ++c) fixed[gs + c] = q[gs + c];
    }
    for (int64_t g = 0; g < n_groups; ++g) {
      if (!free[g]) continue;
      const int64_t gs = g * group, gn = std::min(group, cols - gs);
      for (int k = 0; k < K; ++k) {
        float* hu = hp.data() + (K * g + k) * cols;
        for (int64_t c = 0; c < gn; ++c) {
          const float pv = static_cast<float>(phi(K * g + k, gs + c));
          if (pv == 0.0f) continue;
          Axpy(hu, pv, H + (gs + c) * cols, cols);  // row gs + c of H = its column (symmetric)
        }
        // rhs_u = (HPhi_u)^T (w - fixed)
        double acc = 0.0;
        for (int64_t j = 0; j < cols; ++j) acc += hu[j] * (wv[j] - fixed[j]);
        rhs[K * g + k] = acc;
      }
    }
    // A = Phi^T H Phi over the free unknowns; unknowns of fixed groups get identity rows (theta = 0, unused).
    std::vector<double>& A = s->A;
    A.assign(static_cast<size_t>(nu * nu), 0.0);
    double diag_mean = 0.0;
    for (int64_t u = 0; u < nu; ++u) {
      const int64_t g = u / K;
      if (!free[g]) continue;
      const float* hu = hp.data() + u * cols;
      for (int64_t v = 0; v < nu; ++v) {
        const int64_t gv = v / K;
        if (!free[gv]) continue;
        const int64_t vs = gv * group, vn = std::min(group, cols - vs);
        double acc = 0.0;
        for (int64_t c = 0; c < vn; ++c) acc += phi(v, vs + c) * hu[vs + c];
        A[u * nu + v] = acc;
      }
      diag_mean += A[u * nu + u];
    }
    diag_mean = diag_mean / static_cast<double>(nu) + 1e-30;
    for (int64_t u = 0; u < nu; ++u) {
      if (!free[u / K]) A[u * nu + u] = 1.0, rhs[u] = 0.0;
      else A[u * nu + u] += 1e-9 * diag_mean;  // round-off guard
    }
    // Old parameters as unknowns (the swept values are f + Phi theta_old, up to
    // the rounding of int asym's d c + m), to compare errors in the reduced
    // space: e(theta) = const - 2 theta^T rhs + theta^T A theta.
    std::vector<double>& th0 = s->th0;
    th0.assign(nu, 0.0);
    for (int64_t g = 0; g < n_groups; ++g) {
      if (!free[g]) continue;
      th0[K * g] = fmt::RoundToF16(params[g].scale);
      if (asym) th0[K * g + 1] = fmt::RoundToF16(params[g].zero);
    }
    std::vector<double>& A0 = s->A0;
    A0 = A;
    std::vector<double>& b0 = s->b0;
    b0 = rhs;
    auto reduced = [&](const std::vector<double>& th) {
      double e = 0.0;
      for (int64_t u = 0; u < nu; ++u) {
        if (!free[u / K]) continue;
        double at = 0.0;
        for (int64_t v = 0; v < nu; ++v) at += A0[u * nu + v] * th[v];
        e += th[u] * (at - 2.0 * b0[u]);
      }
      return e;
    };
    if (!CholeskySolveInPlace(A, nu, rhs)) return;
    // New parameters (fp16) and values, decoded from the same levels.
    std::vector<float>& nv = s->nv;
    nv.assign(q, q + cols);
    std::vector<fmt::GroupParams>& np = s->np;
    np.assign(params, params + n_groups);
    for (int64_t g = 0; g < n_groups; ++g) {
      if (!free[g]) continue;
      const int64_t gs = g * group, gn = std::min(group, cols - gs);
      const float d = fmt::RoundToF16(static_cast<float>(rhs[K * g]));
      const float m = asym ? fmt::RoundToF16(static_cast<float>(rhs[K * g + 1])) : 0.0f;
      if (!std::isfinite(d) || !std::isfinite(m) || std::fabs(rhs[K * g]) > 65504.0 ||
          (asym && std::fabs(rhs[K * g + 1]) > 65504.0))
        return;
      // Sign-sensitive kinds keep their sign convention (asym steps, binary/ternary magnitudes > 0).
      if (!(d > 0.0f) && f.kind != fmt::Kind::kNl && !(f.kind == fmt::Kind::kInt && f.symmetric)) return;
      if (d == 0.0f) return;
      np[g].scale = d;
      if (asym) np[g].zero = m;
      if (f.kind == fmt::Kind::kTernary) np[g].zero = 0.5f * d;  // threshold: nonzero levels stay nonzero
      for (int64_t c = 0; c < gn; ++c)
        nv[gs + c] = asym ? fmt::IntAsymValue(d, m, static_cast<int>(lev[gs + c])) : d * static_cast<float>(lev[gs + c]);
    }
    std::vector<double>& th1 = s->th1;
    th1.assign(nu, 0.0);
    for (int64_t g = 0; g < n_groups; ++g) {
      if (!free[g]) continue;
      th1[K * g] = np[g].scale;
      if (asym) th1[K * g + 1] = np[g].zero;
    }
    if (!(reduced(th1) < reduced(th0))) return;
    for (int64_t i = 0; i < cols; ++i) q[i] = atq[i] = nv[i];
    std::copy(np.begin(), np.end(), params);
  }

  // Fits group g's params for every row when its first column (processing
  // index i, in block [i1, i2)) is reached, on the group's current values:
  // columns beyond the block still miss this block's updates from [i1, i).
  void FitGroup(int64_t g, int64_t i1, int64_t i2, int64_t i, int64_t r0, int64_t R, Scratch* s) const {
    const float* U = factor.u.data();
    const float* imp = opts.weighted_fit ? factor.importance.data() : nullptr;
    const int64_t gs = g * group, gn = std::min(group, cols - gs);
    for (int64_t r = 0; r < R; ++r) {
      const float* wr = s->w.data() + r * cols;
      const float* er = s->err.data() + r * bsz;
      for (int64_t c = 0; c < gn; ++c) {
        const int64_t p = pos[gs + c];
        float v = wr[p];
        if (p >= i2)
          for (int64_t k = i1; k < i; ++k) v -= er[k - i1] * U[k * cols + p];
        s->gbuf[c] = v;
      }
      const float* gimp = imp != nullptr ? imp + gs : nullptr;
      if (keep != nullptr) {
        ExcludeKept(keep + (r0 + r) * cols + gs, gn, gimp, s->gbuf.data(), s->gimp.data());
        gimp = s->gimp.data();
      }
      s->params[r * n_groups + g] =
          fmt::FitGroupRef(f, s->gbuf.data(), static_cast<int>(gn), gimp, opts.bintern_lambda);
    }
    s->fitted[g] = 1;
  }
};

}  // namespace

void ExcludeKept(const uint8_t* kept, int64_t n, const float* imp, float* vals, float* imp_out) {
  float lo = 0.0f, hi = 0.0f;
  bool any = false;
  for (int64_t c = 0; c < n; ++c) {
    if (kept[c]) continue;
    lo = any ? std::min(lo, vals[c]) : vals[c];
    hi = any ? std::max(hi, vals[c]) : vals[c];
    any = true;
  }
  for (int64_t c = 0; c < n; ++c) {
    imp_out[c] = kept[c] ? 0.0f : (imp != nullptr ? imp[c] : 1.0f);
    if (kept[c]) vals[c] = any ? std::clamp(vals[c], lo, hi) : 0.0f;
  }
}

int8_t KeptCodeI8(float x, float s) {
  if (!(s != 0.0f) || !std::isfinite(s)) return 0;
  const float q = std::rint(x / s);
  if (!(q >= -127.0f)) return -127;  // also NaN
  return static_cast<int8_t>(std::min(q, 127.0f));
}

float KeptValue(float x, const float* i8_scale) {
  if (i8_scale == nullptr) return Fp16ToFp32(Fp32ToFp16(x));
  return *i8_scale * static_cast<float>(KeptCodeI8(x, *i8_scale));
}

absl::StatusOr<GptqFactor> FactorHessian(const Hessian& h, const GptqOptions& opts) {
  if (auto s = h.Validate("FactorHessian"); !s.ok()) return s;
  if (!(opts.percdamp >= 0.0) || !std::isfinite(opts.percdamp))
    return absl::InvalidArgumentError(absl::StrCat("FactorHessian: percdamp ", opts.percdamp, " is not >= 0"));
  const int64_t n = h.dim;
  GptqFactor f;
  f.cols = n;
  f.dead.assign(n, 0);
  std::vector<double> a(h.h.begin(), h.h.end());
  std::vector<double> raw_diag(n);
  for (int64_t i = 0; i < n; ++i) {
    raw_diag[i] = a[i * n + i];
    if (raw_diag[i] < 0.0)
      return absl::InvalidArgumentError(
          absl::StrCat("FactorHessian: diagonal entry ", i, " is negative (", raw_diag[i], ")"));
    if (raw_diag[i] == 0.0) {  // input i was always zero: its column cannot matter
      f.dead[i] = 1;
      for (int64_t j = 0; j < n; ++j) a[i * n + j] = a[j * n + i] = 0.0;
      a[i * n + i] = 1.0;
    }
  }
  double mean = 0.0;
  for (int64_t i = 0; i < n; ++i) mean += a[i * n + i];
  mean /= static_cast<double>(n);

  f.order.resize(n);
  std::iota(f.order.begin(), f.order.end(), 0);
  if (opts.act_order) {
    std::stable_sort(f.order.begin(), f.order.end(),
                     [&](int32_t x, int32_t y) { return a[x * n + x] > a[y * n + y]; });
  }
  std::vector<double> p(static_cast<size_t>(n * n));
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) p[i * n + j] = a[int64_t{f.order[i]} * n + f.order[j]];

  std::vector<double> u, work;
  double damp = opts.percdamp * mean;
  bool ok = false;
  for (int attempt = 0; attempt <= kDampRetries && !ok; ++attempt) {
    if (attempt > 0) damp = std::max(damp, 1e-6 * mean) * 10.0;
    work = p;
    for (int64_t i = 0; i < n; ++i) work[i * n + i] += damp;
    ok = InverseCholeskyUpper(work, n, &u, opts.n_threads);
  }
  if (!ok)
    return absl::FailedPreconditionError(absl::StrCat("FactorHessian: the ", n, " x ", n,
                                                      " Hessian is not positive definite even with damping ", damp));
  f.damp = damp;
  f.u.assign(u.begin(), u.end());
  f.importance.resize(n);
  for (int64_t i = 0; i < n; ++i) f.importance[i] = static_cast<float>(raw_diag[i] + damp);
  f.mean_diag = mean;
  if (opts.refit_scales || opts.cd_passes > 0) {
    f.h.resize(static_cast<size_t>(n * n));
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < n; ++j) f.h[i * n + j] = static_cast<float>(a[i * n + j]);
  }
  return f;
}

absl::StatusOr<QuantTensor> GptqQuantize(const HostTensor& w, const Hessian& h, const fmt::Format& f,
                                         const GptqOptions& opts, std::vector<float>* chosen) {
  if (h.dim != w.cols())
    return absl::InvalidArgumentError(absl::StrCat("GptqQuantize: Hessian dim ", h.dim, " does not match '", w.name,
                                                   "' with ", w.cols(), " columns"));
  auto factor = FactorHessian(h, opts);
  if (!factor.ok()) return factor.status();
  return GptqQuantize(w, *factor, f, opts, chosen);
}

absl::StatusOr<QuantTensor> GptqQuantize(const HostTensor& w, const GptqFactor& factor, const fmt::Format& f,
                                         const GptqOptions& opts, std::vector<float>* chosen) {
  return GptqQuantize(w, factor, f, opts, GptqKeep{}, chosen);
}

absl::StatusOr<QuantTensor> GptqQuantize(const HostTensor& w, const GptqFactor& factor, const fmt::Format& f,
                                         const GptqOptions& opts, const GptqKeep& keep, std::vector<float>* chosen) {
  if (auto s = CheckMatrix(w, "GptqQuantize"); !s.ok()) return s;
  if (auto s = CheckFormat(f, "GptqQuantize"); !s.ok()) return s;
  const int64_t rows = w.rows(), cols = w.cols();
  if (factor.cols != cols || factor.u.size() != static_cast<size_t>(cols * cols) ||
      factor.order.size() != static_cast<size_t>(cols) || factor.dead.size() != static_cast<size_t>(cols) ||
      factor.importance.size() != static_cast<size_t>(cols))
    return absl::InvalidArgumentError(absl::StrCat("GptqQuantize: factor for ", factor.cols,
                                                   " columns does not fit '", w.name, "' with ", cols, " columns"));
  if (opts.block_size < 1)
    return absl::InvalidArgumentError(absl::StrCat("GptqQuantize: block_size ", opts.block_size, " < 1"));
  if (!keep.mask.empty() && keep.mask.size() != static_cast<size_t>(rows * cols))
    return absl::InvalidArgumentError(absl::StrCat("GptqQuantize: keep mask for '", w.name, "' has ",
                                                   keep.mask.size(), " entries, expected ", rows * cols));
  if (!keep.i8_scale.empty() && keep.i8_scale.size() != static_cast<size_t>(rows))
    return absl::InvalidArgumentError(absl::StrCat("GptqQuantize: int8 keep scales for '", w.name, "' have ",
                                                   keep.i8_scale.size(), " entries, expected ", rows));
  Sweep sw(w, factor, f, opts);
  if (!keep.mask.empty()) {
    sw.keep = keep.mask.data();
    if (!keep.i8_scale.empty()) sw.i8_scale = keep.i8_scale.data();
  }
  sw.cols = cols;
  sw.group = f.group;
  sw.n_groups = f.BlocksPerRow(cols);
  sw.bsz = opts.block_size;
  sw.row_bytes = f.RowBytes(cols);
  sw.pos.assign(cols, -1);
  for (int64_t k = 0; k < cols; ++k) {
    const int32_t j = factor.order[k];
    if (j < 0 || j >= cols || sw.pos[j] >= 0)
      return absl::InvalidArgumentError(
          absl::StrCat("GptqQuantize: factor order is not a permutation (entry ", k, ")"));
    sw.pos[j] = static_cast<int32_t>(k);
  }
  std::vector<uint8_t> bytes(static_cast<size_t>(rows * sw.row_bytes));
  if (chosen != nullptr) chosen->assign(static_cast<size_t>(rows * cols), 0.0f);
  sw.bytes = bytes.data();
  sw.chosen = chosen != nullptr ? chosen->data() : nullptr;

  const int max_threads = ResolveThreads(opts.n_threads);
  std::vector<Scratch> scratch(static_cast<size_t>(max_threads));
  // Work: the column sweep (~cols^2 multiply-adds per row) plus the group fits.
  const double work = static_cast<double>(rows) * cols * (cols + 50.0);
  ParallelItems((rows + kRowBlock - 1) / kRowBlock, max_threads, work, [&](int thread, int64_t blk) {
    const int64_t r0 = blk * kRowBlock;
    sw.Run(r0, std::min(kRowBlock, rows - r0), &scratch[thread]);
  });
  return MakeOwnedQuantTensor(rows, cols, f, std::move(bytes));
}

}  // namespace nibble
