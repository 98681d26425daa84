// Safetensors file reader (Hugging Face's tensor container).
//
// Format: u64 little-endian header length N, N bytes of JSON
//   {"<name>": {"dtype": "F32", "shape": [rows, cols], "data_offsets": [begin, end]},
//    ..., "__metadata__": {"k": "v"}}
// then the data section; offsets are relative to its start (byte 8 + N).
// Goals: validate everything before use (header length within the file and
// <= 100 MB, JSON well formed, known dtype, non-negative shape whose byte size
// equals end - begin, ranges inside the data section and not overlapping each
// other) with errors naming the file and tensor; convert F32/F16/BF16 to fp32.
// Non-goals: writing; integer/fp8 dtypes as weights (parsed, but ReadF32 refuses them).
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/io/mapped_file.h"

namespace nibble::io {

struct SafetensorsTensor {
  std::string name;
  std::string dtype;            // as written: "F32", "BF16", ...
  int elem_size = 0;            // bytes per element
  std::vector<int64_t> shape;   // outermost first
  int64_t numel = 0;
  uint64_t begin = 0, end = 0;  // byte range relative to the data section
  const uint8_t* data = nullptr;  // into the mapping; valid while the file object lives
};

class SafetensorsFile {
 public:
  // Maps and validates `path`; errors name the path.
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Open(const std::string& path);
  // Validates an in-memory image; `name` labels errors. REQUIRES: data outlives the result.
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Parse(const uint8_t* data, size_t size,
                                                                const std::string& name);

  const std::string& path() const { return path_; }
  const std::vector<SafetensorsTensor>& tensors() const { return tensors_; }
  const SafetensorsTensor* Find(std::string_view name) const;
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

  // Converts an F32/F16/BF16 tensor to fp32 (out resized to numel). Other
  // dtypes: INVALID_ARGUMENT naming the file, tensor and dtype.
  absl::Status ReadF32(const SafetensorsTensor& t, std::vector<float>* out) const;

 private:
  SafetensorsFile() = default;
  absl::Status ParseAll(const uint8_t* data, size_t size);

  std::string path_;
  std::unique_ptr<MappedFile> file_;
  std::vector<SafetensorsTensor> tensors_;
  std::map<std::string, size_t, std::less<>> index_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace nibble::io
