// GGUF (v2/v3) container reader: header, metadata and tensor directory.
//
// Goals: parse any well-formed GGUF v2/v3 file over a memory map without
// copying tensor data; reject every malformed one with a status naming the
// file and the offending field or tensor (bad magic, v1/unknown versions,
// truncation anywhere, absurd counts, bad types, tensor ranges outside the
// file, misaligned offsets, duplicate names). Typed metadata accessors with
// coercion among integer types.
// Non-goals: writing GGUF, model semantics (see gguf_model.h), big-endian files.
//
// Format (little-endian): "GGUF" u32 version u64 n_tensors u64 n_kv;
// n_kv x {string key, u32 type, value}; n_tensors x {string name, u32 n_dims,
// u64 ne[n_dims], u32 ggml_type, u64 offset}; padding to general.alignment
// (default 32); tensor data, each tensor at data_start + offset.
// Strings are u64 length + bytes; arrays are u32 elem type, u64 count, elems.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/io/ggml_types.h"
#include "engine/io/mapped_file.h"

namespace nibble::io {

enum class GgufType : uint32_t {
  kUint8 = 0,
  kInt8 = 1,
  kUint16 = 2,
  kInt16 = 3,
  kUint32 = 4,
  kInt32 = 5,
  kFloat32 = 6,
  kBool = 7,
  kString = 8,
  kArray = 9,
  kUint64 = 10,
  kInt64 = 11,
  kFloat64 = 12,
};

const char* GgufTypeName(GgufType t);

// One metadata value. Views point into the file's mapping: a GgufValue lives
// no longer than the GgufFile it came from.
struct GgufValue {
  GgufType type = GgufType::kUint8;
  // Scalars (type != kArray): integers and bool widen into i64 (signed types)
  // or u64 (unsigned types and bool); floats into f64; strings into str.
  int64_t i64 = 0;
  uint64_t u64 = 0;
  double f64 = 0;
  std::string_view str;
  // Arrays (type == kArray): elem_type and count, then by element kind:
  //   numeric/bool elements: `raw`, count packed little-endian elements;
  //   strings: `strings`; nested arrays: `arrays`.
  GgufType elem_type = GgufType::kUint8;
  uint64_t count = 0;
  std::string_view raw;
  std::vector<std::string_view> strings;
  std::vector<GgufValue> arrays;

  bool is_integer() const;
  // Human-readable rendering: scalars as text, arrays as "[type x count]".
  std::string ToString() const;
};

struct GgufTensorInfo {
  std::string name;
  std::vector<int64_t> ne;  // ggml order: ne[0] is the innermost (contiguous) dimension
  GgmlType type = GgmlType::kF32;
  uint64_t offset = 0;      // relative to the data section
  int64_t numel = 0;
  uint64_t n_bytes = 0;
  const uint8_t* data = nullptr;  // into the mapping; valid while the GgufFile lives
};

class GgufFile {
 public:
  // Maps and parses `path`. Errors name the path.
  static absl::StatusOr<std::unique_ptr<GgufFile>> Open(const std::string& path);
  // Parses an in-memory image; `name` labels errors. REQUIRES: data outlives the result.
  static absl::StatusOr<std::unique_ptr<GgufFile>> Parse(const uint8_t* data, size_t size,
                                                         const std::string& name);

  const std::string& path() const { return path_; }
  uint32_t version() const { return version_; }
  uint64_t alignment() const { return alignment_; }
  uint64_t data_offset() const { return data_offset_; }

  // Metadata in file order.
  const std::vector<std::pair<std::string, GgufValue>>& metadata() const { return kv_; }
  const GgufValue* Find(std::string_view key) const;
  bool Has(std::string_view key) const { return Find(key) != nullptr; }

  // Typed accessors. NOT_FOUND if the key is absent, INVALID_ARGUMENT if it
  // has an incompatible type or does not fit (integers coerce among each
  // other with range checks; GetF32/GetF64 also accept integers).
  absl::StatusOr<uint32_t> GetU32(std::string_view key) const;
  absl::StatusOr<int32_t> GetI32(std::string_view key) const;
  absl::StatusOr<uint64_t> GetU64(std::string_view key) const;
  absl::StatusOr<int64_t> GetI64(std::string_view key) const;
  absl::StatusOr<float> GetF32(std::string_view key) const;
  absl::StatusOr<double> GetF64(std::string_view key) const;
  absl::StatusOr<bool> GetBool(std::string_view key) const;
  absl::StatusOr<std::string> GetString(std::string_view key) const;
  absl::StatusOr<std::vector<std::string>> GetStringArray(std::string_view key) const;
  absl::StatusOr<std::vector<float>> GetF32Array(std::string_view key) const;
  absl::StatusOr<std::vector<int32_t>> GetI32Array(std::string_view key) const;
  absl::StatusOr<std::vector<int64_t>> GetI64Array(std::string_view key) const;

  // As above, but an absent key yields `def` (a present key of the wrong type is still an error).
  absl::StatusOr<uint32_t> GetU32Or(std::string_view key, uint32_t def) const;
  absl::StatusOr<int32_t> GetI32Or(std::string_view key, int32_t def) const;
  absl::StatusOr<float> GetF32Or(std::string_view key, float def) const;
  absl::StatusOr<bool> GetBoolOr(std::string_view key, bool def) const;
  absl::StatusOr<std::string> GetStringOr(std::string_view key, std::string def) const;

  const std::vector<GgufTensorInfo>& tensors() const { return tensors_; }
  const GgufTensorInfo* FindTensor(std::string_view name) const;

  // Dequantizes a whole tensor into `out` (resized to numel). Errors name the
  // file, the tensor and its type (UNIMPLEMENTED for unsupported types).
  absl::Status DequantizeTensor(const GgufTensorInfo& t, std::vector<float>* out) const;

 private:
  GgufFile() = default;
  absl::Status ParseAll(const uint8_t* data, size_t size);
  absl::Status KeyError(std::string_view key, std::string_view problem) const;

  std::string path_;
  std::unique_ptr<MappedFile> file_;  // null for Parse()
  uint32_t version_ = 0;
  uint64_t alignment_ = 32;
  uint64_t data_offset_ = 0;
  std::vector<std::pair<std::string, GgufValue>> kv_;
  std::map<std::string, size_t, std::less<>> kv_index_;
  std::vector<GgufTensorInfo> tensors_;
  std::map<std::string, size_t, std::less<>> tensor_index_;
};

}  // namespace nibble::io
