#!/usr/bin/env python3
"""Writes the full-precision (F32) reference GGUFs for the quantization quality table.

Goals: give llama.cpp and nibble the same unquantized starting point per model, so
every quantized variant's PPL/KLD is measured against one reference.
  * SmolLM2-135M-Instruct: the only checkpoint we have is a Q4_1 GGUF, so the
    "reference" is that file with every tensor dequantized to F32 (gguf-py's
    dequantizer) and all metadata copied verbatim (file_type set to ALL_F32).
  * stories260K: converted from llama2.c's checkpoint (stories260K.bin) and its
    tokenizer (tok512.bin) into a llama-arch F32 GGUF with a SentencePiece-style
    ("llama") tokenizer.
Non-goals: generic HF conversion, F16/BF16 output, other llama2.c variants with
shared classifier flags beyond the sign of vocab_size.

    python3 bench/make_ref_gguf.py [--out-dir models/ref] [--verify]

Outputs <out-dir>/SmolLM2-135M-Instruct.F32.gguf and <out-dir>/stories260K.F32.gguf.
--verify loads both with llama-cpp-python and prints a greedy continuation; for
stories260K it checks the continuation against reference-greedy.txt's start.
"""
import argparse
import os
import struct
import sys

import numpy as np
import gguf

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
SMOL_Q41 = os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
STORIES_DIR = os.path.join(SHARED, "models", "stories260K")

# Fields the writer produces itself (header) or that we override.
_SKIP_KEYS = {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count", "general.file_type"}


def _field_value(field):
    """Python value of a GGUFReader field, suitable for GGUFWriter.add_key_value."""
    main = field.types[0]
    if main == gguf.GGUFValueType.ARRAY:
        sub = field.types[-1]
        if sub == gguf.GGUFValueType.STRING:
            return [bytes(field.parts[i]) for i in field.data], sub
        if sub == gguf.GGUFValueType.ARRAY:
            raise ValueError(f"{field.name}: nested arrays not supported")
        return [field.parts[i].tolist()[0] for i in field.data], sub
    if main == gguf.GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]), None
    return field.parts[field.data[0]].tolist()[0], None


def make_smollm2(src, dst):
    r = gguf.GGUFReader(src)
    arch = r.fields["general.architecture"]
    arch = bytes(arch.parts[arch.data[0]]).decode()
    w = gguf.GGUFWriter(dst, arch=arch)
    # GGUFWriter(arch=...) already adds general.architecture; copy the rest in order.
    n_kv = 0
    for key, field in r.fields.items():
        if key == "general.file_type":
            w.add_file_type(int(gguf.LlamaFileType.ALL_F32))  # keep the key's position
            n_kv += 1
            continue
        if key in _SKIP_KEYS or key == "general.architecture":
            continue
        val, sub = _field_value(field)
        w.add_key_value(key, val, field.types[0], sub)
        n_kv += 1
    if "general.file_type" not in r.fields:
        w.add_file_type(int(gguf.LlamaFileType.ALL_F32))
    n_par = 0
    for t in r.tensors:
        # GGUFReader shapes are ggml order (ne0 first); numpy wants the reverse.
        np_shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        if t.tensor_type == gguf.GGMLQuantizationType.F32:
            arr = np.asarray(t.data, dtype=np.float32).reshape(np_shape)
        else:
            arr = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(np_shape)
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{src}: tensor {t.name} has non-finite values after dequantization")
        w.add_tensor(t.name, np.ascontiguousarray(arr))
        n_par += arr.size
    _finish(w)
    print(f"wrote {dst}: {len(r.tensors)} tensors, {n_par} params, {n_kv + 1} kv", file=sys.stderr)


def _read_llama2c_tokenizer(path, vocab_size):
    d = open(path, "rb").read()
    if len(d) < 4:
        raise ValueError(f"{path}: too short for the max_token_length header")
    off = 4
    toks, scores = [], []
    for i in range(vocab_size):
        if off + 8 > len(d):
            raise ValueError(f"{path}: truncated at token {i}")
        score, n = struct.unpack_from("<fi", d, off)
        off += 8
        if n < 0 or off + n > len(d):
            raise ValueError(f"{path}: token {i} has bad length {n}")
        toks.append(d[off:off + n])
        scores.append(score)
        off += n
    if off != len(d):
        raise ValueError(f"{path}: {len(d) - off} trailing bytes after {vocab_size} tokens")
    return toks, scores


def make_stories(model_path, tok_path, dst):
    raw = open(model_path, "rb").read()
    if len(raw) < 28:
        raise ValueError(f"{model_path}: too short for the 7-int32 header")
    dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = struct.unpack_from("<7i", raw, 0)
    shared_cls = vocab > 0
    vocab = abs(vocab)
    if min(dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len) <= 0 or dim % n_heads:
        raise ValueError(f"{model_path}: bad header {dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len}")
    head = dim // n_heads
    kv_dim = n_kv_heads * head
    w = np.frombuffer(raw, dtype="<f4", offset=28)
    pos = 0

    def take(*shape):
        nonlocal pos
        n = int(np.prod(shape))
        if pos + n > w.size:
            raise ValueError(f"{model_path}: truncated reading shape {shape}")
        a = w[pos:pos + n].reshape(shape).astype(np.float32)
        pos += n
        return a

    L = n_layers
    tok_embd = take(vocab, dim)
    rms_att = take(L, dim)
    wq = take(L, dim, dim)
    wk = take(L, kv_dim, dim)
    wv = take(L, kv_dim, dim)
    wo = take(L, dim, dim)
    rms_ffn = take(L, dim)
    w1 = take(L, hidden, dim)
    w2 = take(L, dim, hidden)
    w3 = take(L, hidden, dim)
    rms_final = take(dim)
    take(seq_len, head // 2)  # freq_cis_real (unused)
    take(seq_len, head // 2)  # freq_cis_imag (unused)
    wcls = None if shared_cls else take(vocab, dim)
    if pos != w.size:
        raise ValueError(f"{model_path}: {w.size - pos} unexpected trailing floats")

    pieces, scores = _read_llama2c_tokenizer(tok_path, vocab)
    tokens, types = [], []
    for i, p in enumerate(pieces):
        s = p.decode("utf-8")
        if i == 0:
            tt = gguf.TokenType.UNKNOWN
        elif i in (1, 2):
            s = s.strip()  # llama2.c exports BOS/EOS as "\n<s>\n" / "\n</s>\n"
            tt = gguf.TokenType.CONTROL
        elif len(s) == 6 and s.startswith("<0x") and s.endswith(">"):
            tt = gguf.TokenType.BYTE
        else:
            s = s.replace(" ", "\u2581")
            tt = gguf.TokenType.NORMAL
        tokens.append(s)
        types.append(int(tt))

    wr = gguf.GGUFWriter(dst, arch="llama")
    wr.add_name("stories260K")
    wr.add_file_type(int(gguf.LlamaFileType.ALL_F32))
    wr.add_context_length(seq_len)
    wr.add_embedding_length(dim)
    wr.add_block_count(L)
    wr.add_feed_forward_length(hidden)
    wr.add_head_count(n_heads)
    wr.add_head_count_kv(n_kv_heads)
    wr.add_rope_dimension_count(head)
    wr.add_rope_freq_base(10000.0)
    wr.add_layer_norm_rms_eps(1e-5)
    wr.add_vocab_size(vocab)
    wr.add_tokenizer_model("llama")
    wr.add_tokenizer_pre("default")
    wr.add_token_list(tokens)
    wr.add_token_scores(scores)
    wr.add_token_types(types)
    wr.add_bos_token_id(1)
    wr.add_eos_token_id(2)
    wr.add_unk_token_id(0)
    wr.add_add_bos_token(True)
    wr.add_add_eos_token(False)
    wr.add_add_space_prefix(True)
    # llama2.c's rotary embedding rotates adjacent pairs, which is llama.cpp's
    # "llama" (NORM) rope layout: Q/K need no permutation.
    wr.add_tensor("token_embd.weight", tok_embd)
    for i in range(L):
        wr.add_tensor(f"blk.{i}.attn_norm.weight", rms_att[i])
        wr.add_tensor(f"blk.{i}.attn_q.weight", wq[i])
        wr.add_tensor(f"blk.{i}.attn_k.weight", wk[i])
        wr.add_tensor(f"blk.{i}.attn_v.weight", wv[i])
        wr.add_tensor(f"blk.{i}.attn_output.weight", wo[i])
        wr.add_tensor(f"blk.{i}.ffn_norm.weight", rms_ffn[i])
        wr.add_tensor(f"blk.{i}.ffn_gate.weight", w1[i])
        wr.add_tensor(f"blk.{i}.ffn_down.weight", w2[i])
        wr.add_tensor(f"blk.{i}.ffn_up.weight", w3[i])
    wr.add_tensor("output_norm.weight", rms_final)
    if wcls is not None:
        wr.add_tensor("output.weight", wcls)
    _finish(wr)
    print(f"wrote {dst}: dim={dim} hidden={hidden} layers={L} heads={n_heads}/{n_kv_heads} "
          f"vocab={vocab} seq_len={seq_len} shared_cls={shared_cls}", file=sys.stderr)


def _finish(w):
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _greedy(path, prompt, n):
    sys.path.insert(0, HERE)
    from llamacpp_util import open_llama
    llm = open_llama(path, n_ctx=512, n_threads=2, seed=0)
    out = llm(prompt, max_tokens=n, temperature=0.0, top_k=1)
    return prompt + out["choices"][0]["text"]


def build(out_dir, smollm2=SMOL_Q41, stories_dir=STORIES_DIR):
    """Writes both reference GGUFs into out_dir; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    smol = os.path.join(out_dir, "SmolLM2-135M-Instruct.F32.gguf")
    stories = os.path.join(out_dir, "stories260K.F32.gguf")
    make_smollm2(smollm2, smol)
    make_stories(os.path.join(stories_dir, "stories260K.bin"), os.path.join(stories_dir, "tok512.bin"), stories)
    return smol, stories


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", default=os.path.join(ROOT, "models", "ref"))
    ap.add_argument("--smollm2", default=SMOL_Q41)
    ap.add_argument("--stories-dir", default=STORIES_DIR)
    ap.add_argument("--verify", action="store_true")
    args = ap.parse_args()
    smol, stories = build(args.out_dir, args.smollm2, args.stories_dir)
    if args.verify:
        ok = True
        txt = _greedy(smol, "The capital of France is", 24)
        print(f"[SmolLM2 F32] {txt!r}")
        txt = _greedy(stories, "Once upon a time", 40)
        print(f"[stories260K F32] {txt!r}")
        want = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."
        ref = open(os.path.join(args.stories_dir, "reference-greedy.txt")).read()
        if not ref.startswith(want):
            print("warning: reference-greedy.txt does not start with the expected sentence", file=sys.stderr)
        if not txt.startswith(want):
            print("FAIL: stories260K greedy output differs from reference-greedy.txt", file=sys.stderr)
            ok = False
        else:
            print("stories260K greedy output matches reference-greedy.txt's beginning")
        return 0 if ok else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
