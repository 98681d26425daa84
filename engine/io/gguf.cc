#include "engine/io/gguf.h"

#include <cstring>
#include <limits>
#include <utility>

#include "absl/strings/str_cat.h"
#include "engine/io/byte_reader.h"

namespace nibble::io {
namespace {

// absl here predates std::string_view interop (ABSL_OPTION_USE_STD_STRING_VIEW=0).
absl::string_view Sv(std::string_view s) { return absl::string_view(s.data(), s.size()); }

constexpr int kMaxArrayDepth = 8;  // nested arrays deeper than this are rejected (stack safety)
constexpr uint32_t kMaxDims = 4;
constexpr uint64_t kMaxNameLen = 1 << 16;

// Byte size of a fixed-size element type, 0 for string/array, -1 for unknown ids.
int ScalarSize(uint32_t t) {
  switch (static_cast<GgufType>(t)) {
    case GgufType::kUint8:
    case GgufType::kInt8:
    case GgufType::kBool: return 1;
    case GgufType::kUint16:
    case GgufType::kInt16: return 2;
    case GgufType::kUint32:
    case GgufType::kInt32:
    case GgufType::kFloat32: return 4;
    case GgufType::kUint64:
    case GgufType::kInt64:
    case GgufType::kFloat64: return 8;
    case GgufType::kString:
    case GgufType::kArray: return 0;
  }
  return -1;
}

bool IsSigned(GgufType t) {
  return t == GgufType::kInt8 || t == GgufType::kInt16 || t == GgufType::kInt32 || t == GgufType::kInt64;
}
bool IsUnsigned(GgufType t) {
  return t == GgufType::kUint8 || t == GgufType::kUint16 || t == GgufType::kUint32 || t == GgufType::kUint64;
}
bool IsFloat(GgufType t) { return t == GgufType::kFloat32 || t == GgufType::kFloat64; }

// Decodes one fixed-size little-endian scalar of type t at p into v's scalar fields.
void DecodeScalar(GgufType t, const uint8_t* p, GgufValue* v) {
  auto load = [p](auto x) {
    std::memcpy(&x, p, sizeof(x));
    return x;
  };
  switch (t) {
    case GgufType::kUint8: v->u64 = load(uint8_t{}); break;
    case GgufType::kBool: v->u64 = load(uint8_t{}) != 0; break;
    case GgufType::kInt8: v->i64 = load(int8_t{}); break;
    case GgufType::kUint16: v->u64 = load(uint16_t{}); break;
    case GgufType::kInt16: v->i64 = load(int16_t{}); break;
    case GgufType::kUint32: v->u64 = load(uint32_t{}); break;
    case GgufType::kInt32: v->i64 = load(int32_t{}); break;
    case GgufType::kUint64: v->u64 = load(uint64_t{}); break;
    case GgufType::kInt64: v->i64 = load(int64_t{}); break;
    case GgufType::kFloat32: v->f64 = load(float{}); break;
    case GgufType::kFloat64: v->f64 = load(double{}); break;
    default: break;
  }
  if (IsSigned(t)) v->u64 = static_cast<uint64_t>(v->i64);
  if (IsUnsigned(t) || t == GgufType::kBool) v->i64 = static_cast<int64_t>(v->u64);
}

absl::StatusOr<std::string_view> ReadString(ByteReader& r, const std::string& what) {
  auto len = r.Read<uint64_t>(what + " length");
  if (!len.ok()) return len.status();
  return r.ReadBytes(*len, what);
}

absl::StatusOr<GgufValue> ReadValue(ByteReader& r, uint32_t raw_type, int depth, const std::string& what) {
  GgufValue v;
  const int size = ScalarSize(raw_type);
  if (size < 0) return r.Error(absl::StrCat(what, ": unknown GGUF value type ", raw_type));
  v.type = static_cast<GgufType>(raw_type);
  if (size > 0) {
    auto bytes = r.ReadBytes(size, what);
    if (!bytes.ok()) return bytes.status();
    DecodeScalar(v.type, reinterpret_cast<const uint8_t*>(bytes->data()), &v);
    return v;
  }
  if (v.type == GgufType::kString) {
    auto s = ReadString(r, what);
    if (!s.ok()) return s.status();
    v.str = *s;
    return v;
  }
  // Array.
  if (depth >= kMaxArrayDepth) return r.Error(absl::StrCat(what, ": arrays nested deeper than ", kMaxArrayDepth));
  auto elem = r.Read<uint32_t>(what + " element type");
  if (!elem.ok()) return elem.status();
  const int elem_size = ScalarSize(*elem);
  if (elem_size < 0) return r.Error(absl::StrCat(what, ": unknown GGUF array element type ", *elem));
  v.elem_type = static_cast<GgufType>(*elem);
  auto count = r.Read<uint64_t>(what + " element count");
  if (!count.ok()) return count.status();
  v.count = *count;
  // Every element takes at least this many bytes; checking the count against the
  // remaining bytes first keeps absurd counts from allocating or looping.
  const uint64_t min_elem = elem_size > 0 ? elem_size : (v.elem_type == GgufType::kString ? 8 : 12);
  if (v.count > r.remaining() / min_elem) {
    return r.Truncated(absl::StrCat(what, " (", v.count, " elements of ", GgufTypeName(v.elem_type), ")"),
                       v.count > std::numeric_limits<uint64_t>::max() / min_elem ? v.count : v.count * min_elem);
  }
  if (elem_size > 0) {
    auto bytes = r.ReadBytes(v.count * elem_size, what);
    if (!bytes.ok()) return bytes.status();
    v.raw = *bytes;
  } else if (v.elem_type == GgufType::kString) {
    v.strings.reserve(v.count);
    for (uint64_t i = 0; i < v.count; ++i) {
      auto s = ReadString(r, absl::StrCat(what, "[", i, "]"));
      if (!s.ok()) return s.status();
      v.strings.push_back(*s);
    }
  } else {
    v.arrays.reserve(v.count);
    for (uint64_t i = 0; i < v.count; ++i) {
      auto sub = ReadValue(r, static_cast<uint32_t>(GgufType::kArray), depth + 1, absl::StrCat(what, "[", i, "]"));
      if (!sub.ok()) return sub.status();
      v.arrays.push_back(std::move(*sub));
    }
  }
  return v;
}

// Element i of a numeric array, decoded like a scalar.
GgufValue Element(const GgufValue& arr, uint64_t i) {
  GgufValue e;
  e.type = arr.elem_type;
  DecodeScalar(e.type, reinterpret_cast<const uint8_t*>(arr.raw.data()) + i * ScalarSize(static_cast<uint32_t>(e.type)), &e);
  return e;
}

// Integer value of a scalar as T, with range checking. Empty string on success.
template <typename T>
std::string IntegerAs(const GgufValue& v, T* out) {
  if (IsSigned(v.type)) {
    if (v.i64 < static_cast<int64_t>(std::numeric_limits<T>::min()) ||
        (v.i64 > 0 && static_cast<uint64_t>(v.i64) > static_cast<uint64_t>(std::numeric_limits<T>::max()))) {
      return absl::StrCat("value ", v.i64, " does not fit the expected integer type");
    }
    *out = static_cast<T>(v.i64);
    return "";
  }
  if (IsUnsigned(v.type) || v.type == GgufType::kBool) {
    if (v.u64 > static_cast<uint64_t>(std::numeric_limits<T>::max())) {
      return absl::StrCat("value ", v.u64, " does not fit the expected integer type");
    }
    *out = static_cast<T>(v.u64);
    return "";
  }
  return absl::StrCat("has type ", GgufTypeName(v.type), ", expected an integer");
}

std::string FloatAs(const GgufValue& v, double* out) {
  if (IsFloat(v.type)) {
    *out = v.f64;
  } else if (IsSigned(v.type)) {
    *out = static_cast<double>(v.i64);
  } else if (IsUnsigned(v.type)) {
    *out = static_cast<double>(v.u64);
  } else {
    return absl::StrCat("has type ", GgufTypeName(v.type), ", expected a number");
  }
  return "";
}

}  // namespace

const char* GgufTypeName(GgufType t) {
  switch (t) {
    case GgufType::kUint8: return "uint8";
    case GgufType::kInt8: return "int8";
    case GgufType::kUint16: return "uint16";
    case GgufType::kInt16: return "int16";
    case GgufType::kUint32: return "uint32";
    case GgufType::kInt32: return "int32";
    case GgufType::kFloat32: return "float32";
    case GgufType::kBool: return "bool";
    case GgufType::kString: return "string";
    case GgufType::kArray: return "array";
    case GgufType::kUint64: return "uint64";
    case GgufType::kInt64: return "int64";
    case GgufType::kFloat64: return "float64";
  }
  return "unknown";
}

bool GgufValue::is_integer() const { return IsSigned(type) || IsUnsigned(type); }

std::string GgufValue::ToString() const {
  if (type == GgufType::kBool) return u64 ? "true" : "false";
  if (IsSigned(type)) return absl::StrCat(i64);
  if (IsUnsigned(type)) return absl::StrCat(u64);
  if (IsFloat(type)) return absl::StrCat(f64);
  if (type == GgufType::kString) return std::string(str);
  return absl::StrCat("[", GgufTypeName(elem_type), " x ", count, "]");
}

absl::StatusOr<std::unique_ptr<GgufFile>> GgufFile::Open(const std::string& path) {
  auto mapped = MappedFile::Open(path);
  if (!mapped.ok()) return mapped.status();
  std::unique_ptr<GgufFile> f(new GgufFile());
  f->path_ = path;
  f->file_ = std::move(*mapped);
  if (auto s = f->ParseAll(f->file_->data(), f->file_->size()); !s.ok()) return s;
  return f;
}

absl::StatusOr<std::unique_ptr<GgufFile>> GgufFile::Parse(const uint8_t* data, size_t size,
                                                          const std::string& name) {
  std::unique_ptr<GgufFile> f(new GgufFile());
  f->path_ = name;
  if (auto s = f->ParseAll(data, size); !s.ok()) return s;
  return f;
}

absl::Status GgufFile::ParseAll(const uint8_t* data, size_t size) {
  ByteReader r(data, size, path_);
  auto magic = r.ReadBytes(4, "GGUF magic");
  if (!magic.ok()) return magic.status();
  if (*magic != "GGUF") {
    return absl::InvalidArgumentError(absl::StrCat(path_, ": not a GGUF file (magic bytes are not \"GGUF\")"));
  }
  auto version = r.Read<uint32_t>("GGUF version");
  if (!version.ok()) return version.status();
  version_ = *version;
  if (version_ == 1) {
    return absl::InvalidArgumentError(
        absl::StrCat(path_, ": GGUF version 1 is not supported (only versions 2 and 3); re-convert the model"));
  }
  if (version_ != 2 && version_ != 3) {
    return absl::InvalidArgumentError(absl::StrCat(
        path_, ": unsupported GGUF version ", version_,
        (version_ & 0xffff) == 0 ? " (a big-endian file?)" : "", "; only versions 2 and 3 are supported"));
  }
  auto n_tensors = r.Read<uint64_t>("tensor count");
  if (!n_tensors.ok()) return n_tensors.status();
  auto n_kv = r.Read<uint64_t>("metadata key/value count");
  if (!n_kv.ok()) return n_kv.status();
  // Minimum encoded sizes: a key/value is >= 13 bytes, a tensor info >= 32.
  if (*n_kv > r.remaining() / 13) {
    return r.Error(absl::StrCat("metadata count ", *n_kv, " is impossible for a file of ", size, " bytes"));
  }
  if (*n_tensors > r.remaining() / 32) {
    return r.Error(absl::StrCat("tensor count ", *n_tensors, " is impossible for a file of ", size, " bytes"));
  }

  kv_.reserve(*n_kv);
  for (uint64_t i = 0; i < *n_kv; ++i) {
    auto key = ReadString(r, absl::StrCat("metadata key #", i));
    if (!key.ok()) return key.status();
    const std::string what = absl::StrCat("metadata key '", Sv(*key), "'");
    auto type = r.Read<uint32_t>(what + " type");
    if (!type.ok()) return type.status();
    auto value = ReadValue(r, *type, 0, what);
    if (!value.ok()) return value.status();
    if (!kv_index_.emplace(std::string(*key), kv_.size()).second) {
      return r.Error(absl::StrCat("duplicate ", what));
    }
    kv_.emplace_back(std::string(*key), std::move(*value));
  }

  if (const GgufValue* a = Find("general.alignment")) {
    uint64_t align = 0;
    if (std::string e = IntegerAs(*a, &align); !e.empty()) return KeyError("general.alignment", e);
    if (align == 0 || (align & (align - 1)) != 0 || align > (1u << 30)) {
      return KeyError("general.alignment", absl::StrCat("alignment ", align, " is not a power of two"));
    }
    alignment_ = align;
  }

  tensors_.reserve(*n_tensors);
  for (uint64_t i = 0; i < *n_tensors; ++i) {
    GgufTensorInfo t;
    auto name = ReadString(r, absl::StrCat("name of tensor #", i));
    if (!name.ok()) return name.status();
    if (name->size() > kMaxNameLen) return r.Error(absl::StrCat("tensor #", i, " has a name longer than 64 KiB"));
    t.name = std::string(*name);
    const std::string what = absl::StrCat("tensor '", t.name, "'");
    auto n_dims = r.Read<uint32_t>(what + " dimension count");
    if (!n_dims.ok()) return n_dims.status();
    if (*n_dims == 0 || *n_dims > kMaxDims) {
      return r.Error(absl::StrCat(what, " has ", *n_dims, " dimensions (1..", kMaxDims, " supported)"));
    }
    int64_t numel = 1;
    for (uint32_t d = 0; d < *n_dims; ++d) {
      auto ne = r.Read<uint64_t>(absl::StrCat(what, " ne[", d, "]"));
      if (!ne.ok()) return ne.status();
      if (*ne > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) ||
          (*ne != 0 && static_cast<uint64_t>(numel) > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) / *ne)) {
        return r.Error(absl::StrCat(what, " has absurd dimension ne[", d, "]=", *ne));
      }
      t.ne.push_back(static_cast<int64_t>(*ne));
      numel *= static_cast<int64_t>(*ne);
    }
    t.numel = numel;
    auto type = r.Read<uint32_t>(what + " type");
    if (!type.ok()) return type.status();
    const GgmlTypeTraits* traits = GetGgmlTypeTraits(*type);
    if (traits == nullptr) return r.Error(absl::StrCat(what, " has unknown ggml type id ", *type));
    t.type = static_cast<GgmlType>(*type);
    if (t.ne[0] % traits->block_size != 0) {
      return r.Error(absl::StrCat(what, ": row length ne[0]=", t.ne[0], " is not a multiple of the ", traits->name,
                                  " block size ", traits->block_size));
    }
    auto bytes = GgmlRowBytes(t.type, numel);
    if (!bytes.ok()) return r.Error(absl::StrCat(what, ": ", bytes.status().message()));
    t.n_bytes = *bytes;
    auto offset = r.Read<uint64_t>(what + " data offset");
    if (!offset.ok()) return offset.status();
    t.offset = *offset;
    if (!tensor_index_.emplace(t.name, tensors_.size()).second) return r.Error(absl::StrCat("duplicate ", what));
    tensors_.push_back(std::move(t));
  }

  // Data section: after the tensor directory, rounded up to the alignment.
  const uint64_t pos = r.offset();
  data_offset_ = (pos + alignment_ - 1) / alignment_ * alignment_;
  if (tensors_.empty()) return absl::OkStatus();
  if (data_offset_ > size) {
    return absl::DataLossError(absl::StrCat(path_, ": truncated file: tensor data would start at byte ", data_offset_,
                                            " but the file has ", size, " bytes"));
  }
  const uint64_t data_size = size - data_offset_;
  for (GgufTensorInfo& t : tensors_) {
    if (t.offset % alignment_ != 0) {
      return absl::InvalidArgumentError(absl::StrCat(path_, ": tensor '", t.name, "' data offset ", t.offset,
                                                     " is not a multiple of the alignment ", alignment_));
    }
    if (t.offset > data_size || t.n_bytes > data_size - t.offset) {
      return absl::DataLossError(absl::StrCat(path_, ": tensor '", t.name, "' (", t.n_bytes, " bytes at data offset ",
                                              t.offset, ") extends past the end of the file (", data_size,
                                              " bytes of tensor data); truncated or corrupt file"));
    }
    t.data = data + data_offset_ + t.offset;
  }
  return absl::OkStatus();
}

const GgufValue* GgufFile::Find(std::string_view key) const {
  auto it = kv_index_.find(key);
  return it == kv_index_.end() ? nullptr : &kv_[it->second].second;
}

const GgufTensorInfo* GgufFile::FindTensor(std::string_view name) const {
  auto it = tensor_index_.find(name);
  return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}

absl::Status GgufFile::KeyError(std::string_view key, std::string_view problem) const {
  return absl::InvalidArgumentError(absl::StrCat(path_, ": metadata key '", Sv(key), "' ", Sv(problem)));
}

#define NIBBLE_GGUF_FIND(key)                                                              \
  const GgufValue* v = Find(key);                                                          \
  if (v == nullptr) {                                                                      \
    return absl::NotFoundError(absl::StrCat(path_, ": missing metadata key '", Sv(key), "'")); \
  }

namespace {
template <typename T>
absl::StatusOr<T> GetInt(const GgufFile& f, const GgufValue* v, std::string_view key) {
  T out{};
  if (v->type == GgufType::kBool) {
    return absl::InvalidArgumentError(absl::StrCat(f.path(), ": metadata key '", Sv(key), "' is a bool, expected an integer"));
  }
  if (std::string e = IntegerAs(*v, &out); !e.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(f.path(), ": metadata key '", Sv(key), "' ", e));
  }
  return out;
}
}  // namespace

absl::StatusOr<uint32_t> GgufFile::GetU32(std::string_view key) const {
  NIBBLE_GGUF_FIND(key);
  return GetInt<uint32_t>(*this, v, key);
}
absl::StatusOr<int32_t> GgufFile::GetI32(std::string_view key) const {
  NIBBLE_GGUF_FIND(key);
  return GetInt<int32_t>(*this, v, key);
}
absl::StatusOr<uint64_t> GgufFile::GetU64(std::string_view key) const {
  NIBBLE_GGUF_FIND(key);
  return GetInt<uint64_t>(*this, v, key);
}
absl::StatusOr<int64_t> GgufFile::GetI64(std::string_view key) const {
  NIBBLE_GGUF_FIND(key);
  return GetInt<int64_t>(*this, v, key);
}

absl::StatusOr<double> GgufFile::GetF64(std::string_view key) const {
  NIBBLE_GGUF_FIND(key);
  double d = 0;
  if (std::string e = FloatAs(*v, &d); !e.empty()) return KeyError(key, e);
  return d;
}

absl::StatusOr<float> GgufFile::GetF32(std::string_view key) const {
  auto d = GetF64(key);
  if (!d.ok()) return d.status();
  return static_cast<float>(*d);
}

absl::StatusOr<bool> GgufFile::GetBool(std::string_view key) const {
  NIBBLE_GGUF_FIND(key);
  if (v->type == GgufType::kBool) return v->u64 != 0;
  if (v->is_integer() && v->u64 <= 1) return v->u64 == 1;
  return KeyError(key, absl::StrCat("has type ", GgufTypeName(v->type), ", expected bool"));
}

absl::StatusOr<std::string> GgufFile::GetString(std::string_view key) const {
  NIBBLE_GGUF_FIND(key);
  if (v->type != GgufType::kString) {
    return KeyError(key, absl::StrCat("has type ", GgufTypeName(v->type), ", expected string"));
  }
  return std::string(v->str);
}

absl::StatusOr<std::vector<std::string>> GgufFile::GetStringArray(std::string_view key) const {
  NIBBLE_GGUF_FIND(key);
  if (v->type != GgufType::kArray || v->elem_type != GgufType::kString) {
    return KeyError(key, "is not an array of strings");
  }
  return std::vector<std::string>(v->strings.begin(), v->strings.end());
}

absl::StatusOr<std::vector<float>> GgufFile::GetF32Array(std::string_view key) const {
  NIBBLE_GGUF_FIND(key);
  if (v->type != GgufType::kArray || ScalarSize(static_cast<uint32_t>(v->elem_type)) <= 0 ||
      v->elem_type == GgufType::kBool) {
    return KeyError(key, "is not an array of numbers");
  }
  std::vector<float> out(v->count);
  for (uint64_t i = 0; i < v->count; ++i) {
    double d = 0;
    FloatAs(Element(*v, i), &d);
    out[i] = static_cast<float>(d);
  }
  return out;
}

namespace {
template <typename T>
absl::StatusOr<std::vector<T>> GetIntArray(const GgufFile& f, const GgufValue* v, std::string_view key) {
  if (v->type != GgufType::kArray || !(IsSigned(v->elem_type) || IsUnsigned(v->elem_type))) {
    return absl::InvalidArgumentError(absl::StrCat(f.path(), ": metadata key '", Sv(key), "' is not an array of integers"));
  }
  std::vector<T> out(v->count);
  for (uint64_t i = 0; i < v->count; ++i) {
    if (std::string e = IntegerAs(Element(*v, i), &out[i]); !e.empty()) {
      return absl::InvalidArgumentError(absl::StrCat(f.path(), ": metadata key '", Sv(key), "'[", i, "]: ", e));
    }
  }
  return out;
}
}  // namespace

absl::StatusOr<std::vector<int32_t>> GgufFile::GetI32Array(std::string_view key) const {
  NIBBLE_GGUF_FIND(key);
  return GetIntArray<int32_t>(*this, v, key);
}
absl::StatusOr<std::vector<int64_t>> GgufFile::GetI64Array(std::string_view key) const {
  NIBBLE_GGUF_FIND(key);
  return GetIntArray<int64_t>(*this, v, key);
}

#undef NIBBLE_GGUF_FIND

absl::StatusOr<uint32_t> GgufFile::GetU32Or(std::string_view key, uint32_t def) const {
  return Has(key) ? GetU32(key) : def;
}
absl::StatusOr<int32_t> GgufFile::GetI32Or(std::string_view key, int32_t def) const {
  return Has(key) ? GetI32(key) : def;
}
absl::StatusOr<float> GgufFile::GetF32Or(std::string_view key, float def) const {
  return Has(key) ? GetF32(key) : def;
}
absl::StatusOr<bool> GgufFile::GetBoolOr(std::string_view key, bool def) const {
  return Has(key) ? GetBool(key) : def;
}
absl::StatusOr<std::string> GgufFile::GetStringOr(std::string_view key, std::string def) const {
  return Has(key) ? GetString(key) : absl::StatusOr<std::string>(std::move(def));
}

absl::Status GgufFile::DequantizeTensor(const GgufTensorInfo& t, std::vector<float>* out) const {
  out->assign(static_cast<size_t>(t.numel), 0.0f);
  absl::Status s = DequantizeRow(t.type, t.data, out->data(), t.numel);
  if (!s.ok()) {
    return absl::Status(s.code(), absl::StrCat(path_, ": tensor '", t.name, "' of type ",
                                               GgmlTypeName(static_cast<uint32_t>(t.type)), ": ", s.message()));
  }
  return absl::OkStatus();
}

}  // namespace nibble::io
