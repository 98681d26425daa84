// kTernary: {-a, 0, +a} per group, Hyperspherical Quantization style.
//
// The direction of the ternary vector t (its support and signs) is chosen to
// maximise the importance-weighted cosine similarity with w,
//   cos(S) = sum_{i in S} c_i |w_i| / sqrt(sum_i c_i w_i^2 * sum_{i in S} c_i),
// over every threshold support S = {i : |w_i| > t} (the n + 1 candidates
// obtained by sorting |w|; ties are kept together). Cosine is scale-free, so
// only then is the length fixed: a = sum_S c_i |w_i| / sum_S c_i, the
// importance-weighted least-squares scale for that support, rounded to fp16.
#include <algorithm>
#include <cmath>

#include "kernels/formats/blocks.h"
#include "kernels/formats/format_impl.h"

namespace nibble::fmt::internal {

TernarySupport FindTernarySupport(const float* w, int n, const float* importance) {
  // Magnitudes sorted descending; NaN counts as 0 (never enters the support).
  float mag[kMaxGroup];
  int order[kMaxGroup];
  n = std::min(n, kMaxGroup);
  for (int i = 0; i < n; ++i) {
    const float a = std::fabs(w[i]);
    mag[i] = a > 0.0f ? a : 0.0f;
    order[i] = i;
  }
  std::sort(order, order + n, [&](int x, int y) { return mag[x] > mag[y] || (mag[x] == mag[y] && x < y); });

  TernarySupport best;
  double best_score = 0.0, num = 0.0, den = 0.0;
  for (int k = 1; k <= n; ++k) {
    const int i = order[k - 1];
    const double c = Imp(importance, i);
    num += c * mag[i];
    den += c;
    // Only cut between distinct magnitudes, so "|w| > threshold" selects
    // exactly the first k; a zero magnitude never joins the support.
    if (mag[i] == 0.0f) break;
    if (k < n && mag[order[k]] == mag[i]) continue;
    if (!(den > 0.0)) continue;
    const double score = num / std::sqrt(den);  // cos(S) times a constant
    if (score > best_score) {
      best_score = score;
      best.a = static_cast<float>(num / den);
      best.threshold = k < n ? mag[order[k]] : 0.0f;
      best.size = k;
    }
  }
  return best;
}

GroupParams FitTernaryGroup(const float* w, int n, const float* importance) {
  const TernarySupport s = FindTernarySupport(w, n, importance);
  return GroupParams{ClampRoundF16(s.a), s.threshold};
}

float QuantizeTernaryValue(const GroupParams& p, float w) {
  return TernaryValue(RoundToF16(p.scale), TernaryCode(p.zero, w));
}

void PackTernaryGroup(const Format& f, const GroupParams& p, const float* w, int n, uint8_t* block) {
  StoreF16(block, RoundToF16(p.scale));
  uint8_t* codes = block + kTernaryHeaderBytes;
  for (int i = 0; i < f.group; ++i) PutCode(codes, 2, i, TernaryCode(p.zero, i < n ? w[i] : 0.0f));
}

}  // namespace nibble::fmt::internal
