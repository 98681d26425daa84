// Calibration: run the fp32 model over text and collect, for every linear
// layer's input, the GPTQ Hessian H = (2/N) sum_t x_t x_t^T (quantizers/hessian.h).
//
// Goals: one pass of LlamaModel::Forward with a HessianCollector installed
// gives the statistics GPTQ (quantizers/gptq.h) and importance-weighted RTN
// need for every layer; wq/wk/wv share the kAttnIn Hessian, w_gate/w_up the
// kFfnIn one. Optional layer range so very large models can be calibrated in
// several passes within memory.
// Non-goals: sequential (layer-by-layer re-quantized) calibration, which is
// quantizers/sequential.h; the inputs seen here are those of the unquantized
// model.
//
// Calibration text must never be the evaluation text (wikitext-2 is the
// perplexity set; use e.g. shared/data/tinystories-val.txt).
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/core/weights.h"
#include "engine/model/llama_model.h"
#include "engine/tokenizer/tokenizer.h"
#include "quantizers/hessian.h"

namespace nibble {

constexpr int kNumLinearInputs = 5;  // LinearInput values, in enum order (kHeadIn at layer n_layers)

// The seven linear weights of a decoder block.
enum class LinearWeight { kWq, kWk, kWv, kWo, kGate, kUp, kDown };
constexpr std::array<LinearWeight, 7> kAllLinearWeights = {
    LinearWeight::kWq, LinearWeight::kWk,   LinearWeight::kWv,  LinearWeight::kWo,
    LinearWeight::kGate, LinearWeight::kUp, LinearWeight::kDown};

// The activation a weight multiplies (wq/wk/wv -> kAttnIn, wo -> kAttnOut,
// w_gate/w_up -> kFfnIn, w_down -> kFfnMid).
LinearInput InputOf(LinearWeight w);
const char* LinearWeightName(LinearWeight w);  // "wq", ..., "w_down"
const HostTensor& WeightOf(const LayerWeights& layer, LinearWeight w);
HostTensor& MutableWeightOf(LayerWeights& layer, LinearWeight w);

struct CalibrationStats {
  int64_t n_tokens = 0;  // tokens run through the model
  int64_t n_chunks = 0;  // Forward passes (each with a fresh KV cache)
  // hessians[layer][static_cast<int>(LinearInput)]; dim == 0 for layers outside
  // the collected range.
  std::vector<std::array<Hessian, kNumLinearInputs>> hessians;

  // The Hessian for `layer`'s input `which`, or null if it was not collected.
  const Hessian* Get(int layer, LinearInput which) const;
  const Hessian* Get(int layer, LinearWeight w) const { return Get(layer, InputOf(w)); }
};

// Widest input the collector accepts (an fp64 accumulator of 8 * dim^2 bytes:
// 2 GiB at this limit).
constexpr int kMaxHessianDim = 16384;

struct CollectorOptions {
  int n_threads = 0;     // threads for the accumulation (<= 0: all cores)
  int layer_begin = 0;   // collect layers [layer_begin, layer_end)
  int layer_end = -1;    // -1: every layer
};

// An ActivationObserver accumulating one Hessian per (layer, LinearInput).
// Accumulators are created on first use with the width seen then.
// Thread safety: OnLinearInput runs on the forwarding thread only (as
// LlamaModel calls it); not thread-safe otherwise.
class HessianCollector : public ActivationObserver {
 public:
  explicit HessianCollector(const CollectorOptions& opts = {});
  ~HessianCollector() override;

  void OnLinearInput(int layer, LinearInput which, const float* x, int n_tokens, int width) override;

  // The first inconsistency seen (a width that changed or exceeds
  // kMaxHessianDim, a bad layer index), or OK.
  const absl::Status& status() const { return status_; }
  // Finished statistics for every observed layer; errors if status() is not OK.
  absl::StatusOr<CalibrationStats> Finish() const;

 private:
  CollectorOptions opts_;
  std::vector<std::array<std::unique_ptr<HessianAccumulator>, kNumLinearInputs>> acc_;
  absl::Status status_;
};

struct CalibrateOptions {
  int n_tokens = 4096;   // stop after this many tokens (BOS included)
  int ctx = 256;         // tokens per chunk; each chunk is a fresh context
  CollectorOptions collector;
};

// The token chunks Calibrate() runs (see below for how the text becomes
// chunks): at most n_tokens tokens in chunks of at most min(ctx, max_seq_len)
// (max_seq_len <= 0: no cap). Errors name the text file.
absl::StatusOr<std::vector<std::vector<int32_t>>> CalibrationChunks(const Tokenizer& tokenizer,
                                                                   const std::string& text_path,
                                                                   int64_t n_tokens, int ctx, int max_seq_len);

// The forward passes of Calibrate() with any observer installed (and removed
// afterwards); `check` (may be null) runs after each chunk and stops the run
// with its error. Returns the tokens and chunks run.
struct CalibrationRun {
  int64_t n_tokens = 0, n_chunks = 0;
};
absl::StatusOr<CalibrationRun> RunCalibration(LlamaModel& model, const Tokenizer& tokenizer,
                                              const std::string& text_path, const CalibrateOptions& opts,
                                              ActivationObserver* observer,
                                              const std::function<absl::Status()>& check = nullptr);

// Tokenizes `text_path` document by document (documents are separated by the
// TinyStories/GPT-2 marker "<|endoftext|>", which is removed; a file without it
// is one document), forms a stream with BOS before every document when the
// vocabulary adds BOS, and runs Forward over consecutive chunks of `ctx`
// tokens (ctx is capped at the model's max_seq_len; each chunk starts with BOS
// when the vocabulary adds it, at position 0: a fresh context) until
// n_tokens tokens were seen or the text is exhausted (then fewer; an error
// only if not one token). Errors name the text file.
// Installs its own HessianCollector as the model's observer for the duration
// and leaves no observer installed afterwards.
absl::StatusOr<CalibrationStats> Calibrate(LlamaModel& model, const Tokenizer& tokenizer,
                                           const std::string& text_path, const CalibrateOptions& opts);
absl::StatusOr<CalibrationStats> Calibrate(LlamaModel& model, const Tokenizer& tokenizer,
                                           const std::string& text_path, int n_tokens, int ctx);

}  // namespace nibble
