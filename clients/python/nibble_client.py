#!/usr/bin/env python3
"""Minimal Python gRPC client of nibble-server (nibble.v1.Nibble).

Needs grpcio and grpcio-tools (pip install grpcio grpcio-tools). The stubs are
generated from proto/nibble/v1/nibble.proto into a temporary directory at
start-up, so nothing generated is checked in.

  python3 clients/python/nibble_client.py --addr 127.0.0.1:50051 info
  python3 clients/python/nibble_client.py generate "Once upon a time" -n 64 --temp 0
  python3 clients/python/nibble_client.py chat "What is the capital of France?" -n 64
  python3 clients/python/nibble_client.py tokenize "Hello world"

As a library:

  from nibble_client import NibbleClient
  c = NibbleClient("127.0.0.1:50051")
  for delta in c.generate("Once upon a time", max_tokens=32, temperature=0):
      print(delta, end="", flush=True)
"""
import argparse
import importlib
import os
import sys
import tempfile

import grpc

PROTO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "proto", "nibble", "v1", "nibble.proto")


def load_stubs(proto_path=PROTO):
    """Runs grpc_tools.protoc on the .proto; returns the (nibble_pb2, nibble_pb2_grpc) modules."""
    import grpc_tools
    from grpc_tools import protoc
    proto_path = os.path.abspath(proto_path)
    root = os.path.dirname(os.path.dirname(os.path.dirname(proto_path)))  # the dir holding nibble/v1/
    out = tempfile.mkdtemp(prefix="nibble_stubs_")
    include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    rc = protoc.main(["protoc", f"-I{root}", f"-I{include}", f"--python_out={out}", f"--grpc_python_out={out}",
                      os.path.relpath(proto_path, root)])
    if rc != 0:
        raise RuntimeError(f"protoc failed on {proto_path}")
    sys.path.insert(0, out)
    return importlib.import_module("nibble.v1.nibble_pb2"), importlib.import_module("nibble.v1.nibble_pb2_grpc")


class NibbleClient:
    def __init__(self, addr="127.0.0.1:50051", api_key=None, timeout=600.0):
        self.pb2, pb2_grpc = load_stubs()
        self.channel = grpc.insecure_channel(addr)
        self.stub = pb2_grpc.NibbleStub(self.channel)
        self.metadata = [("authorization", f"Bearer {api_key}")] if api_key else None
        self.timeout = timeout
        self.last = None  # the final GenerateResponse of the last generate() (finish reason, usage)

    def _request(self, prompt=None, messages=None, max_tokens=128, temperature=None, top_p=None, seed=None,
                 stop=()):
        sp = self.pb2.SamplingParams()
        if temperature is not None:
            sp.temperature = temperature
        if top_p is not None:
            sp.top_p = top_p
        if seed is not None:
            sp.seed = seed
        req = self.pb2.GenerateRequest(max_tokens=max_tokens, sampling=sp, stop=list(stop))
        if messages is not None:
            req.chat.messages.extend(self.pb2.ChatMessage(role=m["role"], content=m["content"]) for m in messages)
        else:
            req.text = prompt
        return req

    def generate(self, prompt=None, messages=None, **kw):
        """Yields text deltas as they are generated; self.last holds the final message."""
        for msg in self.stub.Generate(self._request(prompt, messages, **kw), timeout=self.timeout,
                                      metadata=self.metadata):
            if msg.text:
                yield msg.text
            if msg.final:
                self.last = msg

    def complete(self, prompt=None, messages=None, **kw):
        """One unary call; returns the GenerateUnaryResponse."""
        return self.stub.GenerateUnary(self._request(prompt, messages, **kw), timeout=self.timeout,
                                       metadata=self.metadata)

    def tokenize(self, text, add_bos=True, parse_special=False):
        return list(self.stub.Tokenize(self.pb2.TokenizeRequest(text=text, add_bos=add_bos,
                                                                parse_special=parse_special),
                                       timeout=self.timeout, metadata=self.metadata).ids)

    def detokenize(self, ids):
        return self.stub.Detokenize(self.pb2.DetokenizeRequest(ids=ids), timeout=self.timeout,
                                    metadata=self.metadata).text

    def model_info(self):
        return self.stub.ModelInfo(self.pb2.ModelInfoRequest(), timeout=self.timeout, metadata=self.metadata)


def main():
    ap = argparse.ArgumentParser(description="nibble-server gRPC client")
    ap.add_argument("--addr", default="127.0.0.1:50051")
    ap.add_argument("--api-key")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("generate", "chat"):
        p = sub.add_parser(name)
        p.add_argument("text")
        p.add_argument("-n", "--max-tokens", type=int, default=128)
        p.add_argument("--temp", type=float)
        p.add_argument("--seed", type=int)
    sub.add_parser("tokenize").add_argument("text")
    sub.add_parser("info")
    args = ap.parse_args()
    c = NibbleClient(args.addr, args.api_key)
    try:
        if args.cmd in ("generate", "chat"):
            kw = dict(max_tokens=args.max_tokens, temperature=args.temp, seed=args.seed)
            it = (c.generate(messages=[{"role": "user", "content": args.text}], **kw) if args.cmd == "chat"
                  else c.generate(args.text, **kw))
            for delta in it:
                print(delta, end="", flush=True)
            u = c.last.usage
            print(f"\n[{c.last.finish_reason}; prompt {u.prompt_tokens} tokens, completion {u.completion_tokens}]",
                  file=sys.stderr)
        elif args.cmd == "tokenize":
            print(" ".join(map(str, c.tokenize(args.text))))
        else:
            print(c.model_info())
    except grpc.RpcError as e:
        sys.exit(f"error: {e.code().name}: {e.details()}")


if __name__ == "__main__":
    main()
