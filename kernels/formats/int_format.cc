// kInt: group-wise integer quantization, round-to-nearest with a clipping
// search.
//
// Fit (asymmetric, w = d * q + m, q in [0, 2^b - 1]): for every shrink factor
// s in {1.0, 0.975, ..., 0.5} the range [min, max] is shrunk by s about its
// centre, d = s * (max - min) / (2^b - 1), m = the shrunk minimum; d and m are
// rounded to fp16 and the importance-weighted squared error of the stored grid
// is measured. Each candidate is then refined once by weighted least squares
// of (d, m) over the codes it assigns (again rounded and measured). The best
// measured candidate wins; s = 1.0 is plain min/max RTN, so the search is
// never worse than it.
// Symmetric (w = d * (q - 2^(b-1))): the grid is anchored on the signed
// weight v of largest magnitude, either at the extra negative level
// (d = -s * v / 2^(b-1), so v maps to q = 0) or at the top positive level
// (d = s * v / (2^(b-1) - 1)); each with the least-squares refinement of d.
#include <cmath>

#include "kernels/formats/blocks.h"
#include "kernels/formats/format_impl.h"

namespace nibble::fmt::internal {
namespace {

constexpr int kShrinkSteps = 20;       // shrink factors 1.0 - 0.025 * step, step = 0..20
constexpr float kShrinkStep = 0.025f;  // down to 0.5

struct Grid {
  float d = 0.0f;
  float m = 0.0f;  // unused when symmetric
};

// Stored value of w on grid g (d, m already fp16).
inline float GridValue(const Format& f, const Grid& g, float w) {
  if (f.symmetric) return IntSymValue(g.d, f.bits, IntSymCode(g.d, f.bits, w));
  return IntAsymValue(g.d, g.m, IntAsymCode(g.d, g.m, f.bits, w));
}

inline int GridCode(const Format& f, const Grid& g, float w) {
  return f.symmetric ? IntSymCode(g.d, f.bits, w) : IntAsymCode(g.d, g.m, f.bits, w);
}

// One pass over the group on grid g: the importance-weighted squared error of
// the stored values, and the weighted sums a least-squares refit of the grid
// over the codes g assigns needs (q is centred by 2^(b-1) when symmetric).
struct Pass {
  double err = 0, s = 0, sq = 0, sqq = 0, sw = 0, sqw = 0;
};

Pass Evaluate(const Format& f, const Grid& g, const float* w, int n, const float* imp) {
  const int half = 1 << (f.bits - 1);
  Pass r;
  for (int i = 0; i < n; ++i) {
    const int code = GridCode(f, g, w[i]);
    const float v = f.symmetric ? IntSymValue(g.d, f.bits, code) : IntAsymValue(g.d, g.m, code);
    const double c = Imp(imp, i), x = w[i], e = x - v;
    const double q = f.symmetric ? code - half : code;
    r.err += c * e * e;
    r.s += c;
    r.sq += c * q;
    r.sqq += c * q * q;
    r.sw += c * x;
    r.sqw += c * q * x;
  }
  return r;
}

class Search {
 public:
  Search(const Format& f, const float* w, int n, const float* imp) : f_(f), w_(w), n_(n), imp_(imp) {}

  // Rounds (d, m) to fp16 as stored, measures the grid, keeps it if best so
  // far, then tries once the weighted least-squares refit of (d, m) (d only
  // when symmetric) over the codes it assigned.
  void TryWithRefit(float d, float m) {
    Pass p;
    if (!Try(d, m, &p)) return;
    if (f_.symmetric) {
      if (p.sqq > 0) Try(static_cast<float>(p.sqw / p.sqq), 0.0f, &p);
      return;
    }
    const double det = p.s * p.sqq - p.sq * p.sq;
    if (!(det > 1e-9 * p.s * p.sqq)) return;  // a single code used: no unique fit
    const double rd = (p.s * p.sqw - p.sq * p.sw) / det;
    const double rm = (p.sqq * p.sw - p.sq * p.sqw) / det;
    if (rd > 0) Try(static_cast<float>(rd), static_cast<float>(rm), &p);
  }

  GroupParams Best() const { return have_ ? GroupParams{best_.d, best_.m} : GroupParams{}; }

 private:
  bool Try(float d, float m, Pass* p) {
    const Grid g{ClampRoundF16(d), f_.symmetric ? 0.0f : ClampRoundF16(m)};
    if (!std::isfinite(g.d) || !std::isfinite(g.m)) return false;
    *p = Evaluate(f_, g, w_, n_, imp_);
    if (!have_ || p->err < best_err_) {
      best_ = g;
      best_err_ = p->err;
      have_ = true;
    }
    return true;
  }

  const Format& f_;
  const float* w_;
  int n_;
  const float* imp_;
  Grid best_;
  double best_err_ = 0.0;
  bool have_ = false;
};

}  // namespace

GroupParams FitIntGroup(const Format& f, const float* w, int n, const float* importance) {
  // Finite range of the group (NaN/Inf weights are ignored for the range).
  float lo = 0.0f, hi = 0.0f, vext = 0.0f;
  bool any = false;
  for (int i = 0; i < n; ++i) {
    if (!std::isfinite(w[i])) continue;
    if (!any || w[i] < lo) lo = w[i];
    if (!any || w[i] > hi) hi = w[i];
    if (std::fabs(w[i]) > std::fabs(vext)) vext = w[i];
    any = true;
  }
  Search search(f, w, n, importance);
  if (!f.symmetric) {
    const float qmax = static_cast<float>((1 << f.bits) - 1);
    const float range = hi - lo;
    for (int step = 0; step <= kShrinkSteps; ++step) {
      const float s = 1.0f - kShrinkStep * static_cast<float>(step);
      // s == 1: d = (max - min) / qmax and m = min exactly (plain RTN).
      const float d = (range * s) / qmax;
      const float m = lo + range * (1.0f - s) * 0.5f;
      search.TryWithRefit(d, m);
      if (range == 0.0f) break;  // constant group: d = 0, every value decodes to m
    }
  } else {
    const float half = static_cast<float>(1 << (f.bits - 1));
    for (int step = 0; step <= kShrinkSteps; ++step) {
      const float s = 1.0f - kShrinkStep * static_cast<float>(step);
      search.TryWithRefit((-vext * s) / half, 0.0f);
      search.TryWithRefit((vext * s) / (half - 1.0f), 0.0f);
      if (vext == 0.0f) break;  // all-zero group: d = 0
    }
  }
  return search.Best();
}

float QuantizeIntValue(const Format& f, const GroupParams& p, float w) {
  const Grid g{RoundToF16(p.scale), f.symmetric ? 0.0f : RoundToF16(p.zero)};
  return GridValue(f, g, w);
}

void PackIntGroup(const Format& f, const GroupParams& p, const float* w, int n, uint8_t* block) {
  const Grid g{RoundToF16(p.scale), f.symmetric ? 0.0f : RoundToF16(p.zero)};
  StoreF16(block, g.d);
  if (!f.symmetric) StoreF16(block + 2, g.m);
  uint8_t* codes = block + IntHeaderBytes(f.symmetric);
  for (int i = 0; i < f.group; ++i) {
    PutIntCode(codes, f.bits, f.group, i, GridCode(f, g, i < n ? w[i] : 0.0f));
  }
}

}  // namespace nibble::fmt::internal
