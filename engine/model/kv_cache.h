// Contiguous per-sequence KV cache: [layer][position][kv_dim] for K and V.
//
// The single-sequence cache used by generate/perplexity. (The serving
// scheduler's paged cache is a separate allocator over fixed-size blocks.)
#pragma once

#include <cstdint>
#include <memory>
#include <new>

#include "engine/core/config.h"
#include "engine/core/huge_pages.h"

namespace nibble {

class KVCache {
 public:
  // K and V in huge-page memory (engine/core/huge_pages.h), zeroed: attention
  // reads one kv head's rows at a stride of all heads' width, which the
  // hardware prefetchers follow poorly across 4 KiB pages.
  KVCache(const ModelConfig& c, int capacity)
      : capacity_(capacity), kv_dim_(c.kv_dim()), n_layers_(c.n_layers),
        floats_(size_t(c.n_layers) * capacity * c.kv_dim()), k_(Alloc(floats_)), v_(Alloc(floats_)) {}

  int capacity() const { return capacity_; }
  // Start of layer `layer`'s rows; row p is at + p * kv_dim.
  float* k(int layer) { return static_cast<float*>(k_.get()) + size_t(layer) * capacity_ * kv_dim_; }
  float* v(int layer) { return static_cast<float*>(v_.get()) + size_t(layer) * capacity_ * kv_dim_; }
  size_t bytes() const { return 2 * floats_ * sizeof(float); }

 private:
  static std::shared_ptr<void> Alloc(size_t n) {
    std::shared_ptr<void> p = HugePageAlloc(n * sizeof(float));
    if (p == nullptr) throw std::bad_alloc();
    return p;
  }
  int capacity_;
  int kv_dim_;
  int n_layers_;
  size_t floats_;
  std::shared_ptr<void> k_, v_;
};

}  // namespace nibble
