#!/usr/bin/env python3
"""nibble-server against real clients: the `openai` package over /v1 and
grpcio stubs generated (into a temp dir) from proto/nibble/v1/nibble.proto,
plus the standard grpc.health.v1 service. Output is compared with
nibble-generate (the independent single-sequence loop).

Run: python3 tests/python/test_server.py  (NIBBLE_BIN_DIR = build/bin).
Exit 77 (ctest SKIP_RETURN_CODE) when openai / grpcio / grpcio-tools or the
stories260K model are missing."""
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import unittest

SRC = os.environ.get("NIBBLE_SOURCE_DIR", os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
BIN = os.environ.get("NIBBLE_BIN_DIR", os.path.join(SRC, "build", "bin"))
SHARED = os.environ.get("NIBBLE_SHARED_DIR", os.path.join(SRC, "..", "shared"))
MODEL = os.path.join(SHARED, "models", "stories260K", "stories260K.bin")
TOK = os.path.join(SHARED, "models", "stories260K", "tok512.bin")

try:
    import grpc
    import openai
    from grpc_tools import protoc
    from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: F401  (grpcio-health-checking)
except ImportError as e:  # pragma: no cover
    try:
        import grpc  # noqa: F811
        import openai  # noqa: F811
        from grpc_tools import protoc  # noqa: F811
        health_pb2 = None
    except ImportError:
        print(f"SKIP: {e}; pip install openai grpcio grpcio-tools")
        sys.exit(77)

if not (os.path.exists(MODEL) and os.path.exists(os.path.join(BIN, "nibble-server"))):
    print(f"SKIP: {MODEL} or {BIN}/nibble-server missing")
    sys.exit(77)

PROMPT = "Once upon a time"


def reference(prompt, flags):
    out = subprocess.run([os.path.join(BIN, "nibble-generate"), "-m", MODEL, "--tokenizer", TOK, "-t", "1",
                          "-p", prompt] + flags, capture_output=True, check=True, timeout=60).stdout.decode()
    assert out.startswith(prompt)
    return out[len(prompt):]


class ServerTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.log = tempfile.NamedTemporaryFile(prefix="nibble_srv_py_", suffix=".log", delete=False)
        cls.proc = subprocess.Popen([os.path.join(BIN, "nibble-server"), "-m", MODEL, "--tokenizer", TOK,
                                     "--port", "0", "--grpc-port", "0", "-t", "1", "--api-key", "k3y"],
                                    stderr=cls.log, stdout=subprocess.DEVNULL)
        cls.http = cls.grpc_port = None
        for _ in range(300):
            with open(cls.log.name) as f:
                text = f.read()
            h = re.search(r"http listening on [0-9.]+:(\d+)", text)
            g = re.search(r"grpc listening on [0-9.]+:(\d+)", text)
            if h and g:
                cls.http, cls.grpc_port = int(h.group(1)), int(g.group(1))
                break
            time.sleep(0.05)
        assert cls.http, "nibble-server did not report its ports"
        cls.client = openai.OpenAI(base_url=f"http://127.0.0.1:{cls.http}/v1", api_key="k3y", timeout=60,
                                   max_retries=0)
        gen = tempfile.mkdtemp(prefix="nibble_pb_")
        rc = protoc.main(["protoc", f"-I{SRC}/proto", f"--python_out={gen}", f"--grpc_python_out={gen}",
                          f"{SRC}/proto/nibble/v1/nibble.proto"])
        assert rc == 0, "protoc failed"
        sys.path.insert(0, gen)
        from nibble.v1 import nibble_pb2, nibble_pb2_grpc
        cls.pb, cls.pb_grpc = nibble_pb2, nibble_pb2_grpc
        cls.channel = grpc.insecure_channel(f"127.0.0.1:{cls.grpc_port}")
        cls.stub = nibble_pb2_grpc.NibbleStub(cls.channel)
        cls.md = [("authorization", "Bearer k3y")]

    @classmethod
    def tearDownClass(cls):
        cls.channel.close()
        cls.proc.send_signal(signal.SIGTERM)
        assert cls.proc.wait(timeout=30) == 0

    def test_openai_completions_greedy_and_stream(self):
        ref = reference(PROMPT, ["-n", "40", "--temp", "0"])
        r = self.client.completions.create(model="stories260K", prompt=PROMPT, max_tokens=40, temperature=0)
        self.assertEqual(r.choices[0].text, ref)
        self.assertEqual(r.usage.completion_tokens, 40)
        chunks = list(self.client.completions.create(model="stories260K", prompt=PROMPT, max_tokens=40,
                                                     temperature=0, stream=True))
        self.assertEqual("".join(c.choices[0].text for c in chunks if c.choices), ref)

    def test_openai_chat_seeded(self):
        ref = reference("Tell me a story", ["--chat", "-n", "30", "--temp", "0.8", "--top-k", "0", "--top-p", "0.9",
                                            "--min-p", "0", "-s", "7"])
        r = self.client.chat.completions.create(model="stories260K", max_tokens=30, temperature=0.8, top_p=0.9,
                                                seed=7, messages=[{"role": "user", "content": "Tell me a story"}])
        self.assertEqual("\n" + r.choices[0].message.content, ref)
        s = self.client.chat.completions.create(model="stories260K", max_tokens=30, temperature=0.8, top_p=0.9,
                                                seed=7, stream=True, stream_options={"include_usage": True},
                                                messages=[{"role": "user", "content": "Tell me a story"}])
        text, usage = "", None
        for c in s:
            if c.choices and c.choices[0].delta.content:
                text += c.choices[0].delta.content
            if c.usage:
                usage = c.usage
        self.assertEqual("\n" + text, ref)
        self.assertIsNotNone(usage)
        self.assertEqual(usage.completion_tokens, r.usage.completion_tokens)

    def test_openai_logprobs_n_and_errors(self):
        r = self.client.chat.completions.create(model="stories260K", max_tokens=5, temperature=0, n=2, logprobs=True,
                                                top_logprobs=3, messages=[{"role": "user", "content": "Hi"}])
        self.assertEqual([c.index for c in r.choices], [0, 1])
        lp = r.choices[0].logprobs.content
        self.assertEqual(len(lp), 5)
        self.assertEqual(len(lp[0].top_logprobs), 3)
        self.assertAlmostEqual(lp[0].logprob, lp[0].top_logprobs[0].logprob, places=5)  # greedy = top-1
        with self.assertRaises(openai.NotFoundError):
            self.client.completions.create(model="nope", prompt="x")
        with self.assertRaises(openai.BadRequestError):
            self.client.completions.create(model="stories260K", prompt="x", max_tokens=-3)
        bad = openai.OpenAI(base_url=f"http://127.0.0.1:{self.http}/v1", api_key="wrong", max_retries=0)
        with self.assertRaises(openai.AuthenticationError):
            bad.models.list()
        self.assertEqual([m.id for m in self.client.models.list()], ["stories260K"])

    def test_grpc_generate_matches_and_tokenize(self):
        ref = reference(PROMPT, ["-n", "40", "--temp", "0"])
        req = self.pb.GenerateRequest(text=PROMPT, max_tokens=40, sampling=self.pb.SamplingParams(temperature=0))
        msgs = list(self.stub.Generate(req, metadata=self.md, timeout=30))
        self.assertEqual("".join(m.text for m in msgs), ref)
        self.assertTrue(msgs[-1].final)
        self.assertEqual(msgs[-1].finish_reason, "length")
        self.assertEqual(msgs[-1].usage.completion_tokens, 40)
        ids = self.stub.Tokenize(self.pb.TokenizeRequest(text=PROMPT, add_bos=True), metadata=self.md).ids
        self.assertGreater(len(ids), 1)
        text = self.stub.Detokenize(self.pb.DetokenizeRequest(ids=list(ids)), metadata=self.md).text
        self.assertEqual(text.strip(), PROMPT)
        with self.assertRaises(grpc.RpcError) as cm:
            self.stub.ModelInfo(self.pb.ModelInfoRequest())
        self.assertEqual(cm.exception.code(), grpc.StatusCode.UNAUTHENTICATED)
        with self.assertRaises(grpc.RpcError) as cm:
            self.stub.GenerateUnary(self.pb.GenerateRequest(text="x", max_tokens=-1), metadata=self.md)
        self.assertEqual(cm.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)

    def test_grpc_health(self):
        if health_pb2 is None:
            self.skipTest("grpcio-health-checking not installed")
        hs = health_pb2_grpc.HealthStub(self.channel)
        r = hs.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        self.assertEqual(r.status, health_pb2.HealthCheckResponse.SERVING)


    def test_grpc_reflection(self):
        try:
            from google.protobuf import descriptor_pb2
            from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
        except ImportError:
            self.skipTest("grpcio-reflection not installed")
        stub = reflection_pb2_grpc.ServerReflectionStub(self.channel)

        def ask(**kw):
            out = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(**kw)]),
                                                 metadata=self.md, timeout=10))
            self.assertEqual(len(out), 1)
            return out[0]

        names = [x.name for x in ask(list_services="").list_services_response.service]
        self.assertIn("nibble.v1.Nibble", names)
        self.assertIn("grpc.health.v1.Health", names)
        files = ask(file_containing_symbol="nibble.v1.Nibble").file_descriptor_response.file_descriptor_proto
        protos = [descriptor_pb2.FileDescriptorProto.FromString(b) for b in files]
        methods = {m.name for f in protos for sv in f.service if sv.name == "Nibble" for m in sv.method}
        self.assertTrue({"Generate", "GenerateUnary", "Tokenize", "Detokenize", "ModelInfo"} <= methods, methods)
        err = ask(file_containing_symbol="no.such.Service")
        self.assertTrue(err.HasField("error_response"))

    def run_tool(self, argv, timeout=60):
        r = subprocess.run(argv, capture_output=True, timeout=timeout)
        return r.returncode, r.stdout.decode(), r.stderr.decode()

    def test_nibble_cli(self):
        cli = [os.path.join(BIN, "nibble-cli"), "--addr", f"127.0.0.1:{self.grpc_port}", "--api-key", "k3y"]
        rc, out, err = self.run_tool(cli + ["health"])
        self.assertEqual(rc, 0, err)
        self.assertIn("SERVING", out + err)
        rc, out, err = self.run_tool(cli + ["info"])
        self.assertEqual(rc, 0, err)
        self.assertIn("stories260K", out)
        ids = self.stub.Tokenize(self.pb.TokenizeRequest(text=PROMPT, add_bos=True), metadata=self.md).ids
        rc, out, err = self.run_tool(cli + ["tokenize", PROMPT])
        self.assertEqual(rc, 0, err)
        self.assertEqual([int(x) for x in re.findall(r"-?\d+", out)], list(ids))
        rc, out, err = self.run_tool(cli + ["detokenize"] + [str(i) for i in ids])
        self.assertEqual(rc, 0, err)
        self.assertEqual(out.strip(), PROMPT)
        ref = reference(PROMPT, ["-n", "40", "--temp", "0"])
        rc, out, err = self.run_tool(cli + ["generate", "-p", PROMPT, "-n", "40", "--temp", "0"])
        self.assertEqual(rc, 0, err)
        self.assertEqual(out.rstrip("\n"), ref.rstrip("\n"))
        # Errors are clear, non-zero exits: wrong key, bad argument, no server.
        rc, out, err = self.run_tool([cli[0], "--addr", f"127.0.0.1:{self.grpc_port}", "--api-key", "bad", "info"])
        self.assertNotEqual(rc, 0)
        self.assertIn("UNAUTHENTICATED", err.upper().replace(" ", "_"))
        rc, out, err = self.run_tool(cli + ["generate", "-p", "x", "-n", "-5"])
        self.assertNotEqual(rc, 0)
        self.assertIn("INVALID", err.upper())
        rc, out, err = self.run_tool([cli[0], "--addr", "127.0.0.1:1", "--timeout", "2", "health"], timeout=30)
        self.assertNotEqual(rc, 0)

    def test_python_client(self):
        client = os.path.join(SRC, "clients", "python", "nibble_client.py")
        base = [sys.executable, client, "--addr", f"127.0.0.1:{self.grpc_port}", "--api-key", "k3y"]
        ref = reference(PROMPT, ["-n", "40", "--temp", "0"])
        rc, out, err = self.run_tool(base + ["generate", PROMPT, "-n", "40", "--temp", "0"])
        self.assertEqual(rc, 0, err)
        self.assertEqual(out, ref)
        self.assertIn("length", err)
        ids = self.stub.Tokenize(self.pb.TokenizeRequest(text=PROMPT, add_bos=True), metadata=self.md).ids
        rc, out, err = self.run_tool(base + ["tokenize", PROMPT])
        self.assertEqual(rc, 0, err)
        self.assertEqual([int(x) for x in out.split()], list(ids))
        rc, out, err = self.run_tool(base + ["info"])
        self.assertEqual(rc, 0, err)
        self.assertIn("stories260K", out)
        rc, out, err = self.run_tool([sys.executable, client, "--addr", f"127.0.0.1:{self.grpc_port}", "info"])
        self.assertNotEqual(rc, 0)
        self.assertIn("UNAUTHENTICATED", err)


if __name__ == "__main__":
    unittest.main(verbosity=2)
