#include "engine/model/backend.h"

#include "kernels/cpu/thread_pool.h"

namespace nibble {

void Backend::MatMulMany(std::span<const HostTensor* const> ws, const float* x, int n_tokens,
                         std::span<float* const> ys) {
  for (size_t i = 0; i < ws.size(); ++i) MatMul(*ws[i], x, n_tokens, ys[i]);
}

void Backend::PagedAttention(const PagedAttentionArgs& a) {
  if (paged_pool_ == nullptr && n_threads() > 1) paged_pool_ = std::make_shared<ThreadPool>(n_threads());
  cpu::PagedAttention(a, paged_pool_.get(), &paged_scores_);
}

}  // namespace nibble
