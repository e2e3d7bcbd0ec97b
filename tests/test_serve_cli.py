"""`serve` / `loadtest` / `export --format triton` refusing bad input in real processes, without a
Triton server: missing optional dependencies, ports, a stats reply of the wrong shape (a fake
loopback server), and the HTTP gateway's check of the KServe v2 binary tensor data extension."""
from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import REPO
from theseus_deploy.serve.gateway import check_infer_body

# Runs `theseus-deploy ARGS...` with the top-level modules of argv[1] (comma-separated) made
# unimportable, as if not installed: the import raises ModuleNotFoundError naming the module.
BLOCK_SHIM = """
import importlib.abc, runpy, sys
BLOCKED = set(sys.argv[1].split(","))
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, Block())
sys.argv = ["theseus-deploy"] + sys.argv[2:]
runpy.run_module("theseus_deploy", run_name="__main__")
"""


def run_cli(args, cwd, blocked=(), timeout=120):
    cmd = [sys.executable, "-c", BLOCK_SHIM, ",".join(blocked) or "-", *map(str, args)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(r, *needles):
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert lines and lines[-1].startswith("error:"), r.stderr[-2000:]
    assert "Traceback" not in r.stderr and len(lines) == 1, r.stderr[-2000:]
    for n in needles:
        assert n in lines[-1], (n, lines[-1])
    return lines[-1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ optional dependencies
def test_missing_serving_dependency_names_the_install_command(tiny_bert, tmp_path):
    """serve (nvidia-pytriton, tritonclient under it, aiohttp of the gateway) and export --format triton
    (tritonclient): one `error:` line with `make install` / the serve extra, exit 2, nothing written."""
    port = str(free_port())
    cases = {
        "serve without pytriton": (["pytriton"], ["serve", tiny_bert, "--http-port", port], "nvidia-pytriton"),
        "serve without tritonclient": (["tritonclient"], ["serve", tiny_bert, "--http-port", port], "tritonclient"),
        "serve without aiohttp": (["aiohttp"], ["serve", tiny_bert, "--http-port", port], "aiohttp"),
        "export --format triton without tritonclient": (
            ["tritonclient"], ["export", "--model", tiny_bert, "--format", "triton", "--output", tmp_path / "repo"],
            "tritonclient"),
    }
    before = sorted(os.listdir(tmp_path))
    with ThreadPoolExecutor(len(cases)) as pool:
        results = dict(zip(cases, pool.map(lambda c: run_cli(c[1], tmp_path, c[0]), cases.values())))
    for name, r in results.items():
        line = assert_one_line_error(r, cases[name][2], "make install", ".[serve]")
        assert "cannot be imported" in line, (name, line)
    assert sorted(os.listdir(tmp_path)) == before


# ------------------------------------------------------------------ ports
@pytest.mark.parametrize("url", ["http://127.0.0.1:8000/v2/models/text_classifier/infer", "http://127.0.0.1:8000?x=1"])
def test_loadtest_url_beyond_the_server_address(url, tmp_path):
    """The load test builds its own paths: a path or query in URL was silently dropped."""
    r = run_cli(["loadtest", url, "--output", tmp_path / "out"], tmp_path)
    assert_one_line_error(r, "give the server's address only")


@pytest.mark.parametrize("port", ["0", "abc", "70000", "-1"])
def test_loadtest_port_out_of_range_or_not_a_number(port, tmp_path, synthetic_glue):
    r = run_cli(["loadtest", f"http://127.0.0.1:{port}", "--output", tmp_path / "out", "--data-dir", synthetic_glue,
                 "--requests", "2", "--seconds", "2", "--timeout", "2"], tmp_path)
    assert_one_line_error(r, "port must be a number from 1 to 65535")
    assert not (tmp_path / "out").exists()


def test_serve_ports_busy_or_shared_are_refused_before_start(tiny_bert, tmp_path):
    """Measured before: a busy --grpc-port hung the start for 120 s (Triton exited, PyTriton waited);
    a busy --http-port, or one port given twice, ended in the gateway's OSError traceback; --host ::1
    in a socket.gaierror traceback (and PyTriton cannot use an IPv6 address at all)."""
    pytest.importorskip("pytriton")
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    b, f1, f2 = busy.getsockname()[1], free_port(), free_port()
    try:
        cases = {"http busy": (["--http-port", b, "--grpc-port", f1, "--metrics-port", f2], f"--http-port {b}"),
                 "IPv6 loopback": (["--host", "::1", "--http-port", f1, "--grpc-port", b, "--metrics-port", f2],
                                   "PyTriton cannot serve on an IPv6 address"),
                 "grpc busy": (["--http-port", f1, "--grpc-port", b, "--metrics-port", f2], f"--grpc-port {b}"),
                 "one port twice": (["--http-port", f1, "--grpc-port", f1, "--metrics-port", f2],
                                    f"--http-port and --grpc-port are both {f1}")}
        with ThreadPoolExecutor(len(cases)) as pool:
            results = dict(zip(cases, pool.map(lambda c: run_cli(["serve", tiny_bert, *c[0]], tmp_path, timeout=60),
                                               cases.values())))
    finally:
        busy.close()
    for name, r in results.items():
        assert_one_line_error(r, cases[name][1])


# ------------------------------------------------------------------ a stats reply of the wrong shape
class FakeTriton(BaseHTTPRequestHandler):
    """Answers inferences like `serve` and its statistics with whatever the test sets."""

    protocol_version = "HTTP/1.1"
    stats = b""

    def _send(self, body: bytes):
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.posts = getattr(self.server, "posts", 0) + 1
        self._send(json.dumps({"outputs": [{"name": "label", "datatype": "BYTES", "shape": [1, 1], "data": ["LABEL_1"]},
                                           {"name": "score", "datatype": "FP32", "shape": [1, 1], "data": [0.5]}]}).encode())

    def do_GET(self):
        self._send(self.server.stats)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_triton():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeTriton)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


GOOD_STATS = {"model_stats": [{"name": "text_classifier", "inference_count": 7, "execution_count": 3}]}


@pytest.mark.parametrize("stats", [{"model_stats": [5]}, [1, 2], {"model_stats": []}, {"model_stats": "x"},
                                   {"model_stats": [{"inference_count": None, "execution_count": 1}]},
                                   {"model_stats": [{"inference_count": "many", "execution_count": 1}]},
                                   {"model_stats": [{"inference_count": 3}]}, "not json"])
def test_loadtest_stats_reply_of_the_wrong_shape(fake_triton, stats, tmp_path, synthetic_glue):
    fake_triton.stats = stats.encode() if isinstance(stats, str) else json.dumps(stats).encode()
    r = run_cli(["loadtest", f"http://127.0.0.1:{fake_triton.server_address[1]}", "--output", tmp_path / "out",
                 "--data-dir", synthetic_glue, "--concurrency", "1", "--requests", "3", "--seconds", "2", "--warmup", "0"],
                tmp_path)
    assert_one_line_error(r, "/stats answered 200 but not with Triton's statistics")
    assert not (tmp_path / "out").exists()


def test_loadtest_needs_no_serving_dependency(fake_triton, tmp_path, synthetic_glue):
    """The good case of the fake server: loadtest runs without nvidia-pytriton and tritonclient."""
    fake_triton.stats = json.dumps(GOOD_STATS).encode()
    r = run_cli(["loadtest", f"http://127.0.0.1:{fake_triton.server_address[1]}", "--output", tmp_path / "out",
                 "--data-dir", synthetic_glue, "--concurrency", "1", "--requests", "3", "--seconds", "2", "--warmup", "0"],
                tmp_path, blocked=("pytriton", "tritonclient"))
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["runs"][0]["ok"] == 3 and res["runs"][0]["errors"] == 0


def test_loadtest_output_holds_its_run_config(fake_triton, tmp_path, synthetic_glue):
    fake_triton.stats = json.dumps(GOOD_STATS).encode()
    url = f"http://127.0.0.1:{fake_triton.server_address[1]}"
    r = run_cli(["loadtest", url, "--name", "fake", "--output", tmp_path / "out", "--data-dir", synthetic_glue,
                 "--concurrency", "1,2", "--requests", "3", "--seconds", "2", "--warmup", "0", "--timeout", "5"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    cfg = json.loads((tmp_path / "out" / "run_config.json").read_text())
    assert cfg["command"] == "loadtest" and cfg["urls"] == [url] and cfg["names"] == ["fake"]
    assert (cfg["concurrency"], cfg["requests"], cfg["seconds"], cfg["warmup"], cfg["timeout"]) == ("1,2", 3, 2.0, 0, 5.0)
    assert cfg["data_dir"] == str(synthetic_glue) and cfg["output"] == str(tmp_path / "out") and cfg["task"] == "sst2"


@pytest.mark.parametrize("args,msg", [
    (["--name", "x", "--name", "y", "--concurrency", "1,4,1"], "--concurrency lists 1 more than once"),
    (["--name", "a", "--name", "a"], "--name a is given twice"),
    ([], "the same server twice"),
])
def test_loadtest_refuses_a_level_or_server_given_twice(fake_triton, tmp_path, synthetic_glue, args, msg):
    """Each level and each server once: `--concurrency 1,1` reported every row twice with both levels' requests
    summed into each, two equal --name (or a URL given twice without names) merged two servers' rows."""
    fake_triton.stats = json.dumps(GOOD_STATS).encode()
    url = f"http://127.0.0.1:{fake_triton.server_address[1]}"
    r = run_cli(["loadtest", url, url, "--output", tmp_path / "out", "--data-dir", synthetic_glue, "--requests", "3",
                 "--seconds", "2", "--warmup", "0", *args], tmp_path)
    assert_one_line_error(r, msg)
    assert getattr(fake_triton, "posts", 0) == 0 and not (tmp_path / "out").exists()


def test_loadtest_holds_its_output_lock_for_the_whole_run(fake_triton, tmp_path, synthetic_glue):
    """A second live run on the same --output is refused before it sends anything (it used to run the
    whole load test and take the lock only to write, then fail or, with --overwrite, replace the first's)."""
    from theseus_deploy.io import output_lock

    fake_triton.stats = json.dumps(GOOD_STATS).encode()
    with output_lock(tmp_path / "out"):
        r = run_cli(["loadtest", f"http://127.0.0.1:{fake_triton.server_address[1]}", "--output", tmp_path / "out",
                     "--data-dir", synthetic_glue, "--concurrency", "1", "--requests", "3", "--seconds", "2",
                     "--warmup", "0", "--overwrite"], tmp_path)
    assert_one_line_error(r, "another run is writing", str(tmp_path / "out"))
    assert getattr(fake_triton, "posts", 0) == 0 and not (tmp_path / "out").exists()


# ------------------------------------------------------------------ the gateway's check, binary tensor data
def binary_request(texts: list[bytes], size_delta=0, outputs=True, extra_input=None):
    """What tritonclient.http sends for InferInput.set_data_from_numpy(..., binary_data=True)."""
    raw = b"".join(struct.pack("<I", len(t)) + t for t in texts)
    inp = {"name": "text", "shape": [len(texts), 1], "datatype": "BYTES", "parameters": {"binary_data_size": len(raw) + size_delta}}
    if extra_input:
        inp.update(extra_input)
    req = {"inputs": [inp]}
    if outputs:
        req["outputs"] = [{"name": "label", "parameters": {"binary_data": True}},
                          {"name": "score", "parameters": {"binary_data": True}}]
    header = json.dumps(req).encode()
    return header + raw, str(len(header))


def test_binary_tensor_data_is_checked_like_json():
    ok, n = binary_request([b"a gripping film", "d\u00e9j\u00e0 vu".encode()])
    assert check_infer_body(ok, "text", 8, n) is None
    assert check_infer_body(ok, "text", 8, None).startswith("malformed JSON: Extra data")
    assert "Inference-Header-Content-Length header" in check_infer_body(ok, "text", 8, None)
    cases = {
        "not a number": (ok, "abc", "Inference-Header-Content-Length must be a number"),
        "beyond the body": (ok, str(len(ok) + 1), "does not fit the body"),
        "zero": (ok, "0", "does not fit the body"),
        "size too large": (*binary_request([b"x"], size_delta=1), "binary_data_size 6, but 5 bytes"),
        "empty text": (*binary_request([b"ok", b"  "]), "text 1 is empty"),
        "not UTF-8": (*binary_request([b"\xff\xfe"]), "text 0 is not valid UTF-8"),
        "both data and binary": (*binary_request([b"x"], extra_input={"data": ["x"]}), "both 'data' and binary_data_size"),
        "batch over the limit": (*binary_request([b"x"] * 9), "9 texts in one request, at most 8"),
        "parameters not an object": (*binary_request([b"x"], extra_input={"parameters": [1]}), "parameters must be a JSON object"),
    }
    body, n = binary_request([b"abc"])
    cases["truncated prefix"] = (body[:-2], n, "binary_data_size 7, but 5 bytes")
    header = json.loads(body[:int(n)])
    header["inputs"][0]["parameters"]["binary_data_size"] = 5
    h = json.dumps(header).encode()
    cases["bad length prefix"] = (h + body[int(n):-2], str(len(h)), "must hold 1 length-prefixed strings")
    header["inputs"][0]["shape"] = [2, 1]
    header["inputs"][0]["parameters"]["binary_data_size"] = 7
    h = json.dumps(header).encode()
    cases["fewer texts than the shape"] = (h + body[int(n):], str(len(h)), "must hold 2 length-prefixed strings")
    json_body = json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1, 1], "data": ["x"]}]}).encode()
    cases["bytes after JSON without binary input"] = (json_body + b"abc", str(len(json_body)), "3 bytes follow the JSON header")
    for name, (body, n, expected) in cases.items():
        msg = check_infer_body(body, "text", 8, n)
        assert msg is not None and expected in msg, (name, msg)


def test_serve_ends_at_once_when_triton_exits_while_starting(tmp_path, tiny_bert):
    """A port taken after serve's own check (two `serve` on the same ports started at once): Triton
    exits within a second; measured before: PyTriton waited 120 s for it. The check is skipped here
    to reach that state; the answer is one line with Triton's reason."""
    pytest.importorskip("pytriton")
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    code = ("import sys, theseus_deploy.serve.server as s; s.check_ports = lambda *a: None; "
            "from theseus_deploy.cli import main; main(sys.argv[1:])")
    cmd = [sys.executable, "-c", code, "serve", str(tiny_bert), "--backend", "torch", "--http-port", str(free_port()),
           "--grpc-port", str(busy.getsockname()[1]), "--metrics-port", str(free_port())]
    try:
        r = subprocess.run(cmd, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                           text=True, timeout=90)
    finally:
        busy.close()
    assert_one_line_error(r, "Triton exited while starting", "already in use")


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_serve_of_a_model_that_is_not_a_fine_tuned_classifier_is_refused(backend, tmp_path):
    """A bare encoder (no classifier head): serve --backend torch answered with a new random head's
    labels; --backend onnx exported it on the fly and failed that export's validation. Refused before
    Triton starts: one line, exit 2, nothing written."""
    pytest.importorskip("pytriton")
    from transformers import BertModel

    from tiny import tiny_config, tiny_tokenizer

    bare = tmp_path / "bare"
    BertModel(tiny_config("bert", 2)).save_pretrained(bare)
    tiny_tokenizer().save_pretrained(bare)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    r = run_cli(["serve", bare, "--backend", backend, "--http-port", free_port(), "--grpc-port", free_port(),
                 "--metrics-port", free_port()], tmp_path, timeout=120)
    assert_one_line_error(r, f"model '{bare}' is not a fine-tuned classifier (architectures: BertModel)",
                          "serve answers with a classifier's labels")
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_request_fields_triton_answers_500_or_dies_on_are_refused():
    """Measured on Triton 2.51 behind the gateway before this check: `classification` on an output
    killed the server (Triton's classification extension on the BYTES `label`: tritonserver exited,
    `serve` with it); an `outputs` that is not a list of named objects, request `parameters` that are
    not an object, a non-string `id` and a lone surrogate in a text were answered 500."""
    def req(text="a film", **fields):
        return json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1, 1], "data": [text]}],
                           **fields}).encode()

    good = req(id="r1", parameters={"priority": 1},
               outputs=[{"name": "label", "parameters": {"binary_data": False}}, {"name": "score"}])
    assert check_infer_body(good, "text", 8) is None
    cases = {
        "classification": (req(outputs=[{"name": "label", "parameters": {"classification": 2}}]), "classification"),
        "outputs not a list": (req(outputs="label"), "'outputs' must be a list"),
        "output without a name": (req(outputs=[{}]), "output 0 must be an object with a 'name'"),
        "output not an object": (req(outputs=[1]), "output 0 must be an object with a 'name'"),
        "output parameters not an object": (req(outputs=[{"name": "label", "parameters": 1}]), "parameters must be a JSON object"),
        "request parameters not an object": (req(parameters="x"), "request 'parameters' must be a JSON object"),
        "id not a string": (req(id=5), "'id' must be a string"),
        "lone surrogate": (req("\ud800 film"), "text 0 is not valid UTF-8"),
    }
    for name, (body, expected) in cases.items():
        msg = check_infer_body(body, "text", 8)
        assert msg is not None and expected in msg, (name, msg)
    binary, n = binary_request([b"x"])
    header = json.loads(binary[:int(n)])
    header["outputs"] = [{"name": "label", "parameters": {"classification": 1}}]
    h = json.dumps(header).encode()
    assert "classification" in (check_infer_body(h + binary[int(n):], "text", 8, str(len(h))) or "")


def test_gateway_answers_json_for_a_body_too_large_and_for_a_triton_that_is_gone():
    """The gateway alone, its upstream port closed. Measured before: a body of 4,194,204 bytes (a
    4,150,000-byte one was served) made Triton 2.51's HTTP frontend crash (SIGSEGV), and with Triton
    gone the gateway answered aiohttp's text/plain 500 (`Server got itself in trouble`) and logged a
    traceback per request."""
    pytest.importorskip("aiohttp")
    import urllib.error
    import urllib.request

    from theseus_deploy.serve.gateway import Gateway

    port = free_port()
    gateway = Gateway("127.0.0.1", port, free_port(), "text_classifier", "text", 8)
    gateway.start()

    def post(path, body):
        req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body)
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, r.headers.get("Content-Type"), r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.headers.get("Content-Type"), e.read()

    try:
        good = json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1, 1], "data": ["x"]}]}).encode()
        for path, body, status, expected in [
                ("/v2/models/text_classifier/infer", good[:-1] + b" " * (4_194_204 - len(good)) + b"}", 413, "at most"),
                ("/v2/repository/index", b" " * 4_194_204, 413, "at most"),
                ("/v2/models/text_classifier/infer", good, 502, "Triton"),
                ("/v2/health/ready", b"", 502, "Triton")]:
            code, ctype, payload = post(path, body or None)
            assert code == status and ctype.startswith("application/json"), (path, code, ctype, payload[:200])
            assert expected in json.loads(payload)["error"], (path, payload[:200])
    finally:
        gateway.stop()
