#!/usr/bin/env python3
"""CPU prefill / decode speed of nibble vs llama.cpp, measured side by side.

One command runs BOTH engines on SmolLM2-135M in the same session, with the same
thread counts (default 1 and 2), the same prompt length (pp512: one forward pass
over 512 tokens on a fresh context, n_batch 512) and decode length (tg128: 128
single-token steps from position 0), the same repetition count, one untimed
warm-up each, and reports mean ± sample sd of tokens/s:

  * nibble:    build*/bin/nibble-bench --json on .nbl files written by
               nibble-quantize (RTN) into models/ref/perf/ (reused when present);
               fp32 = the F32 reference GGUF loaded directly; f16 = llama.cpp's own F16
               GGUF (the very file its F16 row runs), kept at 16 bits by nibble.
  * llama.cpp: llama-cpp-python (bench/llamacpp_util.open_llama, extra buffer
               types off: the AMX path segfaults here); llm.eval(512 tokens) on a
               reset context for pp, llm.eval([tok]) 128 times for tg. Types are
               quantized from the same F32 reference GGUF (bench/make_ref_gguf.py)
               with llama_cpp.llama_model_quantize (bench/llamacpp_quality.quantize);
               files in models/ref/quant/ are reused, new ones go to models/ref/perf/.

Pairs at similar bits per weight (bpw = bytes of all 2-D weight tensors, the
tied embedding / output head included, * 8 / their element count; llama.cpp's
k-quants fall back to Q4_0/Q5_0/Q8_0 on SmolLM2's 576-column tensors, so the
measured bpw of its files is shown, not the nominal one).

Bandwidth: "MB/token" = weight bytes one decode step streams, "GB/s" =
that * tg tok/s, "% bw" = that over the read bandwidth nibble-bench measures on
a buffer of the same size with the same thread count (cache bound here: the
weights mostly fit in L2/L3 on big machines, DRAM otherwise).

Resumable: results/entries are cached in the JSON (-o) by a key of (engine,
config, threads, p, n, reps, and for nibble the nibble-bench binary's hash), so
a rebuilt kernel re-measures nibble only. --quick: fewer configs and reps.

    python3 bench/performance.py [--build build] [--quick] [--threads 1,2] [--reps 3] [--force]
Writes bench/results/performance.json, docs/PERFORMANCE.md, docs/performance.png.
"""
import argparse
import hashlib
import json
import os
import random
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

REF_DIR = os.path.join(ROOT, "models", "ref")
PERF_DIR = os.path.join(REF_DIR, "perf")
QUANT_DIR = os.path.join(REF_DIR, "quant")
REF_GGUF = os.path.join(REF_DIR, "SmolLM2-135M-Instruct.F32.gguf")
SRC_GGUF = os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")

# nibble configs: name -> (linear format, embedding/head format); None = GGUF fp32;
# a string = that llama.cpp GGUF type's file, run by nibble as it is (F16 stays fp16).
# The tied embedding / output head is int8_g32_sym everywhere: 8.5 bits per
# weight, the size of the q8_0 head llama.cpp gives this model's tied output.
NIBBLE = {
    "int8_g32_sym": ("int8_g32_sym", "int8_g32_sym"),
    "int4_g32": ("int4_g32", "int8_g32_sym"),
    # Non-uniform 4-bit at group 32: exactly Q4_0's bytes (an fp16 scale per 32 4-bit codes).
    "nl4_g32": ("nl4_g32", "int8_g32_sym"),
    "int4_g64_sym": ("int4_g64_sym", "int8_g32_sym"),
    "int2_g64": ("int2_g64", "int8_g32_sym"),
    "fp32": None,
    "f16": "F16",
}
# (nibble config, llama.cpp type): compared at similar bits per weight.
PAIRS = [
    ("int4_g32", "Q4_0"), ("int4_g32", "Q4_K_M"), ("nl4_g32", "Q4_0"),
    ("int4_g64_sym", "Q4_0"), ("int4_g64_sym", "Q4_K_M"),
    ("int2_g64", "Q2_K"),
    ("int8_g32_sym", "Q8_0"),
    ("fp32", "F32"), ("f16", "F16"),
]
QUICK_PAIRS = [("int4_g32", "Q4_0"), ("int8_g32_sym", "Q8_0")]
# Long-context decode (--depths): one pair, the default format.
# (nibble config, llama.cpp type, nibble KV-cache dtype); llama.cpp's cache is F16.
DEPTH_PAIRS = [("int4_g32", "Q4_0", "f32"), ("int4_g32", "Q4_0", "f16")]
NOTES = [
    "Measured with nothing else running on the session's machine (2 vCPUs), both engines in the same run. "
    "The host is shared with other tenants: the same nibble-bench command has varied by up to +-30% between "
    "minutes on some machines, so a ratio near a target can flip between runs. The machine kind also "
    "changes between sessions (Intel Sapphire Rapids with AMX, AMD EPYC without): compare numbers from one "
    "document only. Re-run: `python3 bench/performance.py --force`.",
    "Prefill paths: on CPUs with AMX-INT8 nibble runs its AMX int8 tile kernel for packed-weight matmul "
    "calls of >= 8 tokens (kernels/cpu/qmatmul_amx.cc; NIBBLE_QMATMUL_AMX=0 turns it off); without AMX, "
    "calls of >= 16 tokens dequantize the packed rows 32 at a time (AVX-512 twin of the reference decode) "
    "into the packed-panel fp32 GEMM that fp32 weights use (cpu::QuantMatMulDequantF32; "
    "NIBBLE_QMATMUL_DEQUANT_MIN_TOKENS=0 turns it off). On the AMD EPYC (AVX-512, no AMX) the int8 VNNI "
    "kernels gave int4_g32 pp512 359 tok/s at 1 thread (0.86x llama.cpp's Q4_0), the dequantized path "
    "728-778 tok/s: per 64 multiply-adds the int8 kernels spend ~6 instructions on the block scales, the "
    "fp32 GEMM 4 FMAs. llama.cpp's own AMX / repacked buffer types are off in this comparison (they "
    "segfault in llama-cpp-python here), so its prefill is its AVX-512 path.",
    "16-bit and 32-bit weights (2026-12-07): nibble runs fp16 and bf16 matrices at 16 bits (GGUF and HF "
    "F16 / BF16 tensors, nibble files written with `nibble-quantize --format f16`; cpu::MatMulF16 / "
    "MatMulBF16, the fp32 kernels on rows widened in registers, bit-identical to running the widened "
    "model); the f16 row runs llama.cpp's F16 file itself (an HF BF16 export of SmolLM2 decodes at "
    "109-111 tok/s at 1 thread, like the f16 row). Until then this table paired nibble fp32 with F16 (0.59x / 0.85x decode in the run "
    "before: 32 bits per weight against 16). Serving (nibble-bench included) also moves fp32 matrices into "
    "huge-page memory (+5-8% tg at 1 thread, 74-91 -> 103 tok/s at 2 in A/B runs; between this session's "
    "full runs nibble fp32 at 2 threads still varied from 73.5 to 101.5 tok/s with the same binary (a "
    "check during a fast run found all 538 MB in huge pages; host load is the likely cause). fp32 vs F32 decode "
    "cannot reach 1.3x: both stream 538 MB per token and llama.cpp's F32 decode already runs at 85-95% of "
    "the measured bound, so 1.3x would need more than the machine's bandwidth; the ratio follows which "
    "engine gets closer to the bound (see the % bw columns).",
    "Decode compute (2026-12-07): the int8-activation kernels now spend one fma per 32-column block on the "
    "additive term (fl(m dx) times the block's activation sum, 4 chains per row) instead of 8 spread lanes, "
    "and int sym formats reuse the scale product of the d term; AVX2 lost an integer division per block. "
    "qmatmul_bench GEMV in cache, 1 thread, before -> after: AVX-512 int4_g32 31.1 -> 36.9 GB/s, "
    "int4_g64_sym 27.5 -> 31.9, int2_g64 16.6 -> 18.0; AVX2 int4_g32 7.4 -> 14.6.",
    "Memory (2026-12-07): quantized weights are copied at load into one transparent-huge-page arena and "
    "both KV caches live in huge-page memory (engine/core/huge_pages.h; NIBBLE_HUGE_PAGES=0 keeps the "
    "mapped file): the hardware prefetchers stop at 4 KiB page boundaries (+5-6% tg128 at 1 thread, "
    "+20% tg64 at depth 4096). The decode GEMV prefetches ~4 KiB of rows ahead (at least 2 tiles): "
    "int2_g64 +15% and int4_g64_sym +4-7% over a fixed 2 tiles, int4_g32 unchanged.",
    "Long context (2026-12-07): both KV caches keep K transposed, and attention reads its K^T tiles in "
    "place instead of gathering 64 strided K rows and transposing them for every tile of every decode step "
    "(same values, same bits; kernels/cpu/paged_attention.h). A/B at 1 thread, tg32 at depth 4096: "
    "69-73 -> 78-79 tok/s; nibble-batch-bench (paged cache) at context 2048, 2 threads: 1 stream "
    "106-128 -> 122-138 tok/s. An fp16 KV cache (--kv-dtype f16 in nibble-bench, nibble-generate, "
    "nibble-perplexity, nibble-server, nibble-batch) halves the bytes attention streams (fp32 K and V are "
    "189 MB per token at depth 4096 for SmolLM2); it is llama.cpp's default cache type, so the f16 KV "
    "depth rows compare like with like. Its cost in accuracy: SmolLM2 int4_g32 wikitext-2 PPL (6 chunks of "
    "512) 23.1952 -> 23.1954, stories260K 6.95719 -> 6.95616 with the same greedy tokens.",
    "SwiGLU and nl4 (2026-12-07): the FFN's SiLU uses one fixed exp sequence (range reduction + degree-7 "
    "polynomial) in AVX-512/AVX2/scalar with the same bits: 3.1 -> 0.33 us per 1536-wide row, ~90 us of a "
    "~3 ms decode step that ran serially at 2 threads. nl4_g32 (non-uniform 4-bit, an fp16 scale per 32 codes: "
    "exactly Q4_0's bytes, lower weight error than int4_g32_sym) decodes through a byte-shuffle lookup into the "
    "int8 path, at about int4 speed.",
    "Bandwidth misses, profiled on the AMD EPYC: at 1 thread int4_g32, nl4_g32, int8, fp32 and f16 reach the "
    "70% target in most runs (int4_g32 77-96% across runs; int4_g64_sym 60-79%), int2_g64 53-61%: int2 streams fewer "
    "bytes per weight while the per-weight work is the same, so its decode tile is compute-bound (~18 GB/s "
    "in cache; 2 rows x 64 weights take ~18 vector instructions: unpack, header convert and scale, two "
    "permutes, two dot products, two converts, three fmas, at half rate for zmm on this core). Closing it "
    "needs fewer instructions per 64 weights than the canonical fp32 order (one fp32 lane per 4 weights) "
    "allows, e.g. activations quantized per 64 columns so that a group's two 32-blocks accumulate in int32 "
    "before one convert (a numerics change). At 2 threads perf (int4_g32, tg) puts the decode tiles at "
    "~65% of each thread's samples and they stream at ~55 GB/s, near the bound, while they run; the "
    "worker thread then waits ~19% of the time (serial per-step work on the main thread: SwiGLU with "
    "expf, RMSNorm, activation quantization, RoPE, residual adds, the 3-kv-head attention split over 2 "
    "threads) and the main thread ~5% at joins: 5 fork/joins per layer on ~2.6 ms steps. Closing it needs "
    "that serial work inside the parallel regions (fused epilogues) or a persistent per-layer schedule.",
]
TARGETS = {"tg_ratio": 1.3, "pp_ratio": 1.2, "tg_pct_bw": 70.0}


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def sha_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


# ------------------------------------------------------------------ model files
def gguf_weight_stats(path):
    """(bytes of 2-D weight tensors, their element count, bytes one decode step
    streams: every tensor except token_embd when a separate output.weight exists)."""
    import gguf
    r = gguf.GGUFReader(path)
    names = {t.name for t in r.tensors}
    w_bytes = w_elems = step = 0
    for t in r.tensors:
        nb, ne = int(t.n_bytes), int(t.n_elements)
        if sum(1 for d in t.shape.tolist() if d > 1) >= 2:
            w_bytes += nb
            w_elems += ne
        if not (t.name == "token_embd.weight" and "output.weight" in names):
            step += nb
    return w_bytes, w_elems, step


def nibble_model(cfg, bin_dir, threads):
    if NIBBLE[cfg] is None:
        return REF_GGUF
    if isinstance(NIBBLE[cfg], str):
        return llama_model(NIBBLE[cfg], threads)
    fmt, emb = NIBBLE[cfg]
    os.makedirs(PERF_DIR, exist_ok=True)
    out = os.path.join(PERF_DIR, f"smollm2.rtn.{fmt}.{emb}.nbl")
    if os.path.exists(out):
        return out
    src = REF_GGUF if os.path.exists(REF_GGUF) else SRC_GGUF
    cmd = [os.path.join(bin_dir, "nibble-quantize"), "-m", src, "-o", out + ".tmp", "--format", fmt,
           "--embed-format", emb, "-t", str(threads)]
    log("quantize:", " ".join(cmd))
    t0 = time.time()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    os.replace(out + ".tmp", out)
    log(f"  {time.time() - t0:.0f} s")
    return out


def llama_model(qtype, threads):
    if qtype == "F32":
        return REF_GGUF
    for d in (QUANT_DIR, PERF_DIR):
        p = os.path.join(d, f"smollm2.{qtype}.gguf")
        if os.path.exists(p):
            return p
    import llamacpp_quality as lq
    os.makedirs(PERF_DIR, exist_ok=True)
    out = os.path.join(PERF_DIR, f"smollm2.{qtype}.gguf")
    log(f"llama.cpp quantize {qtype} -> {out}")
    _, err = lq.quantize(REF_GGUF, out, qtype, threads, False)
    if err:
        raise RuntimeError(f"llama.cpp quantization to {qtype} failed: {err}")
    return out


# ------------------------------------------------------------------ measurement
def stat(v):
    n = len(v)
    m = sum(v) / n
    sd = (sum((x - m) ** 2 for x in v) / (n - 1)) ** 0.5 if n > 1 else 0.0
    return m, sd


def run_nibble(model, bin_dir, threads, p, n, reps):
    cmd = [os.path.join(bin_dir, "nibble-bench"), "-m", model, "-p", str(p), "-n", str(n), "-t", str(threads),
           "-r", str(reps), "--json"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    j = json.loads(out.strip().splitlines()[-1])
    return {"pp_tps": j["pp_tps"], "pp_sd": j["pp_tps_sd"], "pp_samples": j["pp_samples"],
            "tg_tps": j["tg_tps"], "tg_sd": j["tg_tps_sd"], "tg_samples": j["tg_samples"],
            "bytes_per_token": j["weight_bytes_per_token"], "read_bw_gbps": j["read_bw_gbps"],
            "backend": j["backend"]}


def run_llama(model, threads, p, n, reps):
    from llamacpp_util import open_llama
    llm = open_llama(model, n_ctx=p + n + 16, n_batch=p, n_ubatch=p, n_threads=threads,
                     n_threads_batch=threads, logits_all=False)
    vocab = llm.n_vocab()
    rng = random.Random(1234)
    toks = [rng.randrange(vocab) for _ in range(max(p, n))]

    def pp():
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(toks[:p])
        return p / (time.perf_counter() - t0)

    def tg():
        llm.reset()
        t0 = time.perf_counter()
        for i in range(n):
            llm.eval([toks[i]])
        return n / (time.perf_counter() - t0)

    res = {}
    for name, fn in (("pp", pp), ("tg", tg)):
        fn()  # warm-up
        v = [fn() for _ in range(reps)]
        m, sd = stat(v)
        res.update({f"{name}_tps": m, f"{name}_sd": sd, f"{name}_samples": v})
    llm.close() if hasattr(llm, "close") else None
    del llm
    return res


def run_nibble_depth(model, bin_dir, threads, d, n, reps, kv="f32"):
    cmd = [os.path.join(bin_dir, "nibble-bench"), "-m", model, "-p", "0", "-n", str(n), "-d", str(d), "-t",
           str(threads), "-r", str(reps), "--json", "--no-bandwidth", "--kv-dtype", kv]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    j = json.loads(out.strip().splitlines()[-1])
    return {"tg_tps": j["tg_tps"], "tg_sd": j["tg_tps_sd"], "tg_samples": j["tg_samples"]}


def run_llama_depth(model, threads, d, n, reps):
    """n single-token evals at positions d .. d + n - 1 after an untimed prefill of d tokens (each repetition
    rolls the context back to d: llm.eval drops the cache from n_tokens on)."""
    from llamacpp_util import open_llama
    llm = open_llama(model, n_ctx=d + n + 16, n_batch=512, n_ubatch=512, n_threads=threads,
                     n_threads_batch=threads, logits_all=False)
    vocab = llm.n_vocab()
    rng = random.Random(1234)
    toks = [rng.randrange(vocab) for _ in range(d + n)]
    llm.reset()
    llm.eval(toks[:d])

    def tg():
        llm.n_tokens = d
        t0 = time.perf_counter()
        for i in range(n):
            llm.eval([toks[d + i]])
        return n / (time.perf_counter() - t0)

    tg()  # warm-up
    v = [tg() for _ in range(reps)]
    m, sd = stat(v)
    llm.close() if hasattr(llm, "close") else None
    del llm
    return {"tg_tps": m, "tg_sd": sd, "tg_samples": v}


# ------------------------------------------------------------------ cache
def load_doc(path):
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {"entries": {}}


def save_doc(path, doc):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def measure(doc, out_path, key, fn, force):
    if key in doc["entries"] and not force:
        return doc["entries"][key]
    la0 = loadavg()
    t0 = time.time()
    r = fn()
    r.update(load_before=la0, load_after=loadavg(), seconds=round(time.time() - t0, 1),
             when=time.strftime("%Y-%m-%d %H:%M:%S"))
    doc["entries"][key] = r
    save_doc(out_path, doc)
    return r


# ------------------------------------------------------------------ report
def fmt_tps(m, sd):
    return f"{m:.1f} ± {sd:.1f}"


def build_rows(doc, pairs, threads_list):
    rows = []
    for t in threads_list:
        for cfg, qt in pairs:
            nb = doc["cur"]["nibble"].get(f"{cfg}|{t}")
            lc = doc["cur"]["llama"].get(f"{qt}|{t}")
            if nb is None or lc is None:
                continue
            rows.append((t, cfg, qt, nb, lc))
    return rows


def write_report(doc, pairs, threads_list, md_path, png_path, args):
    st = doc["stats"]
    rows = build_rows(doc, pairs, threads_list)
    L = []
    L.append("# CPU performance: nibble vs llama.cpp\n")
    L.append("Generated by `python3 bench/performance.py` (do not edit by hand). Model: SmolLM2-135M-Instruct "
             f"(F32 reference GGUF from bench/make_ref_gguf.py). pp{args.p} = one forward pass over {args.p} "
             f"tokens on a fresh context; tg{args.n} = {args.n} single-token decode steps from position 0; "
             f"{args.reps} timed repetitions after one warm-up, mean ± sd of tokens/s. Both engines run in the "
             "same session with the same thread counts. llama.cpp = llama-cpp-python "
             f"{doc.get('llama_cpp_version', '?')} (CPU backend, extra buffer types / AMX off), timed through "
             "`llm.eval` (tg includes ~tens of µs of Python per token).\n")
    L.append(f"Machine: {doc.get('cpu', '?')}; {doc.get('nproc', '?')} cores shared with other jobs "
             f"(load average during the run: {doc.get('load_range', '?')}), so numbers are noisy; ratios are "
             "taken between runs made minutes apart on the same machine. nibble kernels: "
             f"{doc.get('nibble_isa', '?')}.\n")
    L.append("bpw = bits per weight over all 2-D weight tensors (tied embedding / output head included). "
             "MB/tok = weight bytes a decode step streams; GB/s = MB/tok × tg tok/s; % bw = GB/s over the read "
             "bandwidth nibble-bench measured with the same thread count on a buffer of the same size. "
             "llama.cpp's k-quants (Q2_K, Q4_K_M) cannot use 256-wide super-blocks on SmolLM2's 576-wide rows "
             "and fall back to Q4_0/Q5_0/Q8_0 for most tensors, hence their measured bpw.\n")
    L.append("## Targets\n")
    L.append(f"* decode (tg) >= {TARGETS['tg_ratio']}x llama.cpp at matching bpw\n"
             f"* prefill (pp) >= {TARGETS['pp_ratio']}x llama.cpp at matching bpw\n"
             f"* decode >= {TARGETS['tg_pct_bw']:.0f}% of the measured read-bandwidth bound\n")
    for phase, lab in (("tg", f"Decode tg{args.n}"), ("pp", f"Prefill pp{args.p}")):
        L.append(f"\n## {lab} (tokens/s)\n")
        hdr = "| threads | nibble | bpw | llama.cpp | bpw | nibble t/s | llama.cpp t/s | ratio | target |"
        sep = "|---:|---|---:|---|---:|---:|---:|---:|---|"
        if phase == "tg":
            hdr += " nibble MB/tok | nibble GB/s | nibble % bw | llama.cpp MB/tok | llama.cpp GB/s | llama.cpp % bw | bw target |"
            sep += "---:|---:|---:|---:|---:|---:|---|"
        L.append(hdr)
        L.append(sep)
        for t, cfg, qt, nb, lc in rows:
            ratio = nb[f"{phase}_tps"] / lc[f"{phase}_tps"]
            tgt = TARGETS["tg_ratio" if phase == "tg" else "pp_ratio"]
            met = "met" if ratio >= tgt else "**missed**"
            s = (f"| {t} | {cfg} | {st['nibble'][cfg]['bpw']:.2f} | {qt} | {st['llama'][qt]['bpw']:.2f} | "
                 f"{fmt_tps(nb[phase + '_tps'], nb[phase + '_sd'])} | {fmt_tps(lc[phase + '_tps'], lc[phase + '_sd'])} | "
                 f"{ratio:.2f}x | {met} (>= {tgt}x) |")
            if phase == "tg":
                bw = nb["read_bw_gbps"]
                nmb = nb["bytes_per_token"] / 1e6
                lmb = st["llama"][qt]["step_bytes"] / 1e6
                ngb = nmb * nb["tg_tps"] / 1e3
                lgb = lmb * lc["tg_tps"] / 1e3
                npct = 100 * ngb / bw if bw else 0
                lpct = 100 * lgb / bw if bw else 0
                bmet = "met" if npct >= TARGETS["tg_pct_bw"] else "**missed**"
                s += (f" {nmb:.1f} | {ngb:.1f} | {npct:.0f}% of {bw:.0f} | {lmb:.1f} | {lgb:.1f} | {lpct:.0f}% | "
                      f"{bmet} |")
            L.append(s)
    depth_rows = doc.get("cur_depth", [])
    if depth_rows:
        L.append(f"\n## Decode at depth (long context, tokens/s)\n")
        L.append(f"tg{args.depth_n} @ dD = {args.depth_n} single-token decode steps at positions D .. "
                 f"D + {args.depth_n - 1} after an untimed prefill of D tokens (nibble-bench -d, llama-bench's "
                 "depth; llama.cpp: llm.eval of the D tokens, then the context rolled back to D before each "
                 "repetition). Attention then reads D cached positions per step: llama.cpp keeps K/V in F16 (its "
                 "default); nibble (the contiguous cache nibble-bench uses, K stored transposed so that attention "
                 "reads K^T tiles in place) in fp32 or, with --kv-dtype f16, in fp16 like llama.cpp. No target "
                 "is set for these rows.\n")
        L.append("| threads | depth | nibble | nibble KV | llama.cpp | nibble t/s | llama.cpp t/s | ratio |")
        L.append("|---:|---:|---|---|---|---:|---:|---:|")
        for row in depth_rows:
            t, d, cfg, qt, nb, lc = row[:6]
            kv = row[6] if len(row) > 6 else "f32"
            L.append(f"| {t} | {d} | {cfg} | {kv} | {qt} | {fmt_tps(nb['tg_tps'], nb['tg_sd'])} | "
                     f"{fmt_tps(lc['tg_tps'], lc['tg_sd'])} | {nb['tg_tps'] / lc['tg_tps']:.2f}x |")
    L.append("\n## Summary\n")
    for phase in ("tg", "pp"):
        rs = [nb[f"{phase}_tps"] / lc[f"{phase}_tps"] for _, _, _, nb, lc in rows]
        if rs:
            tgt = TARGETS["tg_ratio" if phase == "tg" else "pp_ratio"]
            L.append(f"* {phase}: nibble/llama.cpp ratio {min(rs):.2f}x .. {max(rs):.2f}x; "
                     f"target {tgt}x met in {sum(r >= tgt for r in rs)} of {len(rs)} rows.")
    L.append("\n## Notes\n")
    L.extend(f"* {n}" for n in NOTES + doc.get("notes", []))
    L.append("* Per-entry load averages, timestamps and raw samples are in the JSON; an entry is re-measured "
             "only when its key changes (nibble: a rebuilt nibble-bench), so the two engines' numbers in one "
             "row may come from different minutes of the session: compare them together with the load.")
    L.append(f"\n![performance](performance.png)\n\nRaw samples: bench/results/performance.json.\n")
    with open(md_path, "w") as f:
        f.write("\n".join(L) + "\n")
    try:
        plot(rows, st, png_path, args)
    except Exception as e:  # plotting is optional
        log("plot failed:", e)


def plot(rows, st, png_path, args):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    threads = sorted({r[0] for r in rows})
    fig, axes = plt.subplots(len(threads), 2, figsize=(13, 4.2 * len(threads)), squeeze=False)
    for i, t in enumerate(threads):
        rs = [r for r in rows if r[0] == t]
        for j, phase in enumerate(("tg", "pp")):
            ax = axes[i][j]
            labels = [f"{cfg}\nvs {qt}" for _, cfg, qt, _, _ in rs]
            x = range(len(rs))
            nbv = [r[3][f"{phase}_tps"] for r in rs]
            nbe = [r[3][f"{phase}_sd"] for r in rs]
            lcv = [r[4][f"{phase}_tps"] for r in rs]
            lce = [r[4][f"{phase}_sd"] for r in rs]
            ax.bar([k - 0.2 for k in x], nbv, 0.4, yerr=nbe, label="nibble", color="#2a7ab9")
            ax.bar([k + 0.2 for k in x], lcv, 0.4, yerr=lce, label="llama.cpp", color="#d9822b")
            for k in x:
                ax.text(k, max(nbv[k], lcv[k]) * 1.02, f"{nbv[k] / lcv[k]:.2f}x", ha="center", fontsize=8)
            ax.set_xticks(list(x))
            ax.set_xticklabels(labels, fontsize=7)
            ax.set_ylabel("tokens/s")
            ax.set_title(f"{'decode tg' + str(args.n) if phase == 'tg' else 'prefill pp' + str(args.p)}, "
                         f"{t} thread{'s' if t > 1 else ''}")
            ax.legend(fontsize=8)
    fig.suptitle("SmolLM2-135M on CPU: nibble vs llama.cpp (ratio above bars)")
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)


# ------------------------------------------------------------------ main
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", default="build", help="nibble build dir (bin/nibble-bench, bin/nibble-quantize)")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("-p", type=int, default=512)
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("--quick", action="store_true", help="int4_g32/Q4_0 and int8_g32_sym/Q8_0 only, 2 reps")
    ap.add_argument("--pairs", default="", help="comma list of nibble:llama pairs (default: all)")
    ap.add_argument("--force", action="store_true", help="re-measure everything")
    ap.add_argument("--force-llama", action="store_true", help="re-measure llama.cpp entries")
    ap.add_argument("-o", default=os.path.join(ROOT, "bench", "results", "performance.json"))
    ap.add_argument("--md", default=os.path.join(ROOT, "docs", "PERFORMANCE.md"))
    ap.add_argument("--png", default=os.path.join(ROOT, "docs", "performance.png"))
    ap.add_argument("--no-report", action="store_true", help="measure only (e.g. with --quick)")
    ap.add_argument("--depths", default="1024,4096",
                    help="decode at these context depths for the int4_g32/Q4_0 pair ('' skips)")
    ap.add_argument("--depth-n", type=int, default=64, help="decode steps per depth measurement")
    args = ap.parse_args()
    if args.quick and args.reps == 3:
        args.reps = 2
    pairs = PAIRS
    if args.quick:
        pairs = QUICK_PAIRS
    if args.pairs:
        pairs = [tuple(s.split(":")) for s in args.pairs.split(",")]
    threads_list = [int(x) for x in args.threads.split(",")]
    bin_dir = os.path.join(args.build if os.path.isabs(args.build) else os.path.join(ROOT, args.build), "bin")
    bench_bin = os.path.join(bin_dir, "nibble-bench")
    if not os.path.exists(bench_bin):
        sys.exit(f"error: {bench_bin} not found (build the nibble-bench target)")
    if not os.path.exists(REF_GGUF):
        sys.exit(f"error: {REF_GGUF} missing: run python3 bench/make_ref_gguf.py first")
    bench_id = sha_file(bench_bin)
    import llama_cpp
    doc = load_doc(args.o)
    doc["llama_cpp_version"] = llama_cpp.__version__
    doc["nproc"] = os.cpu_count()
    try:
        doc["cpu"] = [l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")][0]
    except (OSError, IndexError):
        doc["cpu"] = "?"
    isa = subprocess.run(["grep", "-o", "-m1", "avx512_vnni", "/proc/cpuinfo"], capture_output=True, text=True)
    try:
        amx = "amx_int8" in open("/proc/cpuinfo").read()
    except OSError:
        amx = False
    doc["nibble_isa"] = ("AVX-512 VNNI" if isa.stdout.strip() else "AVX2") + (
        " + AMX-INT8 tiles for prefill" if amx else "; no AMX: prefill by dequantized fp32 GEMM")
    _ = ""
    doc.setdefault("stats", {"nibble": {}, "llama": {}})
    doc["cur"] = {"nibble": {}, "llama": {}}
    loads = []
    _, n_w, _ = gguf_weight_stats(REF_GGUF)
    for cfg, qt in pairs:
        for t in threads_list:
            nm = nibble_model(cfg, bin_dir, max(threads_list))
            lm = llama_model(qt, max(threads_list))
            key = f"nibble|{cfg}|t{t}|p{args.p}|n{args.n}|r{args.reps}|{bench_id}"
            if f"{cfg}|{t}" not in doc["cur"]["nibble"]:
                log(f"nibble {cfg} t={t} ...")
                r = measure(doc, args.o, key, lambda: run_nibble(nm, bin_dir, t, args.p, args.n, args.reps),
                            args.force)
                doc["cur"]["nibble"][f"{cfg}|{t}"] = r
                doc["stats"]["nibble"][cfg] = {"bpw": r["bytes_per_token"] * 8 / n_w, "file": os.path.relpath(nm, ROOT)}
                loads += [r["load_before"], r["load_after"]]
                log(f"  pp {fmt_tps(r['pp_tps'], r['pp_sd'])}  tg {fmt_tps(r['tg_tps'], r['tg_sd'])}")
            key = f"llama|{qt}|t{t}|p{args.p}|n{args.n}|r{args.reps}"
            if f"{qt}|{t}" not in doc["cur"]["llama"]:
                log(f"llama.cpp {qt} t={t} ...")
                r = measure(doc, args.o, key, lambda: run_llama(lm, t, args.p, args.n, args.reps),
                            args.force or args.force_llama)
                doc["cur"]["llama"][f"{qt}|{t}"] = r
                wb, we, step = gguf_weight_stats(lm)
                doc["stats"]["llama"][qt] = {"bpw": wb * 8 / we, "step_bytes": step, "file": os.path.relpath(lm, ROOT)}
                loads += [r["load_before"], r["load_after"]]
                log(f"  pp {fmt_tps(r['pp_tps'], r['pp_sd'])}  tg {fmt_tps(r['tg_tps'], r['tg_sd'])}")
    doc["cur_depth"] = []
    depths = [int(x) for x in args.depths.split(",") if x.strip()]
    llama_depth_done = set()
    for cfg, qt, kv in DEPTH_PAIRS if depths else []:
        nm = nibble_model(cfg, bin_dir, max(threads_list))
        lm = llama_model(qt, max(threads_list))
        for t in threads_list:
            for d in depths:
                kvk = "" if kv == "f32" else f"|kv{kv}"
                key = f"nibble-depth|{cfg}{kvk}|t{t}|d{d}|n{args.depth_n}|r{args.reps}|{bench_id}"
                log(f"nibble {cfg} ({kv} KV) t={t} d={d} ...")
                nb = measure(doc, args.o, key,
                             lambda: run_nibble_depth(nm, bin_dir, t, d, args.depth_n, args.reps, kv), args.force)
                key = f"llama-depth|{qt}|t{t}|d{d}|n{args.depth_n}|r{args.reps}"
                log(f"llama.cpp {qt} t={t} d={d} ...")
                # One llama.cpp measurement per (type, threads, depth) per run, shared by nibble's KV types.
                lc = measure(doc, args.o, key, lambda: run_llama_depth(lm, t, d, args.depth_n, args.reps),
                             (args.force or args.force_llama) and key not in llama_depth_done)
                llama_depth_done.add(key)
                loads += [nb["load_before"], nb["load_after"], lc["load_before"], lc["load_after"]]
                log(f"  tg {fmt_tps(nb['tg_tps'], nb['tg_sd'])} vs {fmt_tps(lc['tg_tps'], lc['tg_sd'])}")
                doc["cur_depth"].append((t, d, cfg, qt, nb, lc, kv))
    l1 = [x[0] for x in loads if x]
    doc["load_range"] = f"{min(l1):.1f} .. {max(l1):.1f} (1-min)" if l1 else "?"
    doc["nibble_bench_id"] = bench_id
    save_doc(args.o, doc)
    if not args.no_report:
        write_report(doc, pairs, threads_list, args.md, args.png, args)
        log("wrote", args.md, args.png)
    # Short console table.
    for t, cfg, qt, nb, lc in build_rows(doc, pairs, threads_list):
        print(f"t={t} {cfg:>13} vs {qt:<7} tg {nb['tg_tps']:7.1f} / {lc['tg_tps']:7.1f} = "
              f"{nb['tg_tps'] / lc['tg_tps']:.2f}x   pp {nb['pp_tps']:7.1f} / {lc['pp_tps']:7.1f} = "
              f"{nb['pp_tps'] / lc['pp_tps']:.2f}x")


if __name__ == "__main__":
    main()
