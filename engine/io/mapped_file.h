// Read-only memory-mapped file.
//
// Every model reader goes through this: the file is mapped once, readers see a
// byte span and must bounds-check every offset against size() before use
// (see ByteReader). Thread safety: immutable after Open(), safe to share.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"

namespace nibble::io {

class MappedFile {
 public:
  // Maps `path` read-only. Errors name the path: NOT_FOUND, or INVALID_ARGUMENT
  // for directories and empty files.
  static absl::StatusOr<std::unique_ptr<MappedFile>> Open(const std::string& path);

  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  const std::string& path() const { return path_; }
  std::string_view view() const { return {reinterpret_cast<const char*>(data_), size_}; }

 private:
  MappedFile(std::string path, const uint8_t* data, size_t size)
      : path_(std::move(path)), data_(data), size_(size) {}
  std::string path_;
  const uint8_t* data_;
  size_t size_;
};

// Reads a whole (small) file such as config.json. Errors name the path.
absl::StatusOr<std::string> ReadFileToString(const std::string& path);

}  // namespace nibble::io
