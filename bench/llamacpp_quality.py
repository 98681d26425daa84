#!/usr/bin/env python3
"""llama.cpp's half of the quantization quality table: PPL and KLD vs bits/weight.

For each model, quantizes the F32 reference GGUF (bench/make_ref_gguf.py) with
llama.cpp's own quantizer (llama_cpp.llama_model_quantize) into its standard
types, reads the achieved bits per weight back with gguf-py, and evaluates every
file (reference included) through llama-cpp-python:
  * smollm2: llama-perplexity chunks on wikitext-2-test (-c 512, --chunks 40,
    BOS per vocab, positions CTX/2 .. CTX-2 scored; as bench/llamacpp_perplexity.py).
  * stories260K: document mode on tinystories-val (split on <|endoftext|>, stripped,
    empties skipped, BOS + tokens truncated to 512, every next token scored,
    first --max-docs documents).
KLD = mean over scored positions of KL(P_ref || P_quant) with log-softmax in
float64; top1 = rate at which both argmaxes agree. The reference's raw float32
logits of the scored positions are cached on disk (lossless; ~2 GB for smollm2)
under models/ref/cache/ so each quantized type needs one model pass;
--no-ref-cache evaluates reference and quantized model side by side instead.

Types named "<TYPE>+uimat" are quantized with a constant (all-ones) importance
matrix: llama.cpp refuses IQ1/IQ2 types without one, and a uniform matrix carries
no calibration information. They are labelled as such in the output.

Resumable: entries already in -o with the same settings are skipped unless --force.
Quantized files go to models/ref/quant/ and are reused unless --force.

    python3 bench/llamacpp_quality.py [-o bench/results/llamacpp_quality.json] \
        [--models smollm2,stories260K] [--types Q8_0,Q4_K_M,...] [-t 2] [--force]
Needs: numpy, gguf, llama-cpp-python (NIBBLE_WITH_LLAMACPP=1 scripts/install-deps.sh).
"""
import argparse
import ctypes
import hashlib
import json
import os
import re
import sys
import tempfile
import time
from collections import Counter

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
sys.path.insert(0, HERE)

import quality_common as qc  # noqa: E402

REF_DIR = os.path.join(ROOT, "models", "ref")
MODELS = {
    "smollm2": {"ref": "SmolLM2-135M-Instruct.F32.gguf", "mode": "chunks",
                "data": os.path.join(SHARED, "data", "wikitext-2-test.txt"),
                "note": "reference = SmolLM2-135M-Instruct.Q4_1.gguf dequantized to F32"},
    "stories260K": {"ref": "stories260K.F32.gguf", "mode": "docs",
                    "data": os.path.join(SHARED, "data", "tinystories-val.txt"),
                    "note": "reference = llama2.c stories260K.bin converted to F32 GGUF"},
}
# Evaluation order (the run is resumable): the types first, then extras.
DEFAULT_TYPES = ("Q8_0,Q6_K,Q5_K_M,Q4_K_M,Q4_0,Q3_K_M,Q2_K,IQ2_M,IQ2_XXS,IQ1_S,"
                 "IQ4_XS,IQ3_S,IQ3_XXS,IQ2_M+uimat,IQ2_XXS+uimat,Q4_1")
REF_TYPE = "F32"


# ---------------------------------------------------------------- quantization
class _CaptureStderr:
    """Redirects fd 2 (where llama.cpp logs) into a temporary file."""

    def __enter__(self):
        sys.stderr.flush()
        self.f = tempfile.TemporaryFile()
        self.saved = os.dup(2)
        os.dup2(self.f.fileno(), 2)
        return self

    def __exit__(self, *exc):
        os.dup2(self.saved, 2)
        os.close(self.saved)
        self.f.seek(0)
        self.text = self.f.read().decode("utf-8", errors="replace")
        self.f.close()
        return False


def _uniform_imatrix(ref_path):
    """Null-terminated llama_model_imatrix_data array: ones(ne0) for every matrix."""
    import gguf
    from llama_cpp import llama_cpp as C
    r = gguf.GGUFReader(ref_path)
    mats = [(t.name, int(t.shape[0])) for t in r.tensors if sum(1 for d in t.shape.tolist() if d > 1) >= 2]
    keep = []
    arr = (C.llama_model_imatrix_data * (len(mats) + 1))()
    for i, (name, ne0) in enumerate(mats):
        nm = ctypes.create_string_buffer(name.encode())
        data = np.ones(ne0, dtype=np.float32)
        keep += [nm, data]
        arr[i].name = ctypes.cast(nm, ctypes.c_char_p)
        arr[i].data = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        arr[i].size = ne0
    arr[len(mats)].name = None
    arr[len(mats)].size = 0
    return arr, keep


def _parse_quant_log(text):
    fb = Counter()
    for m in re.finditer(r"required for type\s+(\S+)\).*?-> falling back to\s+(\S+)", text):
        fb[f"{m.group(1)}->{m.group(2)}"] += 1
    m = re.search(r"WARNING: (\d+) of (\d+) tensor\(s\) required fallback", text)
    errors = [ln.strip() for ln in text.splitlines() if "ERROR" in ln or "failed" in ln.lower()]
    return {"fallback_tensors": int(m.group(1)) if m else 0,
            "fallbacks": dict(sorted(fb.items())), "errors": errors}


def quantize(ref_path, out_path, qtype, threads, force):
    """Quantizes ref_path into out_path. Returns (info dict, error string or None)."""
    from llama_cpp import llama_cpp as C
    base, _, opt = qtype.partition("+")
    ftype = getattr(C, "LLAMA_FTYPE_MOSTLY_" + base, None)
    if ftype is None:
        return {}, f"llama_cpp has no LLAMA_FTYPE_MOSTLY_{base}"
    log_path = out_path + ".log"
    if os.path.exists(out_path) and os.path.exists(log_path) and not force:
        text = open(log_path, encoding="utf-8", errors="replace").read()
        return dict(_parse_quant_log(text), quant_seconds=None, reused=True), None
    p = C.llama_model_quantize_default_params()
    p.ftype = ftype
    p.nthread = threads
    keep = None
    if opt == "uimat":
        arr, keep = _uniform_imatrix(ref_path)
        p.imatrix = ctypes.cast(arr, ctypes.POINTER(C.llama_model_imatrix_data))
    elif opt:
        return {}, f"unknown type option +{opt} (only +uimat)"
    tmp = out_path + ".tmp"
    t0 = time.time()
    from llama_cpp import _logger
    with _CaptureStderr() as cap:
        # llama-cpp-python routes llama.cpp's log through a Python callback that
        # drops warnings/errors once a Llama(verbose=False) exists: let them through.
        _logger.set_verbose(True)
        try:
            rc = C.llama_model_quantize(ref_path.encode(), tmp.encode(), ctypes.byref(p))
        finally:
            _logger.set_verbose(False)
    dt = time.time() - t0
    del keep
    info = dict(_parse_quant_log(cap.text), quant_seconds=dt, reused=False)
    if rc != 0:
        if os.path.exists(tmp):
            os.remove(tmp)
        why = "; ".join(info["errors"]) or f"llama_model_quantize returned {rc}"
        return info, why
    os.replace(tmp, out_path)
    with open(log_path, "w") as f:
        f.write(cap.text)
    return info, None


# ---------------------------------------------------------------- evaluation
def _open(path, n_ctx, threads):
    from llamacpp_util import open_llama
    return open_llama(path, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                      n_threads=threads, n_threads_batch=threads)


def _rows(llm, unit):
    toks, first = unit
    llm.reset()
    llm.eval(toks)
    return np.array(llm.scores[first:len(toks) - 1], dtype=np.float32)


def build_units(name, cfg, ref_path, args):
    from llama_cpp import llama_cpp as C
    from llamacpp_util import open_llama
    voc = open_llama(ref_path, vocab_only=True)
    vocab = C.llama_model_get_vocab(voc.model)
    add_bos = bool(C.llama_vocab_get_add_bos(vocab))
    bos = voc.token_bos()
    if cfg["mode"] == "chunks":
        toks = voc.tokenize(open(cfg["data"], "rb").read(), add_bos=add_bos, special=False)
        units = qc.chunk_units(toks, args.ctx, args.chunks, add_bos, bos)
        settings = {"mode": "chunks", "ctx": args.ctx, "chunks": len(units), "add_bos": add_bos,
                    "data": os.path.basename(cfg["data"])}
    else:
        docs = qc.tinystories_docs(cfg["data"], args.max_docs)
        units = qc.doc_units(docs, lambda d: voc.tokenize(d.encode("utf-8"), add_bos=False, special=False),
                             bos, args.doc_len)
        settings = {"mode": "docs", "max_docs": args.max_docs, "docs": len(units), "max_len": args.doc_len,
                    "data": os.path.basename(cfg["data"])}
    del voc
    return units, settings


class RefLogits:
    """Reference logits of every scored row, float32 on disk (or computed live)."""

    def __init__(self, name, ref_path, units, n_ctx, threads, use_cache):
        self.units, self.ref_path, self.n_ctx, self.threads = units, ref_path, n_ctx, threads
        self.offsets = np.cumsum([0] + [qc.n_scored(u) for u in units])
        self.mm = None
        self.live = None
        if use_cache:
            h = hashlib.sha1()
            st = os.stat(ref_path)
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
            for toks, first in units:
                h.update(np.asarray(toks, dtype=np.int32).tobytes() + first.to_bytes(4, "little"))
            d = os.path.join(REF_DIR, "cache")
            os.makedirs(d, exist_ok=True)
            self.path = os.path.join(d, f"{name}.{h.hexdigest()[:16]}.logits.npy")
            if os.path.exists(self.path):
                self.mm = np.load(self.path, mmap_mode="r")
                if self.mm.shape[0] != self.offsets[-1]:
                    self.mm = None
        else:
            self.live = _open(ref_path, n_ctx, threads)

    def needs_build(self):
        return self.live is None and self.mm is None

    def build(self, scorer):
        """One pass of the reference: fills the cache and scores the reference."""
        llm = _open(self.ref_path, self.n_ctx, self.threads)
        tmp = self.path + ".tmp.npy"
        out = None
        for i, u in enumerate(self.units):
            rows = _rows(llm, u)
            if out is None:
                out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32,
                                                shape=(int(self.offsets[-1]), rows.shape[1]))
            out[self.offsets[i]:self.offsets[i + 1]] = rows
            scorer.add(rows, qc.unit_targets(u), rows)
            _progress(i, len(self.units), scorer)
        out.flush()
        del out
        os.replace(tmp, self.path)
        self.mm = np.load(self.path, mmap_mode="r")

    def get(self, i):
        if self.live is not None:
            return _rows(self.live, self.units[i])
        return np.asarray(self.mm[self.offsets[i]:self.offsets[i + 1]])


def _progress(i, n, scorer):
    if (i + 1) % max(1, n // 10) == 0 or i + 1 == n:
        r = scorer.result()
        extra = f" kld={r['kld']:.5f}" if "kld" in r else ""
        print(f"    [{i + 1}/{n}] ppl={r['ppl']:.4f}{extra}", file=sys.stderr, flush=True)


def evaluate(path, units, ref, n_ctx, threads):
    llm = _open(path, n_ctx, threads)
    sc = qc.Scorer()
    for i, u in enumerate(units):
        sc.add(_rows(llm, u), qc.unit_targets(u), ref.get(i))
        _progress(i, len(units), sc)
    return sc


# ---------------------------------------------------------------- results file
def _load(path):
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {}


def _save(path, doc):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def _put(doc, entry):
    doc["entries"] = [e for e in doc.get("entries", [])
                      if (e["model"], e["type"]) != (entry["model"], entry["type"])] + [entry]


def print_table(doc, out=sys.stdout):
    ents = doc.get("entries", [])
    refs = {e["model"]: e for e in ents if e["type"] == REF_TYPE and e.get("ppl")}
    hdr = (f"{'model':<12} {'type':<14} {'bpw_all':>7} {'bpw_lin':>7} {'bpw_blk':>7} {'ppl':>9} "
           f"{'dppl%':>7} {'kld':>8} {'kld_p99':>8} {'top1%':>6} {'tokens':>6} {'sec':>6}  fallback")
    print(hdr, file=out)
    print("-" * len(hdr), file=out)
    order = {m: i for i, m in enumerate(MODELS)}
    for e in sorted(ents, key=lambda e: (order.get(e["model"], 99), -(e.get("bpw_all") or 99))):
        if not e.get("available", True):
            print(f"{e['model']:<12} {e['type']:<14} unavailable: {e.get('reason', '')[:90]}", file=out)
            continue
        r = refs.get(e["model"])
        dppl = 100.0 * (e["ppl"] / r["ppl"] - 1.0) if r else float("nan")
        fb = e.get("fallback_tensors", 0)
        fbs = f"{fb}/{e.get('n_tensors', '?')}" if fb else "-"
        print(f"{e['model']:<12} {e['type']:<14} {e['bpw_all']:7.3f} {e['bpw_linear']:7.3f} "
              f"{e['bpw_blk_linear']:7.3f} {e['ppl']:9.4f} {dppl:7.2f} {e['kld']:8.5f} {e['kld_p99']:8.4f} "
              f"{100 * e['top1']:6.2f} {e['tokens']:6d} {e['seconds']:6.1f}  {fbs}", file=out)


# ---------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--output", default=os.path.join(HERE, "results", "llamacpp_quality.json"))
    ap.add_argument("--models", default="stories260K,smollm2", help=f"subset of {','.join(MODELS)}")
    ap.add_argument("--types", default=DEFAULT_TYPES)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-c", "--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=40)
    ap.add_argument("--max-docs", type=int, default=200)
    ap.add_argument("--doc-len", type=int, default=512)
    ap.add_argument("--force", action="store_true", help="recompute entries and re-quantize files")
    ap.add_argument("--no-ref-cache", action="store_true",
                    help="evaluate the reference beside each quantized model instead of caching its logits")
    ap.add_argument("--table", action="store_true", help="only print the table of -o")
    args = ap.parse_args()

    doc = _load(args.output)
    if args.table:
        print_table(doc)
        return 0
    import llama_cpp
    doc.setdefault("generator", "bench/llamacpp_quality.py")
    doc["llama_cpp_python"] = llama_cpp.__version__
    doc["notes"] = ("bpw_all: all tensors incl. norms; bpw_linear: 2-D tensors (incl. token_embd = tied output); "
                    "bpw_blk_linear: 2-D tensors in blk.* only. kld: mean KL(P_ref||P_q) nats, float64. "
                    "seconds: quantized-model evaluation only (reference logits cached), 2 shared cores, noisy. "
                    "'+uimat': quantized with an all-ones importance matrix.")
    types = [t.strip() for t in args.types.split(",") if t.strip()]
    qdir = os.path.join(REF_DIR, "quant")
    os.makedirs(qdir, exist_ok=True)

    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        if name not in MODELS:
            print(f"unknown model {name!r} (have {', '.join(MODELS)})", file=sys.stderr)
            return 2
        cfg = MODELS[name]
        ref_path = os.path.join(REF_DIR, cfg["ref"])
        if not os.path.exists(ref_path):
            print(f"{ref_path} missing: running make_ref_gguf", file=sys.stderr)
            import make_ref_gguf
            make_ref_gguf.build(REF_DIR)
        units, settings = build_units(name, cfg, ref_path, args)
        n_ctx = max(len(u[0]) for u in units)
        print(f"== {name}: {len(units)} units, {sum(qc.n_scored(u) for u in units)} scored tokens, "
              f"{settings}", file=sys.stderr, flush=True)

        def done(t):
            for e in doc.get("entries", []):
                if e["model"] == name and e["type"] == t and e.get("settings") == settings:
                    return True
            return False

        todo = [t for t in [REF_TYPE] + types if args.force or not done(t)]
        if not todo:
            continue
        ref = RefLogits(name, ref_path, units, n_ctx, args.threads, not args.no_ref_cache)
        if ref.needs_build() and REF_TYPE not in todo:
            todo.insert(0, REF_TYPE)  # the reference pass fills the logits cache
        for t in todo:
            base = {"model": name, "type": t, "settings": settings, "reference": cfg["note"]}
            if t == REF_TYPE:
                path, qinfo = ref_path, {}
            else:
                path = os.path.join(qdir, f"{name}.{t.replace('+', '-')}.gguf")
                print(f"-- {name} {t}: quantizing", file=sys.stderr, flush=True)
                qinfo, err = quantize(ref_path, path, t, args.threads, args.force)
                if err:
                    print(f"   unavailable: {err}", file=sys.stderr, flush=True)
                    _put(doc, dict(base, available=False, reason=err))
                    _save(args.output, doc)
                    continue
            print(f"-- {name} {t}: evaluating {os.path.basename(path)}", file=sys.stderr, flush=True)
            t0 = time.time()
            if t == REF_TYPE and ref.needs_build():
                sc = qc.Scorer()
                ref.build(sc)
            else:
                sc = evaluate(path, units, ref, n_ctx, args.threads)
            secs = time.time() - t0
            bpw = qc.gguf_bpw(path)
            entry = dict(base, available=True, **{k: bpw[k] for k in ("bpw_all", "bpw_linear", "bpw_blk_linear")},
                         **sc.result(), seconds=secs, threads=args.threads, n_params=bpw["n_params"], tensor_bytes=bpw["tensor_bytes"],
                         file_bytes=bpw["file_bytes"], n_tensors=sum(bpw["tensor_types"].values()),
                         tensor_types=bpw["tensor_types"], file=os.path.relpath(path, ROOT))
            entry.update({k: qinfo[k] for k in ("fallback_tensors", "fallbacks", "quant_seconds") if k in qinfo})
            _put(doc, entry)
            _save(args.output, doc)
            print(f"   {t}: bpw={entry['bpw_all']:.3f} ppl={entry['ppl']:.4f} kld={entry.get('kld', 0):.5f} "
                  f"top1={entry.get('top1', 1):.4f} ({secs:.0f}s)", file=sys.stderr, flush=True)
    print_table(doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
