// kNl: non-uniform 2/3/4-bit, w = d * L_bits[q] with the fixed level tables of
// blocks.h (NlLevel) and one fp16 d per group.
//
// Fit: the grid is anchored on the signed weight v of largest magnitude,
// which is put on either end level (d = s * v / L[last] or d = s * v / L[0],
// i.e. both orientations of the asymmetric table) for shrink factors
// s in {1.0, 0.975, ..., 0.5}; each candidate d is rounded to fp16, the
// importance-weighted squared error of the stored values is measured, and
// d is refined once by weighted least squares over the codes it assigned
// (d = sum c w L / sum c L^2, rounded and measured again). The best measured
// candidate wins.
#include <cmath>

#include "kernels/formats/blocks.h"
#include "kernels/formats/format_impl.h"

namespace nibble::fmt::internal {
namespace {

constexpr int kShrinkSteps = 20;       // s = 1.0 - 0.025 * step, step = 0..20
constexpr float kShrinkStep = 0.025f;  // down to 0.5

class NlSearch {
 public:
  NlSearch(int bits, const float* w, int n, const float* imp) : bits_(bits), w_(w), n_(n), imp_(imp) {}

  void TryWithRefit(float d) {
    double lw = 0.0, ll = 0.0;
    if (!Try(d, &lw, &ll)) return;
    if (ll > 0.0) Try(static_cast<float>(lw / ll), &lw, &ll);
  }

  GroupParams Best() const { return GroupParams{have_ ? best_d_ : 0.0f, 0.0f}; }

 private:
  // Measures the stored grid of d (rounded to fp16); lw, ll: sum c w L and
  // sum c L^2 over the assigned levels (for the refit).
  bool Try(float d, double* lw, double* ll) {
    const float ds = ClampRoundF16(d);
    if (!std::isfinite(ds)) return false;
    double err = 0.0, sw = 0.0, sl = 0.0;
    for (int i = 0; i < n_; ++i) {
      const int q = NlCode(ds, bits_, w_[i]);
      const double c = Imp(imp_, i), x = w_[i], l = NlLevel(bits_, q), e = x - NlValue(ds, bits_, q);
      err += c * e * e;
      sw += c * x * l;
      sl += c * l * l;
    }
    *lw = sw;
    *ll = sl;
    if (!have_ || err < best_err_) {
      best_d_ = ds;
      best_err_ = err;
      have_ = true;
    }
    return true;
  }

  int bits_;
  const float* w_;
  int n_;
  const float* imp_;
  float best_d_ = 0.0f;
  double best_err_ = 0.0;
  bool have_ = false;
};

}  // namespace

GroupParams FitNlGroup(const Format& f, const float* w, int n, const float* importance) {
  float vext = 0.0f;  // finite weight of largest magnitude (NaN/Inf ignored)
  for (int i = 0; i < n; ++i) {
    if (std::isfinite(w[i]) && std::fabs(w[i]) > std::fabs(vext)) vext = w[i];
  }
  NlSearch search(f.bits, w, n, importance);
  if (vext == 0.0f) {
    search.TryWithRefit(0.0f);  // all-zero group: d = 0
    return search.Best();
  }
  const float top = static_cast<float>(NlLevel(f.bits, (1 << f.bits) - 1));
  const float bottom = static_cast<float>(NlLevel(f.bits, 0));
  for (int step = 0; step <= kShrinkSteps; ++step) {
    const float s = 1.0f - kShrinkStep * static_cast<float>(step);
    search.TryWithRefit((vext * s) / top);
    search.TryWithRefit((vext * s) / bottom);
  }
  return search.Best();
}

float QuantizeNlValue(const Format& f, const GroupParams& p, float w) {
  const float d = RoundToF16(p.scale);
  return NlValue(d, f.bits, NlCode(d, f.bits, w));
}

void PackNlGroup(const Format& f, const GroupParams& p, const float* w, int n, uint8_t* block) {
  const float d = RoundToF16(p.scale);
  StoreF16(block, d);
  uint8_t* codes = block + kNlHeaderBytes;
  for (int i = 0; i < f.group; ++i)
    PutIntCode(codes, f.bits, f.group, i, i < n ? NlCode(d, f.bits, w[i]) : NlZeroCode(f.bits));
}

}  // namespace nibble::fmt::internal
