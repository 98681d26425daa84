#include "quantizers/quant_error.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "kernels/formats/format.h"
#include "quantizers/linalg.h"
#include "quantizers/parallel.h"

namespace nibble {

absl::StatusOr<std::vector<float>> DequantizeAll(const QuantTensor& q) {
  if (q.rows <= 0 || q.cols <= 0)
    return absl::InvalidArgumentError(absl::StrCat("DequantizeAll: empty shape [", q.rows, ", ", q.cols, "]"));
  if (!q.sidecar.empty())
    return absl::UnimplementedError("DequantizeAll: side-cars are not supported here; use QuantTensor::DequantizeRow");
  std::vector<float> out(static_cast<size_t>(q.rows * q.cols));
  int64_t next = 0;
  for (const QuantSegment& s : q.segments) {
    const int64_t row_bytes = s.format.RowBytes(q.cols);
    if (s.row_begin != next || s.row_end <= s.row_begin || s.row_end > q.rows ||
        static_cast<int64_t>(s.data.size()) != (s.row_end - s.row_begin) * row_bytes)
      return absl::InvalidArgumentError(absl::StrCat("DequantizeAll: segment rows [", s.row_begin, ", ", s.row_end,
                                                     ") with ", s.data.size(), " bytes does not fit"));
    for (int64_t r = s.row_begin; r < s.row_end; ++r)
      fmt::DequantizeRowRef(s.format, s.data.data() + (r - s.row_begin) * row_bytes, q.cols,
                            out.data() + r * q.cols);
    next = s.row_end;
  }
  if (next != q.rows)
    return absl::InvalidArgumentError(absl::StrCat("DequantizeAll: segments cover ", next, " of ", q.rows, " rows"));
  return out;
}

double RelativeWeightError(const float* w, const float* q, int64_t rows, int64_t cols) {
  double num = 0.0, den = 0.0;
  for (int64_t i = 0; i < rows * cols; ++i) {
    const double e = static_cast<double>(w[i]) - q[i];
    num += e * e;
    den += static_cast<double>(w[i]) * w[i];
  }
  if (den == 0.0) return num == 0.0 ? 0.0 : INFINITY;
  return std::sqrt(num / den);
}

namespace {

// sum_r v_r^T H v_r over `rows` rows of v (row r = a_r - b_r, or a_r if b is
// null). Blocks of kRows rows share every H row load; H v accumulates in fp32
// (relative error ~1e-6, plenty for an error measure), the quadratic forms in fp64.
double SumQuadForms(const float* a, const float* b, int64_t rows, int64_t cols, const Hessian& h) {
  constexpr int64_t kRows = 16;
  const int64_t n_blocks = (rows + kRows - 1) / kRows;
  std::vector<double> partial(static_cast<size_t>(n_blocks), 0.0);
  ParallelItems(n_blocks, 0, static_cast<double>(rows) * cols * cols, [&](int, int64_t blk) {
    const int64_t r0 = blk * kRows, nr = std::min(kRows, rows - r0);
    std::vector<float> v(nr * cols), hv(nr * cols, 0.0f);
    for (int64_t r = 0; r < nr; ++r)
      for (int64_t c = 0; c < cols; ++c) {
        const int64_t k = (r0 + r) * cols + c;
        v[r * cols + c] = b != nullptr ? a[k] - b[k] : a[k];
      }
    for (int64_t i = 0; i < cols; ++i) {
      const float* hi = h.h.data() + i * cols;
      for (int64_t r = 0; r < nr; ++r) {
        const float vi = v[r * cols + i];
        if (vi != 0.0f) Axpy(hv.data() + r * cols, vi, hi, cols);
      }
    }
    double s = 0.0;
    for (int64_t k = 0; k < nr * cols; ++k) s += static_cast<double>(v[k]) * hv[k];
    partial[blk] = s;
  });
  double total = 0.0;
  for (double p : partial) total += p;
  return total;
}

}  // namespace

double ProxyOutputError(const float* w, const float* q, int64_t rows, int64_t cols, const Hessian& h) {
  // tr(E H E^T) = sum_r e_r^T H e_r.
  const double num = SumQuadForms(w, q, rows, cols, h);
  const double den = SumQuadForms(w, nullptr, rows, cols, h);
  if (den == 0.0) return num == 0.0 ? 0.0 : INFINITY;
  return num / den;
}

namespace {
absl::StatusOr<std::vector<float>> Decode(const HostTensor& w, const QuantTensor& q, const char* who) {
  if (w.is_quantized() || w.shape.size() != 2 || w.data.size() != static_cast<size_t>(w.rows() * w.cols()))
    return absl::InvalidArgumentError(absl::StrCat(who, ": '", w.name, "' is not an fp32 matrix"));
  if (q.rows != w.rows() || q.cols != w.cols())
    return absl::InvalidArgumentError(absl::StrCat(who, ": '", w.name, "' is [", w.rows(), ", ", w.cols(),
                                                   "] but the quantized tensor is [", q.rows, ", ", q.cols, "]"));
  return DequantizeAll(q);
}
}  // namespace

absl::StatusOr<double> RelativeWeightError(const HostTensor& w, const QuantTensor& q) {
  auto d = Decode(w, q, "RelativeWeightError");
  if (!d.ok()) return d.status();
  return RelativeWeightError(w.data.data(), d->data(), w.rows(), w.cols());
}

absl::StatusOr<double> ProxyOutputError(const HostTensor& w, const QuantTensor& q, const Hessian& h) {
  if (h.dim != w.cols() || h.h.size() != static_cast<size_t>(h.dim * h.dim))
    return absl::InvalidArgumentError(absl::StrCat("ProxyOutputError: Hessian dim ", h.dim, " does not match '",
                                                   w.name, "' with ", w.cols(), " columns"));
  auto d = Decode(w, q, "ProxyOutputError");
  if (!d.ok()) return d.status();
  return ProxyOutputError(w.data.data(), d->data(), w.rows(), w.cols(), h);
}

}  // namespace nibble
