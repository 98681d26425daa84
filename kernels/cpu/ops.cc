#include "kernels/cpu/ops.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string_view>

#include "kernels/cpu/thread_pool.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace nibble::cpu {
namespace {

enum class Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

Isa DetectIsa() {
  Isa best = Isa::kScalar;
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = Isa::kAvx2;
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) best = Isa::kAvx512;
#endif
  if (const char* f = std::getenv("NIBBLE_FORCE_ISA")) {
    std::string_view s(f);
    Isa cap = s == "scalar" ? Isa::kScalar : s == "avx2" ? Isa::kAvx2 : Isa::kAvx512;
    best = std::min(best, cap);
  }
  return best;
}

Isa MaxIsa() {
  static const Isa isa = DetectIsa();
  return isa;
}

std::atomic<int> g_isa_override{-1};

Isa GetIsa() {
  const int o = g_isa_override.load(std::memory_order_relaxed);
  return o >= 0 ? static_cast<Isa>(o) : MaxIsa();
}

float DotRef(const float* a, const float* b, int64_t n) {
  float s = 0.0f;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

#if defined(__x86_64__)
__attribute__((target("avx2,fma"))) inline float Hsum256(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

__attribute__((target("avx2,fma"))) float DotAvx2(const float* a, const float* b, int64_t n) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
  }
  for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
  float s = Hsum256(_mm256_add_ps(s0, s1));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

__attribute__((target("avx512f"))) float DotAvx512(const float* a, const float* b, int64_t n) {
  __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
    s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), s1);
  }
  for (; i + 16 <= n; i += 16) s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
  if (i < n) {
    const __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1);
    s1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), s1);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
}

// One k-step of the 4x4 tile (masked for the tail).
__attribute__((target("avx512f"), always_inline)) inline void Tile4x4Step(const float* w, int64_t cols,
                                                                          const float* x, int64_t k, __mmask16 m,
                                                                          __m512 (&acc)[4][4]) {
  __m512 wv[4], xv[4];
  for (int r = 0; r < 4; ++r) wv[r] = _mm512_maskz_loadu_ps(m, w + r * cols + k);
  for (int t = 0; t < 4; ++t) xv[t] = _mm512_maskz_loadu_ps(m, x + t * cols + k);
  for (int t = 0; t < 4; ++t)
    for (int r = 0; r < 4; ++r) acc[t][r] = _mm512_fmadd_ps(wv[r], xv[t], acc[t][r]);
}

// 4 weight rows x 4 tokens register tile: each k step loads 8 vectors for 16 FMAs.
__attribute__((target("avx512f"))) void Tile4x4Avx512(const float* w, int64_t cols, const float* x,
                                                      float* out /*[4 tokens][4 rows]*/) {
  __m512 acc[4][4];
  for (auto& r : acc)
    for (auto& v : r) v = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= cols; k += 16) Tile4x4Step(w, cols, x, k, 0xffff, acc);
  if (k < cols) Tile4x4Step(w, cols, x, k, static_cast<__mmask16>((1u << (cols - k)) - 1), acc);
  for (int t = 0; t < 4; ++t)
    for (int r = 0; r < 4; ++r) out[t * 4 + r] = _mm512_reduce_add_ps(acc[t][r]);
}
#endif

float Dot(Isa isa, const float* a, const float* b, int64_t n) {
#if defined(__x86_64__)
  if (isa == Isa::kAvx512) return DotAvx512(a, b, n);
  if (isa == Isa::kAvx2) return DotAvx2(a, b, n);
#endif
  return DotRef(a, b, n);
}

// Rows [r0, r1) of the product for all tokens.
void MatMulRows(Isa isa, const float* w, int64_t rows, int64_t cols, const float* x, int64_t n_tokens,
                float* y, int64_t r0, int64_t r1) {
  int64_t r = r0;
#if defined(__x86_64__)
  if (isa == Isa::kAvx512 && n_tokens >= 4) {
    float tile[16];
    for (; r + 4 <= r1; r += 4) {
      int64_t t = 0;
      for (; t + 4 <= n_tokens; t += 4) {
        Tile4x4Avx512(w + r * cols, cols, x + t * cols, tile);
        for (int tt = 0; tt < 4; ++tt)
          for (int rr = 0; rr < 4; ++rr) y[(t + tt) * rows + r + rr] = tile[tt * 4 + rr];
      }
      for (; t < n_tokens; ++t)
        for (int rr = 0; rr < 4; ++rr) y[t * rows + r + rr] = Dot(isa, w + (r + rr) * cols, x + t * cols, cols);
    }
  }
#endif
  for (; r < r1; ++r) {
    for (int64_t t = 0; t < n_tokens; ++t) y[t * rows + r] = Dot(isa, w + r * cols, x + t * cols, cols);
  }
}

}  // namespace

const char* ActiveIsa() {
  switch (GetIsa()) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "scalar";
  }
}

bool ForceIsaForTesting(std::string_view isa) {
  if (isa.empty()) {
    g_isa_override.store(-1);
    return true;
  }
  const Isa want = isa == "scalar" ? Isa::kScalar : isa == "avx2" ? Isa::kAvx2 : isa == "avx512" ? Isa::kAvx512 : MaxIsa();
  if (want > MaxIsa()) return false;
  g_isa_override.store(static_cast<int>(want));
  return true;
}

float DotF32(const float* a, const float* b, int64_t n) { return Dot(GetIsa(), a, b, n); }

void MatMulF32Ref(const float* w, int64_t rows, int64_t cols, const float* x, int64_t n_tokens, float* y) {
  for (int64_t t = 0; t < n_tokens; ++t)
    for (int64_t r = 0; r < rows; ++r) y[t * rows + r] = DotRef(w + r * cols, x + t * cols, cols);
}

void MatMulF32(const float* w, int64_t rows, int64_t cols, const float* x, int64_t n_tokens, float* y,
               ThreadPool* pool) {
  const Isa isa = GetIsa();
  // 16 rows per grain keeps each thread's output columns on separate cache lines.
  if (pool == nullptr || pool->size() == 1 || rows * cols * n_tokens < 32768) {
    MatMulRows(isa, w, rows, cols, x, n_tokens, y, 0, rows);
    return;
  }
  pool->ParallelFor(rows, 16, [&](int, int64_t b, int64_t e) { MatMulRows(isa, w, rows, cols, x, n_tokens, y, b, e); });
}

void RmsNorm(const float* x, const float* weight, int64_t n, float eps, float* out) {
  float ss = 0.0f;
  for (int64_t i = 0; i < n; ++i) ss += x[i] * x[i];
  ss /= static_cast<float>(n);
  ss += eps;
  ss = 1.0f / std::sqrt(ss);
  for (int64_t i = 0; i < n; ++i) out[i] = weight[i] * (ss * x[i]);
}

void Rope(float* v, int n_heads, int head_dim, int rope_dim, int pos, float theta, RopeStyle style) {
  const int half = rope_dim / 2;
  for (int h = 0; h < n_heads; ++h) {
    float* p = v + static_cast<int64_t>(h) * head_dim;
    for (int i = 0; i < half; ++i) {
      // Same float expression as llama2.c: theta^(-2i/d).
      const float freq = 1.0f / std::pow(theta, static_cast<float>(2 * i) / static_cast<float>(rope_dim));
      const float angle = static_cast<float>(pos) * freq;
      const float c = std::cos(angle), s = std::sin(angle);
      float* a;
      float* b;
      if (style == RopeStyle::kInterleaved) {
        a = p + 2 * i;
        b = p + 2 * i + 1;
      } else {
        a = p + i;
        b = p + i + half;
      }
      const float x0 = *a, x1 = *b;
      *a = x0 * c - x1 * s;
      *b = x0 * s + x1 * c;
    }
  }
}

void Softmax(float* x, int64_t n) {
  if (n <= 0) return;
  float mx = x[0];
  for (int64_t i = 1; i < n; ++i) mx = std::max(mx, x[i]);
  float sum = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    x[i] = std::exp(x[i] - mx);
    sum += x[i];
  }
  const float inv = 1.0f / sum;
  for (int64_t i = 0; i < n; ++i) x[i] *= inv;
}

void SwiGLU(float* gate, const float* up, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float g = gate[i];
    gate[i] = g / (1.0f + std::exp(-g)) * up[i];
  }
}

}  // namespace nibble::cpu
