// Contiguous per-sequence KV cache: [layer][position][kv_dim] for K and V,
// plus K transposed (cpu::ContiguousKtIndex layout per layer), which the
// attention kernel reads in place of K (no per-step gather and transpose of
// K rows; row-major K stays for the quantizer's observers).
//
// The single-sequence cache used by generate/perplexity. (The serving
// scheduler's paged cache is a separate allocator over fixed-size blocks.)
#pragma once

#include <cstdint>
#include <memory>
#include <new>

#include "engine/core/config.h"
#include "engine/core/huge_pages.h"
#include "kernels/cpu/paged_attention.h"

namespace nibble {

class KVCache {
 public:
  // K and V in huge-page memory (engine/core/huge_pages.h): attention
  // reads one kv head's rows at a stride of all heads' width, which the
  // hardware prefetchers follow poorly across 4 KiB pages.
  KVCache(const ModelConfig& c, int capacity)
      : capacity_(capacity), kv_dim_(c.kv_dim()), n_layers_(c.n_layers),
        floats_(size_t(c.n_layers) * capacity * c.kv_dim()),
        kt_floats_(size_t(cpu::ContiguousKtFloats(capacity, c.n_kv_heads, c.head_dim))),
        k_(Alloc(floats_)), v_(Alloc(floats_)), kt_(Alloc(size_t(c.n_layers) * kt_floats_)) {}

  int capacity() const { return capacity_; }
  // Start of layer `layer`'s rows; row p is at + p * kv_dim.
  float* k(int layer) { return static_cast<float*>(k_.get()) + size_t(layer) * capacity_ * kv_dim_; }
  float* v(int layer) { return static_cast<float*>(v_.get()) + size_t(layer) * capacity_ * kv_dim_; }
  // Layer `layer`'s transposed K (cpu::ContiguousKtIndex; positions >= the
  // written ones hold whatever was there: the kernel never uses them).
  float* k_t(int layer) { return static_cast<float*>(kt_.get()) + size_t(layer) * kt_floats_; }
  size_t bytes() const { return (2 * floats_ + size_t(n_layers_) * kt_floats_) * sizeof(float); }

 private:
  // Not zeroed: a position is written before anything reads it, and memory is
  // committed only as positions are used (not capacity x layers up front).
  static std::shared_ptr<void> Alloc(size_t n) {
    std::shared_ptr<void> p = HugePageAlloc(n * sizeof(float), /*zero=*/false);
    if (p == nullptr) throw std::bad_alloc();
    return p;
  }
  int capacity_;
  int kv_dim_;
  int n_layers_;
  size_t floats_;
  size_t kt_floats_;
  std::shared_ptr<void> k_, v_, kt_;
};

}  // namespace nibble
