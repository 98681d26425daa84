#include "quantizers/rotation.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "quantizers/calibration.h"
#include "quantizers/parallel.h"

namespace nibble {
namespace {

// out[r] = sum_i a[r][i] * b[i][:] for r < rows: [rows, k] x [k, n] (row-major,
// double accumulation; out may not alias a or b).
void MatMul(const float* a, const float* b, int64_t rows, int64_t k, int64_t n, float* out, int n_threads) {
  constexpr int64_t kRowsPerItem = 16;
  const int64_t items = (rows + kRowsPerItem - 1) / kRowsPerItem;
  ParallelItems(items, n_threads, double(rows) * k * n, [&](int, int64_t item) {
    std::vector<double> acc(n);
    const int64_t r1 = std::min(rows, (item + 1) * kRowsPerItem);
    for (int64_t r = item * kRowsPerItem; r < r1; ++r) {
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int64_t i = 0; i < k; ++i) {
        const double x = a[r * k + i];
        if (x == 0.0) continue;
        const float* bi = b + i * n;
        for (int64_t j = 0; j < n; ++j) acc[j] += x * bi[j];
      }
      for (int64_t j = 0; j < n; ++j) out[r * n + j] = static_cast<float>(acc[j]);
    }
  });
}

std::vector<float> Transpose(const std::vector<float>& m, int64_t rows, int64_t cols) {
  std::vector<float> t(m.size());
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) t[c * rows + r] = m[r * cols + c];
  return t;
}

absl::Status CheckMatrix(const HostTensor& t, int64_t rows, int64_t cols) {
  if (t.is_quantized()) return absl::FailedPreconditionError(absl::StrCat(t.name, ": already quantized; rotate first"));
  if (t.rows() != rows || t.cols() != cols || int64_t(t.data.size()) != rows * cols)
    return absl::InvalidArgumentError(
        absl::StrCat(t.name, ": expected [", rows, ", ", cols, "] fp32 for rotation, got [", t.rows(), ", ", t.cols(), "]"));
  return absl::OkStatus();
}

// W <- W diag(g) R^T  (W: [rows, n]; rt = R^T, [n, n]).
void RotateInput(HostTensor* w, const std::vector<float>* g, const std::vector<float>& rt, int n, int n_threads) {
  const int64_t rows = w->rows();
  if (g != nullptr)
    for (int64_t r = 0; r < rows; ++r)
      for (int i = 0; i < n; ++i) w->data[r * n + i] *= (*g)[i];
  std::vector<float> out(w->data.size());
  MatMul(w->data.data(), rt.data(), rows, n, n, out.data(), n_threads);
  w->data = std::move(out);
}

// W <- R W  (W: [n, cols]).
void RotateOutput(HostTensor* w, const std::vector<float>& r, int n, int n_threads) {
  const int64_t cols = w->cols();
  std::vector<float> out(w->data.size());
  MatMul(r.data(), w->data.data(), n, n, cols, out.data(), n_threads);
  w->data = std::move(out);
}

// The FFN rotation's seed: derived from the residual one, in [1, 2^53].
uint64_t FfnSeed(uint64_t seed) { return ((seed * 0x9e3779b97f4a7c15ULL) >> 11) | 1; }

}  // namespace

absl::Status RotateModel(LoadedModel* m, const RotationOptions& opt, int n_threads) {
  const ModelConfig& cfg = m->config;
  ModelWeights& w = m->weights;
  const int n = cfg.dim, hd = cfg.head_dim;
  if (cfg.residual_rotation != 0 || cfg.ffn_rotation != 0)
    return absl::FailedPreconditionError("rotation: the model is already rotated");
  if (opt.seed == 0 || opt.seed > (uint64_t{1} << 53))
    return absl::InvalidArgumentError("rotation: seed must be in [1, 2^53]");
  if (n <= 0 || cfg.n_layers != int(w.layers.size()))
    return absl::InvalidArgumentError("rotation: model config and weights disagree");
  const int64_t vocab = cfg.vocab_size;
  if (auto s = CheckMatrix(w.tok_embeddings, vocab, n); !s.ok()) return s;
  if (!cfg.tied_embeddings)
    if (auto s = CheckMatrix(w.output, vocab, n); !s.ok()) return s;
  if (int64_t(w.final_norm.data.size()) != n) return absl::InvalidArgumentError("rotation: final_norm is not [dim]");
  for (const LayerWeights& l : w.layers) {
    for (LinearWeight lw : kAllLinearWeights) {
      const HostTensor& t = WeightOf(l, lw);
      if (t.is_quantized() || t.data.empty())
        return absl::FailedPreconditionError(absl::StrCat(t.name, ": rotation needs fp32 weights"));
    }
    if (int64_t(l.attn_norm.data.size()) != n || int64_t(l.ffn_norm.data.size()) != n)
      return absl::InvalidArgumentError("rotation: a layer norm is not [dim]");
  }

  const std::vector<float> r = StructuredRotation(n, opt.seed);
  const std::vector<float> rt = Transpose(r, n, n);
  const std::vector<float> rft =
      opt.ffn ? Transpose(StructuredRotation(cfg.hidden_dim, FfnSeed(opt.seed)), cfg.hidden_dim, cfg.hidden_dim)
              : std::vector<float>();
  const std::vector<float> p = StructuredRotation(hd, opt.seed ^ 0x5bd1e995ULL);
  const std::vector<float> pt = Transpose(p, hd, hd);

  for (LayerWeights& l : w.layers) {
    if (opt.value_heads) {
      // wv rows of kv head k -> P wv_k; wo columns of head h -> wo_h P^T.
      std::vector<float> block(size_t(hd) * n), out(block.size());
      for (int k = 0; k < cfg.n_kv_heads; ++k) {
        float* rows = l.wv.data.data() + int64_t{k} * hd * n;
        MatMul(p.data(), rows, hd, hd, n, out.data(), n_threads);
        std::copy(out.begin(), out.end(), rows);
      }
      const int64_t q_dim = cfg.q_dim();
      std::vector<float> tmp(static_cast<size_t>(hd));
      for (int64_t row = 0; row < n; ++row) {
        float* wo = l.wo.data.data() + row * q_dim;
        for (int h = 0; h < cfg.n_heads; ++h) {
          float* seg = wo + int64_t{h} * hd;
          for (int j = 0; j < hd; ++j) {
            double acc = 0;
            for (int i = 0; i < hd; ++i) acc += double(seg[i]) * pt[size_t(i) * hd + j];
            tmp[j] = static_cast<float>(acc);
          }
          std::copy(tmp.begin(), tmp.end(), seg);
        }
      }
    }
    RotateInput(&l.wq, &l.attn_norm.data, rt, n, n_threads);
    RotateInput(&l.wk, &l.attn_norm.data, rt, n, n_threads);
    RotateInput(&l.wv, &l.attn_norm.data, rt, n, n_threads);
    std::fill(l.attn_norm.data.begin(), l.attn_norm.data.end(), 1.0f);
    RotateInput(&l.w_gate, &l.ffn_norm.data, rt, n, n_threads);
    RotateInput(&l.w_up, &l.ffn_norm.data, rt, n, n_threads);
    std::fill(l.ffn_norm.data.begin(), l.ffn_norm.data.end(), 1.0f);
    RotateOutput(&l.wo, r, n, n_threads);
    RotateOutput(&l.w_down, r, n, n_threads);
    if (opt.ffn) RotateInput(&l.w_down, nullptr, rft, cfg.hidden_dim, n_threads);
  }
  if (opt.ffn) m->config.ffn_rotation = FfnSeed(opt.seed);
  if (cfg.tied_embeddings) {
    // The shared embedding/head stays in the original basis; the model rotates
    // embedded tokens by R and the last hidden state back by R^T at run time.
    m->config.residual_rotation = opt.seed;
  } else {
    // Folded: head E_out diag(g_final) R^T with final norm 1; lookup rows R e_t.
    RotateInput(&w.output, &w.final_norm.data, rt, n, n_threads);
    std::fill(w.final_norm.data.begin(), w.final_norm.data.end(), 1.0f);
    RotateInput(&w.tok_embeddings, nullptr, rt, n, n_threads);
  }
  return absl::OkStatus();
}

}  // namespace nibble
