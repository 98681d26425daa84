// Sequential calibration on stories260K: with nothing quantized, the
// part-by-part states reproduce the one-pass collector's Hessians exactly at
// every layer (and parts out of order are refused); sequential GPTQ is
// thread-count independent, leaves layer 0's q/k/v unchanged (fp32
// embedding) or calibrates them on the quantized embedding, and at int2 beats
// one-pass GPTQ on held-out text; sequential BoA likewise.
#include "quantizers/sequential.h"

#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "engine/core/quant_tensor.h"
#include "engine/model/model_loader.h"
#include "quantizers/model_quantizer.h"
#include "tests/test_util.h"

namespace nibble {
namespace {

using ::nibble::testing::SharedDir;
using ::nibble::testing::Stories260KModel;
using ::nibble::testing::Stories260KTokenizer;

LoadedModel LoadStories() {
  LoadOptions lo;
  lo.tokenizer_path = Stories260KTokenizer();
  auto loaded = LoadModel(Stories260KModel(), lo);
  EXPECT_TRUE(loaded.ok()) << loaded.status();
  return loaded.ok() ? *std::move(loaded) : LoadedModel{};
}

std::string CalibText() { return SharedDir() + "/data/tinystories-val.txt"; }

// The one-layer Hessians of running `parts` of states' layer (collector
// restricted to that layer).
CalibrationStats Observe(LlamaModel& model, LayerStates& states, LlamaModel::LayerPart first,
                         LlamaModel::LayerPart last) {
  CollectorOptions co{.n_threads = 2, .layer_begin = states.layer(), .layer_end = states.layer() + 1};
  HessianCollector collector(co);
  EXPECT_TRUE(states.Run(model, first, last, &collector).ok());
  auto stats = collector.Finish();
  EXPECT_TRUE(stats.ok()) << stats.status();
  return stats.ok() ? *std::move(stats) : CalibrationStats{};
}

void ExpectSameHessian(const CalibrationStats& want, const CalibrationStats& got, int layer, LinearInput which) {
  const Hessian* a = want.Get(layer, which);
  const Hessian* b = got.Get(layer, which);
  ASSERT_NE(a, nullptr);
  ASSERT_NE(b, nullptr) << "layer " << layer << " input " << static_cast<int>(which);
  EXPECT_EQ(a->n_tokens, b->n_tokens);
  EXPECT_EQ(a->h, b->h) << "layer " << layer << " input " << static_cast<int>(which);  // bit-exact
  EXPECT_EQ(a->mean_sq, b->mean_sq);
}

TEST(SequentialTest, UnquantizedStatesReproduceOnePassHessians) {
  using P = LlamaModel::LayerPart;
  auto model = LlamaModel::Create(LoadStories(), 2);
  ASSERT_TRUE(model.ok()) << model.status();
  auto tok = CreateTokenizer((*model)->loaded().vocab);
  ASSERT_TRUE(tok.ok());
  // ctx 300 > kMaxBatch: chunks run in two sub-batches, as in Forward.
  auto one_pass = Calibrate(**model, **tok, CalibText(), /*n_tokens=*/1000, /*ctx=*/300);
  ASSERT_TRUE(one_pass.ok()) << one_pass.status();
  auto chunks = CalibrationChunks(**tok, CalibText(), 1000, 300, (*model)->config().max_seq_len);
  ASSERT_TRUE(chunks.ok());
  auto states = LayerStates::Create(**model, *chunks);
  ASSERT_TRUE(states.ok()) << states.status();
  EXPECT_EQ(states->n_tokens(), 1000);
  EXPECT_EQ(states->n_chunks(), 4);
  LlamaModel& m = **model;
  const int n_layers = m.config().n_layers;
  for (int l = 0; l < n_layers; ++l) {
    ASSERT_EQ(states->layer(), l);
    // The stages' parts, with the re-runs BoA does (attention twice).
    const CalibrationStats s_in = Observe(m, *states, P::kAttnNorm, P::kAttention);
    const CalibrationStats s_att = Observe(m, *states, P::kAttention, P::kAttention);
    const CalibrationStats s_ffn = Observe(m, *states, P::kAttnOut, P::kAttnOut);
    // Parts out of order: inputs of attn_norm / attention were overwritten; ffn_out before ffn.
    EXPECT_EQ(states->Run(m, P::kAttnNorm, nullptr).code(), absl::StatusCode::kFailedPrecondition);
    EXPECT_EQ(states->Run(m, P::kAttention, nullptr).code(), absl::StatusCode::kFailedPrecondition);
    EXPECT_EQ(states->Run(m, P::kFfnOut, nullptr).code(), absl::StatusCode::kFailedPrecondition);
    const CalibrationStats s_mid = Observe(m, *states, P::kFfn, P::kFfn);
    ExpectSameHessian(*one_pass, s_in, l, LinearInput::kAttnIn);
    ExpectSameHessian(*one_pass, s_in, l, LinearInput::kAttnOut);
    ExpectSameHessian(*one_pass, s_att, l, LinearInput::kAttnOut);
    ExpectSameHessian(*one_pass, s_ffn, l, LinearInput::kFfnIn);
    ExpectSameHessian(*one_pass, s_mid, l, LinearInput::kFfnMid);
    EXPECT_EQ(s_att.Get(l, LinearInput::kAttnIn), nullptr);  // only what the parts run observe
    EXPECT_EQ(s_in.Get(l + 1, LinearInput::kAttnIn), nullptr);
    ASSERT_TRUE(states->FinishLayer(m).ok());
  }
  EXPECT_EQ(states->Run(m, P::kAttnNorm, nullptr).code(), absl::StatusCode::kOutOfRange);  // past the last layer
}

TEST(SequentialTest, RejectsMethodsWithoutHessianQuantizer) {
  LoadedModel m = LoadStories();
  QuantizeConfig cfg;
  cfg.method = "rtn";
  cfg.sequential = true;
  cfg.calib_path = CalibText();
  auto f = fmt::Format::Parse("int4_g32");
  ASSERT_TRUE(f.has_value());
  cfg.format = *f;
  EXPECT_FALSE(QuantizeModel(&m, cfg).ok());
}

// Mean next-token NLL of `m` over held-out TinyStories (the file's tail; the
// calibration reads its head).
double HeldOutNll(LoadedModel m) {
  std::ifstream in(CalibText(), std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  const std::string all = ss.str();
  const std::string tail = all.substr(all.size() - std::min<size_t>(all.size(), 60000));
  const std::string path = ::nibble::testing::WriteTempFile("heldout.txt", tail.substr(tail.find("<|endoftext|>")));
  auto model = LlamaModel::Create(std::move(m), 2);
  EXPECT_TRUE(model.ok());
  auto tok = CreateTokenizer((*model)->loaded().vocab);
  EXPECT_TRUE(tok.ok());
  auto chunks = CalibrationChunks(**tok, path, 2048, 256, (*model)->config().max_seq_len);
  EXPECT_TRUE(chunks.ok());
  const int v = (*model)->config().vocab_size;
  double nll = 0;
  int64_t n = 0;
  for (const auto& ch : *chunks) {
    auto cache = (*model)->NewKVCache(static_cast<int>(ch.size()));
    std::vector<float> logits(ch.size() * v);
    EXPECT_TRUE((*model)->Forward(ch, 0, cache.get(), logits, /*all_logits=*/true).ok());
    for (size_t t = 0; t + 1 < ch.size(); ++t) {
      const float* row = &logits[t * v];
      double mx = row[0], s = 0;
      for (int i = 1; i < v; ++i) mx = std::max<double>(mx, row[i]);
      for (int i = 0; i < v; ++i) s += std::exp(row[i] - mx);
      nll += mx + std::log(s) - row[ch[t + 1]];
      ++n;
    }
  }
  return nll / static_cast<double>(n);
}

struct Quantized {
  LoadedModel model;
  QuantizeReport report;
};

// GPTQ int2_g64 (or `format`) of stories260K, the embedding kept in fp32
// unless `embed`, quantized by `embed_method`.
Quantized Quantize(bool sequential, int threads, const char* embed = nullptr, const char* method = "gptq",
                   const char* format = "int2_g64", const char* embed_method = "rtn") {
  Quantized out{LoadStories(), {}};
  QuantizeConfig cfg;
  cfg.method = method;
  cfg.embed_method = embed_method;
  auto f = fmt::Format::Parse(format);
  EXPECT_TRUE(f.has_value());
  cfg.format = *f;
  cfg.embed_format = embed != nullptr ? fmt::Format::Parse(embed) : std::nullopt;
  if (embed != nullptr) EXPECT_TRUE(cfg.embed_format.has_value());
  cfg.calib_path = CalibText();
  cfg.calib_tokens = 2048;
  cfg.n_threads = threads;
  cfg.sequential = sequential;
  auto r = QuantizeModel(&out.model, cfg);
  EXPECT_TRUE(r.ok()) << r.status();
  if (r.ok()) out.report = *std::move(r);
  return out;
}

std::vector<float> Decoded(const HostTensor& t) {
  EXPECT_NE(t.quant, nullptr);
  auto d = DequantizeWithSidecar(*t.quant);
  EXPECT_TRUE(d.ok());
  return d.ok() ? *std::move(d) : std::vector<float>{};
}

TEST(SequentialTest, Int2BeatsOnePassAndIsDeterministic) {
  Quantized one = Quantize(false, 2);
  Quantized seq = Quantize(true, 2);
  Quantized seq1 = Quantize(true, 1);
  ASSERT_EQ(seq.report.tensors.size(), one.report.tensors.size());
  EXPECT_EQ(seq.report.calib_tokens, 2048);
  EXPECT_EQ(seq.model.metadata["quant.sequential"], "true_sequential");
  EXPECT_EQ(one.model.metadata.count("quant.sequential"), 0u);
  const LayerWeights& a0 = one.model.weights.layers[0];
  const LayerWeights& s0 = seq.model.weights.layers[0];
  // Layer 0's q/k/v see the same (unquantized) inputs either way; wo does not.
  EXPECT_EQ(Decoded(a0.wq), Decoded(s0.wq));
  EXPECT_EQ(Decoded(a0.wv), Decoded(s0.wv));
  EXPECT_NE(Decoded(a0.wo), Decoded(s0.wo));
  // Independent of the thread count.
  for (size_t l = 0; l < seq.model.weights.layers.size(); ++l)
    for (LinearWeight w : kAllLinearWeights)
      ASSERT_EQ(Decoded(WeightOf(seq.model.weights.layers[l], w)), Decoded(WeightOf(seq1.model.weights.layers[l], w)))
          << "layer " << l << " " << LinearWeightName(w);
  const double nll_fp = HeldOutNll(LoadStories());
  const double nll_one = HeldOutNll(std::move(one.model));
  const double nll_seq = HeldOutNll(std::move(seq.model));
  std::printf("held-out NLL: fp %.4f (ppl %.2f), one-pass gptq int2_g64 %.4f (ppl %.2f), sequential %.4f (ppl %.2f)\n",
              nll_fp, std::exp(nll_fp), nll_one, std::exp(nll_one), nll_seq, std::exp(nll_seq));
  EXPECT_LT(nll_seq, nll_one);
  EXPECT_GT(nll_seq, nll_fp);
}

// --embed-method gptq: the tied embedding / output head quantized by GPTQ
// with the Hessian of the head's input. At int3 it lowers held-out NLL below
// RTN's, one-shot and sequential (where the head Hessian comes from a pass of
// its own), and the report names the method; bad settings are refused.
TEST(SequentialTest, HeadGptqEmbeddingBeatsRtnEmbedding) {
  for (bool sequential : {false, true}) {
    Quantized rtn = Quantize(sequential, 2, "int3_g64", "gptq", "int8_g32", "rtn");
    Quantized hg = Quantize(sequential, 2, "int3_g64", "gptq", "int8_g32", "gptq");
    ASSERT_FALSE(hg.report.tensors.empty());
    const TensorReport* embed = nullptr;
    for (const TensorReport& t : hg.report.tensors)
      if (t.name == "token_embd") embed = &t;
    ASSERT_NE(embed, nullptr);
    EXPECT_EQ(embed->method, "gptq");
    EXPECT_EQ(hg.model.metadata["quant.embed_method"], "gptq(percdamp 0.1)");
    // Same linear layers' formats; only the embedding's quantizer differs.
    EXPECT_EQ(hg.report.bpw_all, rtn.report.bpw_all);
    const double nll_rtn = HeldOutNll(std::move(rtn.model));
    const double nll_hg = HeldOutNll(std::move(hg.model));
    std::printf("sequential=%d held-out NLL, int3_g64 embedding: rtn %.4f, head-gptq %.4f\n", sequential, nll_rtn,
                nll_hg);
    EXPECT_LT(nll_hg, nll_rtn);
  }
  LoadedModel m = LoadStories();
  QuantizeConfig cfg;
  cfg.method = "gptq";
  cfg.format = *fmt::Format::Parse("int4_g32");
  cfg.embed_method = "gptq";  // no calibration text
  EXPECT_EQ(QuantizeModel(&m, cfg).status().code(), absl::StatusCode::kInvalidArgument);
  cfg.calib_path = CalibText();
  cfg.embed_method = "hessian";
  EXPECT_EQ(QuantizeModel(&m, cfg).status().code(), absl::StatusCode::kInvalidArgument);
}

// The embedding is quantized first: layer 0's q/k/v are calibrated on the
// int4 embedding's rows, not the fp32 ones.
TEST(SequentialTest, QuantizedEmbeddingFeedsLayerZero) {
  Quantized fp_embed = Quantize(true, 2);
  Quantized q_embed = Quantize(true, 2, "int4_g32");
  ASSERT_NE(q_embed.model.weights.tok_embeddings.quant, nullptr);
  EXPECT_EQ(q_embed.report.tensors.front().name, "token_embd");
  EXPECT_NE(Decoded(fp_embed.model.weights.layers[0].wq), Decoded(q_embed.model.weights.layers[0].wq));
}

// BoA: the q/k/v stage collects the attention statistics of the unquantized
// q/k/v (attention run twice per layer); layer 0 then matches one-pass BoA
// exactly, and the rest is calibrated through the quantized layers.
TEST(SequentialTest, BoaLayerZeroMatchesOnePassAndRestDiffers) {
  Quantized one = Quantize(false, 2, nullptr, "boa");
  Quantized seq = Quantize(true, 2, nullptr, "boa");
  EXPECT_EQ(seq.model.metadata["quant.sequential"], "true_sequential");
  int boa_tensors = 0;
  for (const TensorReport& t : seq.report.tensors) boa_tensors += t.method == "boa";
  EXPECT_EQ(boa_tensors, 3 * static_cast<int>(seq.model.weights.layers.size()));  // every wq/wk/wv
  const LayerWeights& a0 = one.model.weights.layers[0];
  const LayerWeights& s0 = seq.model.weights.layers[0];
  EXPECT_EQ(Decoded(a0.wq), Decoded(s0.wq));
  EXPECT_EQ(Decoded(a0.wk), Decoded(s0.wk));
  EXPECT_EQ(Decoded(a0.wv), Decoded(s0.wv));
  EXPECT_NE(Decoded(a0.wo), Decoded(s0.wo));
  EXPECT_NE(Decoded(one.model.weights.layers[1].wq), Decoded(seq.model.weights.layers[1].wq));
  const double nll_one = HeldOutNll(std::move(one.model));
  const double nll_seq = HeldOutNll(std::move(seq.model));
  std::printf("held-out NLL: one-pass boa int2_g64 %.4f (ppl %.2f), sequential boa %.4f (ppl %.2f)\n", nll_one,
              std::exp(nll_one), nll_seq, std::exp(nll_seq));
  EXPECT_LT(nll_seq, nll_one);
}

}  // namespace
}  // namespace nibble
