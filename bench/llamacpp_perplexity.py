#!/usr/bin/env python3
"""llama.cpp's side of the perplexity comparison, through llama-cpp-python.

Re-implements llama-perplexity's chunk convention on top of llama.cpp's own
tokenizer and logits: tokenize the whole file (BOS first if the vocabulary adds
one), cut into non-overlapping chunks of CTX tokens, replace each chunk's first
token by BOS when the vocabulary adds BOS, evaluate each chunk in a fresh
context with all logits, score positions CTX/2 .. CTX-2 against the next token.

Writes JSON: {"ppl", "mean_nll", "tokens", "ctx", "chunks", "unit_mean_nll": [...]}
(the same keys nibble-perplexity --json prints).

    python3 bench/llamacpp_perplexity.py -m models/SmolLM2-135M-Instruct.Q4_1.gguf \
        -f ../shared/data/wikitext-2-test.txt -c 512 --chunks 20 -o tests/fixtures/x.json
Needs: NIBBLE_WITH_LLAMACPP=1 scripts/install-deps.sh (builds llama-cpp-python from source).
"""
import argparse
import json
import math
import sys
import time

import numpy as np


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("-f", "--file", required=True)
    ap.add_argument("-c", "--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=-1)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-o", "--output", default="-")
    args = ap.parse_args()

    from llama_cpp import llama_cpp as C
    sys.path.insert(0, __import__("os").path.dirname(__file__))
    from llamacpp_util import open_llama

    llm = open_llama(args.model, n_ctx=args.ctx, n_batch=args.ctx, n_ubatch=args.ctx,
                     logits_all=True, n_threads=args.threads)
    vocab = C.llama_model_get_vocab(llm.model) if hasattr(C, "llama_model_get_vocab") else None
    add_bos = bool(C.llama_vocab_get_add_bos(vocab)) if vocab is not None else llm._model.add_bos_token()
    bos = llm.token_bos()
    text = open(args.file, "rb").read()
    tokens = llm.tokenize(text, add_bos=add_bos, special=False)
    n_avail = len(tokens) // args.ctx
    n_chunks = min(args.chunks, n_avail) if args.chunks > 0 else n_avail
    print(f"llama.cpp perplexity: {len(tokens)} tokens, {n_chunks} chunks of {args.ctx}, add_bos={add_bos}",
          file=sys.stderr)
    first = args.ctx // 2
    nll_sum, count, unit = 0.0, 0, []
    t0 = time.time()
    for c in range(n_chunks):
        batch = tokens[c * args.ctx:(c + 1) * args.ctx]
        if add_bos:
            batch[0] = bos
        llm.reset()
        llm.eval(batch)
        logits = np.asarray(llm.scores[:args.ctx], dtype=np.float64)
        chunk = 0.0
        for j in range(first, args.ctx - 1):
            row = logits[j]
            mx = row.max()
            lse = mx + math.log(np.exp(row - mx).sum())
            chunk += lse - row[tokens[c * args.ctx + j + 1]]
        n = args.ctx - 1 - first
        nll_sum += chunk
        count += n
        unit.append(chunk / n)
        print(f"[{c + 1}]{math.exp(nll_sum / count):.4f}", end=" ", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    out = {"engine": "llama.cpp (llama-cpp-python)", "model": args.model, "file": args.file, "mode": "chunks",
           "ctx": args.ctx, "chunks": n_chunks, "ppl": math.exp(nll_sum / count), "mean_nll": nll_sum / count,
           "tokens": count, "unit_mean_nll": unit, "seconds": time.time() - t0, "threads": args.threads}
    s = json.dumps(out, indent=1)
    if args.output == "-":
        print(s)
    else:
        open(args.output, "w").write(s + "\n")


if __name__ == "__main__":
    main()
