// The Llama-family decoder (Llama 1/2/3, SmolLM, TinyLlama, llama2.c models):
// RMSNorm, RoPE (interleaved or rotate-half), grouped-query attention, SwiGLU
// FFN, tied or separate output head. Written once against Backend.
//
// Thread safety: Forward() uses per-model scratch buffers and must not be
// called concurrently on one LlamaModel. Read-only accessors are safe.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/model/backend.h"
#include "engine/model/kv_cache.h"
#include "engine/model/paged_kv_cache.h"
#include "engine/core/loaded_model.h"
#include "engine/core/rotation.h"

namespace nibble {

// Which linear layer of a block an activation feeds (calibration hooks).
enum class LinearInput {
  kAttnIn,   // normalized input of wq, wk, wv   [n_tokens, dim]
  kAttnOut,  // attention output, input of wo    [n_tokens, q_dim]
  kFfnIn,    // normalized input of w_gate, w_up [n_tokens, dim]
  kFfnMid,   // silu(gate) * up, input of w_down [n_tokens, hidden_dim]
  kHeadIn,   // final-normed hidden state, input of the output head [n_tokens, dim];
             // reported with layer == n_layers, for every token of the batch
};

// Receives the inputs of every linear layer during Forward() (for GPTQ-style
// calibration). Called on the forwarding thread; `x` is valid only during the call.
// What one layer's attention saw in one Forward batch (attention-aware
// calibration, e.g. BoA's row Hessians). Pointers are valid only during the call.
struct AttentionObservation {
  const float* q;        // [n_tokens, n_heads * head_dim] queries of the batch, RoPE applied
  const float* k_cache;  // [pos0 + n_tokens, n_kv_heads * head_dim] keys at positions 0.., RoPE applied
  const float* v_cache;  // [pos0 + n_tokens, n_kv_heads * head_dim] values
  int n_tokens;          // query rows of this batch, at positions [pos0, pos0 + n_tokens)
  int pos0;
  int n_heads, n_kv_heads, head_dim;
};

class ActivationObserver {
 public:
  virtual ~ActivationObserver() = default;
  virtual void OnLinearInput(int layer, LinearInput which, const float* x, int n_tokens, int width) = 0;
  // Called after each layer's attention (after the batch's keys/values entered
  // the cache), before OnLinearInput(kAttnOut). Default: ignored.
  virtual void OnAttention(int /*layer*/, const AttentionObservation& /*a*/) {}
};

// One sequence's share of a ForwardBatched step (serving): tokens.size() >= 1
// tokens at positions [pos, pos + tokens.size()); `blocks` must already cover
// positions [0, pos + tokens.size()) and hold the sequence's K/V for [0, pos).
struct BatchSequence {
  std::span<const int32_t> tokens;
  int pos = 0;
  const BlockTable* blocks = nullptr;
  bool want_logits = false;  // write logits for the last token of this sequence
};

class LlamaModel {
 public:
  // Takes ownership of the loaded weights. n_threads <= 0 uses every core.
  static absl::StatusOr<std::unique_ptr<LlamaModel>> Create(LoadedModel model, int n_threads = 0);

  const ModelConfig& config() const { return m_.config; }
  const LoadedModel& loaded() const { return m_; }
  // For quantizers probing one tensor at a time: weights may be swapped
  // (e.g. a HostTensor's `quant` set or reset) between Forward calls, never
  // during one, and must keep their shapes.
  LoadedModel& mutable_loaded() { return m_; }
  Backend& backend() { return *backend_; }

  // A cache for one sequence of up to `capacity` tokens (<= max_seq_len by default).
  // dtype kF16: K/V rounded to fp16 (half the memory and bytes per step;
  // not for runs with an observer, which reads fp32 K/V rows).
  std::unique_ptr<KVCache> NewKVCache(int capacity = 0, KvDtype dtype = KvDtype::kF32) const;

  // Runs tokens at positions [pos, pos + tokens.size()); the cache must hold
  // positions [0, pos). Writes vocab_size logits for the last token into
  // `logits`, or tokens.size() * vocab_size (row per token) if all_logits.
  // Errors: OUT_OF_RANGE past the cache, INVALID_ARGUMENT for a bad token id.
  absl::Status Forward(std::span<const int32_t> tokens, int pos, KVCache* cache, std::span<float> logits,
                       bool all_logits = false);

  // Quantizer probes: runs a fresh context of n <= kMaxBatch tokens at
  // positions [0, n) from layer `first_layer` (0..n_layers), with `x` the
  // residual stream entering that layer ([n, dim]) instead of the token
  // embeddings, writing all n rows of logits. layer_inputs (may be null)
  // receives the residual stream entering each layer run, at
  // layer_inputs[l * n * dim], so a reference pass from layer 0 records what
  // later probes start from. Errors: bad layer/size/capacity.
  absl::Status ForwardFromLayer(int first_layer, std::span<const float> x, int n, KVCache* cache,
                                std::span<float> logits, float* layer_inputs = nullptr);

  // Quantizers (sequential calibration): one decoder layer in parts, so a
  // caller can quantize the layer's weights between parts. Running every part
  // in enum order over the same rows is exactly the layer of Forward()
  // (RunLayer is built from the parts; bit-identical).
  enum class LayerPart {
    kAttnNorm,   // xb = attn_norm(x); observes kAttnIn
    kAttention,  // att = attention of (wq xb, wk xb, wv xb) with RoPE; writes the
                 // layer's K/V rows for [pos, pos + n) into the cache (which must
                 // hold [0, pos)); observes the attention, then kAttnOut
    kAttnOut,    // x += wo att; xb = ffn_norm(x); observes kFfnIn
    kFfn,        // h = silu(w_gate xb) * (w_up xb); observes kFfnMid
    kFfnOut,     // x += w_down h (xb is clobbered)
  };
  // Caller-owned rows of n tokens; a part needs only the buffers it reads or
  // writes (the others may be null).
  struct LayerRows {
    float* x = nullptr;    // [n, dim] residual stream
    float* xb = nullptr;   // [n, dim] normalized stream
    float* att = nullptr;  // [n, q_dim] attention output
    float* h = nullptr;    // [n, hidden_dim] FFN activation
  };
  // Runs `part` of decoder layer `layer` over n <= kMaxBatch rows at positions
  // [pos, pos + n) of one sequence, calling the observer as Forward() does.
  // Errors (nothing computed): bad layer/size/positions, a needed buffer null.
  absl::Status ForwardLayerPart(int layer, LayerPart part, const LayerRows& rows, int n, int pos, KVCache* cache);

  // Serving: runs several sequences in one step. All their token rows are
  // stacked so every weight matrix is read once per layer for the whole batch;
  // RoPE and attention are per sequence (attention through `cache`'s block
  // tables after this step's K/V rows are written into their blocks). Writes
  // vocab_size logits per sequence with want_logits, in batch order, into
  // `logits`. The observer is not called. Total tokens <= kMaxBatch.
  // Errors (nothing is computed): INVALID_ARGUMENT for an empty or too large
  // batch, a bad token id, a small logits buffer or a null block table;
  // OUT_OF_RANGE for positions past max_seq_len or past the block table.
  absl::Status ForwardBatched(std::span<const BatchSequence> batch, PagedKVCache* cache, std::span<float> logits);

  // The residual stream entering layer 0 for `tokens` (ids REQUIRED in the
  // vocabulary) into out ([tokens.size(), dim]): the embedding rows, rotated
  // by R when config().residual_rotation is set, exactly as Forward embeds.
  void Embed(std::span<const int32_t> tokens, float* out);

  // Installs (or with nullptr removes) a calibration observer. Not owned.
  void SetObserver(ActivationObserver* observer) { observer_ = observer; }

  // Largest number of tokens evaluated in one batch (prefill is chunked).
  static constexpr int kMaxBatch = 256;

 private:
  // FAILED_PRECONDITION when an observer is attached and `cache` is fp16.
  absl::Status CheckObservable(const KVCache* cache, const char* what) const;
  LlamaModel(LoadedModel m, std::unique_ptr<Backend> backend);
  void EnsureScratch(int n);
  // tokens == null: x_ already holds the residual stream of layer first_layer.
  // layer_inputs (may be null): receives x at the input of every layer run,
  // [n_layers][n][dim] (layers before first_layer untouched).
  void ForwardBatch(const int32_t* tokens, int n, int pos, KVCache* cache, float* logits, bool all_logits,
                    int first_layer = 0, float* layer_inputs = nullptr);

  // Rows x ([n <= kMaxBatch, dim]) of the last residual stream in the basis of
  // the final norm and head: x itself, or R^T x in rot_buf_ for a rotated model.
  const float* Unrotate(const float* x, int n);

  // One decoder layer over x_ ([n, dim]) at positions [pos, pos + n).
  void RunLayer(int l, int n, int pos, KVCache* cache);
  // One part of layer l over `r` (checked by the caller); scratch q_/k_/v_/h3_.
  void RunLayerPart(int l, LayerPart part, const LayerRows& r, int n, int pos, KVCache* cache);

  LoadedModel m_;
  std::unique_ptr<Backend> backend_;
  ActivationObserver* observer_ = nullptr;
  int scratch_tokens_ = 0;
  std::vector<float> x_, xb_, q_, k_, v_, att_, h1_, h3_, last_;
  // config().residual_rotation: R and R^T ([dim, dim] fp32), rows scratch.
  HostTensor rot_, rot_t_;
  std::unique_ptr<FastRotation> ffn_rot_;  // config().ffn_rotation
  std::vector<float> rot_buf_;
};

}  // namespace nibble
