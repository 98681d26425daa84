"""bench/loadgen.py against a mock OpenAI SSE server with known timings.

The mock streams `tokens` chunks: the first after TTFT_S, then one every
ITL_S, then a usage chunk and [DONE] (chunked transfer encoding, like a real
HTTP/1.1 server). It can also fail requests (HTTP 500) and hang (timeouts).
Percentiles are checked against numpy (an independent implementation).

Run: python3 -m unittest discover -s tests/python   (from the repo root)
"""
import http.server
import json
import os
import sys
import threading
import time
import unittest

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "bench"))
import loadgen  # noqa: E402

TTFT_S = 0.05
ITL_S = 0.01


class MockHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    mode = "ok"  # "ok", "fail_odd", "hang", "no_done"
    counter = 0
    lock = threading.Lock()
    max_active = 0
    active = 0

    def log_message(self, *args):
        pass

    def _chunk(self, data):
        b = data.encode()
        self.wfile.write(f"{len(b):x}\r\n".encode() + b + b"\r\n")
        self.wfile.flush()

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        cls = type(self)
        with cls.lock:
            cls.counter += 1
            n = cls.counter
            cls.active += 1
            cls.max_active = max(cls.max_active, cls.active)
        counted = True
        try:
            if cls.mode == "fail_odd" and n % 2 == 1:
                msg = b'{"error": {"message": "boom"}}'
                self.send_response(500)
                self.send_header("Content-Length", str(len(msg)))
                self.end_headers()
                self.wfile.write(msg)
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            if cls.mode == "hang":
                time.sleep(3.0)
                return
            chat = self.path.endswith("/chat/completions")
            prompt = body["messages"][0]["content"] if chat else body["prompt"]
            tokens = body["max_tokens"]
            time.sleep(TTFT_S)
            for i in range(tokens):
                if i:
                    time.sleep(ITL_S)
                piece = f" {prompt.split()[0]}{i}"
                ch = {"index": 0, "delta": {"content": piece}} if chat else {"index": 0, "text": piece}
                # An SSE comment and an empty-text chunk must be ignored.
                if i == 1:
                    self._chunk(": keep-alive\n\n")
                    self._chunk("data: " + json.dumps({"choices": [{"index": 0, "text": ""}], "usage": None}) +
                                "\n\n")
                self._chunk("data: " + json.dumps({"choices": [ch], "usage": None}) + "\n\n")
            # No longer active before the client can see the end of the stream (so
            # its next request never overlaps this one in the count).
            with cls.lock:
                cls.active -= 1
                counted = False
            usage = {"prompt_tokens": 5, "completion_tokens": tokens, "total_tokens": tokens + 5}
            self._chunk("data: " + json.dumps({"choices": [], "usage": usage}) + "\n\n")
            if cls.mode != "no_done":
                self._chunk("data: [DONE]\n\n")
            self._chunk("")
        finally:
            if counted:
                with cls.lock:
                    cls.active -= 1


class QuietServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # clients closing keep-alive connections are expected


class LoadgenTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.server = QuietServer(("127.0.0.1", 0), MockHandler)
        cls.port = cls.server.server_address[1]
        threading.Thread(target=cls.server.serve_forever, daemon=True).start()

    @classmethod
    def tearDownClass(cls):
        cls.server.shutdown()
        cls.server.server_close()

    def setUp(self):
        MockHandler.mode = "ok"
        MockHandler.counter = 0
        MockHandler.max_active = 0

    def test_percentile_matches_numpy(self):
        rng = np.random.default_rng(7)
        for n in (1, 2, 5, 101):
            v = list(rng.exponential(size=n))
            for q in (0, 50, 90, 99, 100):
                self.assertAlmostEqual(loadgen.percentile(v, q), float(np.percentile(v, q)), places=12)
        self.assertIsNone(loadgen.percentile([], 50))

    def test_single_request_timings(self):
        t = loadgen.HttpTarget("127.0.0.1", self.port)
        r = t.run("Hello world", 0, 20, timeout=10)
        self.assertTrue(r.ok, r.error)
        self.assertEqual(r.output_tokens, 20)  # from usage
        self.assertEqual(r.text, "".join(f" Hello{i}" for i in range(20)))
        self.assertEqual(len(r.itl), 19)  # empty-text chunks and comments are not tokens
        # Lower bounds are exact (the mock sleeps at least that long); upper bounds leave room for a
        # client descheduled on a loaded 2-core CI machine (ctest -j2), and a late read can coalesce two
        # chunks (one ~0 gap), so the gaps are checked by their median.
        self.assertGreaterEqual(r.ttft, TTFT_S)
        self.assertLess(r.ttft, TTFT_S + 1.0)
        tpot = (r.e2e - r.ttft) / (r.output_tokens - 1)
        self.assertGreaterEqual(tpot, ITL_S * 0.9)
        self.assertLess(tpot, ITL_S * 10)
        self.assertGreaterEqual(sorted(r.itl)[len(r.itl) // 2], ITL_S * 0.5)

    def test_chat_endpoint(self):
        t = loadgen.HttpTarget("127.0.0.1", self.port, endpoint="chat")
        r = t.run("Hi there", 0, 3, timeout=10)
        self.assertTrue(r.ok, r.error)
        self.assertEqual(r.text, " Hi0 Hi1 Hi2")

    def test_sweep_levels_and_concurrency(self):
        t = loadgen.HttpTarget("127.0.0.1", self.port)
        levels, ref = loadgen.sweep(t, [1, 4], 8, loadgen.PROMPTS[:4], 10, timeout=10, log=None)
        self.assertEqual([s["concurrency"] for s in levels], [1, 4])
        self.assertEqual(MockHandler.max_active, 4)
        for s in levels:
            self.assertEqual(s["errors"], 0, s["error_samples"])
            self.assertEqual(s["completed"], 8)
            self.assertEqual(s["output_tokens"], 80)
            self.assertEqual(s["mismatches"], 0)
            self.assertAlmostEqual(s["output_tok_per_s"], 80 / s["wall_s"])
            self.assertGreaterEqual(s["ttft_s"]["p50"], TTFT_S)
            self.assertLessEqual(s["ttft_s"]["p50"], s["ttft_s"]["p99"])
        self.assertEqual(len(ref), 4)
        # One request takes ~TTFT + 9 ITL = 0.14 s; 8 of them: ~1.1 s serial, ~0.3 s at 4.
        self.assertGreater(levels[1]["requests_per_s"], 1.5 * levels[0]["requests_per_s"])

    def test_errors_are_counted_not_fatal(self):
        MockHandler.mode = "fail_odd"
        t = loadgen.HttpTarget("127.0.0.1", self.port)
        s, _ = loadgen.run_level(t, 2, 6, loadgen.PROMPTS, 4, timeout=10)
        self.assertEqual(s["errors"], 3)
        self.assertEqual(s["completed"], 3)
        self.assertTrue(any("HTTP 500" in e for e in s["error_samples"]), s["error_samples"])

    def test_timeout_bounds_a_hung_request(self):
        MockHandler.mode = "hang"
        t = loadgen.HttpTarget("127.0.0.1", self.port)
        t0 = time.monotonic()
        r = t.run("Hello", 0, 4, timeout=0.5)
        self.assertFalse(r.ok)
        self.assertLess(time.monotonic() - t0, 2.5)
        self.assertIn("timeout", r.error.lower())

    def test_missing_done_is_an_error(self):
        MockHandler.mode = "no_done"
        r = loadgen.HttpTarget("127.0.0.1", self.port).run("Hello", 0, 3, timeout=5)
        self.assertFalse(r.ok)
        self.assertIn("[DONE]", r.error)

    def test_non_loopback_refused(self):
        with self.assertRaises(ValueError):
            loadgen.HttpTarget("10.1.2.3", 80)

    def test_cli_json_and_plot(self):
        import tempfile
        d = tempfile.mkdtemp()
        rc = loadgen.main(["--port", str(self.port), "--concurrency", "1,2", "--requests", "2", "--max-tokens", "3",
                           "--json", d + "/r.json", "--plot", d + "/r.png"])
        self.assertEqual(rc, 0)
        with open(d + "/r.json") as f:
            out = json.load(f)
        self.assertEqual([s["concurrency"] for s in out["levels"]], [1, 2])
        self.assertGreater(os.path.getsize(d + "/r.png"), 1000)


if __name__ == "__main__":
    unittest.main()
