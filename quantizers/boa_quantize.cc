// BoaQuantize / BoaQuantizeAttention: head-wise row-sequential GPTQ with a
// Kronecker (H_row ⊗ H_col) Hessian (quantizers/boa.h).
#include <algorithm>
#include <cstring>
#include <memory>

#include "absl/strings/str_cat.h"
#include "quantizers/boa.h"
#include "quantizers/parallel.h"
#include "quantizers/rtn.h"

namespace nibble {
namespace {

bool FactorFits(const GptqFactor& f, int64_t n) {
  const size_t un = static_cast<size_t>(n);
  return f.cols == n && f.u.size() == un * un && f.order.size() == un && f.dead.size() == un &&
         f.importance.size() == un;
}

}  // namespace

absl::StatusOr<QuantTensor> BoaQuantize(const HostTensor& w, const BoaHeads& heads, const fmt::Format& f,
                                        const GptqOptions& opts, std::vector<float>* chosen) {
  if (auto s = CheckMatrix(w, "BoaQuantize"); !s.ok()) return s;
  if (auto s = CheckFormat(f, "BoaQuantize"); !s.ok()) return s;
  const int64_t rows = w.rows(), cols = w.cols(), hd = heads.head_dim;
  if (hd <= 0 || rows % hd != 0)
    return absl::InvalidArgumentError(
        absl::StrCat("BoaQuantize: head_dim ", hd, " does not divide the ", rows, " rows of '", w.name, "'"));
  const int64_t n_heads = rows / hd;
  if (static_cast<int64_t>(heads.col.size()) != n_heads ||
      (!heads.row.empty() && static_cast<int64_t>(heads.row.size()) != n_heads))
    return absl::InvalidArgumentError(absl::StrCat("BoaQuantize: '", w.name, "' has ", n_heads, " heads, got ",
                                                   heads.col.size(), " column and ", heads.row.size(),
                                                   " row factors"));
  for (int64_t h = 0; h < n_heads; ++h) {
    if (heads.col[h] == nullptr || !FactorFits(*heads.col[h], cols))
      return absl::InvalidArgumentError(absl::StrCat("BoaQuantize: column factor of head ", h, " does not fit '",
                                                     w.name, "' with ", cols, " columns"));
    if (!heads.row.empty() && heads.row[h] != nullptr && !FactorFits(*heads.row[h], hd))
      return absl::InvalidArgumentError(
          absl::StrCat("BoaQuantize: row factor of head ", h, " of '", w.name, "' is not ", hd, " x ", hd));
  }
  if (opts.block_size < 1)
    return absl::InvalidArgumentError(absl::StrCat("BoaQuantize: block_size ", opts.block_size, " < 1"));
  const int64_t row_bytes = f.RowBytes(cols);
  std::vector<uint8_t> bytes(static_cast<size_t>(rows * row_bytes));
  if (chosen != nullptr) chosen->assign(static_cast<size_t>(rows * cols), 0.0f);
  GptqOptions one = opts;
  one.n_threads = 1;
  std::vector<absl::Status> status(static_cast<size_t>(n_heads));
  const double work = static_cast<double>(rows) * cols * (cols + hd + 50.0);

  ParallelItems(n_heads, opts.n_threads, work, [&](int, int64_t h) {
    const GptqFactor* rf = heads.row.empty() ? nullptr : heads.row[h];
    std::vector<float> wh(w.data.begin() + h * hd * cols, w.data.begin() + (h + 1) * hd * cols);
    HostTensor cur;
    cur.name = w.name;
    cur.shape = {1, cols};
    std::vector<float> q, e(static_cast<size_t>(cols));
    for (int64_t i = 0; i < hd; ++i) {
      const int64_t r = rf != nullptr ? rf->order[i] : i;  // head row processed i-th
      if (r < 0 || r >= hd) {
        status[h] = absl::InvalidArgumentError(absl::StrCat("BoaQuantize: bad row order in head ", h));
        return;
      }
      float* wr = wh.data() + r * cols;
      cur.data.assign(wr, wr + cols);
      auto qt = GptqQuantize(cur, *heads.col[h], f, one, &q);
      if (!qt.ok()) {
        status[h] = qt.status();
        return;
      }
      const auto& seg = qt->segments.at(0).data;
      std::memcpy(bytes.data() + (h * hd + r) * row_bytes, seg.data(), static_cast<size_t>(row_bytes));
      if (chosen != nullptr) std::copy(q.begin(), q.end(), chosen->begin() + (h * hd + r) * cols);
      if (rf == nullptr || i + 1 == hd) continue;
      // OBS in the row dimension: the head's later rows absorb this row's error.
      const float* u = rf->u.data() + i * hd;
      const float d = u[i];
      for (int64_t c = 0; c < cols; ++c) e[c] = (wr[c] - q[c]) / d;
      for (int64_t k = i + 1; k < hd; ++k) {
        const float coef = u[k];
        if (coef == 0.0f) continue;
        float* wk = wh.data() + rf->order[k] * cols;
        for (int64_t c = 0; c < cols; ++c) wk[c] -= coef * e[c];
      }
    }
  });
  for (const auto& s : status)
    if (!s.ok()) return s;
  return MakeOwnedQuantTensor(rows, cols, f, std::move(bytes));
}

absl::StatusOr<QuantTensor> BoaQuantizeAttention(const HostTensor& w, LinearWeight which, const BoaLayerStats& s,
                                                 const GptqFactor& attn_in, const fmt::Format& f,
                                                 const GptqOptions& opts) {
  if (!BoaHandles(which))
    return absl::InvalidArgumentError(
        absl::StrCat("BoaQuantizeAttention: '", w.name, "' is ", LinearWeightName(which), ", not wq/wk/wv"));
  const int nkv = s.n_kv_heads;
  if (s.head_dim <= 0 || nkv <= 0 || s.n_heads % nkv != 0 || s.q_row.size() != static_cast<size_t>(nkv) ||
      s.k_row.size() != static_cast<size_t>(nkv) || s.v_col.size() != static_cast<size_t>(nkv))
    return absl::FailedPreconditionError(
        absl::StrCat("BoaQuantizeAttention: no attention statistics for '", w.name, "'"));
  const int gs = s.n_heads / nkv;
  const int n = which == LinearWeight::kWq ? s.n_heads : nkv;
  if (w.rows() != static_cast<int64_t>(n) * s.head_dim)
    return absl::InvalidArgumentError(absl::StrCat("BoaQuantizeAttention: '", w.name, "' has ", w.rows(),
                                                   " rows, expected ", n, " heads of ", s.head_dim));
  GptqOptions row_opts = opts;
  row_opts.act_order = false;
  std::vector<std::unique_ptr<GptqFactor>> factors;
  auto factor = [&](const Hessian& h, const GptqOptions& o) -> absl::StatusOr<const GptqFactor*> {
    auto fr = FactorHessian(h, o);
    if (!fr.ok())
      return absl::Status(fr.status().code(), absl::StrCat(w.name, " (BoA): ", fr.status().message()));
    factors.push_back(std::make_unique<GptqFactor>(*std::move(fr)));
    return factors.back().get();
  };
  BoaHeads heads;
  heads.head_dim = s.head_dim;
  std::vector<const GptqFactor*> per_group;
  for (int g = 0; g < nkv; ++g) {
    const Hessian& h = which == LinearWeight::kWq ? s.q_row[g] : which == LinearWeight::kWk ? s.k_row[g] : s.v_col[g];
    auto fp = factor(h, which == LinearWeight::kWv ? opts : row_opts);
    if (!fp.ok()) return fp.status();
    per_group.push_back(*fp);
  }
  for (int i = 0; i < n; ++i) {
    const GptqFactor* g = per_group[which == LinearWeight::kWq ? i / gs : i];
    if (which == LinearWeight::kWv) {
      heads.col.push_back(g);
    } else {
      heads.col.push_back(&attn_in);
      heads.row.push_back(g);
    }
  }
  return BoaQuantize(w, heads, f, opts);
}

}  // namespace nibble
