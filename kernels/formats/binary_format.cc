// kBinary ({-a, +a}: a = importance-weighted mean |w|, the weighted
// least-squares scale for the sign vector) and kBinTern (per group the
// binary fit or a ternary fit, whichever the lambda criterion picks).
//
// kBinTern's ternary candidate takes its support and a from the same cosine
// search as kTernary (FindTernarySupport), rounds a to fp16, and then codes
// every weight to its nearest level (|w| > a/2 -> sign(w) a), which for that
// a can only lower the error. Both candidates' errors are measured with the
// stored fp16 scale; ternary is kept iff
//   err_binary - err_ternary > lambda * err_binary.
#include <cmath>

#include "kernels/formats/blocks.h"
#include "kernels/formats/format_impl.h"

namespace nibble::fmt::internal {
namespace {

// Importance-weighted mean |w| (unweighted if the importances sum to 0).
float WeightedMeanAbs(const float* w, int n, const float* importance) {
  double num = 0.0, den = 0.0, plain = 0.0;
  int finite = 0;
  for (int i = 0; i < n; ++i) {
    if (!std::isfinite(w[i])) continue;
    const double c = Imp(importance, i);
    num += c * std::fabs(w[i]);
    den += c;
    plain += std::fabs(w[i]);
    ++finite;
  }
  if (den > 0.0) return static_cast<float>(num / den);
  return finite > 0 ? static_cast<float>(plain / finite) : 0.0f;
}

inline bool IsTernaryFlag(const GroupParams& p) { return p.zero >= 0.5f; }

inline float BinTernValue(bool ternary, float a, float w) {
  return ternary ? TernaryValue(a, TernaryCode(0.5f * a, w)) : BinaryValue(a, BinaryCode(w));
}

double BinTernError(bool ternary, float a, const float* w, int n, const float* importance) {
  double err = 0.0;
  for (int i = 0; i < n; ++i) {
    const double e = static_cast<double>(w[i]) - static_cast<double>(BinTernValue(ternary, a, w[i]));
    err += static_cast<double>(Imp(importance, i)) * e * e;
  }
  return err;
}

}  // namespace

GroupParams FitBinaryGroup(const float* w, int n, const float* importance) {
  return GroupParams{ClampRoundF16(WeightedMeanAbs(w, n, importance)), 0.0f};
}

float QuantizeBinaryValue(const GroupParams& p, float w) {
  return BinaryValue(RoundToF16(p.scale), BinaryCode(w));
}

void PackBinaryGroup(const Format& f, const GroupParams& p, const float* w, int n, uint8_t* block) {
  StoreF16(block, RoundToF16(p.scale));
  uint8_t* bits = block + kBinaryHeaderBytes;
  for (int i = 0; i < f.group; ++i) PutCode(bits, 1, i, BinaryCode(i < n ? w[i] : 0.0f));
}

GroupParams FitBinTernGroup(const float* w, int n, const float* importance, float lambda) {
  const float a_bin = ClampRoundF16(WeightedMeanAbs(w, n, importance));
  const float a_ter = ClampRoundF16(FindTernarySupport(w, n, importance).a);
  const double err_bin = BinTernError(false, a_bin, w, n, importance);
  const double err_ter = BinTernError(true, a_ter, w, n, importance);
  if (err_bin - err_ter > static_cast<double>(lambda) * err_bin) return GroupParams{a_ter, 1.0f};
  return GroupParams{a_bin, 0.0f};
}

float QuantizeBinTernValue(const GroupParams& p, float w) {
  return BinTernValue(IsTernaryFlag(p), RoundToF16(p.scale), w);
}

void PackBinTernGroup(const Format& f, const GroupParams& p, const float* w, int n, uint8_t* block) {
  const bool ternary = IsTernaryFlag(p);
  const float a = RoundToF16(p.scale);
  StoreF16(block, a);
  block[kBinTernFlagOffset] = ternary ? 1 : 0;
  uint8_t* codes = block + kBinTernHeaderBytes;
  for (int i = 0; i < f.group; ++i) {
    const float v = i < n ? w[i] : 0.0f;
    if (ternary) {
      PutCode(codes, 2, i, TernaryCode(0.5f * a, v));
    } else {
      PutCode(codes, 1, i, BinaryCode(v));
    }
  }
}

}  // namespace nibble::fmt::internal
