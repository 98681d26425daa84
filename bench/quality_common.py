"""Engine-independent pieces of the quantization quality table (PPL / KLD vs bpw).

Goals: one definition of (a) bits per weight of a GGUF file, (b) the scored
units of each benchmark (llama-perplexity chunks on wikitext-2; whole documents
on tinystories-val), and (c) the NLL / KL(P_ref || P_q) / top-1 accumulation in
float64, so llama.cpp's and nibble's halves of the table measure the same thing.
Non-goals: running any model (callers supply logits), tokenization.

Units: a unit is (tokens, first) — evaluate `tokens` in a fresh context and
score every position j in [first, len(tokens) - 2] against tokens[j + 1].
"""
import math
import os
from collections import Counter

import numpy as np


# ---------------------------------------------------------------- bits per weight
def gguf_bpw(path):
    """Bits per weight of a GGUF file, read back with gguf-py's GGUFReader.

    bpw_all: 8 * (data bytes of every tensor, norms included) / (all parameters).
    bpw_linear: the same over 2-D tensors only (attention/FFN matrices and the
      token embedding, which is also the output matrix when tied).
    bpw_blk_linear: 2-D tensors inside the transformer blocks only (blk.*).
    """
    import gguf
    r = gguf.GGUFReader(path)
    tot_b = tot_n = lin_b = lin_n = blk_b = blk_n = 0
    types = Counter()
    for t in r.tensors:
        nb, ne = int(t.n_bytes), int(t.n_elements)
        tot_b += nb
        tot_n += ne
        types[t.tensor_type.name] += 1
        if sum(1 for d in t.shape.tolist() if d > 1) >= 2:  # a matrix
            lin_b += nb
            lin_n += ne
            if t.name.startswith("blk."):
                blk_b += nb
                blk_n += ne
    return {
        "bpw_all": 8.0 * tot_b / tot_n,
        "bpw_linear": 8.0 * lin_b / lin_n if lin_n else None,
        "bpw_blk_linear": 8.0 * blk_b / blk_n if blk_n else None,
        "n_params": tot_n,
        "tensor_bytes": tot_b,
        "file_bytes": os.path.getsize(path),
        "tensor_types": dict(sorted(types.items())),
    }


# ---------------------------------------------------------------- benchmark units
def chunk_units(tokens, ctx, n_chunks, add_bos, bos):
    """llama-perplexity's convention: non-overlapping CTX-token chunks, first token
    replaced by BOS when the vocabulary adds BOS, score positions CTX/2 .. CTX-2.
    n_chunks <= 0 means all complete chunks."""
    n_avail = len(tokens) // ctx
    n = min(n_chunks, n_avail) if n_chunks > 0 else n_avail
    units = []
    for c in range(n):
        batch = list(tokens[c * ctx:(c + 1) * ctx])
        if add_bos:
            batch[0] = bos
        units.append((batch, ctx // 2))
    return units


def tinystories_docs(path, max_docs):
    """Documents of tinystories-val split on <|endoftext|>, stripped, empties
    skipped, the first max_docs (all when max_docs <= 0)."""
    text = open(path, encoding="utf-8").read()
    docs = [d.strip() for d in text.split("<|endoftext|>")]
    docs = [d for d in docs if d]
    return docs[:max_docs] if max_docs > 0 else docs


def doc_units(docs, tokenize, bos, max_len):
    """Document mode: BOS + tokens(doc) truncated to max_len, every next-token
    prediction scored. `tokenize(str) -> list[int]` must NOT add BOS."""
    units = []
    for d in docs:
        toks = [bos] + list(tokenize(d))
        toks = toks[:max_len]
        if len(toks) >= 2:
            units.append((toks, 0))
    return units


def unit_targets(unit):
    toks, first = unit
    return np.asarray(toks[first + 1:], dtype=np.int64)


def n_scored(unit):
    toks, first = unit
    return max(0, len(toks) - 1 - first)


# ---------------------------------------------------------------- scoring
def log_softmax64(logits):
    x = np.asarray(logits, dtype=np.float64)
    m = x.max(axis=1, keepdims=True)
    z = x - m
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


class Scorer:
    """Accumulates NLL, KL(P_ref || P_q) and top-1 agreement over scored rows.

    add(q_logits, targets, ref_logits=None): q_logits / ref_logits are (n, V)
    raw logits of the scored positions (any float dtype; computed in float64).
    Thread safety: none (single-threaded use).
    """

    def __init__(self):
        self.nll_sum = 0.0
        self.count = 0
        self.kl = []
        self.top1 = 0
        self.unit_nll = []

    def add(self, q_logits, targets, ref_logits=None):
        lq = log_softmax64(q_logits)
        n = lq.shape[0]
        if n != len(targets):
            raise ValueError(f"scored rows {n} != targets {len(targets)}")
        nll = -lq[np.arange(n), targets]
        self.nll_sum += float(nll.sum())
        self.count += n
        self.unit_nll.append(float(nll.mean()) if n else float("nan"))
        if ref_logits is not None:
            lr = log_softmax64(ref_logits)
            if lr.shape != lq.shape:
                raise ValueError(f"reference rows {lr.shape} != quantized rows {lq.shape}")
            kl = (np.exp(lr) * (lr - lq)).sum(axis=1)
            self.kl.append(kl)
            self.top1 += int((lr.argmax(axis=1) == lq.argmax(axis=1)).sum())

    def result(self):
        out = {"ppl": math.exp(self.nll_sum / self.count), "mean_nll": self.nll_sum / self.count,
               "tokens": self.count}
        if self.kl:
            kl = np.concatenate(self.kl)
            out.update({"kld": float(kl.mean()), "kld_median": float(np.median(kl)),
                        "kld_p99": float(np.percentile(kl, 99)), "kld_max": float(kl.max()),
                        "top1": self.top1 / self.count})
        return out
