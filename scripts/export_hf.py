#!/usr/bin/env python3
"""Exports a llama2.c checkpoint or a GGUF llama model as a Hugging Face
transformers checkpoint directory (config.json + safetensors).

  python3 scripts/export_hf.py INPUT OUT_DIR [--dtype f32|bf16|f16] [--shards N]

INPUT is detected by content: a GGUF file (magic "GGUF", dequantized with the
`gguf` package) or a llama2.c legacy .bin checkpoint (7 int32 header: dim,
hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size (negative = separate
classifier), seq_len; then fp32 token_embedding, rms_att, wq, wk, wv, wo,
rms_ffn, w1, w2, w3, rms_final, freq_cis_real, freq_cis_imag [, wcls]).

Both sources store Q/K rows so that RoPE rotates adjacent pairs; HF Llama uses
"rotate_half", so Q and K are permuted exactly as transformers'
convert_llama_weights_to_hf.py does: within each head, row 2i+j moves to
j*(head_dim/2)+i. llama2.c w1/w3/w2 are gate/up/down.

Writes: config.json, model.safetensors (or model-0000k-of-0000n.safetensors
+ model.safetensors.index.json with --shards n > 1) and, for GGUF inputs with
a byte-level BPE ("gpt2") vocabulary, tokenizer.json + tokenizer_config.json
(with the chat template), so the directory is self-contained.
Safetensors files are written by hand (numpy has no bfloat16); bf16 rounds
float32 to nearest even. Needs numpy (and gguf for GGUF inputs).
"""
import argparse
import json
import os
import struct
import sys

import numpy as np

DTYPES = {"f32": ("F32", "float32"), "bf16": ("BF16", "bfloat16"), "f16": ("F16", "float16")}


def permute_rotate_half(w, n_heads):
    """Interleaved-pair RoPE rows -> HF rotate_half rows (per head)."""
    rows, cols = w.shape
    hd = rows // n_heads
    return w.reshape(n_heads, hd // 2, 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def encode(arr, dtype):
    a = np.ascontiguousarray(arr, dtype=np.float32)
    if dtype == "F32":
        return a.astype("<f4").tobytes()
    if dtype == "F16":
        return a.astype("<f2").tobytes()
    u = a.view(np.uint32).astype(np.uint64)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype("<u2")
    nan = np.isnan(a)
    if nan.any():
        rounded[nan] = ((u[nan] >> 16) | 0x40).astype("<u2")
    return rounded.tobytes()


def write_safetensors(path, tensors, dtype):
    """tensors: list of (name, float32 ndarray)."""
    header, blobs, offset = {}, [], 0
    for name, arr in tensors:
        blob = encode(arr, dtype)
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    header["__metadata__"] = {"format": "pt"}
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)
    return offset


def read_llama2c(path):
    raw = np.fromfile(path, dtype="<f4")
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = struct.unpack("<7i", open(path, "rb").read(28))
    shared = vocab > 0
    vocab = abs(vocab)
    hd = dim // n_heads
    kv_dim = hd * n_kv
    pos = 7

    def take(*shape):
        nonlocal pos
        n = int(np.prod(shape))
        if pos + n > raw.size:
            sys.exit(f"{path}: truncated llama2.c checkpoint")
        a = raw[pos:pos + n].reshape(shape)
        pos += n
        return a

    emb = take(vocab, dim)
    rms_att = take(n_layers, dim)
    wq = take(n_layers, dim, dim)
    wk = take(n_layers, kv_dim, dim)
    wv = take(n_layers, kv_dim, dim)
    wo = take(n_layers, dim, dim)
    rms_ffn = take(n_layers, dim)
    w1 = take(n_layers, hidden, dim)
    w2 = take(n_layers, dim, hidden)
    w3 = take(n_layers, hidden, dim)
    rms_final = take(dim)
    take(seq_len, hd // 2)  # freq_cis_real
    take(seq_len, hd // 2)  # freq_cis_imag
    wcls = None if shared else take(vocab, dim)

    config = dict(hidden_size=dim, intermediate_size=hidden, num_hidden_layers=n_layers,
                  num_attention_heads=n_heads, num_key_value_heads=n_kv, head_dim=hd, vocab_size=vocab,
                  max_position_embeddings=seq_len, rms_norm_eps=1e-5, rope_theta=10000.0,
                  tie_word_embeddings=shared, bos_token_id=1, eos_token_id=2)
    t = [("model.embed_tokens.weight", emb)]
    for i in range(n_layers):
        p = f"model.layers.{i}."
        t += [(p + "input_layernorm.weight", rms_att[i]),
              (p + "self_attn.q_proj.weight", permute_rotate_half(wq[i], n_heads)),
              (p + "self_attn.k_proj.weight", permute_rotate_half(wk[i], n_kv)),
              (p + "self_attn.v_proj.weight", wv[i]),
              (p + "self_attn.o_proj.weight", wo[i]),
              (p + "post_attention_layernorm.weight", rms_ffn[i]),
              (p + "mlp.gate_proj.weight", w1[i]),
              (p + "mlp.up_proj.weight", w3[i]),
              (p + "mlp.down_proj.weight", w2[i])]
    t.append(("model.norm.weight", rms_final))
    if wcls is not None:
        t.append(("lm_head.weight", wcls))
    return config, t, None


def gguf_field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def read_gguf(path):
    from gguf import GGUFReader
    from gguf.quants import dequantize

    r = GGUFReader(path)
    arch = gguf_field(r, "general.architecture")
    if arch != "llama":
        sys.exit(f"{path}: architecture {arch!r} is not supported (only llama)")
    g = lambda k, d=None: gguf_field(r, "llama." + k, d)  # noqa: E731
    dim, n_heads = int(g("embedding_length")), int(g("attention.head_count"))
    n_kv = int(g("attention.head_count_kv", n_heads))
    hd = int(g("attention.key_length", dim // n_heads))
    tensors = {t.name: t for t in r.tensors}

    def deq(name):
        t = tensors[name]
        a = dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32)
        shape = tuple(int(x) for x in reversed(t.shape))
        return a.reshape(shape)

    tokens = gguf_field(r, "tokenizer.ggml.tokens")
    emb = deq("token_embd.weight")
    tied = "output.weight" not in tensors
    n_layers = int(g("block_count"))
    config = dict(hidden_size=dim, intermediate_size=int(g("feed_forward_length")), num_hidden_layers=n_layers,
                  num_attention_heads=n_heads, num_key_value_heads=n_kv, head_dim=hd,
                  vocab_size=int(g("vocab_size", len(tokens) if tokens else emb.shape[0])),
                  max_position_embeddings=int(g("context_length")),
                  rms_norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-5)),
                  rope_theta=float(g("rope.freq_base", 10000.0)), tie_word_embeddings=tied)
    for k, hk in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id")):
        v = gguf_field(r, "tokenizer.ggml." + k)
        if v is not None:
            config[hk] = int(v)
    t = [("model.embed_tokens.weight", emb)]
    for i in range(n_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        t += [(p + "input_layernorm.weight", deq(b + "attn_norm.weight")),
              (p + "self_attn.q_proj.weight", permute_rotate_half(deq(b + "attn_q.weight"), n_heads)),
              (p + "self_attn.k_proj.weight", permute_rotate_half(deq(b + "attn_k.weight"), n_kv)),
              (p + "self_attn.v_proj.weight", deq(b + "attn_v.weight")),
              (p + "self_attn.o_proj.weight", deq(b + "attn_output.weight")),
              (p + "post_attention_layernorm.weight", deq(b + "ffn_norm.weight")),
              (p + "mlp.gate_proj.weight", deq(b + "ffn_gate.weight")),
              (p + "mlp.up_proj.weight", deq(b + "ffn_up.weight")),
              (p + "mlp.down_proj.weight", deq(b + "ffn_down.weight"))]
    t.append(("model.norm.weight", deq("output_norm.weight")))
    if not tied:
        t.append(("lm_head.weight", deq("output.weight")))
    return config, t, r


PRE_TOKENIZERS = {
    "smollm": {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]},
    "gpt2": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    "llama-bpe": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": (
            "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
            "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
}


def write_gpt2_tokenizer(r, out_dir):
    tokens = gguf_field(r, "tokenizer.ggml.tokens")
    types = gguf_field(r, "tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = gguf_field(r, "tokenizer.ggml.merges") or []
    pre = gguf_field(r, "tokenizer.ggml.pre", "gpt2")
    if pre not in PRE_TOKENIZERS:
        print(f"warning: pre-tokenizer {pre!r} unknown to this script; writing plain ByteLevel", file=sys.stderr)
    added = [{"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": types[i] == 3}
             for i, tok in enumerate(tokens) if types[i] in (3, 4)]
    tok_json = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": PRE_TOKENIZERS.get(pre, PRE_TOKENIZERS["gpt2"]),
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": False, "vocab": {tok: i for i, tok in enumerate(tokens)},
                  "merges": list(merges)},
    }
    with open(os.path.join(out_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(tok_json, f, ensure_ascii=False)
    cfg = {"tokenizer_class": "GPT2Tokenizer",
           "add_bos_token": bool(gguf_field(r, "tokenizer.ggml.add_bos_token", False)),
           "add_eos_token": bool(gguf_field(r, "tokenizer.ggml.add_eos_token", False)),
           "model_max_length": int(gguf_field(r, "llama.context_length", 2048))}
    for key, name in (("bos", "bos_token"), ("eos", "eos_token"), ("unknown", "unk_token"),
                      ("padding", "pad_token")):
        i = gguf_field(r, f"tokenizer.ggml.{key}_token_id")
        if i is not None and 0 <= int(i) < len(tokens):
            cfg[name] = tokens[int(i)]
    tmpl = gguf_field(r, "tokenizer.chat_template")
    if tmpl:
        cfg["chat_template"] = tmpl
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, ensure_ascii=False, indent=1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("input")
    ap.add_argument("out_dir")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="f32")
    ap.add_argument("--shards", type=int, default=1)
    args = ap.parse_args()
    with open(args.input, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        config, tensors, reader = read_gguf(args.input)
    else:
        config, tensors, reader = read_llama2c(args.input)
    st_dtype, torch_dtype = DTYPES[args.dtype]
    os.makedirs(args.out_dir, exist_ok=True)
    hf_config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
                 "attention_bias": False, "mlp_bias": False, "rope_scaling": None,
                 "torch_dtype": torch_dtype, **config}
    with open(os.path.join(args.out_dir, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=1)

    n = max(1, args.shards)
    if n == 1:
        write_safetensors(os.path.join(args.out_dir, "model.safetensors"), tensors, st_dtype)
    else:
        total = sum(a.size for _, a in tensors)
        groups, acc = [[] for _ in range(n)], 0
        for name, a in tensors:  # contiguous groups of roughly equal size
            groups[min(n - 1, acc * n // max(total, 1))].append((name, a))
            acc += a.size
        weight_map, total_bytes = {}, 0
        for k, group in enumerate(groups):
            fname = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
            total_bytes += write_safetensors(os.path.join(args.out_dir, fname), group, st_dtype)
            weight_map.update({name: fname for name, _ in group})
        with open(os.path.join(args.out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total_bytes}, "weight_map": weight_map}, f, indent=1)

    if reader is not None:
        model = gguf_field(reader, "tokenizer.ggml.model")
        if model == "gpt2":
            write_gpt2_tokenizer(reader, args.out_dir)
        elif model is not None:
            print(f"warning: tokenizer model {model!r} not exported; pass --tokenizer when loading",
                  file=sys.stderr)


if __name__ == "__main__":
    main()
