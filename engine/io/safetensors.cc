#include "engine/io/safetensors.h"

#include <algorithm>
#include <cstring>
#include <limits>

#include "absl/strings/str_cat.h"
#include "kernels/common/fp16.h"
#include "nlohmann/json.hpp"

namespace nibble::io {
namespace {

constexpr uint64_t kMaxHeader = 100u << 20;  // the format's own limit

int DtypeSize(const std::string& d) {
  static const std::map<std::string, int> kSizes = {
      {"F64", 8}, {"F32", 4}, {"F16", 2}, {"BF16", 2}, {"I64", 8}, {"U64", 8}, {"I32", 4}, {"U32", 4},
      {"I16", 2}, {"U16", 2}, {"I8", 1},  {"U8", 1},   {"BOOL", 1}, {"F8_E4M3", 1}, {"F8_E5M2", 1}};
  auto it = kSizes.find(d);
  return it == kSizes.end() ? 0 : it->second;
}

}  // namespace

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(const std::string& path) {
  auto mapped = MappedFile::Open(path);
  if (!mapped.ok()) return mapped.status();
  std::unique_ptr<SafetensorsFile> f(new SafetensorsFile());
  f->path_ = path;
  f->file_ = std::move(*mapped);
  if (auto s = f->ParseAll(f->file_->data(), f->file_->size()); !s.ok()) return s;
  return f;
}

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Parse(const uint8_t* data, size_t size,
                                                                        const std::string& name) {
  std::unique_ptr<SafetensorsFile> f(new SafetensorsFile());
  f->path_ = name;
  if (auto s = f->ParseAll(data, size); !s.ok()) return s;
  return f;
}

absl::Status SafetensorsFile::ParseAll(const uint8_t* data, size_t size) {
  auto bad = [&](const std::string& what) {
    return absl::InvalidArgumentError(absl::StrCat(path_, ": invalid safetensors file: ", what));
  };
  if (size < 8) return bad(absl::StrCat("only ", size, " bytes, too short for the header length"));
  uint64_t n = 0;
  std::memcpy(&n, data, 8);
  if (n > size - 8) return bad(absl::StrCat("header length ", n, " exceeds the file size ", size));
  if (n > kMaxHeader) return bad(absl::StrCat("header length ", n, " exceeds the 100 MB limit"));
  if (n < 2) return bad(absl::StrCat("header length ", n, " is too small for a JSON object"));
  const char* begin = reinterpret_cast<const char*>(data + 8);
  const nlohmann::json j = nlohmann::json::parse(begin, begin + n, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return bad("the header is not valid JSON");
  if (!j.is_object()) return bad("the header is not a JSON object");
  const uint64_t data_start = 8 + n;
  const uint64_t data_size = size - data_start;

  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& name = it.key();
    const nlohmann::json& v = it.value();
    if (name == "__metadata__") {
      if (!v.is_object()) return bad("__metadata__ is not an object");
      for (auto m = v.begin(); m != v.end(); ++m) {
        if (m.value().is_string()) metadata_[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    const std::string what = absl::StrCat("tensor '", name, "'");
    if (!v.is_object()) return bad(what + " is not an object");
    SafetensorsTensor t;
    t.name = name;
    auto dtype = v.find("dtype");
    if (dtype == v.end() || !dtype->is_string()) return bad(what + " has no dtype string");
    t.dtype = dtype->get<std::string>();
    t.elem_size = DtypeSize(t.dtype);
    if (t.elem_size == 0) return bad(absl::StrCat(what, " has unknown dtype '", t.dtype, "'"));
    auto shape = v.find("shape");
    if (shape == v.end() || !shape->is_array() || shape->size() > 8) return bad(what + " has no valid shape array");
    uint64_t numel = 1;
    for (const nlohmann::json& d : *shape) {
      if (!d.is_number_unsigned()) return bad(what + " has a shape entry that is not a non-negative integer");
      const uint64_t dim = d.get<uint64_t>();
      if (dim != 0 && numel > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) / dim) {
        return bad(what + " has an absurd shape");
      }
      numel *= dim;
      t.shape.push_back(static_cast<int64_t>(dim));
    }
    t.numel = static_cast<int64_t>(numel);
    auto offs = v.find("data_offsets");
    if (offs == v.end() || !offs->is_array() || offs->size() != 2 || !(*offs)[0].is_number_unsigned() ||
        !(*offs)[1].is_number_unsigned()) {
      return bad(what + " has no valid data_offsets [begin, end]");
    }
    t.begin = (*offs)[0].get<uint64_t>();
    t.end = (*offs)[1].get<uint64_t>();
    if (t.begin > t.end || t.end > data_size) {
      return bad(absl::StrCat(what, " data_offsets [", t.begin, ", ", t.end, "] fall outside the ", data_size,
                              "-byte data section (truncated file?)"));
    }
    if (numel > std::numeric_limits<uint64_t>::max() / t.elem_size || numel * t.elem_size != t.end - t.begin) {
      return bad(absl::StrCat(what, " occupies ", t.end - t.begin, " bytes but its shape and dtype ", t.dtype,
                              " need ", numel, " x ", t.elem_size));
    }
    t.data = data + data_start + t.begin;
    index_[name] = tensors_.size();
    tensors_.push_back(std::move(t));
  }

  // Tensor byte ranges must not overlap.
  std::vector<const SafetensorsTensor*> order;
  for (const SafetensorsTensor& t : tensors_) order.push_back(&t);
  std::sort(order.begin(), order.end(), [](auto* a, auto* b) { return a->begin < b->begin; });
  for (size_t i = 1; i < order.size(); ++i) {
    if (order[i]->begin < order[i - 1]->end) {
      return bad(absl::StrCat("tensors '", order[i - 1]->name, "' and '", order[i]->name, "' overlap"));
    }
  }
  return absl::OkStatus();
}

const SafetensorsTensor* SafetensorsFile::Find(std::string_view name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

absl::Status SafetensorsFile::ReadF32(const SafetensorsTensor& t, std::vector<float>* out) const {
  const size_t n = static_cast<size_t>(t.numel);
  if (t.dtype == "F32") {
    out->resize(n);
    if (n > 0) std::memcpy(out->data(), t.data, n * 4);
  } else if (t.dtype == "F16" || t.dtype == "BF16") {
    out->resize(n);
    const bool bf = t.dtype == "BF16";
    for (size_t i = 0; i < n; ++i) {
      uint16_t h;
      std::memcpy(&h, t.data + 2 * i, 2);
      (*out)[i] = bf ? Bf16ToFp32(h) : Fp16ToFp32(h);
    }
  } else {
    return absl::InvalidArgumentError(absl::StrCat(path_, ": tensor '", t.name, "' has dtype ", t.dtype,
                                                   "; only F32, F16 and BF16 weights are supported"));
  }
  return absl::OkStatus();
}

}  // namespace nibble::io
