#!/usr/bin/env python3
"""Held-out checks of the budget wins in docs/QUALITY.md, on text its tables never looked at.

The quality tables pick some configurations after looking at the evaluation text (QUALITY.md's
caveats say which). This script re-evaluates those winners and the llama.cpp rows they beat on
disjoint text, both engines, one command:

  * stories260K: tinystories-val documents 200-399 (the tables score documents 0-199, GPTQ
    calibrates on the last 40 %), document mode as in the tables;
  * smollm2: the second half of wikitext-2 test, from the first article heading (" = Title = ")
    after the middle of the file; -c 512, 40 chunks as in the tables.

nibble rows are quantized with exactly the table's command (bench/quality.py run_config; allocation
rows reuse the table's allocation cache, so it is the same model) and evaluated on the held-out text
against the fp32 model's logits on that text. llama.cpp rows go through bench/llamacpp_quality.py
with its data file swapped. Results: bench/results/heldout.json (nibble) and
bench/results/llamacpp_heldout.json; `python3 bench/quality.py --doc-only` prints them in QUALITY.md.

    python3 bench/heldout.py [-t 2] [--force]
"""
import argparse
import copy
import os
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import quality as q  # noqa: E402
import quality_common as qc  # noqa: E402

RESULTS = os.path.join(q.ROOT, "bench", "results", "heldout.json")
LLAMA_RESULTS = os.path.join(q.ROOT, "bench", "results", "llamacpp_heldout.json")
# (model, nibble rows as in quality.CONFIGS, llama.cpp types): the budget wins that involved a choice.
CHECKS = [
    ("stories260K", [("gptq-hg-c32k", "bpw4.98", "auto"), ("gptq-hg", "bpw4.98", "auto"),
                     ("gptq-hg-rf-n16-c32k", "bpw4.5", "auto"), ("gptq-hg-ao-rf-n16-b16-c32k", "bpw4.5", "auto"),
                     ("gptq-hg-ao-rf-cd-n16-b16-c32k", "bpw4.5", "auto")],
     ["IQ2_M+uimat", "Q3_K_M"]),
    ("smollm2", [("gptq-seq-rot-hg-c32k", "bpw2.5", "auto-low"), ("gptq-seq-rot-hg-cd-c32k", "bpw2.5", "auto-low")],
     ["IQ2_XXS+uimat"]),
]


def stories_heldout():
    path = os.path.join(q.WORK, "tinystories-val.heldout.txt")
    docs = qc.tinystories_docs(q.TINY, 0)[200:400]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n<|endoftext|>\n".join(docs))
    return path


def wikitext_heldout():
    path = os.path.join(q.WORK, "wikitext-2-test.heldout.txt")
    text = open(q.WIKI, encoding="utf-8").read()
    heading = re.compile(r"^ = [^=].* = $")
    pos = len(text) // 2
    lines = text[pos:].split("\n")
    off = pos
    for i, line in enumerate(lines):
        if i > 0 and heading.match(line):
            break
        off += len(line) + 1
    with open(path, "w", encoding="utf-8") as f:
        f.write(text[off:])
    return path


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=os.environ.get("NIBBLE_BIN", os.path.join(q.ROOT, "build", "bin")))
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--force", action="store_true", help="re-run finished rows")
    ap.add_argument("--no-llama", action="store_true", help="nibble rows only")
    args = ap.parse_args()
    os.makedirs(os.path.join(q.WORK, "logs"), exist_ok=True)
    texts = {"stories260K": stories_heldout(), "smollm2": wikitext_heldout()}
    # quality.run_config / ensure_reference read these attributes of args.
    qa = argparse.Namespace(bin=args.bin, threads=args.threads, force=args.force, force_ref=args.force,
                            keep=False, fast_eval=False, output=RESULTS)
    doc = q.load_json(RESULTS)
    for model, rows, _ in CHECKS:
        name = f"{model}@heldout"
        cfg = copy.deepcopy(q.MODELS[model])
        cfg["base"] = model
        cfg["eval"] = [texts[model] if a in (q.TINY, q.WIKI) else a for a in cfg["eval"]]
        cfg["settings"]["data"] = os.path.basename(texts[model])
        q.MODELS[name] = cfg
        logits = q.ensure_reference(name, cfg, qa, doc)
        for method, fmt, embed in rows:
            q.run_config(name, method, fmt, embed, qa, doc, logits)
    if not args.no_llama:
        for model, _, types in CHECKS:
            code = ("import sys; sys.path.insert(0, %r); import llamacpp_quality as L; "
                    "L.MODELS[%r]['data'] = %r; "
                    "sys.argv = ['llamacpp_quality.py', '-o', %r, '--models', %r, '--types', %r, '-t', %r]; "
                    "sys.exit(L.main())"
                    % (HERE, model, texts[model], LLAMA_RESULTS, model, ",".join(types), str(args.threads)))
            subprocess.run([sys.executable, "-c", code], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
