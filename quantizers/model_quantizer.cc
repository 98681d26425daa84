#include "quantizers/model_quantizer.h"

#include <chrono>
#include <cmath>
#include <map>
#include <memory>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "engine/core/quant_tensor.h"
#include "engine/model/llama_model.h"
#include "engine/tokenizer/tokenizer.h"
#include "engine/util/log.h"
#include "kernels/common/fp16.h"
#include "quantizers/alloc_cache.h"
#include "quantizers/boa.h"
#include "quantizers/calibration.h"
#include "quantizers/quant_error.h"
#include "quantizers/rotation.h"
#include "quantizers/rtn.h"
#include "quantizers/sequential.h"
#include "quantizers/sensitivity.h"

namespace nibble {
namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point since) { return std::chrono::duration<double>(Clock::now() - since).count(); }

struct Job {
  HostTensor* tensor;
  std::string name;
  fmt::Format format;
  const Hessian* hessian;  // null: no calibration statistics for this tensor
  bool linear;
  const std::vector<AllocBlock>* plan = nullptr;  // bit allocation: per-row-block formats
  int layer = -1;                                  // linear layers: block index and weight (BoA)
  LinearWeight weight = LinearWeight::kWq;
  const BoaLayerStats* boa = nullptr;  // sequential BoA: this layer's attention statistics
  bool head = false;                   // the output head (tied embedding or output matrix)
};

// Storage bits of a [rows, cols] tensor in format f (nullopt: fp32).
double StorageBits(const HostTensor& t, const std::optional<fmt::Format>& f, int vector_bits = 32) {
  if (t.shape.size() == 1) return vector_bits * static_cast<double>(t.numel());
  if (!f || t.shape.size() != 2) return 32.0 * static_cast<double>(t.numel());
  return 8.0 * static_cast<double>(t.rows()) * static_cast<double>(f->RowBytes(t.cols()));
}

}  // namespace

void AccountBits(const LoadedModel& m, QuantizeReport* report, int vector_bits) {
  double bits_all = 0, bits_linear = 0;
  report->params_all = report->params_linear = 0;
  auto account = [&](const HostTensor& t, bool linear) {
    const double n = static_cast<double>(t.numel());
    const double bits = t.quant ? t.quant->BitsPerWeight() * n : (t.shape.size() == 1 ? vector_bits : 32.0) * n;
    report->params_all += t.numel();
    bits_all += bits;
    if (linear) {
      report->params_linear += t.numel();
      bits_linear += bits;
    }
  };
  account(m.weights.tok_embeddings, false);
  account(m.weights.final_norm, false);
  if (!m.config.tied_embeddings) account(m.weights.output, false);
  for (const LayerWeights& l : m.weights.layers) {
    account(l.attn_norm, false);
    account(l.ffn_norm, false);
    for (LinearWeight w : kAllLinearWeights) account(WeightOf(l, w), true);
  }
  report->bpw_all = bits_all / static_cast<double>(report->params_all);
  report->bpw_linear = bits_linear / static_cast<double>(report->params_linear);
}

absl::StatusOr<QuantizeReport> QuantizeModel(LoadedModel* m, const QuantizeConfig& cfg_in,
                                             const QuantizeProgress& progress) {
  const auto t0 = Clock::now();
  QuantizeConfig cfg = cfg_in;
  if (cfg.embed_method == "auto") cfg.embed_method = cfg.method == "gptq" || cfg.method == "boa" ? "gptq" : "rtn";
  if (cfg.method == "dfmpc") {
    if (cfg.rotate) return absl::InvalidArgumentError("--rotate is not supported with method dfmpc");
    if (cfg.embed_method == "gptq")
      return absl::InvalidArgumentError("--embed-method gptq is not supported with method dfmpc");
    if (!cfg.tensor_formats.empty())
      return absl::InvalidArgumentError("per-tensor formats are not supported with method dfmpc");
    if (cfg.norms_f16) return absl::InvalidArgumentError("fp16 norms are not supported with method dfmpc");
    return QuantizeModelDfmpc(m, cfg, progress);  // quantizers/dfmpc.h
  }
  if (cfg.norms_f16) {
    // Round first: calibration, probes and estimates then see the stored values.
    auto round16 = [](HostTensor& t) {
      for (float& v : t.data) v = Fp16ToFp32(Fp32ToFp16(v));
    };
    round16(m->weights.final_norm);
    for (LayerWeights& l : m->weights.layers) round16(l.attn_norm), round16(l.ffn_norm);
  }
  if (cfg.method != "rtn" && cfg.method != "gptq" && cfg.method != "boa") {
    return absl::InvalidArgumentError(
        absl::StrCat("unknown quantization method '", cfg.method, "' (supported: rtn, gptq, boa, dfmpc)"));
  }
  const bool boa = cfg.method == "boa";  // BoA: wq/wk/wv attention-aware, the rest GPTQ (quantizers/boa.h)
  if ((cfg.method == "gptq" || boa) && cfg.calib_path.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("method ", cfg.method, " needs calibration text (--calib FILE)"));
  }
  if (cfg.embed_method != "rtn" && cfg.embed_method != "gptq" && cfg.embed_method != "auto")
    return absl::InvalidArgumentError(
        absl::StrCat("unknown embedding/head method '", cfg.embed_method, "' (supported: auto, rtn, gptq)"));
  if (cfg.embed_method == "gptq" && cfg.calib_path.empty())
    return absl::InvalidArgumentError("embedding/head method gptq needs calibration text (--calib FILE)");
  if (!(cfg.embed_percdamp > 0.0 && cfg.embed_percdamp <= 1e6))
    return absl::InvalidArgumentError(absl::StrCat("embedding damping ", cfg.embed_percdamp, " is not in (0, 1e6]"));
  if (!cfg.tensor_formats.empty()) {
    if (cfg.target_bpw != 0.0)
      return absl::InvalidArgumentError("per-tensor formats cannot be combined with bit allocation (--bpw)");
    for (const auto& [pattern, f] : cfg.tensor_formats) {
      bool known = false;
      for (LinearWeight w : kAllLinearWeights) known = known || pattern == LinearWeightName(w);
      for (int l = 0; l < m->config.n_layers && !known; ++l)
        for (LinearWeight w : kAllLinearWeights)
          known = known || pattern == absl::StrCat("blk.", l, ".", LinearWeightName(w));
      if (!known)
        return absl::InvalidArgumentError(absl::StrCat("per-tensor format '", pattern, "=", f.Name(),
                                                       "': no linear matrix is named '", pattern,
                                                       "' (wq, wk, wv, wo, w_gate, w_up, w_down or blk.L.<that>)"));
    }
  }
  if (boa && (cfg.target_bpw != 0.0 || cfg.outlier_fraction > 0.0))
    return absl::InvalidArgumentError("method boa cannot be combined with bit allocation (--bpw) or --outliers");
  if (!(cfg.outlier_fraction >= 0.0 && cfg.outlier_fraction < 1.0))
    return absl::InvalidArgumentError(absl::StrCat("outlier fraction ", cfg.outlier_fraction, " is not in [0, 1)"));
  const bool outliers = cfg.outlier_fraction > 0.0;
  if (outliers && cfg.outlier_type != Sidecar::ValueType::kF16 && cfg.outlier_type != Sidecar::ValueType::kI8)
    return absl::InvalidArgumentError("outlier value type must be f16 or i8");
  if (outliers && cfg.outlier_saliency == Saliency::kHessian && cfg.calib_path.empty())
    return absl::InvalidArgumentError(
        "hessian outlier saliency needs calibration text (--calib FILE), or use magnitude saliency");
  if (cfg.sequential && cfg.method != "gptq" && !boa)
    return absl::InvalidArgumentError(absl::StrCat("sequential calibration needs method gptq or boa, not ", cfg.method));
  const bool allocate = cfg.target_bpw != 0.0;
  if (allocate) {
    if (!(cfg.target_bpw > 0.0 && cfg.target_bpw <= 32.0))
      return absl::InvalidArgumentError(absl::StrCat("target bits per weight ", cfg.target_bpw, " is not in (0, 32]"));
    if (cfg.calib_path.empty())
      return absl::InvalidArgumentError("bit allocation (--bpw) needs calibration text (--calib FILE)");
    if (outliers) return absl::InvalidArgumentError("bit allocation (--bpw) cannot be combined with --outliers");
  }
  if (cfg.rotate) {
    if (auto s = RotateModel(m, RotationOptions{}, cfg.n_threads); !s.ok()) return s;
  }
  QuantizeReport report;
  report.method = cfg.method;
  report.format = allocate ? "mixed" : cfg.format.Name();
  for (const auto& [pattern, f] : cfg.tensor_formats) absl::StrAppend(&report.format, ",", pattern, "=", f.Name());
  report.target_bpw = cfg.target_bpw;

  // Calibration: run the full-precision model over the calibration text once,
  // collecting the Hessian of every linear layer's input.
  std::optional<CalibrationStats> stats;
  std::vector<BoaLayerStats> boa_stats;  // method boa: per layer
  std::unique_ptr<LlamaModel> fp_model;  // the full-precision model (calibration, sensitivity probes)
  std::unique_ptr<Tokenizer> fp_tokenizer;
  if (!cfg.calib_path.empty()) {
    const auto tc = Clock::now();
    auto tok = CreateTokenizer(m->vocab);
    if (!tok.ok()) return tok.status();
    auto model = LlamaModel::Create(*m, cfg.n_threads);
    if (!model.ok()) return model.status();
    fp_model = *std::move(model);
    fp_tokenizer = *std::move(tok);
    CalibrateOptions copts;
    copts.n_tokens = cfg.calib_tokens;
    copts.ctx = cfg.calib_ctx;
    copts.collector.n_threads = cfg.n_threads;
    if (cfg.sequential && !allocate) {
      // Sequential: every layer's statistics are collected below.
    } else if (boa) {
      auto bs = CalibrateBoa(*fp_model, *fp_tokenizer, cfg.calib_path, copts);
      if (!bs.ok()) return bs.status();
      boa_stats = std::move(bs->layers);
      stats = std::move(bs->plain);
    } else {
      auto s = Calibrate(*fp_model, *fp_tokenizer, cfg.calib_path, copts);
      if (!s.ok()) return s.status();
      stats = *std::move(s);
    }
    if (stats) report.calib_tokens = stats->n_tokens;
    report.calib_seconds = Seconds(tc);
  }

  std::vector<Job> jobs;
  for (int l = 0; l < m->config.n_layers; ++l) {
    for (LinearWeight w : kAllLinearWeights) {
      const Hessian* h = stats ? stats->Get(l, w) : nullptr;
      const std::string name = absl::StrCat("blk.", l, ".", LinearWeightName(w));
      fmt::Format f = cfg.format;
      for (const auto& [pattern, tf] : cfg.tensor_formats)
        if (pattern == name || pattern == LinearWeightName(w)) f = tf;
      jobs.push_back({&MutableWeightOf(m->weights.layers[l], w), name, f, h, true});
      jobs.back().layer = l;
      jobs.back().weight = w;
    }
  }
  // The output head's Hessian (embed_method gptq): from the calibration pass
  // above when it ran over the whole model, else from a pass of its own over
  // the same text (sequential calibration quantizes the embedding first).
  const Hessian* head_hessian = nullptr;
  std::optional<CalibrationStats> head_stats;
  if (cfg.embed_method == "gptq") {
    if (stats) head_hessian = stats->Get(m->config.n_layers, LinearInput::kHeadIn);
    if (head_hessian == nullptr) {
      const auto tc = Clock::now();
      CalibrateOptions hopts;
      hopts.n_tokens = cfg.calib_tokens;
      hopts.ctx = cfg.calib_ctx;
      hopts.collector.n_threads = cfg.n_threads;
      hopts.collector.layer_begin = m->config.n_layers;  // only the head's input
      auto hs = Calibrate(*fp_model, *fp_tokenizer, cfg.calib_path, hopts);
      if (!hs.ok()) return hs.status();
      head_stats = *std::move(hs);
      head_hessian = head_stats->Get(m->config.n_layers, LinearInput::kHeadIn);
      report.calib_seconds += Seconds(tc);
    }
    if (head_hessian == nullptr) return absl::InternalError("calibration did not observe the output head's input");
  }
  if (cfg.embed_format) {
    jobs.push_back({&m->weights.tok_embeddings, "token_embd", *cfg.embed_format,
                    m->config.tied_embeddings ? head_hessian : nullptr, false});
    jobs.back().head = m->config.tied_embeddings;
  }
  if (!m->config.tied_embeddings) {
    std::optional<fmt::Format> f = cfg.output_format ? cfg.output_format : cfg.embed_format;
    if (f) {
      jobs.push_back({&m->weights.output, "output", *f, head_hessian, false});
      jobs.back().head = true;
    }
  }

  BitAllocation allocation;
  if (allocate) {
    // Fixed cost: everything that is not a linear layer, in the format it will get.
    std::optional<fmt::Format> out_f = cfg.output_format ? cfg.output_format : cfg.embed_format;
    const bool kld = cfg.alloc.sensitivity == "kld";
    if (!kld && cfg.alloc.sensitivity != "none")
      return absl::InvalidArgumentError(
          absl::StrCat("unknown allocation sensitivity '", cfg.alloc.sensitivity, "' (kld, none)"));
    const bool alloc_embed = kld && !cfg.alloc.embed_candidates.empty();
    if (!cfg.alloc.embed_candidates.empty() && !kld)
      return absl::InvalidArgumentError("allocating the embedding formats needs sensitivity kld");
    double fixed_bits = (alloc_embed ? 0.0 : StorageBits(m->weights.tok_embeddings, cfg.embed_format)) +
                        StorageBits(m->weights.final_norm, std::nullopt, cfg.norms_f16 ? 16 : 32);
    int64_t params = m->weights.tok_embeddings.numel() + m->weights.final_norm.numel();
    if (!m->config.tied_embeddings) {
      if (!alloc_embed) fixed_bits += StorageBits(m->weights.output, out_f);
      params += m->weights.output.numel();
    }
    std::vector<AllocTensor> at;
    for (LayerWeights& l : m->weights.layers) {
      fixed_bits += StorageBits(l.attn_norm, std::nullopt, cfg.norms_f16 ? 16 : 32) +
                    StorageBits(l.ffn_norm, std::nullopt, cfg.norms_f16 ? 16 : 32);
      params += l.attn_norm.numel() + l.ffn_norm.numel();
      for (LinearWeight w : kAllLinearWeights) params += WeightOf(l, w).numel();
    }
    for (const Job& j : jobs)
      if (j.linear) at.push_back({j.name, j.tensor, j.hessian});
    const double budget = cfg.target_bpw * static_cast<double>(params) - fixed_bits;
    if (budget < 0)
      return absl::OutOfRangeError(absl::StrFormat(
          "target %.4f bits per weight is below the fixed cost of embeddings/output/norms alone (%.4f)",
          cfg.target_bpw, fixed_bits / static_cast<double>(params)));
    {
      // Feasibility before any probe or estimate: the cheapest candidate everywhere.
      double min_bits = fixed_bits;
      const std::vector<fmt::Format> cands = cfg.alloc.candidates.empty() ? DefaultAllocFormats()
                                                                          : cfg.alloc.candidates;
      auto cheapest = [](const HostTensor& t, const std::vector<fmt::Format>& fs) {
        double mb = 0;
        for (size_t k = 0; k < fs.size(); ++k) mb = k == 0 ? StorageBits(t, fs[k]) : std::min(mb, StorageBits(t, fs[k]));
        return mb;
      };
      for (const AllocTensor& t : at) min_bits += cheapest(*t.w, cands);
      if (alloc_embed) {
        min_bits += cheapest(m->weights.tok_embeddings, cfg.alloc.embed_candidates);
        if (!m->config.tied_embeddings) min_bits += cheapest(m->weights.output, cfg.alloc.embed_candidates);
      }
      if (min_bits > cfg.target_bpw * static_cast<double>(params))
        return absl::OutOfRangeError(absl::StrFormat(
            "target %.4f bits per weight is infeasible: the smallest allocation of these formats needs %.4f "
            "bits per weight over all %d weights",
            cfg.target_bpw, min_bits / static_cast<double>(params), params));
    }
    // The expensive half (sensitivity probes, per-candidate estimates) comes
    // from the cache when one matches; the knapsack is solved per budget.
    AllocCacheEntry entry;
    bool cached = false;
    if (!cfg.alloc.cache_path.empty()) {
      std::string settings = absl::StrCat(
          "method=", cfg.method, ";estimate=", cfg.alloc.estimate, ";block_rows=", cfg.alloc.block_rows,
          ";sensitivity=", cfg.alloc.sensitivity, ";probe=", cfg.alloc.probe_format.Name(), "/",
          cfg.alloc.probe_tokens, "/", cfg.alloc.probe_ctx, ";calib_tokens=", cfg.calib_tokens,
          ";calib_ctx=", cfg.calib_ctx, ";percdamp=", cfg.gptq.percdamp, ";act_order=", cfg.gptq.act_order, ";refit=", cfg.gptq.refit_scales,
          ";embed_format=", cfg.embed_format ? cfg.embed_format->Name() : "f32", ";candidates=");
      // Only a non-default embedding method enters the key, so caches written
      // before it existed still match RTN runs.
      if (cfg.embed_method != "rtn")
        absl::StrAppend(&settings, ";embed_method=", cfg.embed_method, "/", cfg.embed_percdamp);
      if (cfg.norms_f16) absl::StrAppend(&settings, ";norms=f16");
      if (cfg.gptq.cd_passes > 0) absl::StrAppend(&settings, ";cd=", cfg.gptq.cd_passes, "/", cfg.gptq.cd_percdamp);
      for (const fmt::Format& f : cfg.alloc.candidates.empty() ? DefaultAllocFormats() : cfg.alloc.candidates)
        absl::StrAppend(&settings, f.Name(), ",");
      absl::StrAppend(&settings, ";embed_candidates=");
      for (const fmt::Format& f : cfg.alloc.embed_candidates) absl::StrAppend(&settings, f.Name(), ",");
      entry.key = AllocCacheKey(*m, cfg.calib_path, settings);
      auto c = LoadAllocCache(cfg.alloc.cache_path, entry.key);
      if (c.ok()) {
        entry = *std::move(c);
        cached = true;
        report.alloc_cache_hit = true;
      } else if (c.status().code() != absl::StatusCode::kNotFound) {
        NIBBLE_LOG(WARNING) << c.status().message() << " (recomputing)";
      }
    }
    if (!cached) {
      std::vector<double> weights(at.size(), 1.0);
      if (kld) {
        // End-to-end sensitivity probes on the full-precision model, unless
        // the sensitivity cache (no candidate lists in its key) has them.
        const auto ts = Clock::now();
        SensitivityCacheEntry sc;
        bool have_sc = false;
        std::string sens_path;
        if (!cfg.alloc.cache_path.empty()) {
          sens_path = cfg.alloc.cache_path + ".sens.json";
          sc.key = AllocCacheKey(
              *m, cfg.calib_path,
              absl::StrCat("sensitivity;probe=", cfg.alloc.probe_format.Name(), "/", cfg.alloc.probe_tokens, "/",
                           cfg.alloc.probe_ctx, ";calib_tokens=", cfg.calib_tokens, ";calib_ctx=", cfg.calib_ctx,
                           ";embed_method=", cfg.embed_method, "/", cfg.embed_percdamp, ";act_order=",
                           cfg.gptq.act_order, ";refit=", cfg.gptq.refit_scales, ";norms=", cfg.norms_f16 ? "f16" : "f32",
                           ";matrices=", at.size(),
                           cfg.gptq.cd_passes > 0
                               ? absl::StrCat(";cd=", cfg.gptq.cd_passes, "/", cfg.gptq.cd_percdamp)
                               : std::string()));
          auto c = LoadSensitivityCache(sens_path, sc.key);
          if (c.ok() && c->weights.size() == at.size()) {
            sc = *std::move(c);
            have_sc = true;
          } else if (!c.ok() && c.status().code() != absl::StatusCode::kNotFound) {
            NIBBLE_LOG(WARNING) << c.status().message() << " (recomputing)";
          }
        }
        std::unique_ptr<KldProbe> probe_holder;
        auto get_probe = [&]() -> absl::StatusOr<KldProbe*> {
          if (!probe_holder) {
            auto chunks = CalibrationChunks(*fp_tokenizer, cfg.calib_path, cfg.alloc.probe_tokens,
                                            cfg.alloc.probe_ctx, fp_model->config().max_seq_len);
            if (!chunks.ok()) return chunks.status();
            auto probe = KldProbe::Create(fp_model.get(), *std::move(chunks));
            if (!probe.ok()) return probe.status();
            probe_holder = *std::move(probe);
          }
          return probe_holder.get();
        };
        ProbeProgress pp;
        if (progress) pp = [&](int d, int t, const std::string& what) { progress(d, t, absl::StrCat("probe ", what)); };
        if (have_sc) {
          weights = sc.weights;
        } else {
          auto probe = get_probe();
          if (!probe.ok()) return probe.status();
          auto sens = LinearSensitivities(**probe, *fp_model, *stats, cfg.alloc.probe_format, cfg.n_threads, pp);
          if (!sens.ok()) return sens.status();
          size_t p = 0;
          for (int l = 0; l < m->config.n_layers; ++l)
            for (size_t k = 0; k < kAllLinearWeights.size(); ++k) weights[p++] = (*sens)[l][k];
          sc.weights = weights;
          sc.extras.clear();
        }
        if (alloc_embed) {
          // The head (tied embedding or output matrix) is priced as it will be
          // quantized: by GPTQ with the head Hessian under embed_method gptq.
          std::optional<GptqFactor> head_factor;
          GptqOptions head_gptq = cfg.gptq;
          head_gptq.percdamp = cfg.embed_percdamp;
          if (head_hessian != nullptr) {
            auto f = FactorHessian(*head_hessian, head_gptq);
            if (!f.ok()) return absl::Status(f.status().code(), absl::StrCat("output head: ", f.status().message()));
            head_factor = *std::move(f);
          }
          for (bool output : {false, true}) {
            if (output && m->config.tied_embeddings) continue;
            const bool is_head = output || m->config.tied_embeddings;
            const std::string name = output ? "output" : "token_embd";
            // Costs measured before (sensitivity cache), then the missing formats.
            AllocExtra* known = nullptr;
            for (AllocExtra& x : sc.extras)
              if (x.name == name) known = &x;
            if (known == nullptr) known = &sc.extras.emplace_back(AllocExtra{name, {}, {}});
            std::vector<fmt::Format> missing;
            for (const fmt::Format& f : cfg.alloc.embed_candidates)
              if (std::find(known->formats.begin(), known->formats.end(), f) == known->formats.end())
                missing.push_back(f);
            if (!missing.empty()) {
              auto probe = get_probe();
              if (!probe.ok()) return probe.status();
              auto costs = EmbeddingCosts(**probe, *fp_model, missing, output, cfg.n_threads, pp,
                                          is_head && head_factor ? &*head_factor : nullptr, head_gptq);
              if (!costs.ok()) return costs.status();
              known->formats.insert(known->formats.end(), missing.begin(), missing.end());
              known->costs.insert(known->costs.end(), costs->begin(), costs->end());
            }
            AllocExtra chosen{name, cfg.alloc.embed_candidates, {}};
            for (const fmt::Format& f : cfg.alloc.embed_candidates)
              chosen.costs.push_back(
                  known->costs[std::find(known->formats.begin(), known->formats.end(), f) - known->formats.begin()]);
            entry.extras.push_back(std::move(chosen));
          }
        }
        if (!sens_path.empty()) {
          if (auto st = SaveSensitivityCache(sens_path, sc); !st.ok())
            NIBBLE_LOG(WARNING) << st.message() << " (continuing without a sensitivity cache)";
        }
        report.sensitivity_seconds = Seconds(ts);
      }
      auto est = EstimateAllocation(at, cfg.alloc, cfg.method, cfg.gptq, cfg.n_threads);
      if (!est.ok()) return est.status();
      entry.estimates = *std::move(est);
      entry.weights = std::move(weights);
      if (!cfg.alloc.cache_path.empty()) {
        if (auto s = SaveAllocCache(cfg.alloc.cache_path, entry); !s.ok())
          NIBBLE_LOG(WARNING) << s.message() << " (continuing without a cache)";
      }
    }
    if (entry.estimates.names.size() != at.size())
      return absl::InternalError("bit allocation: cached estimates do not match the model's matrices");
    const std::vector<AllocExtra>& extras = entry.extras;
    auto a = SolveAllocation(entry.estimates, entry.weights, budget, extras);
    if (!a.ok()) return a.status();
    allocation = *std::move(a);
    for (size_t e = 0; e < extras.size(); ++e) {
      const fmt::Format chosen = extras[e].formats[allocation.extra_choice[e]];
      const bool output = extras[e].name == "output";
      bool found = false;
      for (Job& j : jobs) {
        if (j.tensor == (output ? &m->weights.output : &m->weights.tok_embeddings)) {
          j.format = chosen;
          found = true;
        }
      }
      if (!found) jobs.push_back({output ? &m->weights.output : &m->weights.tok_embeddings, extras[e].name, chosen,
                                  nullptr, false});
      absl::StrAppend(&report.alloc_embed, report.alloc_embed.empty() ? "" : ",", extras[e].name, ":", chosen.Name());
    }
    size_t p = 0;
    for (Job& j : jobs)
      if (j.linear) j.plan = &allocation.plans[p++];
    std::map<std::string, int> mix;
    for (const auto& plan : allocation.plans)
      for (const AllocBlock& b : plan) ++mix[b.format.Name()];
    for (const auto& [name, n] : mix) absl::StrAppend(&report.alloc_mix, report.alloc_mix.empty() ? "" : ",", name, ":", n);
    report.alloc_budget_bits = budget;
    report.alloc_est_error = allocation.est_error_total;
    report.alloc_gap_bound = allocation.solution.gap_bound;
  }

  std::unique_ptr<GptqFactor> factor;  // reused by matrices that share an input (q/k/v, gate/up)
  const Hessian* factored = nullptr;
  // Quantizes one job in place (its fp32 data replaced by a QuantTensor).
  auto quantize_job = [&](Job& j) -> absl::Status {
    const auto tt = Clock::now();
    HostTensor& w = *j.tensor;
    absl::StatusOr<QuantTensor> q;
    const bool use_gptq = (cfg.method == "gptq" || boa || j.head) && j.hessian != nullptr;
    GptqOptions job_gptq = cfg.gptq;
    if (j.head) job_gptq.percdamp = cfg.embed_percdamp;
    if (use_gptq && factored != j.hessian) {
      auto f = FactorHessian(*j.hessian, job_gptq);
      if (!f.ok()) return absl::Status(f.status().code(), absl::StrCat(j.name, ": ", f.status().message()));
      factor = std::make_unique<GptqFactor>(*std::move(f));
      factored = j.hessian;
    }
    if (j.plan != nullptr) {
      std::span<const float> importance;
      if (j.hessian != nullptr) importance = j.hessian->mean_sq;
      q = QuantizeBlocks(w, *j.plan, use_gptq ? factor.get() : nullptr, importance, cfg.gptq, cfg.n_threads);
    } else if (outliers && j.linear) {
      OutlierOptions oo;
      oo.fraction = cfg.outlier_fraction;
      oo.saliency = cfg.outlier_saliency;
      oo.type = cfg.outlier_type;
      oo.method = use_gptq ? "gptq" : "rtn";
      oo.gptq = cfg.gptq;
      oo.n_threads = cfg.n_threads;
      q = QuantizeWithOutliers(w, j.hessian, use_gptq ? factor.get() : nullptr, j.format, oo);
    } else if (use_gptq && boa && j.linear && BoaHandles(j.weight) &&
               (j.boa != nullptr || (j.layer >= 0 && j.layer < static_cast<int>(boa_stats.size())))) {
      GptqOptions go = cfg.gptq;
      go.n_threads = cfg.n_threads;
      q = BoaQuantizeAttention(w, j.weight, j.boa != nullptr ? *j.boa : boa_stats[j.layer], *factor, j.format, go);
    } else if (use_gptq) {
      GptqOptions go = job_gptq;
      go.n_threads = cfg.n_threads;
      q = GptqQuantize(w, *factor, j.format, go);
    } else {
      RtnOptions ro;
      ro.n_threads = cfg.n_threads;
      std::span<const float> importance;
      if (j.hessian != nullptr) importance = j.hessian->mean_sq;
      q = RtnQuantize(w, importance, j.format, ro);
    }
    if (!q.ok()) return absl::Status(q.status().code(), absl::StrCat(j.name, ": ", q.status().message()));
    TensorReport tr;
    tr.name = j.name;
    tr.format = j.plan != nullptr ? FormatMix(*j.plan) : j.format.Name();
    tr.method = !use_gptq ? "rtn" : (boa && j.linear && BoaHandles(j.weight) && j.layer >= 0) ? "boa" : "gptq";
    tr.rows = w.rows();
    tr.cols = w.cols();
    tr.bpw = q->BitsPerWeight();
    auto decoded = DequantizeWithSidecar(*q);  // side-car applied
    if (!decoded.ok())
      return absl::Status(decoded.status().code(), absl::StrCat(j.name, ": ", decoded.status().message()));
    tr.rel_error = RelativeWeightError(w.data.data(), decoded->data(), w.rows(), w.cols());
    if (j.hessian != nullptr && j.hessian->dim == w.cols() &&
        j.hessian->h.size() == static_cast<size_t>(w.cols() * w.cols()))
      tr.proxy_error = ProxyOutputError(w.data.data(), decoded->data(), w.rows(), w.cols(), *j.hessian);
    w.quant = std::make_shared<const QuantTensor>(*std::move(q));
    w.data.clear();
    w.data.shrink_to_fit();
    tr.seconds = Seconds(tt);
    report.tensors.push_back(tr);
    return absl::OkStatus();
  };
  if (!cfg.sequential) {
    for (size_t i = 0; i < jobs.size(); ++i) {
      if (progress) progress(static_cast<int>(i), static_cast<int>(jobs.size()), jobs[i].name);
      if (auto s = quantize_job(jobs[i]); !s.ok()) return s;
    }
  } else {
    // Sequential (quantizers/sequential.h): the embedding/output first, so
    // layer 0 sees the quantized embedding; then layer by layer, stage by
    // stage, each stage's Hessians observed through the weights quantized so
    // far in the calibration model.
    const int n_layers = m->config.n_layers;
    const size_t per_layer = kAllLinearWeights.size();
    for (size_t i = static_cast<size_t>(n_layers) * per_layer; i < jobs.size(); ++i) {
      if (progress) progress(static_cast<int>(i), static_cast<int>(jobs.size()), jobs[i].name);
      if (auto s = quantize_job(jobs[i]); !s.ok()) return s;
      if (jobs[i].tensor == &m->weights.tok_embeddings)
        fp_model->mutable_loaded().weights.tok_embeddings = m->weights.tok_embeddings;
    }
    const auto tc = Clock::now();
    auto chunks = CalibrationChunks(*fp_tokenizer, cfg.calib_path, cfg.calib_tokens, cfg.calib_ctx,
                                    fp_model->config().max_seq_len);
    if (!chunks.ok()) return chunks.status();
    double quant_seconds = 0;
    SequentialOptions so;
    so.n_threads = cfg.n_threads;
    so.boa = boa;
    const std::vector<SequentialStage> stages = SequentialStages(boa);
    auto quantize_one = [&](int l, LinearWeight w, const Hessian& h,
                            const BoaLayerStats* bs) -> absl::StatusOr<HostTensor> {
      const auto tq = Clock::now();
      const size_t i = static_cast<size_t>(l) * per_layer + static_cast<size_t>(w);
      Job& j = jobs[i];
      if (progress) progress(static_cast<int>(i), static_cast<int>(jobs.size()), j.name);
      // The weights of a stage share one Hessian (one factorization); a new
      // stage's Hessian may reuse a freed one's address, so reset by stage.
      for (const SequentialStage& st : stages)
        if (st.weights.front() == w) factored = nullptr;
      j.hessian = &h;
      j.boa = bs;
      absl::Status s = quantize_job(j);
      j.hessian = nullptr;  // both die with the stage
      j.boa = nullptr;
      quant_seconds += Seconds(tq);
      if (!s.ok()) return s;
      return *j.tensor;
    };
    auto run = QuantizeSequentially(*fp_model, *chunks, so, quantize_one);
    if (!run.ok()) return run.status();
    factored = nullptr;
    factor.reset();
    report.calib_tokens = run->n_tokens;
    report.calib_seconds += Seconds(tc) - quant_seconds;
  }
  if (progress) progress(static_cast<int>(jobs.size()), static_cast<int>(jobs.size()), "");

  AccountBits(*m, &report, cfg.norms_f16 ? 16 : 32);
  report.seconds = Seconds(t0);

  m->metadata["quant.method"] = cfg.method;
  m->metadata["quant.format"] = report.format;
  if (allocate) {
    m->metadata["quant.target_bpw"] = absl::StrCat(cfg.target_bpw);
    m->metadata["quant.alloc.block_rows"] = absl::StrCat(cfg.alloc.block_rows);
    std::string names;
    for (const fmt::Format& f : cfg.alloc.candidates.empty() ? DefaultAllocFormats() : cfg.alloc.candidates)
      absl::StrAppend(&names, names.empty() ? "" : ",", f.Name());
    m->metadata["quant.alloc.formats"] = names;
    m->metadata["quant.alloc.estimate"] = cfg.alloc.estimate.empty() ? cfg.method : cfg.alloc.estimate;
    m->metadata["quant.alloc.mix"] = report.alloc_mix;
    m->metadata["quant.alloc.sensitivity"] =
        cfg.alloc.sensitivity == "kld" ? absl::StrCat("kld(probe ", cfg.alloc.probe_format.Name(), ", ",
                                                      cfg.alloc.probe_tokens, " tokens)")
                                       : cfg.alloc.sensitivity;
    if (!report.alloc_embed.empty()) m->metadata["quant.alloc.embed"] = report.alloc_embed;
  }
  m->metadata["quant.embed_format"] = cfg.embed_format ? cfg.embed_format->Name() : "f32";
  m->metadata["quant.embed_method"] =
      cfg.embed_method == "gptq" ? absl::StrFormat("gptq(percdamp %g)", cfg.embed_percdamp) : "rtn";
  m->metadata["quant.bpw_all"] = absl::StrFormat("%.4f", report.bpw_all);
  m->metadata["quant.bpw_linear"] = absl::StrFormat("%.4f", report.bpw_linear);
  m->metadata["quant.norms"] = cfg.norms_f16 ? "f16" : "f32";
  if (!cfg.calib_path.empty()) {
    m->metadata["quant.calib_file"] = cfg.calib_path;
    m->metadata["quant.calib_tokens"] = absl::StrCat(report.calib_tokens);
    m->metadata["quant.calib_ctx"] = absl::StrCat(cfg.calib_ctx);
  }
  if (outliers) {
    m->metadata["quant.outliers"] = absl::StrCat(cfg.outlier_fraction);
    m->metadata["quant.outlier_type"] = SidecarTypeName(cfg.outlier_type);
    m->metadata["quant.outlier_saliency"] = SaliencyName(cfg.outlier_saliency);
  }
  if (cfg.sequential) m->metadata["quant.sequential"] = "true_sequential";
  if (cfg.method == "gptq" || boa) {
    m->metadata["quant.gptq.percdamp"] = absl::StrCat(cfg.gptq.percdamp);
    m->metadata["quant.gptq.act_order"] = cfg.gptq.act_order ? "true" : "false";
    m->metadata["quant.gptq.refit_scales"] = cfg.gptq.refit_scales ? "true" : "false";
    m->metadata["quant.gptq.cd_passes"] = absl::StrCat(cfg.gptq.cd_passes);
    if (cfg.gptq.cd_passes > 0) m->metadata["quant.gptq.cd_percdamp"] = absl::StrCat(cfg.gptq.cd_percdamp);
    m->metadata["quant.gptq.block_size"] = absl::StrCat(cfg.gptq.block_size);
  }
  return report;
}

}  // namespace nibble
