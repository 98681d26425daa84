#!/usr/bin/env python3
"""Serving load generator for nibble-server (or any OpenAI-compatible server).

Closed-loop concurrency sweep: for each concurrency level C, N requests (fixed
prompts, fixed max_tokens, greedy) are issued by C worker threads, each sending
its next request as soon as the previous one finished. Streaming is used so the
per-token timings can be measured:

  TTFT  time from sending the request to the first chunk carrying text
  TPOT  per request: (e2e latency - TTFT) / (output tokens - 1)   (vLLM's
        benchmark_serving definition; requests with one output token have none)
  ITL   every gap between consecutive text-carrying chunks, all requests pooled
  E2E   request latency

Per level: requests/s and aggregate output tokens/s (both over the level's wall
time), p50/p90/p99 (and mean) of the above, and the error count. Output token
counts come from the server's usage (stream_options.include_usage for HTTP, the
final message for gRPC); if absent, text chunks are counted.

Transports: HTTP (/v1/completions or /v1/chat/completions with SSE, parsed with
http.client; no third-party packages) and gRPC (nibble.v1.Nibble/Generate; needs
grpcio + grpcio-tools, stubs are generated from proto/nibble/v1/nibble.proto
into a temporary directory). Loopback addresses only; every request has a
timeout (socket and total).

Also reports, per level, how many greedy outputs differ from the first level's
output for the same prompt ("mismatches"): continuous batching must not change
greedy text.

Usage:
  bench/loadgen.py --port 8080 [--grpc-port 50051] --concurrency 1,2,4,8,16 \
      --requests 32 --max-tokens 64 --json out.json --plot out.png
"""
import argparse
import http.client
import json
import os
import sys
import tempfile
import threading
import time

LOOPBACK = ("127.0.0.1", "localhost", "::1")

# Fixed, distinct prompts (request i uses PROMPTS[i % len(PROMPTS)]).
PROMPTS = [
    "Once upon a time, in a small village by the sea, there lived",
    "The old lighthouse keeper climbed the stairs every evening because",
    "Write a short story about a robot who learns to paint:",
    "In the year 2150, the first colony on Mars discovered",
    "The recipe for a perfect summer day includes",
    "A curious cat found a hidden door behind the bookshelf and",
    "Explain to a child why the sky is blue:",
    "The detective looked at the muddy footprints and said",
    "On the first day of school, the new teacher told the class",
    "Deep in the forest, the fox and the owl argued about",
    "The spaceship's computer suddenly announced that",
    "My grandmother always told me that the secret to happiness is",
    "The little boat sailed across the stormy lake until",
    "A list of things to pack for a camping trip:",
    "The dragon was tired of guarding gold, so one morning it",
    "When the music started, everyone in the town square",
]


def percentile(values, q):
    """Linear-interpolation percentile (numpy's default method); None if empty."""
    if not values:
        return None
    v = sorted(values)
    pos = (len(v) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def summarize(values):
    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    return {"mean": sum(values) / len(values), "p50": percentile(values, 50),
            "p90": percentile(values, 90), "p99": percentile(values, 99)}


class RequestResult:
    __slots__ = ("ok", "error", "ttft", "e2e", "itl", "output_tokens", "text", "prompt_index")

    def __init__(self, prompt_index):
        self.ok = False
        self.error = None
        self.ttft = None
        self.e2e = None
        self.itl = []
        self.output_tokens = 0
        self.text = ""
        self.prompt_index = prompt_index


class HttpTarget:
    """POSTs streaming OpenAI requests to host:port and parses the SSE stream."""

    def __init__(self, host, port, endpoint="completions", model=None, ignore_eos=True):
        if host not in LOOPBACK:
            raise ValueError(f"loadgen only talks to loopback addresses, not {host!r}")
        self.host, self.port, self.endpoint = host, port, endpoint
        self.model, self.ignore_eos = model, ignore_eos
        self.name = "http"

    def body(self, prompt, max_tokens):
        b = {"max_tokens": max_tokens, "temperature": 0, "stream": True,
             "stream_options": {"include_usage": True}, "ignore_eos": self.ignore_eos}
        if self.model:
            b["model"] = self.model
        if self.endpoint == "chat":
            b["messages"] = [{"role": "user", "content": prompt}]
        else:
            b["prompt"] = prompt
        return json.dumps(b)

    def run(self, prompt, prompt_index, max_tokens, timeout):
        r = RequestResult(prompt_index)
        path = "/v1/chat/completions" if self.endpoint == "chat" else "/v1/completions"
        deadline = time.monotonic() + timeout
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        usage_tokens = None
        chunks = 0
        try:
            t0 = time.perf_counter()
            last = None
            conn.request("POST", path, body=self.body(prompt, max_tokens),
                         headers={"Content-Type": "application/json", "Accept": "text/event-stream"})
            resp = conn.getresponse()
            if resp.status != 200:
                r.error = f"HTTP {resp.status}: {resp.read(2000).decode('utf-8', 'replace')}"
                return r
            data_lines = []
            done = False
            while not done:
                if time.monotonic() > deadline:
                    r.error = f"timeout after {timeout}s"
                    return r
                raw = resp.readline()
                if not raw:
                    break  # EOF
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                if line.startswith("data:"):
                    data_lines.append(line[5:].lstrip(" "))
                    continue
                if line or not data_lines:
                    continue  # comments, other fields, or keep-alive blank lines
                data = "\n".join(data_lines)
                data_lines = []
                if data == "[DONE]":
                    done = True
                    break
                ev = json.loads(data)
                if "error" in ev:
                    r.error = f"stream error: {ev['error']}"
                    return r
                if ev.get("usage"):
                    usage_tokens = ev["usage"].get("completion_tokens")
                for ch in ev.get("choices") or []:
                    text = ch.get("text")
                    if text is None:
                        text = (ch.get("delta") or {}).get("content")
                    if not text:
                        continue
                    now = time.perf_counter()
                    if r.ttft is None:
                        r.ttft = now - t0
                    else:
                        r.itl.append(now - last)
                    last = now
                    r.text += text
                    chunks += 1
            r.e2e = time.perf_counter() - t0
            if not done:
                r.error = "stream ended without [DONE]"
                return r
            r.output_tokens = usage_tokens if usage_tokens is not None else chunks
            r.ok = True
        except Exception as e:  # noqa: BLE001 - any failure is one errored request
            r.error = f"{type(e).__name__}: {e}"
        finally:
            conn.close()
        return r


def load_grpc_stubs(proto_path):
    """Generates nibble_pb2 / nibble_pb2_grpc into a temp dir; returns (pb2, pb2_grpc) or raises ImportError."""
    import grpc  # noqa: F401
    from grpc_tools import protoc
    import importlib
    out = tempfile.mkdtemp(prefix="nibble_grpc_")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(proto_path))))
    rel = os.path.relpath(os.path.abspath(proto_path), root)
    import grpc_tools
    include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    rc = protoc.main(["protoc", f"-I{root}", f"-I{include}", f"--python_out={out}", f"--grpc_python_out={out}", rel])
    if rc != 0:
        raise ImportError(f"grpc_tools.protoc failed on {proto_path} (exit {rc})")
    sys.path.insert(0, out)
    pb2 = importlib.import_module("nibble.v1.nibble_pb2")
    pb2_grpc = importlib.import_module("nibble.v1.nibble_pb2_grpc")
    return pb2, pb2_grpc


class GrpcTarget:
    """Calls nibble.v1.Nibble/Generate (server streaming)."""

    def __init__(self, host, port, proto_path, ignore_eos=True):
        if host not in LOOPBACK:
            raise ValueError(f"loadgen only talks to loopback addresses, not {host!r}")
        import grpc
        self.grpc = grpc
        self.pb2, pb2_grpc = load_grpc_stubs(proto_path)
        self.channel = grpc.insecure_channel(f"{host}:{port}")
        self.stub = pb2_grpc.NibbleStub(self.channel)
        self.ignore_eos = ignore_eos
        self.name = "grpc"

    def run(self, prompt, prompt_index, max_tokens, timeout):
        r = RequestResult(prompt_index)
        req = self.pb2.GenerateRequest(text=prompt, max_tokens=max_tokens, ignore_eos=self.ignore_eos,
                                       sampling=self.pb2.SamplingParams(temperature=0.0))
        usage_tokens = None
        chunks = 0
        try:
            t0 = time.perf_counter()
            last = None
            for msg in self.stub.Generate(req, timeout=timeout):
                if msg.text:
                    now = time.perf_counter()
                    if r.ttft is None:
                        r.ttft = now - t0
                    else:
                        r.itl.append(now - last)
                    last = now
                    r.text += msg.text
                    chunks += 1
                if msg.final:
                    usage_tokens = msg.usage.completion_tokens
            r.e2e = time.perf_counter() - t0
            r.output_tokens = usage_tokens if usage_tokens is not None else chunks
            r.ok = True
        except self.grpc.RpcError as e:
            r.error = f"gRPC {e.code().name}: {e.details()}"
        except Exception as e:  # noqa: BLE001
            r.error = f"{type(e).__name__}: {e}"
        return r

    def close(self):
        self.channel.close()


def run_level(target, concurrency, n_requests, prompts, max_tokens, timeout):
    """Runs n_requests with `concurrency` closed-loop workers; returns (summary dict, results)."""
    results = [None] * n_requests
    next_i = [0]
    lock = threading.Lock()

    def worker():
        while True:
            with lock:
                i = next_i[0]
                if i >= n_requests:
                    return
                next_i[0] += 1
            results[i] = target.run(prompts[i % len(prompts)], i % len(prompts), max_tokens, timeout)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 60.0)  # bounded even if a worker wedges; its slot reports an error below
    wall = time.perf_counter() - t0
    results = [r if r is not None else RequestResult(i % len(prompts)) for i, r in enumerate(results)]
    for r in results:
        if not r.ok and r.error is None:
            r.error = "not completed"
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.ttft is not None and r.output_tokens > 1]
    summary = {
        "transport": target.name,
        "concurrency": concurrency,
        "requests": n_requests,
        "completed": len(ok),
        "errors": n_requests - len(ok),
        "error_samples": sorted({r.error for r in results if r.error})[:5],
        "wall_s": wall,
        "requests_per_s": len(ok) / wall if wall > 0 else 0.0,
        "output_tokens": out_tokens,
        "output_tok_per_s": out_tokens / wall if wall > 0 else 0.0,
        "ttft_s": summarize([r.ttft for r in ok if r.ttft is not None]),
        "tpot_s": summarize(tpot),
        "itl_s": summarize([g for r in ok for g in r.itl]),
        "e2e_s": summarize([r.e2e for r in ok]),
    }
    return summary, results


def sweep(target, levels, n_requests, prompts, max_tokens, timeout, log=print):
    """Runs every level; adds "mismatches" (greedy text differing from the first
    level's text for the same prompt). Returns (list of level summaries, texts of the first level by prompt)."""
    summaries, reference = [], {}
    for c in levels:
        n = max(n_requests, c)
        s, results = run_level(target, c, n, prompts, max_tokens, timeout)
        mism = 0
        for r in results:
            if not r.ok:
                continue
            if r.prompt_index not in reference:
                reference[r.prompt_index] = r.text
            elif reference[r.prompt_index] != r.text:
                mism += 1
        s["mismatches"] = mism
        summaries.append(s)
        if log:
            log(format_row(s))
    return summaries, reference


def ms(x):
    return "-" if x is None else f"{1e3 * x:.1f}"


HEADER = (f"{'xport':>5} {'conc':>4} {'req/s':>7} {'out tok/s':>9} {'TTFT p50/p90/p99 ms':>22} "
          f"{'TPOT p50/p90/p99 ms':>22} {'ITL p50/p90/p99 ms':>22} {'err':>3} {'mism':>4}")


def format_row(s):
    def trio(d):
        return f"{ms(d['p50'])}/{ms(d['p90'])}/{ms(d['p99'])}"
    return (f"{s['transport']:>5} {s['concurrency']:>4} {s['requests_per_s']:>7.2f} {s['output_tok_per_s']:>9.1f} "
            f"{trio(s['ttft_s']):>22} {trio(s['tpot_s']):>22} {trio(s['itl_s']):>22} {s['errors']:>3} "
            f"{s.get('mismatches', 0):>4}")


def plot(levels, path, title="nibble-server"):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for xport in sorted({s["transport"] for s in levels}):
        rows = [s for s in levels if s["transport"] == xport]
        c = [s["concurrency"] for s in rows]
        axes[0].plot(c, [s["output_tok_per_s"] for s in rows], "o-", label=xport)
        for key, style in (("p50", "o-"), ("p99", "x--")):
            axes[1].plot(c, [1e3 * (s["ttft_s"][key] or 0) for s in rows], style, label=f"{xport} {key}")
            axes[2].plot(c, [1e3 * (s["tpot_s"][key] or 0) for s in rows], style, label=f"{xport} {key}")
    for ax, t in zip(axes, ("aggregate output tok/s", "TTFT (ms)", "TPOT (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent requests")
        ax.set_title(t)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, help="HTTP port")
    ap.add_argument("--grpc-port", type=int, help="gRPC port (needs grpcio + grpcio-tools)")
    ap.add_argument("--proto", default=os.path.join(os.path.dirname(__file__), "..", "proto", "nibble", "v1",
                                                    "nibble.proto"))
    ap.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    ap.add_argument("--model", help="model id to send (default: none)")
    ap.add_argument("--concurrency", default="1,2,4,8,16")
    ap.add_argument("--requests", type=int, default=32, help="requests per level (at least the concurrency)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--no-ignore-eos", action="store_true", help="let EOS end a generation early")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--plot", help="write a PNG plot here")
    args = ap.parse_args(argv)
    if args.port is None and args.grpc_port is None:
        ap.error("give --port and/or --grpc-port")
    levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    targets = []
    if args.port is not None:
        targets.append(HttpTarget(args.host, args.port, args.endpoint, args.model, not args.no_ignore_eos))
    if args.grpc_port is not None:
        try:
            targets.append(GrpcTarget(args.host, args.grpc_port, args.proto, not args.no_ignore_eos))
        except ImportError as e:
            print(f"loadgen: gRPC skipped: {e}", file=sys.stderr)
    all_levels = []
    print(HEADER)
    for t in targets:
        s, _ = sweep(t, levels, args.requests, PROMPTS, args.max_tokens, args.timeout)
        all_levels += s
    out = {"max_tokens": args.max_tokens, "requests_per_level": args.requests, "prompts": PROMPTS,
           "levels": all_levels}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    if args.plot:
        plot(all_levels, args.plot)
    return 1 if any(s["errors"] for s in all_levels) else 0


if __name__ == "__main__":
    sys.exit(main())
