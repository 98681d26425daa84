// Private to kernels/formats: the per-kind pieces behind the dispatchers in
// format.cc. Not for use outside this folder.
//
// Goals: one entry point per (kind, operation) so format.cc stays a thin
// switch and each kind's numerics live in its own file.
// Non-goals: argument validation (format.cc clamps n to [1, group] and
// rejects formats outside AllFormats() before calling in).
#pragma once

#include <cstdint>

#include "kernels/formats/format.h"

namespace nibble::fmt::internal {

// Largest finite fp16; fitted scales are clamped to +-kF16Max before rounding
// so a stored scale is never Inf.
inline constexpr float kF16Max = 65504.0f;
// Clamps v to the finite fp16 range and rounds it to fp16 (NaN stays NaN).
float ClampRoundF16(float v);
// importance[i], or 1 when importance is null.
inline float Imp(const float* importance, int i) { return importance ? importance[i] : 1.0f; }

// kInt (int_format.cc).
GroupParams FitIntGroup(const Format& f, const float* w, int n, const float* importance);
float QuantizeIntValue(const Format& f, const GroupParams& p, float w);
void PackIntGroup(const Format& f, const GroupParams& p, const float* w, int n, uint8_t* block);

// Support of a ternary vector chosen by maximising the importance-weighted
// cosine similarity with w over all threshold supports {i : |w_i| > t}
// (ternary_format.cc). a is the importance-weighted least-squares scale for
// that support (mean |w_i| over it), not yet rounded to fp16; a == 0 and
// threshold == 0 for an all-zero group.
struct TernarySupport {
  float a = 0.0f;
  float threshold = 0.0f;
  int size = 0;
};
TernarySupport FindTernarySupport(const float* w, int n, const float* importance);

// kTernary (ternary_format.cc).
GroupParams FitTernaryGroup(const float* w, int n, const float* importance);
float QuantizeTernaryValue(const GroupParams& p, float w);
void PackTernaryGroup(const Format& f, const GroupParams& p, const float* w, int n, uint8_t* block);

// kBinary and kBinTern (binary_format.cc).
GroupParams FitBinaryGroup(const float* w, int n, const float* importance);
float QuantizeBinaryValue(const GroupParams& p, float w);
void PackBinaryGroup(const Format& f, const GroupParams& p, const float* w, int n, uint8_t* block);
GroupParams FitBinTernGroup(const float* w, int n, const float* importance, float lambda);
float QuantizeBinTernValue(const GroupParams& p, float w);
void PackBinTernGroup(const Format& f, const GroupParams& p, const float* w, int n, uint8_t* block);

// kNl (nl_format.cc).
GroupParams FitNlGroup(const Format& f, const float* w, int n, const float* importance);
float QuantizeNlValue(const Format& f, const GroupParams& p, float w);
void PackNlGroup(const Format& f, const GroupParams& p, const float* w, int n, uint8_t* block);

}  // namespace nibble::fmt::internal
