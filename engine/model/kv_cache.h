// Contiguous per-sequence KV cache: [layer][position][kv_dim] for K and V.
//
// The single-sequence cache used by generate/perplexity. (The serving
// scheduler's paged cache is a separate allocator over fixed-size blocks.)
#pragma once

#include <cstdint>
#include <vector>

#include "engine/core/config.h"

namespace nibble {

class KVCache {
 public:
  KVCache(const ModelConfig& c, int capacity)
      : capacity_(capacity), kv_dim_(c.kv_dim()), n_layers_(c.n_layers),
        k_(size_t(c.n_layers) * capacity * c.kv_dim()), v_(k_.size()) {}

  int capacity() const { return capacity_; }
  // Start of layer `layer`'s rows; row p is at + p * kv_dim.
  float* k(int layer) { return k_.data() + size_t(layer) * capacity_ * kv_dim_; }
  float* v(int layer) { return v_.data() + size_t(layer) * capacity_ * kv_dim_; }
  size_t bytes() const { return (k_.size() + v_.size()) * sizeof(float); }

 private:
  int capacity_;
  int kv_dim_;
  int n_layers_;
  std::vector<float> k_, v_;
};

}  // namespace nibble
