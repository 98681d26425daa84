#include "quantizers/outliers.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "kernels/common/fp16.h"
#include "quantizers/parallel.h"
#include "quantizers/quant_error.h"
#include "quantizers/rtn.h"

namespace nibble {

const char* SaliencyName(Saliency s) { return s == Saliency::kMagnitude ? "magnitude" : "hessian"; }

std::optional<Saliency> ParseSaliency(std::string_view name) {
  if (name == "magnitude") return Saliency::kMagnitude;
  if (name == "hessian") return Saliency::kHessian;
  return std::nullopt;
}

const char* SidecarTypeName(Sidecar::ValueType t) {
  switch (t) {
    case Sidecar::ValueType::kF16:
      return "f16";
    case Sidecar::ValueType::kI8:
      return "i8";
    default:
      return "none";
  }
}

std::optional<Sidecar::ValueType> ParseSidecarType(std::string_view name) {
  if (name == "f16") return Sidecar::ValueType::kF16;
  if (name == "i8") return Sidecar::ValueType::kI8;
  return std::nullopt;
}

std::vector<uint8_t> SalientSet::Mask() const {
  std::vector<uint8_t> m(static_cast<size_t>(rows * cols), 0);
  for (int64_t r = 0; r < rows; ++r)
    for (uint32_t i = row_ptr[r]; i < row_ptr[r + 1]; ++i) m[r * cols + col[i]] = 1;
  return m;
}

namespace {

constexpr int64_t kMaxCols = 65536;  // 16-bit column index

absl::Status CheckFraction(double fraction, const std::string& name) {
  if (!(fraction >= 0.0 && fraction < 1.0))
    return absl::InvalidArgumentError(
        absl::StrCat("outliers: fraction ", fraction, " for '", name, "' is not in [0, 1)"));
  return absl::OkStatus();
}

int64_t KeptCount(double fraction, int64_t n) {
  return std::min<int64_t>(n, static_cast<int64_t>(std::llround(fraction * static_cast<double>(n))));
}

}  // namespace

absl::StatusOr<SalientSet> SelectSalient(const HostTensor& w, std::span<const float> col_weight, double fraction,
                                         Saliency kind) {
  if (auto s = CheckMatrix(w, "SelectSalient"); !s.ok()) return s;
  if (auto s = CheckFraction(fraction, w.name); !s.ok()) return s;
  const int64_t rows = w.rows(), cols = w.cols(), n = rows * cols;
  if (cols > kMaxCols)
    return absl::InvalidArgumentError(absl::StrCat("SelectSalient: '", w.name, "' has ", cols,
                                                   " columns; side-car column indices are 16-bit (max ", kMaxCols,
                                                   ")"));
  if (n > int64_t{UINT32_MAX})
    return absl::InvalidArgumentError(absl::StrCat("SelectSalient: '", w.name, "' has too many weights (", n, ")"));
  if (kind == Saliency::kHessian) {
    if (static_cast<int64_t>(col_weight.size()) != cols)
      return absl::InvalidArgumentError(absl::StrCat("SelectSalient: hessian saliency for '", w.name, "' needs ",
                                                     cols, " column weights, got ", col_weight.size()));
    for (size_t j = 0; j < col_weight.size(); ++j)
      if (!(col_weight[j] >= 0.0f) || !std::isfinite(col_weight[j]))
        return absl::InvalidArgumentError(absl::StrCat("SelectSalient: column weight ", j, " for '", w.name,
                                                       "' is not finite and >= 0 (", col_weight[j], ")"));
  }
  SalientSet set;
  set.rows = rows;
  set.cols = cols;
  set.row_ptr.assign(static_cast<size_t>(rows + 1), 0);
  const int64_t k = KeptCount(fraction, n);
  if (k == 0) return set;
  std::vector<float> sal(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    const float v = w.data[i];
    sal[i] = kind == Saliency::kMagnitude ? std::fabs(v) : v * v * col_weight[i % cols];
  }
  std::vector<uint32_t> idx(static_cast<size_t>(n));
  std::iota(idx.begin(), idx.end(), 0u);
  // Strict total order: saliency descending, then index ascending (ties stable).
  auto before = [&](uint32_t a, uint32_t b) { return sal[a] > sal[b] || (sal[a] == sal[b] && a < b); };
  if (k < n) std::nth_element(idx.begin(), idx.begin() + (k - 1), idx.end(), before);
  idx.resize(static_cast<size_t>(k));
  std::sort(idx.begin(), idx.end());  // row-major: rows ascending, columns ascending within a row
  set.col.resize(idx.size());
  for (size_t i = 0; i < idx.size(); ++i) {
    const int64_t r = idx[i] / cols;
    set.col[i] = static_cast<uint16_t>(idx[i] % cols);
    ++set.row_ptr[r + 1];
  }
  for (int64_t r = 0; r < rows; ++r) set.row_ptr[r + 1] += set.row_ptr[r];
  return set;
}

std::vector<float> I8RowScales(const SalientSet& set, std::span<const float> values) {
  std::vector<float> scales(static_cast<size_t>(set.rows), 0.0f);
  for (int64_t r = 0; r < set.rows; ++r) {
    float amax = 0.0f;
    for (uint32_t i = set.row_ptr[r]; i < set.row_ptr[r + 1]; ++i)
      amax = std::max(amax, std::fabs(values[r * set.cols + set.col[i]]));
    scales[r] = Fp16ToFp32(Fp32ToFp16(amax / 127.0f));
  }
  return scales;
}

absl::StatusOr<OwnedSidecar> BuildSidecar(const SalientSet& set, std::span<const float> values,
                                          Sidecar::ValueType type, std::span<const float> i8_scale) {
  if (type != Sidecar::ValueType::kF16 && type != Sidecar::ValueType::kI8)
    return absl::InvalidArgumentError("BuildSidecar: value type must be f16 or i8");
  if (values.size() != static_cast<size_t>(set.rows * set.cols) ||
      set.row_ptr.size() != static_cast<size_t>(set.rows + 1) || set.row_ptr.back() != set.nnz())
    return absl::InvalidArgumentError(absl::StrCat("BuildSidecar: ", values.size(), " values / ",
                                                   set.row_ptr.size(), " row pointers do not fit [", set.rows, ", ",
                                                   set.cols, "] with ", set.nnz(), " kept"));
  if (!i8_scale.empty() && i8_scale.size() != static_cast<size_t>(set.rows))
    return absl::InvalidArgumentError(
        absl::StrCat("BuildSidecar: ", i8_scale.size(), " int8 row scales for ", set.rows, " rows"));
  struct Buffers {
    std::vector<uint32_t> row_ptr;
    std::vector<uint16_t> col, f16, row_scale;
    std::vector<int8_t> i8;
  };
  auto b = std::make_shared<Buffers>();
  b->row_ptr = set.row_ptr;
  b->col = set.col;
  if (type == Sidecar::ValueType::kF16) {
    b->f16.resize(set.nnz());
    for (int64_t r = 0; r < set.rows; ++r)
      for (uint32_t i = set.row_ptr[r]; i < set.row_ptr[r + 1]; ++i)
        b->f16[i] = Fp32ToFp16(values[r * set.cols + set.col[i]]);
  } else {
    std::vector<float> scales = i8_scale.empty() ? I8RowScales(set, values)
                                                 : std::vector<float>(i8_scale.begin(), i8_scale.end());
    b->row_scale.resize(static_cast<size_t>(set.rows));
    b->i8.resize(set.nnz());
    for (int64_t r = 0; r < set.rows; ++r) {
      b->row_scale[r] = Fp32ToFp16(scales[r]);
      const float s = Fp16ToFp32(b->row_scale[r]);
      for (uint32_t i = set.row_ptr[r]; i < set.row_ptr[r + 1]; ++i)
        b->i8[i] = KeptCodeI8(values[r * set.cols + set.col[i]], s);
    }
  }
  OwnedSidecar out;
  out.view.type = type;
  out.view.row_ptr = b->row_ptr;
  out.view.col = b->col;
  out.view.f16 = b->f16;
  out.view.i8 = b->i8;
  out.view.row_scale = b->row_scale;
  out.owner = std::static_pointer_cast<const void>(std::shared_ptr<const Buffers>(std::move(b)));
  return out;
}

std::vector<float> InverseHessianDiag(const GptqFactor& factor) {
  // (H + damp)^-1 = U^T U with U upper (processing order): [.]_kk = sum_{i <= k} U_ik^2.
  const int64_t n = factor.cols;
  std::vector<double> acc(static_cast<size_t>(n), 0.0);
  for (int64_t i = 0; i < n; ++i) {
    const float* ui = factor.u.data() + i * n;
    for (int64_t k = i; k < n; ++k) acc[k] += static_cast<double>(ui[k]) * ui[k];
  }
  std::vector<float> out(static_cast<size_t>(n));
  for (int64_t k = 0; k < n; ++k) out[factor.order[k]] = static_cast<float>(acc[k]);
  return out;
}

namespace {

// RTN of w in format f with kept weights excluded from every group fit; the
// kept positions' values (fp16 or int8) go to `chosen`.
QuantTensor RtnWithKept(const HostTensor& w, std::span<const float> importance, const fmt::Format& f,
                        const std::vector<uint8_t>& mask, const std::vector<float>& i8_scale,
                        const OutlierOptions& o, std::vector<float>* chosen) {
  const int64_t rows = w.rows(), cols = w.cols(), row_bytes = f.RowBytes(cols), block_bytes = f.BlockBytes();
  const int64_t n_groups = f.BlocksPerRow(cols);
  std::vector<uint8_t> bytes(static_cast<size_t>(rows * row_bytes));
  chosen->assign(static_cast<size_t>(rows * cols), 0.0f);
  ParallelItems(rows, o.n_threads, 50.0 * rows * cols, [&](int, int64_t r) {
    std::vector<float> vals(f.group), imp(f.group);
    const float* wr = w.data.data() + r * cols;
    const uint8_t* kr = mask.data() + r * cols;
    float* cr = chosen->data() + r * cols;
    const float* scale = i8_scale.empty() ? nullptr : &i8_scale[r];
    for (int64_t g = 0; g < n_groups; ++g) {
      const int64_t gs = g * f.group, gn = std::min<int64_t>(f.group, cols - gs);
      std::copy_n(wr + gs, gn, vals.data());
      ExcludeKept(kr + gs, gn, importance.empty() ? nullptr : importance.data() + gs, vals.data(), imp.data());
      const fmt::GroupParams p =
          fmt::FitGroupRef(f, vals.data(), static_cast<int>(gn), imp.data(), o.gptq.bintern_lambda);
      fmt::PackGroupRef(f, p, vals.data(), static_cast<int>(gn), bytes.data() + r * row_bytes + g * block_bytes);
      for (int64_t c = 0; c < gn; ++c)
        cr[gs + c] = kr[gs + c] ? KeptValue(wr[gs + c], scale) : fmt::QuantizeValueRef(f, p, vals[c]);
    }
  });
  return MakeOwnedQuantTensor(rows, cols, f, std::move(bytes));
}

}  // namespace

absl::StatusOr<QuantTensor> QuantizeWithOutliers(const HostTensor& w, const Hessian* h, const GptqFactor* factor,
                                                 const fmt::Format& f, const OutlierOptions& o,
                                                 std::vector<float>* chosen) {
  if (auto s = CheckMatrix(w, "QuantizeWithOutliers"); !s.ok()) return s;
  if (auto s = CheckFormat(f, "QuantizeWithOutliers"); !s.ok()) return s;
  if (auto s = CheckFraction(o.fraction, w.name); !s.ok()) return s;
  auto fail = [&](const std::string& what) {
    return absl::InvalidArgumentError(absl::StrCat("QuantizeWithOutliers: '", w.name, "': ", what));
  };
  if (o.type != Sidecar::ValueType::kF16 && o.type != Sidecar::ValueType::kI8)
    return fail("outlier value type must be f16 or i8");
  const bool gptq = o.method == "gptq";
  if (!gptq && o.method != "rtn") return fail(absl::StrCat("unknown method '", o.method, "' (rtn, gptq)"));
  if (h != nullptr && h->dim != w.cols())
    return fail(absl::StrCat("Hessian dim ", h->dim, " does not match ", w.cols(), " columns"));
  if (gptq && h == nullptr && factor == nullptr) return fail("gptq needs a Hessian");
  if (o.saliency == Saliency::kHessian && h == nullptr && !(gptq && factor != nullptr))
    return fail("hessian saliency needs a Hessian (calibration)");
  std::optional<GptqFactor> own;
  if (gptq && factor == nullptr) {
    auto fa = FactorHessian(*h, o.gptq);
    if (!fa.ok()) return fa.status();
    own = *std::move(fa);
    factor = &*own;
  }
  GptqOptions go = o.gptq;
  go.n_threads = o.n_threads;
  RtnOptions ro;
  ro.n_threads = o.n_threads;
  ro.bintern_lambda = o.gptq.bintern_lambda;
  std::span<const float> importance;
  if (h != nullptr) importance = h->mean_sq;

  const int64_t rows = w.rows(), cols = w.cols();
  if (KeptCount(o.fraction, rows * cols) == 0) {  // the plain quantizer, bit for bit
    absl::StatusOr<QuantTensor> q = gptq ? GptqQuantize(w, *factor, f, go, chosen) : RtnQuantize(w, importance, f, ro);
    if (q.ok() && !gptq && chosen != nullptr) {
      auto d = DequantizeAll(*q);
      if (!d.ok()) return d.status();
      *chosen = *std::move(d);
    }
    return q;
  }

  std::vector<float> col_weight;
  if (o.saliency == Saliency::kHessian) {
    if (gptq) {  // exact OBS saliency w^2 / [H^-1]_jj
      col_weight = InverseHessianDiag(*factor);
      for (float& c : col_weight) c = c > 0.0f ? 1.0f / c : 0.0f;
    } else {  // w^2 * H_jj
      col_weight.resize(static_cast<size_t>(cols));
      for (int64_t j = 0; j < cols; ++j) col_weight[j] = h->at(j, j);
    }
  }
  auto set = SelectSalient(w, col_weight, o.fraction, o.saliency);
  if (!set.ok()) return set.status();
  const std::vector<uint8_t> mask = set->Mask();
  // PB-LLM: the per-row int8 step comes from the ORIGINAL salient weights,
  // fixed before GPTQ so the kept values it compensates are the stored ones.
  std::vector<float> i8_scale;
  if (o.type == Sidecar::ValueType::kI8) i8_scale = I8RowScales(*set, w.data);

  std::vector<float> local;
  std::vector<float>* values = chosen != nullptr ? chosen : &local;
  absl::StatusOr<QuantTensor> q;
  if (gptq) {
    q = GptqQuantize(w, *factor, f, go, GptqKeep{mask, i8_scale}, values);
  } else {
    q = RtnWithKept(w, importance, f, mask, i8_scale, o, values);
  }
  if (!q.ok()) return q.status();
  auto side = BuildSidecar(*set, *values, o.type, i8_scale);
  if (!side.ok()) return side.status();
  q->sidecar = side->view;
  q->owners.push_back(side->owner);
  return q;
}

absl::Status ValidateSidecar(const QuantTensor& q) {
  const Sidecar& s = q.sidecar;
  if (s.empty()) return absl::OkStatus();
  auto bad = [](const std::string& what) { return absl::InvalidArgumentError(absl::StrCat("side-car: ", what)); };
  if (s.type != Sidecar::ValueType::kF16 && s.type != Sidecar::ValueType::kI8)
    return bad(absl::StrCat("unknown value type ", static_cast<int>(s.type)));
  if (q.rows < 0 || s.row_ptr.size() != static_cast<size_t>(q.rows + 1))
    return bad(absl::StrCat(s.row_ptr.size(), " row pointers for ", q.rows, " rows"));
  if (s.row_ptr[0] != 0 || s.row_ptr[q.rows] != s.nnz())
    return bad(absl::StrCat("row pointers span [", s.row_ptr[0], ", ", s.row_ptr[q.rows], "), nnz ", s.nnz()));
  for (int64_t r = 0; r < q.rows; ++r)
    if (s.row_ptr[r] > s.row_ptr[r + 1]) return bad(absl::StrCat("row pointer ", r + 1, " decreases"));
  for (size_t i = 0; i < s.nnz(); ++i)
    if (s.col[i] >= q.cols) return bad(absl::StrCat("column ", s.col[i], " of entry ", i, " >= ", q.cols));
  if (s.type == Sidecar::ValueType::kF16 && s.f16.size() != s.nnz())
    return bad(absl::StrCat(s.f16.size(), " f16 values for nnz ", s.nnz()));
  if (s.type == Sidecar::ValueType::kI8 &&
      (s.i8.size() != s.nnz() || s.row_scale.size() != static_cast<size_t>(q.rows)))
    return bad(absl::StrCat(s.i8.size(), " i8 values / ", s.row_scale.size(), " row scales for nnz ", s.nnz(),
                            ", ", q.rows, " rows"));
  return absl::OkStatus();
}

absl::StatusOr<std::vector<float>> DequantizeWithSidecar(const QuantTensor& q) {
  if (auto s = ValidateSidecar(q); !s.ok()) return s;
  QuantTensor base = q;  // spans only: validates the segments without the side-car
  base.sidecar = Sidecar{};
  auto out = DequantizeAll(base);
  if (!out.ok() || q.sidecar.empty()) return out;
  for (int64_t r = 0; r < q.rows; ++r) q.DequantizeRow(r, out->data() + r * q.cols);
  return out;
}

}  // namespace nibble
