"""`theseus-deploy serve` on PyTriton's bundled Triton server (tiny model, loopback, free ports).

One server per module, started as a real `theseus-deploy serve` process and always stopped by
PID; the last test stops it with SIGTERM and checks that no process of it is left.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from theseus_deploy.config import ExportConfig

pytest.importorskip("pytriton")
psutil = pytest.importorskip("psutil")

from conftest import REPO  # noqa: E402

MODEL = "text_classifier"
TEXTS = ["a gripping, beautifully acted film", "dull and far too long", "it is what it is",
         "word " * 400]  # the last one is longer than --max-length: truncated, not refused


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port, body: bytes, timeout=30, headers=None):
    return post_to("127.0.0.1", port, body, timeout, headers)


def post_to(host, port, body: bytes, timeout=30, headers=None):
    req = urllib.request.Request(f"http://{host}:{port}/v2/models/{MODEL}/infer", data=body,
                                 headers=headers or {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def infer_json(texts, name="text", datatype="BYTES"):
    return json.dumps({"inputs": [{"name": name, "datatype": datatype, "shape": [len(texts), 1], "data": texts}]}).encode()


def outputs(body):
    out = {o["name"]: o["data"] for o in body["outputs"]}
    return out["label"], out["score"]


@pytest.fixture(scope="module")
def export_dir(tiny_bert, tmp_path_factory):
    from theseus_deploy.export.api import export_model

    out = tmp_path_factory.mktemp("serve") / "export"
    export_model(ExportConfig.of(model=str(tiny_bert), formats=["onnx-int8"], output=str(out), max_seq_length=128))
    return out


def start_server(model, log, *extra, host="127.0.0.1"):
    """A `theseus-deploy serve` process on free loopback ports, ready to answer; stop it with stop_server."""
    ports = {"http": free_port(), "grpc": free_port(), "metrics": free_port()}
    cmd = [sys.executable, "-m", "theseus_deploy", "serve", str(model), "--http-port", str(ports["http"]),
           "--grpc-port", str(ports["grpc"]), "--metrics-port", str(ports["metrics"]), "--exit-timeout-secs", "2", *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
    info = {"proc": proc, "ports": ports, "log": log, "pids": {proc.pid}}
    try:
        deadline = time.time() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://{host}:{ports['http']}/v2/models/{MODEL}/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail(f"server not ready after 180 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        info["pids"] |= {c.pid for c in psutil.Process(proc.pid).children(recursive=True)}
    except BaseException:
        stop_server(info)
        raise
    return info


def stop_server(info):
    """Stop by PID (SIGTERM, then SIGKILL of its group), and kill any process of it still alive."""
    proc = info["proc"]
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    for pid in info["pids"]:
        if psutil.pid_exists(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="module")
def server(export_dir, tmp_path_factory):
    info = start_server(export_dir, tmp_path_factory.mktemp("serve-log") / "server.log", "--max-batch-size", "8",
                        "--max-queue-delay-ms", "20", "--max-length", "64", "--verbose")
    try:
        yield info
    finally:
        stop_server(info)


def test_listens_on_loopback_only(server):
    conns = [c for p in server["pids"] if psutil.pid_exists(p) for c in psutil.Process(p).net_connections("inet")
             if c.status == psutil.CONN_LISTEN]
    ports = {c.laddr.port: c.laddr.ip for c in conns}
    loopback = ("127.0.0.1", "::ffff:127.0.0.1", "::1")
    for name, port in server["ports"].items():
        assert ports.get(port) in loopback, (name, port, ports)
    assert all(ip in loopback for ip in ports.values()), ports


def test_triton_http_behind_the_gateway_is_on_loopback_whatever_the_host(export_dir, tmp_path):
    """--host 127.0.0.2 --allow-remote (another address, still on this machine's loopback network):
    the gateway, gRPC and metrics listen there, Triton's own HTTP (the gateway's upstream) on 127.0.0.1
    only. Measured before with --allow-remote and the wildcard --host (in a network namespace of its own):
    Triton's HTTP listened on the wildcard address at its "internal" port, reachable past the gateway."""
    info = start_server(export_dir, tmp_path / "server.log", "--host", "127.0.0.2", "--allow-remote", host="127.0.0.2")
    try:
        listening = {c.laddr.port: c.laddr.ip.removeprefix("::ffff:") for p in info["pids"] if psutil.pid_exists(p)
                     for c in psutil.Process(p).net_connections("inet") if c.status == psutil.CONN_LISTEN}
        for name, port in info["ports"].items():
            assert listening.pop(port, None) == "127.0.0.2", (name, port, listening)
        assert listening and set(listening.values()) == {"127.0.0.1"}, listening  # Triton's HTTP, inside
        status, body = post_to("127.0.0.2", info["ports"]["http"], infer_json([TEXTS[0]]))
        assert status == 200 and outputs(body)[0][0], body
    finally:
        stop_server(info)


def test_text_in_label_out_like_text_classifier(server, export_dir):
    from theseus_deploy.runtime import TextClassifier

    clf = TextClassifier.load(str(export_dir), backend="onnx-int8", max_length=64)
    for text in TEXTS:
        status, body = post(server["ports"]["http"], infer_json([text]))
        assert status == 200, body
        (label,), (score,) = outputs(body)
        ref = clf([text])[0]
        assert label == ref["label"]
        assert abs(score - ref["score"]) < 1e-3  # INT8: dynamic activation scales depend on the batch's padding
    status, body = post(server["ports"]["http"], infer_json(TEXTS[:3]))  # one request, several rows
    assert status == 200 and len(outputs(body)[0]) == 3


def test_grpc_and_health(server, export_dir):
    import tritonclient.grpc as grpcclient

    from theseus_deploy.runtime import TextClassifier

    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server['ports']['grpc']}")
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL)
    inp = grpcclient.InferInput("text", [1, 1], "BYTES")
    inp.set_data_from_numpy(np.array([[TEXTS[0].encode()]], dtype=object))
    res = client.infer(MODEL, [inp])
    ref = TextClassifier.load(str(export_dir), backend="onnx-int8", max_length=64)([TEXTS[0]])[0]
    assert res.as_numpy("label")[0, 0].decode() == ref["label"]
    assert abs(float(res.as_numpy("score")[0, 0]) - ref["score"]) < 1e-3
    client.close()


def test_concurrent_requests_are_batched(server):
    port = server["ports"]["http"]

    def stats():
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/models/{MODEL}/stats", timeout=10) as r:
            s = json.loads(r.read())["model_stats"][0]
        return int(s["inference_count"]), int(s["execution_count"]), s["batch_stats"]

    inf0, exe0, _ = stats()
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(lambda i: post(port, infer_json([TEXTS[i % 3]])), range(96)))
    assert all(status == 200 for status, _ in results)
    inf1, exe1, batch_stats = stats()
    assert inf1 - inf0 == 96
    assert exe1 - exe0 < 96, "no two requests were merged into one batch"
    assert any(int(b["batch_size"]) > 1 for b in batch_stats)
    assert max(int(b["batch_size"]) for b in batch_stats) <= 8


BINARY = {"Content-Type": "application/octet-stream"}


@pytest.mark.parametrize("case", ["wrong tensor name", "wrong datatype", "batch over the limit", "malformed JSON",
                                  "non-string", "empty text", "binary: empty text", "binary: size mismatch",
                                  "binary: not UTF-8", "binary without its header length", "classification output",
                                  "body over 4 MB"])
def test_bad_request_is_refused_and_server_keeps_serving(server, case):
    from test_serve_cli import binary_request

    port = server["ports"]["http"]
    binary = {"binary: empty text": binary_request([b"fine", b""]), "binary: size mismatch": binary_request([b"x"], 3),
              "binary: not UTF-8": binary_request([b"\xc3\x28"]), "binary without its header length": binary_request([b"x"])}
    if case in binary:
        body, n = binary[case]
        status, answer = post(port, body, headers={**BINARY, **({} if "header length" in case else
                                                                 {"Inference-Header-Content-Length": n})})
        expected = {"binary: empty text": "text 1 is empty", "binary: size mismatch": "binary_data_size 8, but 5 bytes",
                    "binary: not UTF-8": "text 0 is not valid UTF-8",
                    "binary without its header length": "needs the Inference-Header-Content-Length header"}[case]
        assert status == 400 and expected in answer.get("error", ""), (status, answer)
        status, ok = post(port, infer_json([TEXTS[0]]))
        assert status == 200 and outputs(ok)[0][0]
        return
    body = {"wrong tensor name": infer_json(["x"], name="txt"),
            "wrong datatype": json.dumps({"inputs": [{"name": "text", "datatype": "INT32", "shape": [1, 1], "data": [5]}]}).encode(),
            "batch over the limit": infer_json(["x"] * 9),
            "malformed JSON": b'{"inputs": [{"name": ',
            "non-string": json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1, 1], "data": [5]}]}).encode(),
            "empty text": infer_json(["  "]),
            # measured before the gateway refused them: each one made tritonserver exit, and `serve` with it
            "classification output": json.dumps({"inputs": json.loads(infer_json(["x"]))["inputs"],
                                                 "outputs": [{"name": "label", "parameters": {"classification": 2}}]}).encode(),
            "body over 4 MB": infer_json(["word " * 1_200_000])}[case]  # 6 MB
    status, answer = post(port, body)
    expected = {"wrong tensor name": "expected exactly one input named 'text'", "wrong datatype": "datatype BYTES",
                "batch over the limit": "at most 8", "malformed JSON": "malformed JSON",
                "non-string": "text 0 is not a string", "empty text": "text 0 is empty",
                "classification output": "classification", "body over 4 MB": "at most"}[case]
    assert status == (413 if case == "body over 4 MB" else 400) and expected in answer.get("error", ""), (status, answer)
    status, ok = post(port, infer_json([TEXTS[0]]))
    assert status == 200 and outputs(ok)[0][0]


@pytest.mark.parametrize("path", ["versions/01/infer", "./infer", "versions/1/./infer", "x/../infer", "infer/"])
def test_every_spelling_of_the_infer_path_is_checked(server, path):
    """Triton resolves dot segments and reads the version as a number: measured before, these paths
    reached Triton's infer past the gateway's checks (malformed JSON: Triton's 500)."""
    url = f"http://127.0.0.1:{server['ports']['http']}/v2/models/{MODEL}/{path}"

    def send(body):
        req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    status, answer = send(b'{"inputs": [')
    assert status == 400 and "malformed JSON" in answer.get("error", ""), (status, answer)
    status, answer = send(infer_json([TEXTS[0]]))
    assert status == 200 and outputs(answer)[0][0], (status, answer)


def test_empty_text_in_a_batch_does_not_fail_the_others(server):
    """Behind the HTTP front (gRPC goes straight to Triton) a bad row is answered in its row."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server['ports']['grpc']}")
    inp = grpcclient.InferInput("text", [2, 1], "BYTES")
    inp.set_data_from_numpy(np.array([[TEXTS[0].encode()], [b""]], dtype=object))
    res = client.infer(MODEL, [inp])
    labels, scores = res.as_numpy("label")[:, 0], res.as_numpy("score")[:, 0]
    assert labels[1] == b"error: empty text" and np.isnan(scores[1])
    assert not labels[0].startswith(b"error") and 0 < scores[0] <= 1
    client.close()


def test_a_request_of_bad_texts_only_is_answered_row_by_row_without_a_traceback(server):
    """gRPC (straight to Triton): measured before, a request whose rows were all bad (when no other
    client's request shared its merged batch) got StatusCode.INTERNAL with PyTriton's Python traceback
    (server file paths included) as its message; merged with a good request, the same rows got their
    row errors. Now the answer of a row depends on that row only."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server['ports']['grpc']}")
    try:
        inp = grpcclient.InferInput("text", [2, 1], "BYTES")
        inp.set_data_from_numpy(np.array([[b"\xff\xfe"], [b" "]], dtype=object))
        res = client.infer(MODEL, [inp], client_timeout=30)
        assert list(res.as_numpy("label")[:, 0]) == [b"error: text is not valid UTF-8", b"error: empty text"]
        assert np.isnan(res.as_numpy("score")[:, 0]).all()
    finally:
        client.close()


@pytest.fixture(scope="module")
def classifier(export_dir):
    from theseus_deploy.runtime import TextClassifier

    return TextClassifier.load(str(export_dir), backend="onnx-int8", max_length=64)


@pytest.fixture(scope="module")
def library_server(export_dir):
    """`serve` used as a library: a Server in this process, without the HTTP gateway (clients reach
    Triton's own HTTP frontend), beside a child process of the caller's own started before it."""
    from theseus_deploy.config import ServeConfig
    from theseus_deploy.serve.server import Server

    own = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    saved = os.environ.get("LD_LIBRARY_PATH")  # Server.start puts this Python's LIBDIR first
    ports = {"http": free_port(), "grpc": free_port(), "metrics": free_port()}
    cfg = ServeConfig(model=str(export_dir), http_port=ports["http"], grpc_port=ports["grpc"], metrics_port=ports["metrics"],
                      http_gateway=False, max_batch_size=8, max_queue_delay_ms=20, max_length=64, exit_timeout_secs=2)
    server = Server(cfg)
    try:
        server.start()
        yield {"server": server, "ports": ports, "own": own}
    finally:
        server.stop()
        own.kill()
        own.wait(10)
        if saved is None:
            os.environ.pop("LD_LIBRARY_PATH", None)
        else:
            os.environ["LD_LIBRARY_PATH"] = saved


@pytest.fixture(params=["gateway", "no gateway"])
def ports(request):
    """The ports of `serve` with its HTTP gateway (a real CLI process) and without it (the library server)."""
    return request.getfixturevalue({"gateway": "server", "no gateway": "library_server"}[request.param])["ports"]


def as_text(x):
    return x.decode() if isinstance(x, bytes) else x


@pytest.mark.parametrize("binary_in", [True, False], ids=["binary in", "JSON in"])
@pytest.mark.parametrize("binary_out", [None, True, False], ids=["default out", "binary out", "JSON out"])
def test_tritonclient_http_classifies_unchanged(ports, classifier, binary_in, binary_out):
    """Triton's own HTTP client, as users call it (set_data_from_numpy: binary_data=True by default,
    outputs binary by default), with and without compression, with and without the gateway."""
    import tritonclient.http as httpclient

    texts = TEXTS[:3]
    # the server runs a merged batch sorted by length (one micro-batch here): the reference is that batch
    ref = dict(zip(sorted(texts, key=len), classifier(sorted(texts, key=len))))
    client = httpclient.InferenceServerClient(f"127.0.0.1:{ports['http']}", network_timeout=30)
    try:
        assert client.is_server_ready() and client.is_model_ready(MODEL)
        inp = httpclient.InferInput("text", [len(texts), 1], "BYTES")
        inp.set_data_from_numpy(np.array([[t.encode()] for t in texts], dtype=object), binary_data=binary_in)
        outs = None if binary_out is None else [httpclient.InferRequestedOutput(n, binary_data=binary_out)
                                                for n in ("label", "score")]
        for compression in (None, "gzip"):
            res = client.infer(MODEL, [inp], outputs=outs, request_compression_algorithm=compression,
                               response_compression_algorithm=compression)
            params = {o["name"]: o.get("parameters") or {} for o in res.get_response()["outputs"]}
            assert ("binary_data_size" in params["label"]) == (binary_out is not False), params
            labels, scores = res.as_numpy("label")[:, 0], res.as_numpy("score")[:, 0]
            for t, label, score in zip(texts, labels, scores):
                assert as_text(label) == ref[t]["label"]
                assert abs(float(score) - ref[t]["score"]) < 1e-4
    finally:
        client.close()


def test_tritonclient_grpc_classifies_unchanged(ports, classifier):
    import tritonclient.grpc as grpcclient

    texts = TEXTS[:3]
    ref = dict(zip(sorted(texts, key=len), classifier(sorted(texts, key=len))))
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{ports['grpc']}")
    try:
        inp = grpcclient.InferInput("text", [len(texts), 1], "BYTES")
        inp.set_data_from_numpy(np.array([[t.encode()] for t in texts], dtype=object))
        res = client.infer(MODEL, [inp], client_timeout=30)
        for t, label, score in zip(texts, res.as_numpy("label")[:, 0], res.as_numpy("score")[:, 0]):
            assert label.decode() == ref[t]["label"] and abs(float(score) - ref[t]["score"]) < 1e-4
    finally:
        client.close()


def test_tritonclient_bad_text_is_a_400_through_the_gateway(server):
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    client = httpclient.InferenceServerClient(f"127.0.0.1:{server['ports']['http']}", network_timeout=30)
    try:
        inp = httpclient.InferInput("text", [2, 1], "BYTES")
        inp.set_data_from_numpy(np.array([[TEXTS[0].encode()], [b" "]], dtype=object))
        with pytest.raises(InferenceServerException) as e:
            client.infer(MODEL, [inp])
        assert e.value.status() == "400" and "text 1 is empty" in e.value.message()
    finally:
        client.close()


def test_library_stop_stops_only_its_own_processes(library_server):
    """Server.stop ends Triton and what it started; the caller's own children (one started before the
    server, one after) live on. Before: every child of the calling process was waited for and killed."""
    server, own = library_server["server"], library_server["own"]
    later = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        mine = {own.pid, later.pid}
        tritons = [c for c in psutil.Process().children(recursive=True)
                   if c.pid not in mine and c.cmdline()[:1] and c.cmdline()[0].startswith(str(server.workdir))]
        assert tritons, "no tritonserver of this server found"
        theirs = tritons + [d for t in tritons for d in t.children(recursive=True)]
        server.stop()
        assert own.poll() is None and later.poll() is None, "Server.stop ended a process of its caller"
        left = [p.pid for p in theirs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert not left, f"processes of the server left: {left}"
    finally:
        later.kill()
        later.wait(10)


def processes_left(pids, grace_s: float) -> list:
    """(pid, command) of the processes of `pids` still running (not zombies) after up to `grace_s` seconds."""
    def alive():
        return [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]

    deadline = time.time() + grace_s
    while time.time() < deadline and alive():
        time.sleep(0.2)
    return [(p, psutil.Process(p).cmdline()[:3]) for p in alive()]


def test_sigterm_stops_everything(server):
    proc = server["proc"]
    assert len(server["pids"]) >= 2  # the CLI and the tritonserver it started
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    left = processes_left(server["pids"], 5)
    assert not left, f"processes left after SIGTERM: {left}"


def test_triton_dying_while_serving_ends_serve_with_an_error_and_its_processes(export_dir, tmp_path):
    """Triton gone while serving (as after the crashes the gateway now refuses; here SIGKILL). Measured
    before: `serve` exited 0 without a word, and the Python-backend stub with its two helper
    processes lived on, re-parented (they were only looked for under a running tritonserver); and
    Triton's temporary copy of the model (`/tmp/folderXXXXXX`, the stub's model.py) stayed behind."""
    info = start_server(export_dir, tmp_path / "server.log")
    try:
        proc = info["proc"]
        tritons = [c for c in psutil.Process(proc.pid).children() if "tritonserver" in " ".join(c.cmdline()[:1])]
        assert tritons, "no tritonserver child found"
        stubs = [c.cmdline() for c in tritons[0].children(recursive=True)
                 if c.cmdline()[:1] and c.cmdline()[0].endswith("triton_python_backend_stub")]
        folders = [Path(cmd[1]).parent.parent for cmd in stubs]
        assert folders and all((f / "config.pbtxt").is_file() for f in folders), stubs
        tritons[0].kill()
        assert proc.wait(60) == 1
        last = info["log"].read_text().strip().splitlines()[-1]
        assert last.startswith("error: Triton exited while serving"), last
        left = processes_left(info["pids"], 10)
        assert not left, f"processes left after Triton died: {left}"
        assert not [f for f in folders if f.exists()], "Triton's temporary copy of the model was left behind"
    finally:
        stop_server(info)


def test_overloaded_queue_is_rejected_at_once(export_dir, tmp_path):
    """A full queue answers 503 "Exceeds maximum queue size" immediately instead of holding the client."""
    from theseus_deploy.serve.loadtest import run_level

    info = start_server(export_dir, tmp_path / "server.log", "--max-batch-size", "1", "--max-queue-size", "1")
    try:
        texts = ["a gripping film", "dull and far too long"]
        r = run_level("127.0.0.1", info["ports"]["http"], MODEL, texts, 32, 400, 60, 30)
        assert r["ok"] > 0 and r["errors"] > 0, r
        assert set(r["statuses"]) <= {"200", "503"}
        assert all("Exceeds maximum queue size" in e for e in r["error_samples"])
        status, body = post(info["ports"]["http"], infer_json(texts[:1]))
        assert status == 200
    finally:
        stop_server(info)
