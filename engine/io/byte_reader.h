// Bounds-checked little-endian cursor over a byte span.
//
// Every read checks the remaining length first and returns a DATA_LOSS /
// INVALID_ARGUMENT status naming the file, the field and the offset, so a
// truncated or corrupt model file can never read out of bounds.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
#include <type_traits>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"

namespace nibble::io {

class ByteReader {
 public:
  ByteReader(const uint8_t* data, size_t size, std::string_view file)
      : data_(data), size_(size), file_(file) {}

  size_t offset() const { return pos_; }
  size_t size() const { return size_; }
  size_t remaining() const { return size_ - pos_; }
  const uint8_t* data() const { return data_; }

  absl::Status Seek(size_t pos, std::string_view what) {
    if (pos > size_) return Truncated(what, pos - size_);
    pos_ = pos;
    return absl::OkStatus();
  }

  template <typename T>
  absl::StatusOr<T> Read(std::string_view what) {
    static_assert(std::is_trivially_copyable_v<T>);
    if (remaining() < sizeof(T)) return Truncated(what, sizeof(T));
    T v;
    std::memcpy(&v, data_ + pos_, sizeof(T));
    pos_ += sizeof(T);
    return v;
  }

  // Returns a view of the next n bytes and advances past them.
  absl::StatusOr<std::string_view> ReadBytes(uint64_t n, std::string_view what) {
    if (n > remaining()) return Truncated(what, n);
    std::string_view v(reinterpret_cast<const char*>(data_ + pos_), static_cast<size_t>(n));
    pos_ += static_cast<size_t>(n);
    return v;
  }

  absl::Status Skip(uint64_t n, std::string_view what) {
    if (n > remaining()) return Truncated(what, n);
    pos_ += static_cast<size_t>(n);
    return absl::OkStatus();
  }

  absl::Status Error(std::string_view what) const {
    return absl::InvalidArgumentError(absl::StrCat(Av(file_), ": ", Av(what), " (at byte offset ", pos_, ")"));
  }

  absl::Status Truncated(std::string_view what, uint64_t need) const {
    return absl::DataLossError(absl::StrCat(Av(file_), ": truncated or corrupt file: reading ", Av(what),
                                            " needs ", need, " bytes at offset ", pos_, " but the file has ",
                                            size_, " bytes"));
  }

 private:
  // Debian's abseil is built with its own string_view type (ABSL_OPTION_USE_STD_STRING_VIEW 0).
  static absl::string_view Av(std::string_view s) { return absl::string_view(s.data(), s.size()); }

  const uint8_t* data_;
  size_t size_;
  size_t pos_ = 0;
  std::string_view file_;
};

}  // namespace nibble::io
