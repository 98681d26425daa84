#!/usr/bin/env python3
"""nibble's half of the quantization quality report, and the report itself.

Goals: quantize stories260K and SmolLM2-135M with nibble-quantize in every
format x method worth showing, evaluate each with nibble-perplexity against the
full-precision model's saved logits (PPL, KL(P_ref || P_q), top-1 agreement),
and write docs/QUALITY.md + docs/quality.png from these results and
llama.cpp's (bench/llamacpp_quality.py -> bench/results/llamacpp_quality.json).
Non-goals: running llama.cpp itself (only with --llamacpp, which calls
bench/llamacpp_quality.py), timing anything precisely (2 shared cores).

Settings (identical to bench/llamacpp_quality.py):
  * smollm2: wikitext-2-test, chunk mode -c 512 --chunks 40. Reference: the
    Q4_1 GGUF dequantized to fp32 by nibble (SmolLM2's only checkpoint here).
    GPTQ calibration: the start of tinystories-val (never wikitext-2).
  * stories260K: tinystories-val document mode (split on <|endoftext|>), the
    first 200 documents. GPTQ calibration: the LAST 40% of the documents of
    tinystories-val (disjoint from the 200 evaluated ones), written to
    models/ref/nibble/stories260K.calib.txt.

Resumable: a config whose entry in -o has the same settings is skipped unless
--force; results are written after every config. Files: models/ref/nibble/
(reference logits *.ref.logits, quantized *.nbl deleted after evaluation
unless --keep, logs/).

    python3 bench/quality.py                # run what is missing, then write the doc
    python3 bench/quality.py --llamacpp     # also run llama.cpp's half first (resumable)
    python3 bench/quality.py --doc-only     # only regenerate docs/QUALITY.md + quality.png
    python3 bench/quality.py -o bench/results/x.json --only smollm2:boa --doc /tmp/q.md --png /tmp/q.png
    python3 bench/quality.py --merge bench/results/x.json --doc-only   # then fold x.json into the main results
    NIBBLE_BIN=build-quality/bin python3 bench/quality.py -t 1 --only dfmpc   # binaries of another build dir (or --bin)
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
sys.path.insert(0, HERE)

import quality_common as qc  # noqa: E402

WORK = os.path.join(ROOT, "models", "ref", "nibble")
RESULTS = os.path.join(HERE, "results", "nibble_quality.json")
LLAMA_RESULTS = os.path.join(HERE, "results", "llamacpp_quality.json")
TINY = os.path.join(SHARED, "data", "tinystories-val.txt")
WIKI = os.path.join(SHARED, "data", "wikitext-2-test.txt")
STORIES = os.path.join(SHARED, "models", "stories260K")
CALIB_FRACTION = 0.4  # stories260K: calibrate on the last 40% of the documents

MODELS = {
    "stories260K": {
        "src": os.path.join(STORIES, "stories260K.bin"), "tokenizer": os.path.join(STORIES, "tok512.bin"),
        "eval": ["-f", TINY, "--doc-separator", "<|endoftext|>", "--max-docs", "200"],
        "settings": {"mode": "docs", "max_docs": 200, "data": "tinystories-val.txt"},
        "calib_tokens": 4096,
        "reference": "llama2.c stories260K.bin (fp32)",
    },
    "smollm2": {
        "src": os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf"), "tokenizer": None,
        "eval": ["-f", WIKI, "-c", "512", "--chunks", "40"],
        "settings": {"mode": "chunks", "ctx": 512, "chunks": 40, "data": "wikitext-2-test.txt"},
        "calib_tokens": 8192,
        # Allocation on 135M parameters: RTN error estimates over ten candidates keep a sweep tractable on 2 cores.
        "alloc_args": ["--alloc-estimate", "rtn", "--alloc-formats",
                       "int2_g32,int2_g64_sym,int2_g64,int3_g32,int3_g64,int3_g128,int4_g32,int4_g64,int4_g128,int8_g128"],
        "reference": "SmolLM2-135M-Instruct.Q4_1.gguf dequantized to fp32",
    },
}

E8, E4 = "int8_g32", "int4_g32"
_ST = ["int8_g32", "int4_g32", "int4_g128", "int3_g32", "int3_g64", "int3_g128", "int2_g32", "int2_g64",
       "ternary_g64", "bintern_g64", "binary_g32"]
# (model, method, format, embed format), run in this order.
CONFIGS = (
    [("stories260K", m, f, E8) for f in _ST for m in ("rtn", "gptq")]
    + [("stories260K", "gptq", f, E4) for f in ("int4_g32", "int4_g128", "int3_g64", "int3_g128", "int2_g32",
                                                "int2_g64")]
    + [("smollm2", m, f, E8) for f in ("int4_g128", "int3_g64", "int2_g64") for m in ("rtn", "gptq")]
    + [("smollm2", "gptq", "int4_g64", E4), ("smollm2", "gptq", "int3_g128", E4)]
    # BoA beside GPTQ (same calibration, same embedding format).
    + [("stories260K", "boa", f, E4) for f in ("int4_g32", "int3_g64", "int2_g64")]
    + [("smollm2", "boa", f, E8) for f in ("int3_g64", "int4_g128")]
    # DF-MPC against the same per-tensor formats without compensation.
    + [("stories260K", m, f, E8) for f in ("int2_g64/int4_g64", "int2_g64/int8_g32", "int3_g64/int4_g64")
       for m in ("dfmpc-nocomp", "dfmpc")]
    # DF-MPC with the compensation weighted by calibration activations (--dfmpc-weighting calib, GPTQ's calibration).
    + [("stories260K", "dfmpc-calib", f, E8)
       for f in ("int2_g64/int4_g64", "int2_g64/int8_g32", "int3_g64/int4_g64")]
    # Bit allocation (KLD-sensitivity-weighted, embeddings allocated too) at fixed budgets.
    + [("stories260K", "gptq", f"bpw{b}", "auto") for b in ("2.5", "3.5", "4.5")]
    # Uniform formats near those budgets (symmetric, smaller embeddings), and the allocator at exactly their size.
    + [("stories260K", "gptq", f, e) for f, e in (("int3_g64_sym", "int4_g64"), ("int3_g64_sym", "int3_g64"),
                                                   ("int2_g64_sym", "int3_g64"), ("int2_g64_sym", "int2_g64"))]
    + [("stories260K", "gptq", f"bpw{b}", "auto") for b in ("2.5434", "3.5653")]
    + [("smollm2", "gptq", f"bpw{b}", "auto") for b in ("2.5", "3.5", "4.5", "5.14")]
    # Budget 5.0 (bpw5.14 allocated 5.007 bpw_all, over 5.0): a budget that lands at or under 5.0.
    + [("smollm2", "gptq", "bpw4.98", "auto")]
    # SmolLM2 DF-MPC: uncompensated, data-free and calibration-weighted compensation at equal bits.
    + [("smollm2", m, "int2_g64/int8_g32", "int8_g64") for m in ("dfmpc-nocomp", "dfmpc", "dfmpc-calib")]
    # SmolLM2's reference is Q4_1 dequantized: int4_g32 asymmetric (fp16 scale + min per 32) can represent
    # it exactly, so RTN int4_g32 measures how close the clip search gets to that grid.
    + [("smollm2", "rtn", "int4_g32", E4), ("smollm2", "rtn", "int4_g32", "int8_g64"),
       ("smollm2", "rtn", "int4_g32", "int8_g128")]
    # Extras (lower budgets), run last.
    + [("smollm2", "gptq", "int2_g64", E4), ("smollm2", "gptq", "int3_g64", E4),
       ("smollm2", "gptq", "int2_g128", "int3_g64"), ("smollm2", "gptq", "int4_g128", E4)]
    # Budget 3.0 measured rather than read off the 2.5 row (the per-budget comparison at 3.0).
    + [("smollm2", "gptq", "bpw3.0", "auto")]
    # Sequential GPTQ (--sequential): the low-bit end, where error compounding over layers dominates.
    + [("smollm2", "gptq-seq", "int2_g64", E8), ("smollm2", "gptq-seq", "bpw3.0", "auto"),
       ("smollm2", "gptq-seq", "bpw2.5", "auto"), ("stories260K", "gptq-seq", "int2_g64", E8),
       ("stories260K", "gptq-seq", "int3_g64", E8)]
    # Rotation (--rotate) at the low-bit end of SmolLM2, one-shot and sequential, and on stories260K.
    + [("smollm2", "gptq-seq-rot", "bpw2.5", "auto"), ("smollm2", "gptq-rot", "int2_g64", E8),
       ("smollm2", "gptq-seq-rot", "bpw3.0", "auto"), ("smollm2", "gptq-seq-rot", "int2_g64", E8),
       ("stories260K", "gptq-rot", "int2_g64", E8)]
    # Budget 2.0 (binary / 2.125-bit candidates, cheaper embeddings): the low end of the 2..5 range.
    + [("smollm2", "gptq-seq-rot", "bpw2.0", "auto-low")]
    # stories260K at budget 5.0 (llama.cpp's smallest file there is 7.5 bpw, PPL 3.80), one-shot and sequential.
    + [("stories260K", m, f"bpw{b}", "auto") for m in ("gptq", "gptq-seq") for b in ("4.98", "4.5")]
    # The output head / tied embedding by GPTQ (--embed-method gptq, "-hg"): the low budgets of SmolLM2
    # (one allocation cache for both: auto-low's embedding candidates), stories260K at 4.5 / 5.0, and
    # uniform pairs beside the RTN-embedding rows.
    + [("smollm2", "gptq-seq-rot-hg", f"bpw{b}", "auto-low") for b in ("2.5", "2.0")]
    + [("stories260K", "gptq-hg", f"bpw{b}", "auto") for b in ("4.98", "4.5")]
    + [("stories260K", "gptq-hg", f, E4) for f in ("int4_g32", "int3_g64", "int2_g64")]
    + [("smollm2", "gptq-hg", "int3_g64", E4), ("smollm2", "gptq-hg", "int2_g128", "int3_g64")]
    # Per-tensor group sizes (--tensor-format) on stories260K under 5.0 bpw: int4_g32 where rows are 64 wide,
    # int4_g64 for w_down (172-wide rows: 3 groups of 64 instead of 6 of 32) and w_up, embedding int4_g32.
    + [("stories260K", m, "int4_g32+w_down=int4_g64+w_up=int4_g64", E4) for m in ("boa-hg", "gptq-hg")]
    # ... and w_gate at g64 too, the bits saved spent on wk at int8 (4.99 bpw).
    + [("stories260K", "boa-hg", "int4_g32+w_down=int4_g64+w_gate=int4_g64+w_up=int4_g64+wk=int8_g64_sym", E4)]
    # Activation ordering on top, at SmolLM2's 2.5 budget.
    + [("smollm2", "gptq-seq-rot-hg-ao", "bpw2.5", "auto-low")]
    # Four times the calibration text at the same budget, and at 3.0 / 2.0 with that allocation cache.
    + [("smollm2", "gptq-seq-rot-hg-c32k", f"bpw{b}", "auto-low") for b in ("2.5", "3.0", "2.0", "3.5")]
    # stories260K's allocation at 4.5 / 5.0 with the head by GPTQ and 32,768 calibration tokens. (Its rows are
    # 64 and 172 wide: the default candidates include int4/int8 at groups of 32 and 64, which do not pad them.)
    + [("stories260K", "gptq-hg-c32k", f"bpw{b}", "auto") for b in ("4.98", "4.5")]
    # nl4 (non-uniform 4-bit, docs/FORMATS.md) as a uniform format beside int4 of the same size. (The stories260K
    # allocations above include it: it is one of the allocator's default candidates.)
    + [("stories260K", "gptq", f, E4) for f in ("nl4_g32", "nl4_g64")] + [("smollm2", "gptq", "nl4_g64", E4)]
    # GPTQ with the least-squares scale refit after each row's sweep (--refit-scales), beside the same rows without.
    + [("stories260K", "gptq-hg-rf", f"bpw{b}", "auto") for b in ("4.98", "4.5")]
    + [("stories260K", "gptq-rf", f, E4) for f in ("int4_g32", "int3_g64", "int2_g64")]
    + [("smollm2", "gptq-seq-rot-hg-rf-c32k", "bpw2.0", "auto-low"), ("smollm2", "gptq-rf", "int2_g64", E8)]
    # stories260K at 4.5 / 5.0 with every improvement of this kind: head by GPTQ, scale refit, fp16 norms (0.043 bpw
    # of stories' budget back to the linears), 32k calibration tokens; then also act-order and 16-row blocks.
    + [("stories260K", m, f"bpw{b}", "auto") for m in ("gptq-hg-rf-c32k", "gptq-hg-rf-n16-c32k")
       for b in ("4.98", "4.5")]
    + [("stories260K", "gptq-hg-ao-rf-n16-b16-c32k", f"bpw{b}", "auto") for b in ("4.98", "4.5", "4.0", "3.5", "2.5")]
    # The non-uniform 3- and 2-bit formats as uniform formats beside int3/int2 of the same or larger size.
    + [("stories260K", "gptq", f, E4) for f in ("nl3_g64", "nl2_g64")]
    + [("smollm2", "gptq", f, E8) for f in ("nl3_g64", "nl2_g64")]
    # GPTQ's codes refined by coordinate descent on the output error (--cd-passes 4), alone and alternating with
    # the scale refit, beside plain GPTQ and the refit alone.
    + [("stories260K", m, f, E4) for m in ("gptq-cd", "gptq-rf-cd") for f in ("int4_g32", "int3_g64", "int2_g64")]
    + [("smollm2", m, "int2_g64", E8) for m in ("gptq-cd", "gptq-rf-cd")]
    + [("smollm2", m, "int3_g64", E8) for m in ("gptq-cd",)]
    + [("stories260K", "gptq-hg-ao-rf-cd-n16-b16-c32k", f"bpw{b}", "auto") for b in ("4.98", "4.5", "4.0", "3.5", "2.5")]
    + [("smollm2", "gptq-seq-rot-hg-cd-c32k", f"bpw{b}", "auto-low") for b in ("2.5", "2.0", "3.0", "3.5")]
    + [("smollm2", "gptq-cd", "int4_g64", E4)]
    + [("stories260K", "boa-cd", f, E4) for f in ("int4_g32", "int3_g64", "int2_g64")]
    + [("smollm2", "gptq-cd", f"bpw{b}", "auto") for b in ("4.5", "4.98")]
)


def key_of(model, method, fmt, embed):
    return f"{model}:{method}:{fmt}:{embed}"


# ---------------------------------------------------------------- results file
def load_json(path):
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {}


def save_json(path, doc):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def put(doc, entry):
    doc["entries"] = [e for e in doc.get("entries", []) if e["key"] != entry["key"]] + [entry]


def find(doc, key, settings):
    for e in doc.get("entries", []):
        if e["key"] == key and e.get("settings") == settings:
            return e
    return None


# ---------------------------------------------------------------- running the tools
def run(cmd, log_path, env=None):
    """Runs cmd, stderr appended to log_path; returns (stdout, seconds). Raises on failure."""
    t0 = time.time()
    with open(log_path, "a") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"exit {p.returncode}: {' '.join(cmd)} (see {log_path})")
    return p.stdout, time.time() - t0


def eval_json(stdout):
    d = json.loads(stdout.strip().splitlines()[-1])
    d.pop("unit_mean_nll", None)
    return d


def stories_calib_file():
    """The last 40% of tinystories-val's documents, one blank line apart."""
    path = os.path.join(WORK, "stories260K.calib.txt")
    docs = qc.tinystories_docs(TINY, 0)
    first = len(docs) - int(round(CALIB_FRACTION * len(docs)))
    if first < 200:
        raise RuntimeError(f"{TINY}: {len(docs)} documents; calibration would overlap the 200 evaluated")
    text = "\n\n".join(docs[first:]) + "\n"
    if not os.path.exists(path) or open(path, encoding="utf-8").read() != text:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    return path, {"calib": f"tinystories-val documents {first}..{len(docs) - 1} of {len(docs)} (last 40%)"}


def bpw_from_report(rep):
    """bpw over 2-D tensors with llama.cpp's definitions (quality_common.gguf_bpw):
    bpw_linear includes token_embd (= tied output); bpw_blk_linear only blk.*."""
    lb = ln = bb = bn = 0.0
    for t in rep["tensors"]:
        n = t["rows"] * t["cols"]
        lb += t["bpw"] * n
        ln += n
        if t["name"].startswith("blk."):
            bb += t["bpw"] * n
            bn += n
    # Everything not in the per-tensor list (norms) is stored as fp32.
    rest = rep["params_all"] - ln
    all_bits = lb + 32.0 * rest
    return {"bpw_linear": lb / ln, "bpw_blk_linear": bb / bn,
            "bpw_all_check": all_bits / rep["params_all"]}


def ensure_reference(name, cfg, args, doc):
    """Saves the fp32 model's logits once; records the reference entry."""
    logits = os.path.join(WORK, f"{name}.ref.logits")
    key = key_of(name, "ref", "f32", "f32")
    settings = cfg["settings"]
    if os.path.exists(logits) and not args.force_ref:
        if find(doc, key, settings):
            return logits
        # A separate results file (-o): reuse the main file's reference entry with the saved logits.
        main_ref = find(load_json(RESULTS), key, settings) if os.path.abspath(args.output) != RESULTS else None
        if main_ref:
            put(doc, main_ref)
            save_json(args.output, doc)
            return logits
    cmd = [os.path.join(args.bin, "nibble-perplexity"), "-m", cfg["src"]]
    if cfg["tokenizer"]:
        cmd += ["--tokenizer", cfg["tokenizer"]]
    cmd += cfg["eval"] + ["-t", str(args.threads), "--json", "--save-logits", logits + ".tmp"]
    print(f"-- {name}: reference logits", file=sys.stderr, flush=True)
    out, secs = run(cmd, os.path.join(WORK, "logs", f"{name}.ref.log"))
    os.replace(logits + ".tmp", logits)
    r = eval_json(out)
    put(doc, {"key": key, "model": name, "engine": "nibble", "method": "ref", "format": "f32", "embed_format": "f32",
              "settings": settings, "bpw_all": 32.0, "bpw_linear": 32.0, "bpw_blk_linear": 32.0,
              "ppl": r["ppl"], "mean_nll": r["mean_nll"], "kld": 0.0, "top1": 1.0, "tokens": r["tokens"],
              "eval_seconds": secs, "reference": cfg["reference"]})
    save_json(args.output, doc)
    print(f"   reference ppl={r['ppl']:.4f} tokens={r['tokens']} ({secs:.0f}s)", file=sys.stderr, flush=True)
    return logits


def run_config(name, method, fmt, embed, args, doc, logits):
    cfg = MODELS[name]
    settings = dict(cfg["settings"])
    qargs = []
    # Method names: BASE[-seq][-rot][-hg][-ao][-rf][-cd][-n16][-b16][-nl][-c32k] (--sequential, --rotate,
    # --embed-method gptq, --act-order, --refit-scales, --cd-passes 4, --norm-format f16, --alloc-block-rows 16, the
    # nl formats added to an explicit allocation candidate list, 32,768 calibration tokens) or dfmpc[-nocomp|-calib].
    parts = method.split("-")
    if parts[0] in ("gptq", "boa") or method == "dfmpc-calib" or fmt.startswith("bpw"):
        if cfg.get("base", name) == "stories260K":
            calib, info = stories_calib_file()
        else:
            calib, info = TINY, {"calib": "tinystories-val.txt from its start"}
        # "-c32k": 32,768 calibration tokens instead of the model's default.
        ctoks = 32768 if "c32k" in parts else cfg["calib_tokens"]
        qargs = ["--calib", calib, "--calib-tokens", str(ctoks)]
        settings.update(info, calib_tokens=ctoks)
    key = key_of(name, method, fmt, embed)
    if not args.force and find(doc, key, settings):
        return
    tag = f"{name}.{method}.{fmt}.{embed}".replace("/", "+")
    log = os.path.join(WORK, "logs", tag + ".log")
    if os.path.exists(log):
        os.remove(log)
    nbl, rep_path = os.path.join(WORK, tag + ".nbl"), os.path.join(WORK, "logs", tag + ".report.json")
    cmd = [os.path.join(args.bin, "nibble-quantize"), "-m", cfg["src"]]
    if cfg["tokenizer"]:
        cmd += ["--tokenizer", cfg["tokenizer"]]
    if fmt.startswith("bpw"):
        # Bit allocation at a budget: "bpw3.5"; embed "auto" lets the allocator pick the embedding format.
        # One allocation cache per (model, method): a sweep pays probes and estimates once.
        # (gptq-seq allocates from the one-shot GPTQ sensitivities, so it shares gptq's cache; rotated
        # weights are another model: their own cache.)
        cache = (parts[0] + ("-rot" if "rot" in parts else "") + ("-hg" if "hg" in parts else "")
                 + ("-ao" if "ao" in parts else "") + ("-rf" if "rf" in parts else "")
                 + ("-cd" if "cd" in parts else "")
                 + ("-n16" if "n16" in parts else "") + ("-b16" if "b16" in parts else "")
                 + ("-nl" if "nl" in parts else "")
                 + ("-c32k" if "c32k" in parts else "")
                 + ("-low" if embed == "auto-low" else ""))
        # (a held-out variant of a model, cfg["base"], shares the base model's cache: the same quantized model)
        fargs = ["--bpw", fmt[3:], "--alloc-cache",
                 os.path.join(WORK, f"{cfg.get('base', name)}.{cache}.alloc-cache.json")]
        alloc_args = list(cfg.get("alloc_args", []))
        nl = "nl" in parts
        if nl and "--alloc-formats" in alloc_args:
            # "-nl": the non-uniform formats join an explicit candidate list (they are in the default one).
            i = alloc_args.index("--alloc-formats") + 1
            alloc_args[i] += ",nl2_g64,nl2_g128,nl3_g64,nl3_g128,nl4_g64"
        if embed == "auto-low":
            # Budgets near 2 bpw_all: binary and 2.125-bit candidates for the linears, and embedding
            # candidates down to int2_g128_sym (auto's cheapest, int2_g64, is 2.5 bpw on 21% of SmolLM2).
            i = alloc_args.index("--alloc-formats") + 1
            alloc_args[i] += ",int2_g128_sym,binary_g64,binary_g128"
            fargs += alloc_args + ["--alloc-embed-formats", "int4_g64,int3_g64,int2_g64,int2_g64_sym,int2_g128_sym"
                                   + (",nl3_g64,nl2_g64,nl2_g128" if nl else "")]
        elif embed == "auto":
            fargs += alloc_args + ["--alloc-embed-formats", "auto"]
        else:
            fargs += alloc_args + ["--embed-format", embed, "--alloc-embed-formats", "none"]
    elif method.startswith("dfmpc"):
        # DF-MPC: "LOW/HIGH" = wv, w_up (and wq, wk, w_gate) in LOW; wo, w_down compensated, in HIGH.
        # "dfmpc-nocomp" is the same per-tensor formats without compensation (the equal-bits baseline).
        low, high = fmt.split("/")
        fargs = ["--format", low, "--dfmpc-high", high, "--embed-format", embed]
        if method == "dfmpc-nocomp":
            fargs.append("--dfmpc-no-compensation")
        elif method == "dfmpc-calib":
            # Compensation weighted by the calibration Hessian of each layer input (not data-free; same
            # calibration text and token count as the GPTQ rows).
            fargs += ["--dfmpc-weighting", "calib"]
    else:
        # "BASE+w_down=F2+...": per-tensor formats over BASE (--tensor-format).
        base, *over = fmt.split("+")
        fargs = ["--format", base, "--embed-format", embed]
        for o in over:
            fargs += ["--tensor-format", o]
    if "seq" in parts:
        # Sequential GPTQ: each layer calibrated on the outputs of the already-quantized earlier layers.
        fargs.append("--sequential")
    if "rot" in parts:
        # Incoherence processing: residual stream and value heads rotated before quantization (exact in fp32).
        fargs.append("--rotate")
    if "ao" in parts:
        # GPTQ with activation ordering (columns by descending Hessian diagonal).
        fargs.append("--act-order")
    if "rf" in parts:
        # GPTQ's group scales refit by least squares on the output error after each row's sweep.
        fargs.append("--refit-scales")
    # GPTQ's codes refined by greedy coordinate descent on the output error after each row's sweep
    # (alternating with the scale refit when -rf is also given): "-cd"; explicit either way, so rows keep
    # their meaning whatever nibble-quantize's default is.
    fargs += ["--cd-passes", "4" if "cd" in parts else "0"]
    if "n16" in parts:
        # Norm weights stored as fp16 (16 bits each in the budget).
        fargs += ["--norm-format", "f16"]
    if "b16" in parts:
        # Bit allocation over blocks of 16 rows (default 64).
        fargs += ["--alloc-block-rows", "16"]
    # The tied embedding / output head: GPTQ with the head-input Hessian ("-hg"), else RTN (explicit, so
    # rows keep their meaning whatever nibble-quantize's default is).
    fargs += ["--embed-method", "gptq" if "hg" in parts else "rtn"]
    cmd += ["-o", nbl] + fargs + ["--method", "dfmpc" if method.startswith("dfmpc") else method.split("-")[0],
                                  "-t", str(args.threads), "--report", rep_path] + qargs
    print(f"-- {key}: quantizing", file=sys.stderr, flush=True)
    try:
        _, qsecs = run(cmd, log)
        with open(rep_path) as f:
            rep = json.load(f)
        print(f"   bpw_all={rep['bpw_all']:.3f} ({qsecs:.0f}s); evaluating", file=sys.stderr, flush=True)
        ecmd = [os.path.join(args.bin, "nibble-perplexity"), "-m", nbl] + cfg["eval"] + [
            "-t", str(args.threads), "--json", "--kld-base", logits]
        # Weight-only quality: evaluate on the exact fp32 dequantize-and-dot path unless --fast-eval (the
        # fused kernels also round activations to int8; every row so far uses the exact path).
        env = dict(os.environ)
        if not args.fast_eval:
            env["NIBBLE_QMATMUL"] = "f32ref"
        out, esecs = run(ecmd, log, env)
        r = eval_json(out)
    except (RuntimeError, OSError, ValueError, KeyError) as e:
        print(f"   FAILED: {e}", file=sys.stderr, flush=True)
        put(doc, {"key": key, "model": name, "engine": "nibble", "method": method, "format": fmt,
                  "embed_format": embed, "settings": settings, "available": False, "reason": str(e)})
        save_json(args.output, doc)
        return
    finally:
        if not args.keep and os.path.exists(nbl):
            os.remove(nbl)
    b = bpw_from_report(rep)
    entry = {"key": key, "model": name, "engine": "nibble", "method": method, "format": fmt, "embed_format": embed,
             "settings": settings, "available": True, "bpw_all": rep["bpw_all"], "bpw_linear": b["bpw_linear"],
             "bpw_blk_linear": b["bpw_blk_linear"], "bpw_linear_nibble_report": rep["bpw_linear"],
             "params_all": rep["params_all"], "ppl": r["ppl"], "mean_nll": r["mean_nll"], "kld": r["kld"],
             "top1": r["top1"], "tokens": r["tokens"], "quant_seconds": qsecs, "eval_seconds": esecs,
             "calib_tokens": rep.get("calib_tokens", 0), "threads": args.threads,
             # Which matmul path evaluated it: the exact fp32 dequantize-and-dot reference (default) or, with
             # --fast-eval, the fused kernels, which also round activations to int8 per 32-block (+0.1% PPL
             # on stories260K int3_g64).
             "eval_path": "fused-int8-act" if args.fast_eval else "f32ref"}
    if abs(b["bpw_all_check"] - rep["bpw_all"]) > 1e-3:
        entry["bpw_warning"] = f"per-tensor bits + fp32 norms give {b['bpw_all_check']:.4f} bpw"
    put(doc, entry)
    save_json(args.output, doc)
    print(f"   ppl={r['ppl']:.4f} kld={r['kld']:.5f} top1={r['top1']:.4f} ({esecs:.0f}s)", file=sys.stderr,
          flush=True)


# ---------------------------------------------------------------- doc additions
def add_dfmpc_calib_section(pq, nib, lla, md_path):
    """Inserts the calibration-weighted DF-MPC comparison after plot_quality's DF-MPC section."""
    rows, _ = pq.rows_of(nib, lla)
    if not any(r["method"] == "dfmpc-calib" for r in rows):
        return
    vn, wn, ln = pq.method_vs(rows, "dfmpc-calib", "dfmpc-nocomp")
    vd, wd, ld = pq.method_vs(rows, "dfmpc-calib", "dfmpc")
    sec = ["### DF-MPC with calibration weighting (`dfmpc-calib`)", "",
           "`--method dfmpc --dfmpc-weighting calib`: the same compensation, but each input column of the",
           "compensated error is weighted by the calibration Hessian of the layer input instead of the RMSNorm gain,",
           "so it is not data-free. Calibration as for the GPTQ rows (tinystories-val, never wikitext-2). In the plot",
           "these rows are the black down-triangles labelled dfmpc-calib.", "",
           f"Against no compensation, dfmpc-calib has the lower PPL in {wn} of {wn + ln} pairs:", ""] + vn + [
           "", f"Against data-free DF-MPC (norm weighting), dfmpc-calib has the lower PPL in {wd} of {wd + ld} pairs:",
           ""] + vd + ["", ""]
    with open(md_path, encoding="utf-8") as f:
        text = f.read()
    anchor = "## Bit allocation vs uniform formats"
    text = text.replace(anchor, "\n".join(sec) + anchor, 1) if anchor in text else text + "\n" + "\n".join(sec)
    with open(md_path, "w", encoding="utf-8") as f:
        f.write(text)


def add_reproduce_notes(md_path):
    """Binaries and the filter, under plot_quality's reproduce commands."""
    anchor = "`--force` re-runs finished rows."
    note = ("`--bin DIR` (or `$NIBBLE_BIN`) picks the nibble binaries (default `build/bin`); `--only a,b` runs only "
            "the rows whose key (`model:method:format:embed`) contains one of the substrings, e.g. "
            "`NIBBLE_BIN=build-quality/bin python3 bench/quality.py -t 1 --models smollm2 --only "
            "smollm2:dfmpc,smollm2:gptq:bpw4.98,smollm2:gptq:bpw4.5:`.")
    with open(md_path, encoding="utf-8") as f:
        text = f.read()
    if anchor in text and note not in text:
        text = text.replace(anchor, anchor + "\n" + note, 1)
        with open(md_path, "w", encoding="utf-8") as f:
            f.write(text)


def add_heldout_section(md_path):
    """The held-out checks of bench/heldout.py (bench/results/heldout.json + llamacpp_heldout.json)."""
    nib = load_json(os.path.join(ROOT, "bench", "results", "heldout.json")).get("entries", [])
    lla = load_json(os.path.join(ROOT, "bench", "results", "llamacpp_heldout.json")).get("entries", [])
    if not nib and not lla:
        return
    L = ["", "## Held-out checks", "",
         "`python3 bench/heldout.py` re-evaluates the budget winners whose configuration was chosen after looking "
         "at the evaluation text, and the llama.cpp rows they beat, on disjoint text (both engines, same "
         "settings as the tables otherwise): stories260K on tinystories-val documents 200-399, SmolLM2 on "
         "the second half of wikitext-2 test (from the first article heading after the middle), `-c 512`, "
         "40 chunks. nibble's rows are quantized with the tables' exact commands.", "",
         "| model | engine | configuration | bpw_all | held-out PPL | held-out KLD |", "|---|---|---|---:|---:|---:|"]
    rows = []
    for e in nib:
        if not e.get("available", True) and e.get("method") != "ref":
            continue
        model = e["model"].split("@")[0]
        what = "fp32 reference" if e.get("method") == "ref" else f"{e['method']} {e['format']}, embed {e['embed_format']}"
        rows.append((model, "nibble", what, e.get("bpw_all", 32.0), e.get("ppl"), e.get("kld")))
    for e in lla:
        if not e.get("available", True):
            continue
        what = "F32 reference" if e["type"] == "F32" else e["type"]
        rows.append((e["model"], "llama.cpp", what, e.get("bpw_all", 32.0), e.get("ppl"), e.get("kld")))
    for model, eng, what, bpw, ppl, kld in sorted(rows, key=lambda r: (r[0], -r[3] if r[3] >= 32 else r[3], r[1])):
        L.append(f"| {model} | {eng} | {what} | {bpw:.3f} | {ppl:.4f} | {kld:.5f} |")
    with open(md_path, "a", encoding="utf-8") as f:
        f.write("\n".join(L) + "\n")


def add_budget_losses(pq, nib, lla, md_path):
    """Under each model's per-budget summary line: every budget in words, losses with the llama.cpp row that
    wins and how far over the budget it is, wins with how far over the budget the beaten row is."""
    rows, _ = pq.rows_of(nib, lla)
    with open(md_path, encoding="utf-8") as f:
        text = f.read()
    for model in pq.MODEL_ORDER:
        _, _, summary = pq.vs_llama(rows, model)
        nibr = [r for r in rows if r["model"] == model and r["engine"] == "nibble" and not r["ref"]]
        llar = [r for r in rows if r["model"] == model and r["engine"] == "llama.cpp" and not r["ref"]]
        notes = []
        for B, verdict in summary:
            n = pq._best([r for r in nibr if r["bpw_all"] <= B])
            ge = [r for r in llar if r["bpw_all"] >= B]
            l_ge = min(ge, key=lambda r: (r["bpw_all"], r["ppl"])) if ge else None
            l_le = pq._best([r for r in llar if r["bpw_all"] <= B])
            if verdict.startswith("**yes"):
                # A win is only as strong as the comparison: say how far over the budget llama.cpp's row is.
                far = l_ge is not None and l_ge["bpw_all"] - B > 0.25
                notes.append(f"* {B:.1f}: nibble wins: {pq._label(n)} at {n['bpw_all']:.3f} bpw, PPL {n['ppl']:.4f}, "
                             f"against llama.cpp {l_ge['format']} at {l_ge['bpw_all']:.3f} bpw, PPL "
                             f"{l_ge['ppl']:.4f}" + (f" ({l_ge['bpw_all'] - B:+.2f} bpw over the budget: llama.cpp "
                                                     "has no smaller row here, so this says little about llama.cpp "
                                                     f"at {B:.1f} bpw)" if far else "") + "."
                             if l_ge is not None else f"* {B:.1f}: nibble wins ({verdict}).")
                continue
            if n is None:
                notes.append(f"* {B:.1f}: nibble has no row at or under {B:.1f} bpw_all (not measured), so no claim.")
                continue
            beaters = [x for x in (l_le, l_ge) if x is not None and not n["ppl"] < x["ppl"]]
            why = "; ".join(f"llama.cpp {x['format']} at {x['bpw_all']:.3f} bpw has PPL {x['ppl']:.4f}"
                            + (f" ({x['bpw_all'] - B:+.2f} bpw over the budget)" if x["bpw_all"] > B else "")
                            for x in beaters) or verdict
            notes.append(f"* {B:.1f}: **nibble loses**. Its best at <= {B:.1f} is {pq._label(n)} at "
                         f"{n['bpw_all']:.3f} bpw, PPL {n['ppl']:.4f}; {why}.")
        if not notes:
            continue
        block = ["", "Each budget in words (the numbers of the per-budget table below):", ""] + notes
        m = re.search(rf"### {re.escape(model)}\n\nBudgets where nibble wins:[^\n]*\n", text)
        if m:
            text = text[:m.end()] + "\n".join(block) + "\n" + text[m.end():]
    with open(md_path, "w", encoding="utf-8") as f:
        f.write(text)


# ---------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--output", default=RESULTS)
    ap.add_argument("--llama-results", default=LLAMA_RESULTS)
    ap.add_argument("--bin", default=os.environ.get("NIBBLE_BIN", os.path.join(ROOT, "build", "bin")),
                    help="directory of nibble-quantize and nibble-perplexity (default: $NIBBLE_BIN or build/bin)")
    ap.add_argument("--models", default="stories260K,smollm2")
    ap.add_argument("--only", default="", help="comma list of substrings; run configs whose key contains one")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--force", action="store_true", help="re-run configs that already have results")
    ap.add_argument("--force-ref", action="store_true", help="re-save the reference logits")
    ap.add_argument("--keep", action="store_true", help="keep the quantized .nbl files")
    ap.add_argument("--fast-eval", action="store_true",
                    help="evaluate with the fused int8-activation kernels instead of the exact fp32 reference path")
    ap.add_argument("--llamacpp", action="store_true", help="run bench/llamacpp_quality.py (resumable) first")
    ap.add_argument("--doc-only", action="store_true", help="only regenerate docs/QUALITY.md and docs/quality.png")
    ap.add_argument("--merge", action="append", default=[], metavar="JSON",
                    help="first copy every non-reference entry of this results file (written by a separate run with "
                         "-o) into -o, replacing entries with the same key; repeatable")
    ap.add_argument("--no-doc", action="store_true", help="only run; do not regenerate the doc and plot")
    ap.add_argument("--doc", default=os.path.join(ROOT, "docs", "QUALITY.md"))
    ap.add_argument("--png", default=os.path.join(ROOT, "docs", "quality.png"))
    args = ap.parse_args()

    for path in args.merge:
        doc, other = load_json(args.output), load_json(path)
        moved = [e for e in other.get("entries", []) if e.get("method") != "ref"]
        for e in moved:
            put(doc, e)
        save_json(args.output, doc)
        print(f"merged {len(moved)} entries of {path} into {args.output}", file=sys.stderr)

    if not args.doc_only:
        if args.llamacpp:
            subprocess.run([sys.executable, os.path.join(HERE, "llamacpp_quality.py"), "-o", args.llama_results,
                            "-t", str(args.threads)], check=False)
        os.makedirs(os.path.join(WORK, "logs"), exist_ok=True)
        doc = load_json(args.output)
        doc["generator"] = "bench/quality.py"
        doc["notes"] = ("bpw_all: nibble-quantize's report (every weight incl. fp32 norms and the int/fp token "
                        "embedding = tied output head, every scale byte counted). bpw_linear: 2-D tensors incl. "
                        "token_embd, bpw_blk_linear: blk.* 2-D tensors (llama.cpp's definitions). kld: mean "
                        "KL(P_ref||P_q) in nats over scored positions. seconds: 2 shared cores, noisy.")
        models = [m.strip() for m in args.models.split(",") if m.strip()]
        only = [s for s in args.only.split(",") if s]
        t_start = time.time()
        for name in models:
            if name not in MODELS:
                print(f"unknown model {name!r} (have {', '.join(MODELS)})", file=sys.stderr)
                return 2
            logits = ensure_reference(name, MODELS[name], args, doc)
            for (m, method, fmt, embed) in CONFIGS:
                if m != name or (only and not any(s in key_of(m, method, fmt, embed) for s in only)):
                    continue
                run_config(name, method, fmt, embed, args, doc, logits)
        print(f"== runs done in {time.time() - t_start:.0f}s", file=sys.stderr, flush=True)

    if args.no_doc:
        return 0
    import plot_quality
    plot_quality.write(load_json(args.output), load_json(args.llama_results), args.doc, args.png)
    add_dfmpc_calib_section(plot_quality, load_json(args.output), load_json(args.llama_results), args.doc)
    add_budget_losses(plot_quality, load_json(args.output), load_json(args.llama_results), args.doc)
    add_heldout_section(args.doc)
    add_reproduce_notes(args.doc)
    print(f"wrote {os.path.relpath(args.doc, ROOT)} and {os.path.relpath(args.png, ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
