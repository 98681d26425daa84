// LlamaModel::ForwardBatched: the serving scheduler's multi-sequence step over
// a paged KV cache (see llama_model.h). Same operators and order as
// ForwardBatch, so a sequence's logits agree with Forward's up to matmul
// rounding (row blocking differs with the number of stacked rows). With an
// int8 cache (PagedKVCache::Options::dtype) K/V are quantized as they are
// written and attention dequantizes on the fly; logits then differ from the
// fp32 cache's by the quantization error (see paged_int8_forward_test.cc).
#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "engine/core/quant_tensor.h"
#include "engine/model/llama_model.h"

namespace nibble {

absl::Status LlamaModel::ForwardBatched(std::span<const BatchSequence> batch, PagedKVCache* cache,
                                        std::span<float> logits) {
  const ModelConfig& c = m_.config;
  if (batch.empty()) return absl::InvalidArgumentError("ForwardBatched: empty batch");
  if (cache == nullptr || cache->n_layers() != c.n_layers || cache->kv_dim() != c.kv_dim() ||
      cache->n_kv_heads() != c.n_kv_heads)
    return absl::InvalidArgumentError("ForwardBatched: the paged cache is missing or shaped for another model");
  int64_t total = 0, n_logits = 0;
  for (size_t s = 0; s < batch.size(); ++s) {
    const BatchSequence& b = batch[s];
    const int64_t n = static_cast<int64_t>(b.tokens.size());
    if (n == 0) return absl::InvalidArgumentError(absl::StrCat("ForwardBatched: sequence ", s, " has no tokens"));
    if (b.blocks == nullptr)
      return absl::InvalidArgumentError(absl::StrCat("ForwardBatched: sequence ", s, " has no block table"));
    if (b.pos < 0 || b.pos + n > c.max_seq_len)
      return absl::OutOfRangeError(absl::StrCat("ForwardBatched: sequence ", s, " positions [", b.pos, ", ",
                                                b.pos + n, ") exceed the context ", c.max_seq_len));
    const int64_t covered = static_cast<int64_t>(b.blocks->blocks.size()) * cache->block_size();
    if (b.pos + n > covered)
      return absl::OutOfRangeError(absl::StrCat("ForwardBatched: sequence ", s, " positions [", b.pos, ", ",
                                                b.pos + n, ") exceed its ", b.blocks->blocks.size(), " blocks"));
    for (int32_t blk : b.blocks->blocks)
      if (blk < 0 || blk >= cache->num_blocks())
        return absl::InvalidArgumentError(absl::StrCat("ForwardBatched: sequence ", s, " has block id ", blk,
                                                       " outside the pool of ", cache->num_blocks()));
    for (int64_t i = 0; i < n; ++i)
      if (b.tokens[i] < 0 || b.tokens[i] >= c.vocab_size)
        return absl::InvalidArgumentError(absl::StrCat("ForwardBatched: sequence ", s, " token id ", b.tokens[i],
                                                       " is outside the vocabulary [0, ", c.vocab_size, ")"));
    total += n;
    n_logits += b.want_logits ? 1 : 0;
  }
  if (total > kMaxBatch)
    return absl::InvalidArgumentError(absl::StrCat("ForwardBatched: ", total, " tokens exceed kMaxBatch ", kMaxBatch));
  if (logits.size() < static_cast<size_t>(n_logits) * c.vocab_size)
    return absl::InvalidArgumentError(absl::StrCat("ForwardBatched: logits buffer holds ", logits.size(),
                                                   " floats, need ", n_logits * c.vocab_size));

  const ModelWeights& w = m_.weights;
  Backend& be = *backend_;
  const int n = static_cast<int>(total);
  EnsureScratch(n);
  const int dim = c.dim, qd = c.q_dim(), kvd = c.kv_dim(), hid = c.hidden_dim;
  const int bs = cache->block_size();

  int row = 0;
  for (const BatchSequence& b : batch) {
    Embed(b.tokens, &x_[size_t(row) * dim]);
    row += static_cast<int>(b.tokens.size());
  }

  for (int l = 0; l < c.n_layers; ++l) {
    const LayerWeights& lw = w.layers[l];
    be.RmsNorm(x_.data(), lw.attn_norm.data.data(), n, dim, c.norm_eps, xb_.data());
    {
      const HostTensor* wqkv[] = {&lw.wq, &lw.wk, &lw.wv};
      float* yqkv[] = {q_.data(), k_.data(), v_.data()};
      be.MatMulMany(wqkv, xb_.data(), n, yqkv);
    }
    row = 0;
    for (const BatchSequence& b : batch) {
      const int len = static_cast<int>(b.tokens.size());
      float* q = q_.data() + size_t(row) * qd;
      float* k = k_.data() + size_t(row) * kvd;
      const float* v = v_.data() + size_t(row) * kvd;
      be.Rope(q, len, b.pos, c.n_heads, c);
      be.Rope(k, len, b.pos, c.n_kv_heads, c);
      for (int t = 0; t < len; ++t) {
        const int p = b.pos + t;
        const int32_t blk = b.blocks->blocks[p / bs];
        cache->WriteKV(blk, l, p % bs, k + size_t(t) * kvd, v + size_t(t) * kvd);  // int8: quantized here
      }
      PagedAttentionArgs a;
      a.q = q;
      a.out = att_.data() + size_t(row) * qd;
      a.n_tokens = len;
      a.pos0 = b.pos;
      a.n_heads = c.n_heads;
      a.n_kv_heads = c.n_kv_heads;
      a.head_dim = c.head_dim;
      cache->FillAttentionArgs(l, &a);  // base, strides, offsets, block_size, kv_dtype
      a.block_table = b.blocks->blocks.data();
      a.n_blocks = static_cast<int>(b.blocks->blocks.size());
      be.PagedAttention(a);
      row += len;
    }
    be.MatMul(lw.wo, att_.data(), n, xb_.data());
    for (size_t i = 0; i < size_t(n) * dim; ++i) x_[i] += xb_[i];
    be.RmsNorm(x_.data(), lw.ffn_norm.data.data(), n, dim, c.norm_eps, xb_.data());
    {
      const HostTensor* wgu[] = {&lw.w_gate, &lw.w_up};
      float* ygu[] = {h1_.data(), h3_.data()};
      be.MatMulMany(wgu, xb_.data(), n, ygu);
    }
    be.SwiGLU(h1_.data(), h3_.data(), int64_t{n} * hid);
    if (ffn_rot_) ffn_rot_->Apply(h1_.data(), n);
    be.MatMul(lw.w_down, h1_.data(), n, xb_.data());
    for (size_t i = 0; i < size_t(n) * dim; ++i) x_[i] += xb_[i];
  }
  if (n_logits == 0) return absl::OkStatus();
  // Normalize only the rows whose logits are wanted, packed, then one head matmul.
  row = 0;
  int out_row = 0;
  for (const BatchSequence& b : batch) {
    row += static_cast<int>(b.tokens.size());
    if (!b.want_logits) continue;
    be.RmsNorm(Unrotate(x_.data() + size_t(row - 1) * dim, 1), w.final_norm.data.data(), 1, dim, c.norm_eps,
               xb_.data() + size_t(out_row) * dim);
    ++out_row;
  }
  const HostTensor& head = c.tied_embeddings ? w.tok_embeddings : w.output;
  be.MatMul(head, xb_.data(), out_row, logits.data());
  return absl::OkStatus();
}

}  // namespace nibble
