#include "quantizers/hessian.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string_view>

#include "absl/strings/str_cat.h"
#include "kernels/cpu/ops.h"
#include "quantizers/parallel.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace nibble {
namespace {

// Tiles: kTileI rows x kTileJ columns of H per work item. Activations are
// repacked into panels of kTileJ columns, [panel][token][kTileJ], so every
// tile streams two contiguous strips.
constexpr int kTileI = 8;
constexpr int kTileJ = 16;

using TileFn = void (*)(const float* pi, const float* pj, int64_t n, float out[kTileI][kTileJ]);

void TileScalar(const float* pi, const float* pj, int64_t n, float out[kTileI][kTileJ]) {
  float s[kTileI][kTileJ] = {};
  for (int64_t t = 0; t < n; ++t) {
    const float* xi = pi + t * kTileJ;
    const float* xj = pj + t * kTileJ;
    for (int a = 0; a < kTileI; ++a)
      for (int b = 0; b < kTileJ; ++b) s[a][b] += xi[a] * xj[b];
  }
  std::memcpy(out, s, sizeof(s));
}

#if defined(__x86_64__)
__attribute__((target("avx2,fma"))) void TileAvx2(const float* pi, const float* pj, int64_t n,
                                                  float out[kTileI][kTileJ]) {
  // Two passes of 4 rows: 8 accumulators + 2 loads + 1 broadcast fit 16 ymm.
  for (int half = 0; half < 2; ++half) {
    const float* pih = pi + 4 * half;
    __m256 s[4][2];
    for (int a = 0; a < 4; ++a) s[a][0] = s[a][1] = _mm256_setzero_ps();
    for (int64_t t = 0; t < n; ++t) {
      const __m256 x0 = _mm256_loadu_ps(pj + t * kTileJ);
      const __m256 x1 = _mm256_loadu_ps(pj + t * kTileJ + 8);
      for (int a = 0; a < 4; ++a) {
        const __m256 v = _mm256_broadcast_ss(pih + t * kTileJ + a);
        s[a][0] = _mm256_fmadd_ps(v, x0, s[a][0]);
        s[a][1] = _mm256_fmadd_ps(v, x1, s[a][1]);
      }
    }
    for (int a = 0; a < 4; ++a) {
      _mm256_storeu_ps(out[4 * half + a], s[a][0]);
      _mm256_storeu_ps(out[4 * half + a] + 8, s[a][1]);
    }
  }
}

__attribute__((target("avx512f"))) void TileAvx512(const float* pi, const float* pj, int64_t n,
                                                   float out[kTileI][kTileJ]) {
  __m512 s[kTileI];
  for (int a = 0; a < kTileI; ++a) s[a] = _mm512_setzero_ps();
  for (int64_t t = 0; t < n; ++t) {
    const __m512 x = _mm512_loadu_ps(pj + t * kTileJ);
    for (int a = 0; a < kTileI; ++a) s[a] = _mm512_fmadd_ps(_mm512_set1_ps(pi[t * kTileJ + a]), x, s[a]);
  }
  for (int a = 0; a < kTileI; ++a) _mm512_storeu_ps(out[a], s[a]);
}
#endif

// Follows the CPU kernels' ISA choice (NIBBLE_FORCE_ISA, cpu::ForceIsaForTesting).
TileFn PickTile() {
#if defined(__x86_64__)
  const std::string_view isa = cpu::ActiveIsa();
  if (isa == "avx512") return TileAvx512;
  if (isa == "avx2") return TileAvx2;
#endif
  return TileScalar;
}

}  // namespace

absl::Status Hessian::Validate(const char* what) const {
  if (dim <= 0) return absl::InvalidArgumentError(absl::StrCat(what, ": Hessian dim ", dim, " is not positive"));
  if (n_tokens < 0) return absl::InvalidArgumentError(absl::StrCat(what, ": negative token count ", n_tokens));
  if (dim > (int64_t{1} << 20) || h.size() != static_cast<size_t>(dim * dim))
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": Hessian holds ", h.size(), " values, expected ", dim, " x ", dim));
  for (size_t i = 0; i < h.size(); ++i) {
    if (!std::isfinite(h[i]))
      return absl::InvalidArgumentError(absl::StrCat(what, ": Hessian entry (", i / dim, ", ", i % dim,
                                                     ") is not finite"));
  }
  return absl::OkStatus();
}

HessianAccumulator::HessianAccumulator(int64_t dim)
    : dim_(std::max<int64_t>(dim, 0)), padded_((dim_ + kTileJ - 1) / kTileJ * kTileJ) {
  acc_.assign(static_cast<size_t>(padded_ * padded_), 0.0);
  // Upper-triangle tiles, ordered for cache reuse: a chunk of kChunk column
  // panels (kChunk * n * 64 bytes, L2-sized) is swept by every row block, whose
  // strip stays in L1 across the chunk.
  constexpr int64_t kChunk = 8;
  const int64_t bi = padded_ / kTileI, bj = padded_ / kTileJ;
  for (int64_t jc = 0; jc < bj; jc += kChunk)
    for (int64_t ib = 0; ib < bi; ++ib)
      for (int64_t jb = std::max(jc, ib * kTileI / kTileJ); jb < std::min(bj, jc + kChunk); ++jb) {
        tiles_.push_back(static_cast<int32_t>(ib));
        tiles_.push_back(static_cast<int32_t>(jb));
      }
}

void HessianAccumulator::Add(const float* x, int64_t n, int n_threads) {
  if (n <= 0 || dim_ == 0) return;
  const TileFn tile = PickTile();
  const int64_t n_panels = padded_ / kTileJ;
  panel_.assign(static_cast<size_t>(n_panels * n * kTileJ), 0.0f);
  for (int64_t pnl = 0; pnl < n_panels; ++pnl) {
    const int64_t c0 = pnl * kTileJ, w = std::min<int64_t>(kTileJ, dim_ - c0);
    float* dst = panel_.data() + pnl * n * kTileJ;
    for (int64_t t = 0; t < n; ++t) std::memcpy(dst + t * kTileJ, x + t * dim_ + c0, w * sizeof(float));
  }
  const float* p = panel_.data();
  const int64_t ld = padded_;
  double* acc = acc_.data();
  // Work items: runs of kTilesPerItem consecutive tiles.
  constexpr int64_t kTilesPerItem = 16;
  const int64_t n_tiles = static_cast<int64_t>(tiles_.size() / 2);
  const int64_t n_items = (n_tiles + kTilesPerItem - 1) / kTilesPerItem;
  auto run = [&](int, int64_t item) {
    float out[kTileI][kTileJ];
    const int64_t end = std::min(n_tiles, (item + 1) * kTilesPerItem);
    for (int64_t k = item * kTilesPerItem; k < end; ++k) {
      const int64_t i0 = int64_t{tiles_[2 * k]} * kTileI, j0 = int64_t{tiles_[2 * k + 1]} * kTileJ;
      const float* pi = p + (i0 / kTileJ) * n * kTileJ + i0 % kTileJ;
      const float* pj = p + (j0 / kTileJ) * n * kTileJ;
      tile(pi, pj, n, out);
      for (int a = 0; a < kTileI; ++a) {
        double* dst = acc + (i0 + a) * ld + j0;
        for (int b = 0; b < kTileJ; ++b) dst[b] += out[a][b];
      }
    }
  };
  ParallelItems(n_items, n_threads, static_cast<double>(n_tiles) * kTileI * kTileJ * n, run);
  n_tokens_ += n;
}

Hessian HessianAccumulator::Finish() const {
  Hessian out;
  out.dim = dim_;
  out.n_tokens = n_tokens_;
  out.h.assign(static_cast<size_t>(dim_ * dim_), 0.0f);
  out.mean_sq.assign(static_cast<size_t>(dim_), 0.0f);
  if (n_tokens_ == 0) return out;
  const double scale = 2.0 / static_cast<double>(n_tokens_);
  for (int64_t i = 0; i < dim_; ++i) {
    for (int64_t j = i; j < dim_; ++j) {
      const float v = static_cast<float>(acc_[i * padded_ + j] * scale);
      out.h[i * dim_ + j] = v;
      out.h[j * dim_ + i] = v;
    }
    out.mean_sq[i] = static_cast<float>(acc_[i * padded_ + i] / static_cast<double>(n_tokens_));
  }
  return out;
}

}  // namespace nibble
