// nibble-quantize: compress a checkpoint (GGUF, HF safetensors, llama2.c) into
// a nibble model file with one of the registry's formats.
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <string>

#include "CLI/CLI.hpp"
#include "absl/strings/str_cat.h"
#include "engine/io/nibble_file.h"
#include "engine/model/model_loader.h"
#include "kernels/formats/format.h"
#include "nlohmann/json.hpp"
#include "quantizers/model_quantizer.h"

namespace {

int Fail(const absl::Status& s) {
  fprintf(stderr, "error: %s\n", std::string(s.message()).c_str());
  return 1;
}

void ListFormats() {
  printf("%-18s %-8s %5s %6s %5s  %s\n", "name", "kind", "bits", "group", "sym", "bits/weight (cols % group == 0)");
  for (const nibble::fmt::Format& f : nibble::fmt::AllFormats()) {
    const char* kind = f.kind == nibble::fmt::Kind::kInt       ? "int"
                       : f.kind == nibble::fmt::Kind::kTernary ? "ternary"
                       : f.kind == nibble::fmt::Kind::kBinary  ? "binary"
                       : f.kind == nibble::fmt::Kind::kNl      ? "nl"
                                                               : "bintern";
    printf("%-18s %-8s %5d %6d %5s  %.3f\n", f.Name().c_str(), kind, f.bits, f.group, f.symmetric ? "yes" : "no",
           f.BitsPerWeight(f.group * 16));
  }
  printf("%-18s %-8s %5d %6s %5s  %.3f   (no quantization: every matrix stored as IEEE fp16)\n", "f16", "float", 16,
         "-", "-", 16.0);
}

// A progress bar on a terminal, plain lines otherwise.
class Progress {
 public:
  Progress() : tty_(isatty(STDERR_FILENO)) {}
  void operator()(int done, int total, const std::string& name) {
    if (tty_) {
      const int width = 30, filled = total ? done * width / total : width;
      fprintf(stderr, "\r[%s%s] %d/%d %-28s", std::string(filled, '=').c_str(),
              std::string(width - filled, ' ').c_str(), done, total, name.c_str());
      if (done == total) fputc('\n', stderr);
    } else if (!name.empty()) {
      fprintf(stderr, "quantize: %d/%d %s\n", done + 1, total, name.c_str());
    }
    fflush(stderr);
  }

 private:
  bool tty_;
};

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"nibble-quantize: quantize a model into a nibble file"};
  std::string src, tokenizer_path, out, format_name, embed_name = "int8_g32", method = "rtn", calib, report_path;
  int calib_tokens = 8192, calib_ctx = 256, threads = 0, cd_passes = 4;
  double cd_percdamp = 0.5;
  double percdamp = 0.01, outliers = 0.0;
  std::string outlier_type = "f16", saliency = "auto";
  bool act_order = false, refit_scales = false, list = false;
  std::string norm_format = "f32";
  double target_bpw = 0.0;
  int alloc_block_rows = 64;
  std::string alloc_formats, alloc_estimate;
  std::string alloc_sensitivity = "kld", alloc_probe_format = "int3_g64", alloc_embed_formats = "auto";
  int alloc_probe_tokens = 256;
  std::string alloc_cache;
  std::string dfmpc_high = "int4_g64", dfmpc_rest, dfmpc_weighting = "norm";
  double dfmpc_ridge = 0.0;
  bool dfmpc_no_comp = false;
  app.add_flag("--list-formats", list, "list the weight formats and exit");
  app.add_option("-m,--model", src, "source model (GGUF, llama2.c .bin, HF directory)");
  app.add_option("--tokenizer", tokenizer_path, "tokenizer file (llama2.c tok*.bin or SentencePiece .model)");
  app.add_option("-o,--output", out, "output nibble file");
  app.add_option("--format", format_name, "format of the linear layers (see --list-formats)");
  std::vector<std::string> tensor_format_args;
  app.add_option("--tensor-format", tensor_format_args,
                 "per-tensor format over --format, NAME=FORMAT with NAME a weight (wq wk wv wo w_gate w_up w_down) "
                 "or one matrix (blk.3.w_down); repeatable, the last match wins")
      ->allow_extra_args(false);
  app.add_option("--embed-format", embed_name, "format of token embeddings / output head, or f32")
      ->capture_default_str();
  std::string embed_method = "auto";
  double embed_percdamp = 0.1;
  app.add_option("--embed-method", embed_method,
                 "output head / tied embedding: rtn | gptq (Hessian of the head's input over --calib) | auto (gptq "
                 "with --method gptq or boa, else rtn)")
      ->capture_default_str();
  app.add_option("--embed-damp", embed_percdamp,
                 "--embed-method gptq: damping as a fraction of mean diag(H); larger keeps a tied embedding's "
                 "token rows closer to plain round-to-nearest")
      ->capture_default_str();
  app.add_option("--method", method,
                 "rtn | gptq | boa (BoA: attention-aware wq/wk/wv, needs --calib) | dfmpc (data-free mixed-precision "
                 "compensation: wv/w_up in --format, wo/w_down compensated in --dfmpc-high)")
      ->capture_default_str();
  app.add_option("--calib", calib, "calibration text (gptq; optional for rtn: importance-weighted clipping)");
  bool sequential = false;
  app.add_flag("--sequential", sequential,
               "gptq/boa (also with --bpw): calibrate each layer on the outputs of the already-quantized earlier "
               "layers, sub-block by sub-block (q/k/v, o, gate/up, down); about one extra calibration forward");
  bool rotate = false;
  app.add_flag("--rotate", rotate,
               "rotate the residual stream and value heads into an incoherent basis before quantizing "
               "(QuIP/QuaRot-style; exact in fp32; a tied embedding stays tied, the engine rotates around it)");
  app.add_option("--calib-tokens", calib_tokens, "calibration tokens")->capture_default_str();
  app.add_option("--calib-ctx", calib_ctx, "tokens per calibration chunk")->capture_default_str();
  app.add_option("--percdamp", percdamp, "gptq: damping as a fraction of mean diag(H)")->capture_default_str();
  app.add_flag("--act-order", act_order, "gptq: process columns by descending Hessian diagonal");
  app.add_option("--norm-format", norm_format,
                 "storage of the norm weights: f32 | f16 (rounded to fp16 before calibration, counted at 16 bits)")
      ->capture_default_str()
      ->check(CLI::IsMember({"f32", "f16"}));
  app.add_flag("--refit-scales", refit_scales,
               "gptq: after each row's sweep, refit its group scales (and minima) jointly by least squares on the "
               "output error with the chosen codes fixed (kept where it lowers that error)");
  app.add_option("--cd-passes", cd_passes,
                 "gptq/boa: after each row's sweep, passes of greedy coordinate descent on the chosen codes "
                 "(group parameters fixed), each move kept only where it lowers the output error; 0 = off (plain GPTQ)")
      ->capture_default_str()
      ->check(CLI::Range(0, 100));
  app.add_option("--cd-percdamp", cd_percdamp,
                 "gptq: the coordinate descent's ridge toward the original weights, as a fraction of mean diag(H)")
      ->capture_default_str()
      ->check(CLI::Range(0.0, 10.0));
  app.add_option("--outliers", outliers,
                 "fraction of each linear layer's weights kept in a sparse side-car (e.g. 0.01; 0 = none)")
      ->capture_default_str();
  app.add_option("--outlier-type", outlier_type,
                 "side-car values: f16 (GWQ/SpQR outliers) | i8 (PB-LLM salient weights, with --format binary_gN)")
      ->capture_default_str();
  app.add_option("--saliency", saliency,
                 "outlier selection: hessian (needs --calib) | magnitude | auto (hessian with --calib, else magnitude)")
      ->capture_default_str();
  auto* bpw_opt = app.add_option(
      "--bpw", target_bpw,
      "bit allocation: choose formats per (linear layer, row block) to meet TARGET bits per weight over the whole "
      "model at least estimated loss (needs --calib; instead of --format)");
  app.add_option("--alloc-block-rows", alloc_block_rows, "bit allocation: rows per allocation block")
      ->capture_default_str();
  app.add_option("--alloc-formats", alloc_formats,
                 "bit allocation: candidate formats a,b,c (default: int2/3/4/8 at groups 32, 64, 128, asym and sym, and "
                 "nl4/nl3/nl2 at groups 32, 64, 128)");
  app.add_option("--alloc-estimate", alloc_estimate,
                 "bit allocation: error estimate gptq (exact for --method gptq) | rtn (faster); default: the method");
  app.add_option("--alloc-sensitivity", alloc_sensitivity,
                 "bit allocation: kld (weigh each matrix's Hessian proxy by a KLD probe of the full model) | none")
      ->capture_default_str();
  app.add_option("--alloc-probe-format", alloc_probe_format, "bit allocation: format of the KLD sensitivity probes")
      ->capture_default_str();
  app.add_option("--alloc-probe-tokens", alloc_probe_tokens, "bit allocation: calibration tokens per KLD probe")
      ->capture_default_str();
  app.add_option("--alloc-cache", alloc_cache,
                 "bit allocation: reuse/store the sensitivity probes and error estimates in this file (a sweep over "
                 "budgets then pays them once)");
  app.add_option("--alloc-embed-formats", alloc_embed_formats,
                 "bit allocation: candidate formats of the token embedding/output head, chosen by measured KLD "
                 "(auto: int8_g32,int4_g32,nl4_g32,int4_g64,nl4_g64,int3_g64,nl3_g64,int2_g64,nl2_g64; none: keep --embed-format)")
      ->capture_default_str();
  auto* dfmpc_high_opt = app.add_option("--dfmpc-high", dfmpc_high,
                                        "dfmpc: format of the compensating layers wo and w_down")
                             ->capture_default_str();
  auto* dfmpc_rest_opt = app.add_option("--dfmpc-rest", dfmpc_rest, "dfmpc: format of wq, wk, w_gate (default: --format)");
  auto* dfmpc_ridge_opt = app.add_option("--dfmpc-ridge", dfmpc_ridge,
                                         "dfmpc: relative ridge pulling the compensation toward identity (>= 0)")
                              ->capture_default_str();
  auto* dfmpc_w_opt = app.add_option("--dfmpc-weighting", dfmpc_weighting,
                                     "dfmpc: input-column weights: norm (RMSNorm gain squared) | none | calib "
                                     "(calibration Hessian of the layer input; needs --calib, not data-free)")
                          ->capture_default_str();
  auto* dfmpc_nc_opt = app.add_flag("--dfmpc-no-compensation", dfmpc_no_comp,
                                    "dfmpc: same per-tensor formats, no compensation (equal-bits RTN baseline)");
  app.add_option("-t,--threads", threads, "CPU threads (default: all cores)");
  app.add_option("--report", report_path, "write a JSON report (per-tensor format, bits, error, time)");
  CLI11_PARSE(app, argc, argv);
  if (list) {
    ListFormats();
    return 0;
  }
  const bool allocate = bpw_opt->count() > 0;
  if (src.empty() || out.empty() || (format_name.empty() && !allocate)) {
    fprintf(stderr, "error: -m MODEL, -o OUT and --format NAME (or --bpw TARGET) are required (see --help, "
                    "--list-formats)\n");
    return 2;
  }
  if (allocate && !format_name.empty()) {
    fprintf(stderr, "error: --format and --bpw are mutually exclusive\n");
    return 2;
  }
  nibble::QuantizeConfig cfg;
  if (allocate) {
    if (!(target_bpw > 0.0 && target_bpw <= 32.0))
      return Fail(absl::InvalidArgumentError(absl::StrCat("--bpw: ", target_bpw, " is not in (0, 32]")));
    if (calib.empty()) return Fail(absl::InvalidArgumentError("--bpw needs calibration text (--calib FILE)"));
    if (alloc_block_rows < 1)
      return Fail(absl::InvalidArgumentError(absl::StrCat("--alloc-block-rows: ", alloc_block_rows, " < 1")));
    cfg.target_bpw = target_bpw;
    cfg.alloc.block_rows = alloc_block_rows;
    cfg.alloc.estimate = alloc_estimate;
    if (!alloc_formats.empty()) {
      auto list = nibble::ParseFormatList(alloc_formats);
      if (!list.ok()) return Fail(absl::InvalidArgumentError(absl::StrCat("--alloc-formats: ", list.status().message())));
      cfg.alloc.candidates = *std::move(list);
    }
    cfg.alloc.sensitivity = alloc_sensitivity;
    cfg.alloc.cache_path = alloc_cache;
    auto pf = nibble::fmt::Format::Parse(alloc_probe_format);
    if (!pf)
      return Fail(absl::InvalidArgumentError(absl::StrCat("--alloc-probe-format: unknown format '", alloc_probe_format, "'")));
    cfg.alloc.probe_format = *pf;
    if (alloc_probe_tokens < 2)
      return Fail(absl::InvalidArgumentError(absl::StrCat("--alloc-probe-tokens: ", alloc_probe_tokens, " < 2")));
    cfg.alloc.probe_tokens = alloc_probe_tokens;
    if (alloc_embed_formats != "none" && alloc_sensitivity == "kld") {
      auto list = nibble::ParseFormatList(alloc_embed_formats == "auto" ? "int8_g32,int4_g32,nl4_g32,int4_g64,nl4_g64,int3_g64,nl3_g64,int2_g64,nl2_g64"
                                                                         : alloc_embed_formats);
      if (!list.ok())
        return Fail(absl::InvalidArgumentError(absl::StrCat("--alloc-embed-formats: ", list.status().message())));
      cfg.alloc.embed_candidates = *std::move(list);
    }
  } else if (format_name == "f16") {
    // A 16-bit copy of the model: no quantizer runs, so its options do not apply.
    if (!tensor_format_args.empty() || outliers > 0.0 || !calib.empty() || method != "rtn")
      return Fail(absl::InvalidArgumentError(
          "--format f16 stores every matrix as fp16 without quantizing: --tensor-format, --outliers, --calib and "
          "--method do not apply"));
  } else {
    auto f = nibble::fmt::Format::Parse(format_name);
    if (!f) return Fail(absl::InvalidArgumentError(absl::StrCat("--format: unknown format '", format_name,
                                                                "' (see --list-formats)")));
    cfg.format = *f;
  }
  for (const std::string& a : tensor_format_args) {
    const size_t eq = a.find('=');
    auto f = eq == std::string::npos ? std::nullopt : nibble::fmt::Format::Parse(a.substr(eq + 1));
    if (!f)
      return Fail(absl::InvalidArgumentError(absl::StrCat("--tensor-format '", a,
                                                          "': expected NAME=FORMAT with a known format")));
    cfg.tensor_formats.emplace_back(a.substr(0, eq), *f);
  }
  if (embed_name == "f32") {
    cfg.embed_format.reset();
  } else {
    auto e = nibble::fmt::Format::Parse(embed_name);
    if (!e) return Fail(absl::InvalidArgumentError(absl::StrCat("--embed-format: unknown format '", embed_name, "'")));
    cfg.embed_format = *e;
  }
  cfg.method = method;
  if (method != "dfmpc") {
    for (auto* o : {dfmpc_high_opt, dfmpc_rest_opt, dfmpc_ridge_opt, dfmpc_w_opt, dfmpc_nc_opt})
      if (o->count() > 0)
        return Fail(absl::InvalidArgumentError(absl::StrCat(o->get_name(), " needs --method dfmpc")));
  } else {
    if (allocate) return Fail(absl::InvalidArgumentError("--method dfmpc cannot be combined with --bpw"));
    auto hf = nibble::fmt::Format::Parse(dfmpc_high);
    if (!hf)
      return Fail(absl::InvalidArgumentError(absl::StrCat("--dfmpc-high: unknown format '", dfmpc_high,
                                                          "' (see --list-formats)")));
    cfg.dfmpc.high = *hf;
    if (!dfmpc_rest.empty()) {
      auto rf = nibble::fmt::Format::Parse(dfmpc_rest);
      if (!rf)
        return Fail(absl::InvalidArgumentError(absl::StrCat("--dfmpc-rest: unknown format '", dfmpc_rest,
                                                            "' (see --list-formats)")));
      cfg.dfmpc.rest = *rf;
    }
    if (!(std::isfinite(dfmpc_ridge) && dfmpc_ridge >= 0.0))
      return Fail(absl::InvalidArgumentError(absl::StrCat("--dfmpc-ridge: ", dfmpc_ridge, " is not finite and >= 0")));
    cfg.dfmpc.ridge = dfmpc_ridge;
    if (dfmpc_weighting != "norm" && dfmpc_weighting != "none" && dfmpc_weighting != "calib")
      return Fail(absl::InvalidArgumentError(absl::StrCat("--dfmpc-weighting: '", dfmpc_weighting,
                                                          "' is not norm, none or calib")));
    cfg.dfmpc.norm_weighted = dfmpc_weighting == "norm";
    cfg.dfmpc.calibrated = dfmpc_weighting == "calib";
    cfg.dfmpc.compensate = !dfmpc_no_comp;
    if (cfg.dfmpc.calibrated && calib.empty())
      return Fail(absl::InvalidArgumentError("--dfmpc-weighting calib needs calibration text (--calib FILE)"));
    if (!calib.empty() && !cfg.dfmpc.calibrated)
      fprintf(stderr, "quantize: dfmpc is data-free; --calib is ignored\n");
  }
  cfg.calib_path = calib;
  cfg.calib_tokens = calib_tokens;
  cfg.calib_ctx = calib_ctx;
  if (sequential && method != "gptq" && method != "boa")
    return Fail(absl::InvalidArgumentError(absl::StrCat("--sequential needs --method gptq or boa, not ", method)));
  if (sequential && calib.empty())
    return Fail(absl::InvalidArgumentError("--sequential needs calibration text (--calib FILE)"));
  cfg.sequential = sequential;
  cfg.rotate = rotate;
  cfg.embed_method = embed_method;
  cfg.embed_percdamp = embed_percdamp;
  cfg.gptq.percdamp = percdamp;
  cfg.gptq.act_order = act_order;
  cfg.gptq.refit_scales = refit_scales;
  cfg.gptq.cd_passes = cd_passes;
  cfg.gptq.cd_percdamp = cd_percdamp;
  cfg.norms_f16 = norm_format == "f16";
  cfg.n_threads = threads;
  if (!(outliers >= 0.0 && outliers < 1.0))
    return Fail(absl::InvalidArgumentError(absl::StrCat("--outliers: ", outliers, " is not in [0, 1)")));
  cfg.outlier_fraction = outliers;
  auto otype = nibble::ParseSidecarType(outlier_type);
  if (!otype)
    return Fail(absl::InvalidArgumentError(absl::StrCat("--outlier-type: '", outlier_type, "' is not f16 or i8")));
  cfg.outlier_type = *otype;
  if (saliency == "auto") {
    cfg.outlier_saliency = calib.empty() ? nibble::Saliency::kMagnitude : nibble::Saliency::kHessian;
  } else {
    auto sal = nibble::ParseSaliency(saliency);
    if (!sal)
      return Fail(absl::InvalidArgumentError(
          absl::StrCat("--saliency: '", saliency, "' is not hessian, magnitude or auto")));
    cfg.outlier_saliency = *sal;
  }

  auto m = nibble::LoadModel(src, {.tokenizer_path = tokenizer_path, .huge_pages = true, .keep_f16 = false});
  if (!m.ok()) return Fail(m.status());
  fprintf(stderr, "quantize: %s (%s, %d layers, dim %d) -> %s, method %s\n", src.c_str(), m->source_format.c_str(),
          m->config.n_layers, m->config.dim,
          allocate                ? absl::StrCat("bit allocation at ", target_bpw, " bpw").c_str()
          : format_name == "f16" ? "f16"
                                 : cfg.format.Name().c_str(),
          format_name == "f16" ? "none" : method.c_str());
  if (outliers > 0.0)
    fprintf(stderr, "quantize: side-car: top %g of each linear layer's weights as %s by %s saliency\n", outliers,
            nibble::SidecarTypeName(cfg.outlier_type), nibble::SaliencyName(cfg.outlier_saliency));
  m->metadata["quant.source"] = src;
  m->metadata["quant.source_format"] = m->source_format;
  if (format_name == "f16") {
    m->metadata["quant.format"] = "f16";
    const auto t0 = std::chrono::steady_clock::now();
    nibble::io::NibbleWriteOptions wo;
    wo.fp16_matrices = true;
    wo.fp16_vectors = norm_format == "f16";
    if (auto s = nibble::io::WriteNibbleFile(*m, out, wo); !s.ok()) return Fail(s);
    fprintf(stderr, "quantize: wrote %s: every matrix as fp16 (16 bits/weight; norms %s); %.1f s\n", out.c_str(),
            norm_format.c_str(), std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    return 0;
  }
  Progress progress;
  auto report = nibble::QuantizeModel(&*m, cfg, [&](int d, int t, const std::string& n) { progress(d, t, n); });
  if (!report.ok()) return Fail(report.status());
  nibble::io::NibbleWriteOptions wopts;
  wopts.fp16_vectors = cfg.norms_f16;
  if (auto s = nibble::io::WriteNibbleFile(*m, out, wopts); !s.ok()) return Fail(s);

  const int fw = allocate ? 40 : 14;
  fprintf(stderr, "%-20s %-*s %11s %6s %9s %9s %7s\n", "tensor", fw, "format", "shape", "bits", "rel.err", "proxy", "time");
  for (const auto& t : report->tensors) {
    fprintf(stderr, "%-20s %-*s %5lldx%-5lld %6.3f %9.5f %9.5f %6.2fs\n", t.name.c_str(), fw, t.format.c_str(),
            (long long)t.rows, (long long)t.cols, t.bpw, t.rel_error, t.proxy_error, t.seconds);
  }
  fprintf(stderr, "quantize: wrote %s: %.4f bits/weight over all %lld weights (%.4f over linear layers); %.1f s%s\n",
          out.c_str(), report->bpw_all, (long long)report->params_all, report->bpw_linear, report->seconds,
          report->calib_tokens ? absl::StrCat(" (calibration: ", report->calib_tokens, " tokens, ",
                                              static_cast<int>(report->calib_seconds), " s)").c_str()
                               : "");
  if (allocate)
    fprintf(stderr,
            "quantize: bit allocation: target %.4f bpw, achieved %.4f (all weights, every scale/zero byte counted); "
            "segments %s; estimated error %.6g (gap bound %.3g)\n",
            target_bpw, report->bpw_all, report->alloc_mix.c_str(), report->alloc_est_error, report->alloc_gap_bound);
  for (size_t l = 0; l < report->dfmpc_layers.size(); ++l)
    fprintf(stderr, "quantize: dfmpc layer %zu: composite error (wv,wo) %.5f  (w_up,w_down) %.5f\n", l,
            report->dfmpc_layers[l].attn, report->dfmpc_layers[l].ffn);
  if (allocate && !report->alloc_embed.empty())
    fprintf(stderr, "quantize: bit allocation: embeddings %s (sensitivity probes %.0f s)\n", report->alloc_embed.c_str(),
            report->sensitivity_seconds);
  if (!report_path.empty()) {
    nlohmann::json j;
    j["source"] = src;
    j["output"] = out;
    j["method"] = report->method;
    j["sequential"] = sequential;
    j["rotate"] = rotate;
    j["format"] = report->format;
    j["bpw_all"] = report->bpw_all;
    j["bpw_linear"] = report->bpw_linear;
    j["params_all"] = report->params_all;
    j["calib_tokens"] = report->calib_tokens;
    j["seconds"] = report->seconds;
    if (allocate) {
      j["target_bpw"] = target_bpw;
      j["alloc_block_rows"] = alloc_block_rows;
      j["alloc_budget_bits"] = report->alloc_budget_bits;
      j["alloc_mix"] = report->alloc_mix;
      j["alloc_est_error"] = report->alloc_est_error;
      j["alloc_gap_bound"] = report->alloc_gap_bound;
      j["alloc_sensitivity"] = alloc_sensitivity;
      j["alloc_embed"] = report->alloc_embed;
      j["sensitivity_seconds"] = report->sensitivity_seconds;
      j["alloc_cache_hit"] = report->alloc_cache_hit;
    }
    if (outliers > 0.0) {
      j["outliers"] = outliers;
      j["outlier_type"] = nibble::SidecarTypeName(cfg.outlier_type);
      j["outlier_saliency"] = nibble::SaliencyName(cfg.outlier_saliency);
    }
    if (method == "dfmpc") {
      j["dfmpc_high"] = cfg.dfmpc.high.Name();
      j["dfmpc_rest"] = cfg.dfmpc.rest ? cfg.dfmpc.rest->Name() : cfg.format.Name();
      j["dfmpc_ridge"] = cfg.dfmpc.ridge;
      j["dfmpc_compensate"] = cfg.dfmpc.compensate;
      j["dfmpc_weighting"] = dfmpc_weighting;
      for (const auto& e : report->dfmpc_layers)
        j["dfmpc_layers"].push_back({{"attn_composite_error", e.attn}, {"ffn_composite_error", e.ffn}});
    }
    for (const auto& t : report->tensors) {
      j["tensors"].push_back({{"name", t.name}, {"format", t.format}, {"rows", t.rows}, {"cols", t.cols},
                              {"bpw", t.bpw}, {"rel_error", t.rel_error}, {"proxy_error", t.proxy_error},
                              {"seconds", t.seconds}});
    }
    std::ofstream(report_path) << j.dump(1) << "\n";
  }
  return 0;
}
