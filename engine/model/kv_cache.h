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
  // dtype kF32: row-major K and V plus K^T (fp32). kF16: only K^T and V rows,
  // in IEEE fp16 (half the bytes; k() / v() are null, so no Forward observer
  // can read them). kInt8 is a paged-cache type only (treated as kF32 here).
  KVCache(const ModelConfig& c, int capacity, cpu::KvDtype dtype = cpu::KvDtype::kF32)
      : capacity_(capacity), kv_dim_(c.kv_dim()), n_layers_(c.n_layers),
        f16_(dtype == cpu::KvDtype::kF16),
        rows_(size_t(c.n_layers) * capacity * c.kv_dim()),
        kt_elems_(size_t(cpu::ContiguousKtFloats(capacity, c.n_kv_heads, c.head_dim))),
        k_(f16_ ? nullptr : Alloc(rows_ * 4)), v_(Alloc(rows_ * (f16_ ? 2 : 4))),
        kt_(Alloc(size_t(c.n_layers) * kt_elems_ * (f16_ ? 2 : 4))) {}

  int capacity() const { return capacity_; }
  bool f16() const { return f16_; }
  // fp32: start of layer `layer`'s rows; row p is at + p * kv_dim (null for fp16).
  float* k(int layer) { return f16_ ? nullptr : static_cast<float*>(k_.get()) + size_t(layer) * capacity_ * kv_dim_; }
  float* v(int layer) { return f16_ ? nullptr : static_cast<float*>(v_.get()) + size_t(layer) * capacity_ * kv_dim_; }
  // fp32: layer `layer`'s transposed K (cpu::ContiguousKtIndex; positions >=
  // the written ones hold whatever was there: the kernel never uses them).
  float* k_t(int layer) { return f16_ ? nullptr : static_cast<float*>(kt_.get()) + size_t(layer) * kt_elems_; }
  // fp16: the same layouts with fp16 bits.
  uint16_t* v16(int layer) {
    return f16_ ? static_cast<uint16_t*>(v_.get()) + size_t(layer) * capacity_ * kv_dim_ : nullptr;
  }
  uint16_t* k_t16(int layer) { return f16_ ? static_cast<uint16_t*>(kt_.get()) + size_t(layer) * kt_elems_ : nullptr; }
  size_t bytes() const { return f16_ ? (rows_ + size_t(n_layers_) * kt_elems_) * 2 : (2 * rows_ + size_t(n_layers_) * kt_elems_) * 4; }

 private:
  // Not zeroed: a position is written before anything reads it, and memory is
  // committed only as positions are used (not capacity x layers up front).
  static std::shared_ptr<void> Alloc(size_t bytes) {
    std::shared_ptr<void> p = HugePageAlloc(bytes, /*zero=*/false);
    if (p == nullptr) throw std::bad_alloc();
    return p;
  }
  int capacity_;
  int kv_dim_;
  int n_layers_;
  bool f16_;
  size_t rows_;      // elements of one of K / V over all layers
  size_t kt_elems_;  // elements of one layer's K^T
  std::shared_ptr<void> k_, v_, kt_;
};

}  // namespace nibble
