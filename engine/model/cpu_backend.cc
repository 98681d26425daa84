#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <string_view>
#include <vector>

#include "engine/core/quant_tensor.h"
#include "engine/model/backend.h"
#include "kernels/cpu/ops.h"
#include "kernels/cpu/qmatmul.h"
#include "kernels/cpu/thread_pool.h"

namespace nibble {
namespace {

class CpuBackend final : public Backend {
 public:
  explicit CpuBackend(int n_threads) : pool_(n_threads) {}

  std::string name() const override { return std::string("cpu-") + cpu::ActiveIsa(); }
  int n_threads() const override { return pool_.size(); }

  void MatMul(const HostTensor& w, const float* x, int n_tokens, float* y) override {
    if (w.quant != nullptr) {
      QuantMatMul(*w.quant, x, n_tokens, y);
      return;
    }
    if (w.is_f16()) {
      cpu::MatMulF16(w.f16.data(), w.rows(), w.cols(), x, n_tokens, y, &pool_);
      return;
    }
    if (w.is_bf16()) {
      cpu::MatMulBF16(w.bf16.data(), w.rows(), w.cols(), x, n_tokens, y, &pool_);
      return;
    }
    cpu::MatMulF32(w.fp32(), w.rows(), w.cols(), x, n_tokens, y, &pool_);
  }

  // Packed weights of one width: cpu::QuantMatMulMany (one activation
  // rounding, one fork/join; bit-identical to separate calls). Anything else
  // (fp32 weights, the f32ref path, mixed widths): one MatMul each.
  void MatMulMany(std::span<const HostTensor* const> ws, const float* x, int n_tokens,
                  std::span<float* const> ys) override {
    bool fuse = ws.size() > 1 && ws.size() <= kMaxMany && !UseF32Reference() && !UseDequantPrefill(n_tokens);
    for (const HostTensor* w : ws) fuse = fuse && w->quant != nullptr && w->quant->cols == ws[0]->quant->cols;
    if (!fuse) {
      Backend::MatMulMany(ws, x, n_tokens, ys);
      return;
    }
    cpu::QMatrixView views[kMaxMany];
    for (size_t i = 0; i < ws.size(); ++i) views[i] = View(*ws[i]->quant, &many_segs_[i]);
    cpu::QuantMatMulMany({views, ws.size()}, x, n_tokens, ys, &pool_, &qscratch_);
  }

  // Packed weights: the fused int8-activation kernels (kernels/cpu/qmatmul.h)
  // on the active ISA (NIBBLE_FORCE_ISA=scalar runs their scalar version).
  // NIBBLE_QMATMUL=f32ref selects the exact path instead: each row
  // dequantized (side-car applied) to fp32 and dotted in fp32.
  void QuantMatMul(const QuantTensor& q, const float* x, int n_tokens, float* y) {
    if (UseF32Reference()) {
      QuantMatMulF32(q, x, n_tokens, y);
      return;
    }
    if (UseDequantPrefill(n_tokens)) {
      cpu::QuantMatMulDequantF32(View(q, &seg_views_), x, n_tokens, y, &pool_);
      return;
    }
    cpu::QuantMatMul(View(q, &seg_views_), x, n_tokens, y, &pool_, &qscratch_);
  }

  // Prefill where no AMX unit takes the call: from DequantPrefillMinTokens()
  // tokens on, packed weights are dequantized panel by panel into the fp32
  // GEMM (cpu::QuantMatMulDequantF32), which outruns the int8 VNNI kernels
  // there; decode and small batches keep the int8 kernels.
  static bool UseDequantPrefill(int n_tokens) {
    return n_tokens >= DequantPrefillMinTokens() && !cpu::QuantMatMulTakesAmx(n_tokens);
  }
  // NIBBLE_QMATMUL_DEQUANT_MIN_TOKENS=N (read once) moves the threshold; 0 turns the path off.
  static int DequantPrefillMinTokens() {
    static const int env = [] {
      const char* e = std::getenv("NIBBLE_QMATMUL_DEQUANT_MIN_TOKENS");
      if (e == nullptr || *e == '\0') return -1;
      const int v = std::atoi(e);
      return v <= 0 ? std::numeric_limits<int>::max() : v;
    }();
    if (env > 0) return env;
    return cpu::ActiveQIsa() == cpu::QIsa::kScalar ? kDequantMinTokensScalar : kDequantMinTokensSimd;
  }
  // Measured (SmolLM2 int4_g32, 1 thread, AMD EPYC with AVX-512, no AMX), int8 kernels vs dequantized fp32
  // with the SIMD row decode, tok/s at 8 / 16 / 32 / 512 tokens:
  //   AVX-512: 348 / 373 / 379 / 359  vs  276 / 423 / 579 / 728
  //   AVX2 (forced): 201 / 207 / 212 / 195  vs  164 / 268 / 345 / 444
  // The scalar ISA (a test path) is not measured; it keeps the int8 kernels longer.
  static constexpr int kDequantMinTokensSimd = 16;
  static constexpr int kDequantMinTokensScalar = 32;

  // The kernels' view of q; its segment list lives in *segs (reused: no
  // allocation after the first call).
  static cpu::QMatrixView View(const QuantTensor& q, std::vector<cpu::QSegmentView>* segs) {
    segs->clear();
    for (const QuantSegment& s : q.segments) segs->push_back({s.row_begin, s.row_end, s.format, s.data.data()});
    cpu::QMatrixView v;
    v.rows = q.rows;
    v.cols = q.cols;
    v.segments = *segs;
    const Sidecar& sc = q.sidecar;
    if (!sc.empty()) {
      v.sidecar.type = sc.type == Sidecar::ValueType::kF16 ? cpu::QSidecarView::Type::kF16 : cpu::QSidecarView::Type::kI8;
      v.sidecar.row_ptr = sc.row_ptr.data();
      v.sidecar.col = sc.col.data();
      v.sidecar.f16 = sc.f16.data();
      v.sidecar.i8 = sc.i8.data();
      v.sidecar.row_scale = sc.row_scale.data();
    }
    return v;
  }

  static bool UseF32Reference() {
    static const bool ref = [] {
      const char* e = std::getenv("NIBBLE_QMATMUL");
      return e != nullptr && std::string_view(e) == "f32ref";
    }();
    return ref;
  }

  // The exact (slow) path: dequantize one row at a time into per-thread
  // scratch, fp32 dot with every token.
  void QuantMatMulF32(const QuantTensor& q, const float* x, int n_tokens, float* y) {
    const int64_t rows = q.rows, cols = q.cols;
    if (static_cast<int64_t>(row_scratch_.size()) < pool_.size() * cols) row_scratch_.resize(pool_.size() * cols);
    pool_.ParallelFor(rows, 16, [&](int thread, int64_t b, int64_t e) {
      float* row = row_scratch_.data() + thread * cols;
      for (int64_t r = b; r < e; ++r) {
        q.DequantizeRow(r, row);
        for (int t = 0; t < n_tokens; ++t) y[int64_t{t} * rows + r] = cpu::DotF32(row, x + int64_t{t} * cols, cols);
      }
    });
  }

  void RmsNorm(const float* x, const float* weight, int n_tokens, int dim, float eps, float* out) override {
    for (int t = 0; t < n_tokens; ++t) cpu::RmsNorm(x + int64_t{t} * dim, weight, dim, eps, out + int64_t{t} * dim);
  }

  void Rope(float* x, int n_tokens, int pos0, int n_heads, const ModelConfig& c) override {
    const int64_t width = int64_t{n_heads} * c.head_dim;
    for (int t = 0; t < n_tokens; ++t)
      cpu::Rope(x + t * width, n_heads, c.head_dim, c.rope_dim, pos0 + t, c.rope_theta, c.rope_style);
  }

  // The tiled kernel shared with the paged path (kernels/cpu/paged_attention.h):
  // bit-identical to PagedAttention on equal K/V.
  void Attention(const AttentionArgs& a) override {
    if (a.k_t16 != nullptr) {
      cpu::ContiguousAttentionF16(a.q, a.k_t16, a.v16, a.out, a.n_tokens, a.pos0, a.n_heads, a.n_kv_heads,
                                  a.head_dim, &pool_, &scores_);
      return;
    }
    cpu::ContiguousAttention(a.q, a.k_cache, a.v_cache, a.out, a.n_tokens, a.pos0, a.n_heads, a.n_kv_heads,
                             a.head_dim, &pool_, &scores_, a.k_t);
  }

  void SwiGLU(float* gate, const float* up, int64_t n) override {
    // A decode step's few thousand values cost less than a fork/join.
    if (n < 16384) {
      cpu::SwiGLU(gate, up, n);
      return;
    }
    pool_.ParallelFor(n, 1024, [&](int, int64_t b, int64_t e) { cpu::SwiGLU(gate + b, up + b, e - b); });
  }

 private:
  ThreadPool pool_;
  std::vector<float> scores_;
  std::vector<float> row_scratch_;
  static constexpr size_t kMaxMany = 4;
  std::vector<cpu::QSegmentView> seg_views_;
  std::vector<cpu::QSegmentView> many_segs_[kMaxMany];
  cpu::QMatMulScratch qscratch_;
};

}  // namespace

std::unique_ptr<Backend> MakeCpuBackend(int n_threads) { return std::make_unique<CpuBackend>(n_threads); }

}  // namespace nibble
