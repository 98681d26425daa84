#!/usr/bin/env python3
"""Reference token ids from llama.cpp (via the llama_cpp Python package).

Loads a GGUF vocabulary only (vocab_only=True) and tokenizes
  - every entry of tests/fixtures/tokenize_corpus.json: "texts" with
    special=False, "special_texts" with special=True (add_bos=True, i.e.
    llama.cpp's add_special: BOS only if the model asks for it);
  - whole text files from ../shared/data (the perplexity inputs), stored as
    token count + FNV-1a-64 of the ids (int32 little-endian) + the first ids.
and writes the result as JSON for engine/tokenizer/gpt2_bpe_test.cc.

Usage (from the repository root; needs `pip install llama-cpp-python`, see
scripts/install-deps.sh NIBBLE_WITH_LLAMACPP=1):
  python3 bench/llamacpp_tokenize.py \
      --model models/SmolLM2-135M-Instruct.Q4_1.gguf \
      --out tests/fixtures/smollm2_llamacpp_tokens.json
"""
import argparse
import json
import os
import struct
import sys
import tempfile


def fnv1a64(ids):
    h = 0xCBF29CE484222325
    for b in struct.pack("<%di" % len(ids), *ids):
        h ^= b
        h = (h * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return "%016x" % h


def write_vocab_only_gguf(src, dst, pre):
    """Copies every metadata key of `src` (no tensors) into `dst`, with
    tokenizer.ggml.pre replaced by `pre`: the same vocabulary and merges under
    another pre-tokenizer, for llama.cpp to tokenize with vocab_only=True."""
    from gguf import GGUFReader
    reader = GGUFReader(src)
    out = bytearray(b"GGUF")
    out += struct.pack("<I", int(reader.fields["GGUF.version"].parts[0][0]))
    body = bytearray()
    n_kv = 0
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        n_kv += 1
        if name == "tokenizer.ggml.pre":
            key = name.encode()
            val = pre.encode()
            body += struct.pack("<Q", len(key)) + key + struct.pack("<I", 8) + struct.pack("<Q", len(val)) + val
            continue
        for part in field.parts:
            body += part.tobytes()
    out += struct.pack("<QQ", 0, n_kv) + body
    with open(dst, "wb") as f:
        f.write(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--corpus", default="tests/fixtures/tokenize_corpus.json")
    ap.add_argument("--shared", default="../shared")
    ap.add_argument("--files", nargs="*",
                    default=["data/wikitext-2-test.txt:0", "data/tinystories-val.txt:1"],
                    help="shared-relative paths with ':<special 0|1>'")
    ap.add_argument("--head", type=int, default=256, help="leading ids stored per file")
    ap.add_argument("--pre-variants", default="gpt-2,default,llama-bpe,qwen2,falcon,starcoder,gpt-4o,tekken",
                    help="other tokenizer.ggml.pre names to run the same vocabulary under")
    ap.add_argument("--variant-bytes", type=int, default=200000,
                    help="leading bytes of the first --files entry tokenized per variant")
    ap.add_argument("--out", default="tests/fixtures/smollm2_llamacpp_tokens.json")
    args = ap.parse_args()

    import llama_cpp  # imported late so --help works without it

    llm = llama_cpp.Llama(model_path=args.model, vocab_only=True, verbose=False)

    def tok(text, special):
        return llm.tokenize(text.encode("utf-8"), add_bos=True, special=special)

    with open(args.corpus, encoding="utf-8") as f:
        corpus = json.load(f)

    cases = []
    for text in corpus["texts"]:
        cases.append({"text": text, "special": False, "ids": tok(text, False)})
    for text in corpus["special_texts"]:
        cases.append({"text": text, "special": True, "ids": tok(text, True)})

    # Invalid UTF-8 (JSON strings cannot hold it: stored as hex). llama.cpp
    # replaces each byte of a broken sequence with U+FFFD before splitting.
    byte_cases = []
    for raw in [b"ok\xff\xe4\xb8 done", b"\x80abc", b"caf\xc3", b"\xf0\x9f\x98 x \xe2\x82"]:
        byte_cases.append({"hex": raw.hex(), "ids": llm.tokenize(raw, add_bos=True, special=False)})

    files = []
    for spec in args.files:
        rel, _, special = spec.partition(":")
        special = special == "1"
        path = os.path.join(args.shared, rel)
        with open(path, "rb") as f:
            data = f.read()
        ids = llm.tokenize(data, add_bos=True, special=special)
        files.append({"path": rel, "special": special, "n_bytes": len(data), "count": len(ids),
                      "fnv1a64": fnv1a64(ids), "head_ids": ids[: args.head]})
        print(f"{rel}: {len(data)} bytes -> {len(ids)} tokens", file=sys.stderr)

    # The same vocabulary under other pre-tokenizers (no BOS: llama3-style
    # pre names make llama.cpp force add_bos on).
    variants = []
    first_file = os.path.join(args.shared, args.files[0].partition(":")[0])
    with open(first_file, "rb") as f:
        head_text = f.read(args.variant_bytes)
    head_text = head_text[: len(head_text.decode("utf-8", "ignore").encode("utf-8"))]
    with tempfile.TemporaryDirectory() as tmp:
        for pre in [p for p in args.pre_variants.split(",") if p]:
            path = os.path.join(tmp, f"vocab-{pre}.gguf")
            write_vocab_only_gguf(args.model, path, pre)
            try:
                v = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
            except Exception as e:  # an older llama.cpp may not know the name
                print(f"pre '{pre}': llama.cpp refused it ({e}); skipped", file=sys.stderr)
                continue
            texts = corpus["texts"]
            ids = [v.tokenize(t.encode("utf-8"), add_bos=False, special=False) for t in texts]
            file_ids = v.tokenize(head_text, add_bos=False, special=False)
            variants.append({"pre": pre, "ids": ids,
                             "file": {"path": args.files[0].partition(":")[0], "n_bytes": len(head_text),
                                      "count": len(file_ids), "fnv1a64": fnv1a64(file_ids)}})
            del v
            print(f"pre '{pre}': {len(file_ids)} tokens for the first {len(head_text)} bytes", file=sys.stderr)

    out = {
        "comment": "Generated by bench/llamacpp_tokenize.py; do not edit by hand.",
        "model": os.path.basename(args.model),
        "llama_cpp_python": llama_cpp.__version__,
        "cases": cases,
        "byte_cases": byte_cases,
        "files": files,
        "pre_variants": variants,
    }
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=None, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {len(cases)} cases and {len(files)} files to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
