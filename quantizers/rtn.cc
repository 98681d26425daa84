#include "quantizers/rtn.h"

#include <cmath>
#include <memory>

#include "absl/strings/str_cat.h"
#include "quantizers/parallel.h"

namespace nibble {

absl::Status CheckMatrix(const HostTensor& w, const char* who) {
  if (w.is_quantized())
    return absl::InvalidArgumentError(absl::StrCat(who, ": tensor '", w.name, "' is already quantized"));
  if (w.shape.size() != 2 || w.rows() <= 0 || w.cols() <= 0 || w.rows() > (int64_t{1} << 31) ||
      w.cols() > (int64_t{1} << 24))
    return absl::InvalidArgumentError(absl::StrCat(who, ": tensor '", w.name, "' is not a non-empty matrix"));
  if (w.data.size() != static_cast<size_t>(w.rows() * w.cols()))
    return absl::InvalidArgumentError(absl::StrCat(who, ": tensor '", w.name, "' holds ", w.data.size(),
                                                   " values for shape [", w.rows(), ", ", w.cols(), "]"));
  for (size_t i = 0; i < w.data.size(); ++i) {
    if (!std::isfinite(w.data[i]))
      return absl::InvalidArgumentError(absl::StrCat(who, ": tensor '", w.name, "' has a non-finite value at (",
                                                     i / w.cols(), ", ", i % w.cols(), ")"));
  }
  return absl::OkStatus();
}

absl::Status CheckFormat(const fmt::Format& f, const char* who) {
  for (const fmt::Format& known : fmt::AllFormats())
    if (known == f) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(who, ": unsupported format (kind ", static_cast<int>(f.kind),
                                                 ", bits ", f.bits, ", group ", f.group, ")"));
}

QuantTensor MakeOwnedQuantTensor(int64_t rows, int64_t cols, const fmt::Format& f, std::vector<uint8_t> bytes) {
  auto buf = std::make_shared<const std::vector<uint8_t>>(std::move(bytes));
  QuantTensor q;
  q.rows = rows;
  q.cols = cols;
  QuantSegment seg;
  seg.row_begin = 0;
  seg.row_end = rows;
  seg.format = f;
  seg.data = std::span<const uint8_t>(buf->data(), buf->size());
  q.segments.push_back(seg);
  q.owners.push_back(std::static_pointer_cast<const void>(buf));
  return q;
}

absl::StatusOr<QuantTensor> RtnQuantize(const HostTensor& w, std::span<const float> importance,
                                        const fmt::Format& f, const RtnOptions& opts) {
  if (auto s = CheckMatrix(w, "RtnQuantize"); !s.ok()) return s;
  if (auto s = CheckFormat(f, "RtnQuantize"); !s.ok()) return s;
  const int64_t rows = w.rows(), cols = w.cols();
  if (!importance.empty() && static_cast<int64_t>(importance.size()) != cols)
    return absl::InvalidArgumentError(absl::StrCat("RtnQuantize: importance for '", w.name, "' has ",
                                                   importance.size(), " entries, expected ", cols));
  const int64_t row_bytes = f.RowBytes(cols);
  std::vector<uint8_t> bytes(static_cast<size_t>(rows * row_bytes));
  const float* imp = importance.empty() ? nullptr : importance.data();
  constexpr int64_t kRowsPerItem = 8;
  // Fit cost: ~50 candidate grids per weight (clip search + refits).
  ParallelItems((rows + kRowsPerItem - 1) / kRowsPerItem, opts.n_threads, 50.0 * rows * cols, [&](int, int64_t it) {
    const int64_t r1 = std::min(rows, (it + 1) * kRowsPerItem);
    for (int64_t r = it * kRowsPerItem; r < r1; ++r)
      fmt::QuantizeRowRef(f, w.data.data() + r * cols, cols, imp, bytes.data() + r * row_bytes,
                          opts.bintern_lambda);
  });
  return MakeOwnedQuantTensor(rows, cols, f, std::move(bytes));
}

}  // namespace nibble
