"""`theseus-deploy serve`: one text classifier behind PyTriton's bundled Triton server.

Clients speak KServe v2 (HTTP and gRPC): input `text` (BYTES, one string per request row),
outputs `label` (BYTES) and `score` (FP32), exactly what `TextClassifier` returns. Triton's C++
dynamic batcher merges concurrent requests; the merged batch is tokenized once (padding to the
longest text of the batch, truncation at --max-length) and run by the runner of `--backend`.

Measured facts this module is built on (nvidia-pytriton 0.7.0, Triton 2.51.0, Python 3.11):
- HTTP, gRPC and metrics bind to every interface (Triton's default) unless told otherwise: all three get --host.
- Without a workspace PyTriton writes under ~/.cache: each server gets its own temporary one.
- On a Python built outside the system (pyenv) the Python-backend stub loads the system
  libpython unless that Python's LIBDIR leads LD_LIBRARY_PATH, and the model fails to start
  (`'_thread.RLock' object has no attribute '_recursion_count'`).
- Without --exit-timeout-secs a stop waited 30 s for in-flight requests.
- The Python-backend stub in nvidia-pytriton 0.7.0 is compiled against numpy 1.x (its wheel pins
  numpy<2): under numpy 2.4 a BYTES input reached the stub as an array with stride 0 and the stub
  aborted (`unpack_from requires a buffer of at least 218959121 bytes`). The stub ignores
  PYTHONPATH (an isolated embedded interpreter; measured), so it gets its own Python environment
  with nvidia-pytriton and numpy<2 (`make install` builds <venv>/triton-stub-env); PyTriton
  puts the environment's bin/ first on the server's PATH. This process keeps the project's numpy.
- PyTriton reports an error raised by the infer function for every request of the merged batch,
  with its Python traceback (server file paths) as the message (gRPC: StatusCode.INTERNAL), and
  Triton's HTTP frontend answers malformed JSON and non-string texts with 500: the HTTP gateway
  (gateway.py, on by default) refuses bad requests with 400 before Triton sees them; behind it
  (and for gRPC clients) a bad text is answered in its own row (see `classify_batch`), also when
  every row of the merged batch is bad: the infer function never raises for a text.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import socket
import sys
import sysconfig
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import click
import numpy as np

from theseus_deploy.config import ExportConfig
from theseus_deploy.deps import require
from theseus_deploy.errors import UsageError
from theseus_deploy.export.api import export_model
from theseus_deploy.hf import check_fine_tuned, load_config
from theseus_deploy.registry import BACKENDS, export_format
from theseus_deploy.runtime import TextClassifier

from .gateway import Gateway

MODEL_NAME = "text_classifier"
LOG = logging.getLogger("theseus_deploy.serve")
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _free_port(host: str, avoid=()) -> int:
    """A port free on `host` now (IPv6 hosts too), none of `avoid` (the ports the flags name, not bound yet)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    while True:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port not in avoid:
            return port


def check_ports(host: str, ports: dict[str, int]) -> None:
    """Each port distinct and free on `host`, before anything starts. Measured without this check: a
    --grpc-port in use made Triton exit at start while PyTriton waited for it (120 s), a busy
    --http-port gave the gateway's OSError traceback after Triton had started."""
    seen = {}
    for flag, port in ports.items():
        if port in seen:
            raise UsageError(f"{seen[port]} and {flag} are both {port}: give each its own port")
        seen[port] = flag
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for flag, port in ports.items():
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Triton and aiohttp bind theirs
            try:
                s.bind((host, port))
            except OSError as e:
                raise UsageError(f"{flag} {port}: cannot listen on {host}:{port} ({e.strerror or e})") from None


def python_libdir_env() -> None:
    """Put this Python's LIBDIR first on LD_LIBRARY_PATH (the Triton Python-backend stub links libpython)."""
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir and Path(libdir).is_dir():
        parts = [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(":") if p and p != libdir]
        os.environ["LD_LIBRARY_PATH"] = ":".join([libdir] + parts)


def stub_env() -> Path | None:
    """The Python environment for the Triton Python-backend stub (None: this one will do, numpy 1.x)."""
    if int(np.__version__.split(".")[0]) < 2:
        return None
    env = Path(os.environ.get("THESEUS_TRITON_STUB_ENV", Path(sys.prefix) / "triton-stub-env"))
    if not (env / "bin" / "python").exists():
        raise UsageError(f"the Triton Python-backend stub needs a Python environment with numpy<2 (this one has numpy "
                         f"{np.__version__}): run `make install`, or `{sys.executable} -m venv {env} && {env}/bin/pip install "
                         f"nvidia-pytriton==0.7.0`, or set THESEUS_TRITON_STUB_ENV to such an environment")
    return env


def resolve_model(model: str, backend: str, workdir: Path, max_batch_size: int, max_length: int) -> str:
    """The folder a runner for `backend` loads: an export folder as is; a model folder as is for
    PyTorch backends, else exported on the fly (validated) into `workdir`."""
    if backend not in BACKENDS:
        raise UsageError(f"unknown backend '{backend}': choose from {', '.join(BACKENDS)}")
    path = Path(model)
    if not path.is_dir():
        raise UsageError(f"model folder not found: {model}")
    if (path / "manifest.json").is_file():
        return str(path)
    if not (path / "config.json").is_file():
        raise UsageError(f"{model} is neither a model folder (config.json) nor an export folder (manifest.json)")
    # A bare encoder would answer with a new random head's labels.
    check_fine_tuned(model, load_config(model), "model", "serve answers with a classifier's labels: fine-tune it on "
                     "the task first (theseus-deploy finetune)")
    if BACKENDS[backend].format is None:
        return str(path)

    out = workdir / "export"
    LOG.info("exporting %s to %s on the fly", model, export_format(backend))
    export_model(ExportConfig.of(model=str(path), formats=(export_format(backend),), output=str(out),
                                 max_batch_size=max_batch_size, max_seq_length=max_length))
    return str(out)


def classify_batch(classifier, texts: np.ndarray, micro_batch: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels and scores for a merged batch of texts (shape [n, 1] BYTES). A row that is not
    valid UTF-8 text or is empty gets label `error: ...` and score NaN, whatever the other rows
    (a batch of such rows only too). Valid rows are classified together."""
    rows = texts.reshape(len(texts), -1)[:, 0]
    decoded, bad = [], {}
    for i, raw in enumerate(rows):
        try:
            t = raw.decode("utf-8") if isinstance(raw, (bytes, np.bytes_)) else str(raw)
        except UnicodeDecodeError:
            bad[i] = "error: text is not valid UTF-8"
            continue
        if not t.strip():
            bad[i] = "error: empty text"
            continue
        decoded.append((i, t))
    labels = np.empty((len(rows), 1), dtype=object)
    scores = np.full((len(rows), 1), np.nan, dtype=np.float32)
    if decoded:
        # Sorted by length and run in micro-batches: a merged batch padded to its longest text wastes
        # compute on a CPU (see ServeConfig.micro_batch); each micro-batch is padded to its own longest.
        decoded.sort(key=lambda x: len(x[1]))
        step = micro_batch or len(decoded)
        for start in range(0, len(decoded), step):
            chunk = decoded[start:start + step]
            for (i, _), r in zip(chunk, classifier([t for _, t in chunk])):
                labels[i, 0], scores[i, 0] = r["label"].encode(), r["score"]
    for i, msg in bad.items():
        labels[i, 0] = msg.encode()
    return labels, scores


def make_infer_func(classifier, micro_batch: int = 0):
    """The function Triton calls with the requests of one merged batch (a list of requests)."""
    # Every forward from one thread: PyTriton calls `infer` from changing threads, and each new
    # calling thread can give PyTorch's OpenMP a new thread team. Measured on 2 shared cores: the
    # naive (torch) server swung between ~3 and ~70 requests/s before and after this change alike
    # (docs/serve.md: cause not found); the ONNX servers were not slower with it.
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward")

    def infer(requests):
        sizes = [len(r["text"]) for r in requests]
        texts = np.concatenate([r["text"] for r in requests], axis=0)
        t0 = time.perf_counter()
        labels, scores = worker.submit(classify_batch, classifier, texts, micro_batch).result()
        LOG.debug("batch of %d requests, %d texts in %.1f ms", len(requests), len(texts), 1000 * (time.perf_counter() - t0))
        # Nothing valid in the merged batch is answered row by row too. Measured before, when it raised
        # (PyTritonBadParameterError): gRPC StatusCode.INTERNAL with PyTriton's traceback as the message,
        # and whether a bad request got that or its row errors depended on the requests merged with it.
        out, start = [], 0
        for n in sizes:
            out.append({"label": labels[start:start + n], "score": scores[start:start + n]})
            start += n
        return out

    return infer


class Server:
    """A started Triton server with the classifier bound; `stop()` ends it and its processes."""

    def __init__(self, cfg):
        """`cfg`: a theseus_deploy.config.ServeConfig."""
        if cfg.host not in LOOPBACK and not cfg.allow_remote:
            raise UsageError(f"--host {cfg.host}: this server listens on loopback only (127.0.0.1) unless --allow-remote")
        if ":" in cfg.host:
            # measured: PyTriton 0.7.0 writes http://::1:PORT and fails on its own URL (PyTritonClientInvalidUrlError)
            raise UsageError(f"--host {cfg.host}: PyTriton cannot serve on an IPv6 address; use 127.0.0.1 "
                             f"(or an IPv4 address with --allow-remote)")
        self.cfg = cfg
        self.workdir = Path(tempfile.mkdtemp(prefix="theseus-serve-"))
        self.triton = None
        self.gateway = None
        self.started_processes = []  # psutil.Process of the children Triton.run() started (see stop)
        self.tree = []  # their descendants as last seen (see wait)
        self.stub_folders = set()  # Triton's temporary copies of the model, one per stub (see _see_tree)
        self.log_mark = 0  # length of Triton's log when ready

    def start(self) -> "Server":
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self):
        cfg = self.cfg
        require("serve", "pytriton.triton", "pytriton.model_config", "psutil", *(["aiohttp"] if cfg.http_gateway else []))
        check_ports(cfg.host, {"--http-port": cfg.http_port, "--grpc-port": cfg.grpc_port,
                               "--metrics-port": cfg.metrics_port})
        t0 = time.perf_counter()
        folder = resolve_model(cfg.model, cfg.backend, self.workdir, cfg.max_batch_size, cfg.max_length)
        threads = cfg.threads or max(1, (os.cpu_count() or 1) // cfg.instances)
        classifiers = [TextClassifier.load(folder, backend=cfg.backend, device=cfg.device, max_length=cfg.max_length,
                                           threads=threads) for _ in range(cfg.instances)]
        self.labels = sorted(set(classifiers[0].id2label.values()))
        self.load_seconds = time.perf_counter() - t0
        python_libdir_env()
        env = stub_env()
        if env is not None:
            import pytriton.server.triton_server as ts

            ts.get_triton_python_backend_python_env = lambda: env
        from pytriton.model_config import DynamicBatcher, ModelConfig, QueuePolicy, Tensor, TimeoutAction
        from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig

        # With the gateway (theseus_deploy/serve/gateway.py) Triton's HTTP listens on a free internal port on
        # 127.0.0.1, whatever --host: measured before with --allow-remote and the wildcard --host, it listened
        # on the wildcard address too, where clients could reach Triton past the gateway's checks.
        self.triton_http_host = "127.0.0.1" if cfg.http_gateway else cfg.host
        triton_http = (_free_port(self.triton_http_host, avoid={cfg.http_port, cfg.grpc_port, cfg.metrics_port})
                       if cfg.http_gateway else cfg.http_port)
        config = TritonConfig(http_address=self.triton_http_host, http_port=triton_http, grpc_address=cfg.host,
                              grpc_port=cfg.grpc_port, metrics_address=cfg.host, metrics_port=cfg.metrics_port,
                              exit_timeout_secs=cfg.exit_timeout_secs, log_verbose=0)
        preferred = sorted({b for b in (cfg.max_batch_size // 4, cfg.max_batch_size // 2, cfg.max_batch_size) if b >= 1})
        queue = QueuePolicy(timeout_action=TimeoutAction.REJECT, max_queue_size=cfg.max_queue_size,
                            default_timeout_microseconds=int(cfg.queue_timeout_ms * 1000), allow_timeout_override=True)
        batching = cfg.max_batch_size > 1 and cfg.max_queue_delay_ms >= 0
        model_config = ModelConfig(
            max_batch_size=cfg.max_batch_size, batching=True,
            batcher=DynamicBatcher(max_queue_delay_microseconds=int(cfg.max_queue_delay_ms * 1000),
                                   preferred_batch_size=preferred if batching else None,
                                   default_queue_policy=queue))
        # PyTriton protects statistics with a random token by default; the batch statistics (read-only
        # counts) stay open, the endpoints that change the server (repository, shared memory, trace, logging) do not.
        security = TritonSecurityConfig(restricted_endpoints=["shared-memory", "model-repository", "trace", "logging"])
        self.triton = Triton(config=config, workspace=self.workdir / "workspace", security_config=security)
        self._fail_fast_start(triton_http)
        self.triton.bind(model_name=MODEL_NAME, infer_func=[make_infer_func(c, cfg.micro_batch) for c in classifiers],
                         inputs=[Tensor(name="text", dtype=bytes, shape=(1,))],
                         outputs=[Tensor(name="label", dtype=bytes, shape=(1,)),
                                  Tensor(name="score", dtype=np.float32, shape=(1,))],
                         config=model_config, strict=True)
        before = _child_pids()
        try:
            self.triton.run()
        finally:
            import psutil

            for pid in _child_pids() - before:
                try:
                    proc = psutil.Process(pid)
                    if proc.cmdline()[:1] and proc.cmdline()[0].startswith(str(self.workdir)):  # our tritonserver
                        self.started_processes.append(proc)
                except psutil.Error:
                    pass
        self._see_tree()
        server = getattr(self.triton, "_triton_server", None)
        self.log_mark = len(server.logs() or "") if server is not None else 0
        if cfg.http_gateway:
            self.gateway = Gateway(cfg.host, cfg.http_port, triton_http, MODEL_NAME, "text", cfg.max_batch_size,
                                   upstream_host=self.triton_http_host)
            self.gateway.start()
        self.ready_seconds = time.perf_counter() - t0

    def _fail_fast_start(self, http_port: int) -> None:
        """PyTriton waits up to 120 s for the server to be ready even when it has already exited
        (measured: a --grpc-port taken by another process after check_ports, as when two `serve` on
        the same ports start at once: Triton exited in 1 s, the start hung 120 s). Readiness is
        polled here first, and the wait ends the moment the server process is gone, with its reason."""
        triton, original = self.triton, self.triton._wait_for_server
        host = self.triton_http_host
        url = f"http://{host}:{http_port}/v2/health/ready"

        def wait():
            server = getattr(triton, "_triton_server", None)  # PyTriton's TritonServer: is_alive(), logs()
            deadline = time.monotonic() + 120
            while server is not None and time.monotonic() < deadline:
                if not server.is_alive():
                    raise UsageError(f"Triton exited while starting: {_triton_error(server.logs())}")
                try:
                    with urllib.request.urlopen(url, timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                time.sleep(0.2)
            original()

        triton._wait_for_server = wait

    @property
    def url(self) -> str:
        return f"http://{self.cfg.host}:{self.cfg.http_port}"

    def _see_tree(self) -> None:
        """Remember the descendants of the tritonserver this server started (Python-backend stubs and
        their helpers): when tritonserver dies they are re-parented and no longer found under it."""
        import psutil

        seen = {p.pid: p for p in self.tree}
        for proc in self.started_processes:
            try:
                for child in proc.children(recursive=True):
                    seen.setdefault(child.pid, child)
                    self.stub_folders |= _stub_folder(child)
            except psutil.Error:
                pass
        self.tree = list(seen.values())

    def wait(self):
        """Serve until SIGINT/SIGTERM or until the server dies, then stop. Triton gone by itself is an
        error (TritonExited): measured before, a request that killed tritonserver made `serve` exit 0
        without a word, leaving the Python-backend stub and its helpers running."""
        def _interrupt(signum, frame):
            raise KeyboardInterrupt

        previous = signal.signal(signal.SIGTERM, _interrupt)
        died, reason, ticks = False, "", 0
        try:
            while self.triton.is_alive():
                time.sleep(0.5)
                ticks += 1
                if ticks % 10 == 0:
                    self._see_tree()
            died = True
            server = getattr(self.triton, "_triton_server", None)
            reason = _triton_error((server.logs() or "")[self.log_mark:], crash=True) if server is not None else ""
        except KeyboardInterrupt:
            LOG.info("signal received, stopping")
        finally:
            signal.signal(signal.SIGTERM, previous)
            self.stop()
        if died:
            raise TritonExited(f"Triton exited while serving ({reason or 'no reason in its log'}); every process of "
                               f"this server was stopped")

    def stop(self):
        """Stop Triton, then wait for every process it started and kill those still alive after
        --exit-timeout-secs + 10 s: nothing is left behind, and nothing else is touched.

        "Started by this server" = the children of this process that appeared while `Triton.run()`
        ran and run the tritonserver binary PyTriton copied into this server's workspace (PyTriton
        starts no other process here, measured), with all their descendants taken just before the
        stop (the Python-backend stubs and their multiprocessing helpers, which are re-parented when
        the server exits and outlived the stub by seconds when measured). A caller's own child
        processes, started before, during or after, and another Server's, are left alone (serve is also
        a library); PyTriton gives no handle on its process tree, hence the workspace path."""
        if self.gateway is not None:
            self.gateway.stop()
            self.gateway = None
        if self.triton is not None:
            import psutil

            procs = []
            for proc in self.started_processes:
                try:
                    if proc.is_running():  # also false if the pid was reused by another process
                        procs += [proc, *proc.children(recursive=True)]
                except psutil.Error:
                    pass
            known = {p.pid for p in procs}
            procs += [p for p in self.tree if p.pid not in known and p.is_running()]  # is_running: same process, not a reused pid
            try:
                self.triton.stop()
            finally:
                self.triton = None
                self.started_processes = []
                self.tree = []
                _, alive = psutil.wait_procs(procs, timeout=self.cfg.exit_timeout_secs + 10)
                for proc in alive:
                    LOG.warning("killing leftover process %d (%s)", proc.pid, proc.name())
                    try:
                        proc.kill()
                    except psutil.Error:
                        pass
                psutil.wait_procs(alive, timeout=5)
                # After a failed start PyTriton's exit callback stops (and cleans its workspace) in its own
                # thread: removing the folder under it made it warn (CleanupWarning). Wait for it, 5 s at most.
                deadline = time.monotonic() + 5
                while (self.workdir / "workspace").exists() and time.monotonic() < deadline:
                    time.sleep(0.1)
                for folder in self.stub_folders:  # Triton removes them when it unloads the model; a crashed one did not
                    shutil.rmtree(folder, ignore_errors=True)
                self.stub_folders = set()
        shutil.rmtree(self.workdir, ignore_errors=True)


def _stub_folder(proc) -> set:
    """{the temporary copy of the model a Python-backend stub runs}, else {}. Triton writes the
    PyTriton model it is given (config.pbtxt and 1/model.py) to a `folderXXXXXX` in the temporary
    directory and starts the stub as `triton_python_backend_stub <folder>/1/model.py ...`; it
    removes the folder when it unloads the model, so a tritonserver that crashed left it behind
    (measured: one ~110 KB folder per crash). Read while the stub lives: a dead process has no
    command line."""
    cmd = proc.cmdline()
    if len(cmd) < 2 or Path(cmd[0]).name != "triton_python_backend_stub":
        return set()
    model = Path(cmd[1])
    folder = model.parent.parent
    if model.name == "model.py" and re.fullmatch(r"folder\w{6}", folder.name) and folder.parent == Path(tempfile.gettempdir()):
        return {folder}
    return set()


def _triton_error(logs: str, crash: bool = False) -> str:
    """The last error line of Triton's log (`E1201 09:57:20.933649 8074 main.cc:245] "failed to start GRPC
    service: ..."`) without its prefix, else its last line. `crash`: a `Signal (11) received.` line
    counts as an error line (what a crashed tritonserver printed, before its stack trace)."""
    lines = [line.strip() for line in (logs or "").splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"E\d{4} ", line) or (crash and re.match(r"Signal \(\d+\) received", line))]
    if crash and not errors:
        return ""
    line = (errors or lines or ["no log"])[-1]
    return line.split("] ", 1)[-1].strip().strip('"').strip()


def _child_pids() -> set[int]:
    """The pids of this process's direct children."""
    import psutil

    try:
        return {c.pid for c in psutil.Process().children()}
    except psutil.Error:
        return set()


def run_serve(cfg) -> None:
    logging.basicConfig(level=logging.INFO if cfg.verbose else logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    if not cfg.verbose:
        logging.getLogger("pytriton").setLevel(logging.WARNING)
        # "Triton Inference Server exited with failure. Please wait.": logged at every stop whose exit
        # timeout expired, and before the one `error:` line of a failed start (which says why)
        logging.getLogger("pytriton.server.triton_server").addFilter(
            lambda record: "exited with failure" not in record.getMessage())
    server = Server(cfg)
    with _signals_as_interrupt():
        server.start()
    click.echo(f"serving {cfg.model} ({cfg.backend}, max batch {cfg.max_batch_size}, queue delay {cfg.max_queue_delay_ms} ms, "
               f"{cfg.instances} instance(s)) as model '{MODEL_NAME}' [{', '.join(server.labels)}]; "
               f"ready in {server.ready_seconds:.1f} s", err=True)
    click.echo(f"  HTTP {server.url}/v2/models/{MODEL_NAME}/infer  gRPC {cfg.host}:{cfg.grpc_port}  "
               f"metrics http://{cfg.host}:{cfg.metrics_port}/metrics  (Ctrl+C or SIGTERM to stop)", err=True)
    server.wait()


class TritonExited(click.ClickException):
    """Triton ended while serving: one `error:` line and exit code 1 (a failure of the server, not
    the user's input, hence not 2)."""

    exit_code = 1

    def show(self, file=None):
        click.echo(f"error: {self.message}", err=True)


class _signals_as_interrupt:
    """While starting: SIGTERM behaves like Ctrl+C, so a stop during start-up still cleans up."""

    def __enter__(self):
        def _interrupt(signum, frame):
            raise KeyboardInterrupt

        self.previous = signal.signal(signal.SIGTERM, _interrupt)

    def __exit__(self, *exc):
        signal.signal(signal.SIGTERM, self.previous)
        return False
