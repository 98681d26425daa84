// A grow-only, 64-byte aligned scratch array for kernels (packing buffers,
// unpack staging). Typically `thread_local`, so each pool thread has its own
// and nothing is allocated once the largest request has been seen.
//
// Thread safety: none (one owner; use one per thread).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace nibble::cpu {

template <class T>
class AlignedScratch {
 public:
  // At least n elements starting on a 64-byte boundary; contents unspecified
  // (zero when freshly grown). Invalidated by a later, larger Get.
  T* Get(size_t n) {
    constexpr size_t kPad = 64 / sizeof(T) + 1;
    if (v_.size() < n + kPad) v_.assign(n + kPad, T{});
    return reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(v_.data()) + 63) & ~uintptr_t{63});
  }

 private:
  std::vector<T> v_;
};

}  // namespace nibble::cpu
