"""ONNX Runtime: the runner, session options, CPU topology, execution providers, the TensorRT EP cache."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from theseus_deploy.artifact import ExportFolder, is_export_folder
from theseus_deploy.errors import UsageError
from theseus_deploy.registry import BACKENDS

from .base import Runner, check_device


def open_session(path, opts, providers, backend: str):
    """An InferenceSession over `path`; a file that is not an ONNX graph (or one ONNX Runtime cannot
    load) is a UsageError naming the file, not a protobuf traceback."""
    import onnxruntime as ort

    try:
        return ort.InferenceSession(str(path), opts, providers=providers)
    except UsageError:
        raise
    except Exception as e:  # InvalidProtobuf, InvalidGraph, Fail, NotImplemented ... (pybind11 types)
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise UsageError(f"{path}: not a loadable ONNX graph for backend {backend} ({type(e).__name__}: {first})") from None


class OrtRunner(Runner):
    """ONNX Runtime: CPU EP, or CUDA / TensorRT EPs when onnxruntime-gpu is installed."""

    def __init__(self, path: Path, backend: str, device: str = "cpu", threads: int | None = None,
                 vocab_size: int = 30522, folder: Path | None = None, session_config: str = "default"):
        spec = BACKENDS.get(backend)  # None: a format validated on the CPU session (onnx-fp16-trt)
        options = spec.options if spec is not None else {}
        opts = self.session_options(session_config, threads, options)
        need = None
        if device == "cuda":
            need = check_ort_provider(backend)
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
            if need == "TensorrtExecutionProvider":  # the plain fp16 graph: TensorRT takes all of it
                providers.insert(0, (need, _trt_ep_options(Path(path), folder)))
        else:
            check_device(backend, device)
            providers = ["CPUExecutionProvider"]
        self.session = open_session(path, opts, providers, backend)
        if device == "cuda" and need not in self.session.get_providers():
            # listed as available but its libraries (cuDNN, TensorRT) did not load: ORT fell back quietly
            raise UsageError(f"backend {backend}: {need} could not be loaded (session runs on "
                             f"{', '.join(self.session.get_providers())}); check the CUDA/cuDNN/TensorRT libraries")
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.backend, self.device, self.name = backend, device, f"{backend}@{device}"
        self.vocab_size = vocab_size
        self.path = Path(path)

    @staticmethod
    def session_options(config: str, threads: int | None, options: dict):
        """The session options of this runner (a backend entry may set `graph_optimization` or
        `execution_mode` in its options; see `ort_session_options`)."""
        return ort_session_options(config, threads, graph_optimization=options.get("graph_optimization", "all"),
                                   execution_mode=options.get("execution_mode"))

    @classmethod
    def precheck(cls, spec, device: str) -> None:
        """Device, and on CUDA the execution provider, before anything is exported or loaded."""
        check_device(spec.name, device)
        if device == "cuda":
            check_ort_provider(spec.name)

    @classmethod
    def open(cls, spec, path, device: str = "cpu", threads: int | None = None, vocab_size: int = 30522,
             folder=None, session_config: str = "default", **options) -> "OrtRunner":
        """The runner over an artifact file (what `load_runner` calls for an ONNX backend)."""
        return cls(path, spec.name, device, threads, vocab_size, folder=folder, session_config=session_config)

    def encode(self, encoded: dict):
        feeds = {n: np.ascontiguousarray(np.asarray(encoded[n], dtype=np.int64)) for n in self.input_names}
        if self.device == "cuda":  # device-resident inputs, like torch's: no host copies in the timed call
            import onnxruntime as ort

            return {n: ort.OrtValue.ortvalue_from_numpy(a, "cuda", 0) for n, a in feeds.items()}
        return feeds

    def __call__(self, feeds):
        if self.device == "cuda":
            binding = self.session.io_binding()
            for n, v in feeds.items():
                binding.bind_ortvalue_input(n, v)
            binding.bind_output("logits", "cuda")  # output stays on the GPU
            self.session.run_with_iobinding(binding)
            return binding.get_outputs()[0]
        return self.session.run(["logits"], feeds)[0]

    def logits(self, feeds) -> np.ndarray:
        out = self(feeds)
        return np.asarray(out.numpy() if self.device == "cuda" else out, dtype=np.float32)


ORT_SESSION_CONFIGS = ("default", "latency")


def physical_cores() -> int:
    """Physical cores this process may use (hyper-threads counted once)."""
    try:
        import psutil

        n = psutil.cpu_count(logical=False)
    except ImportError:
        n = None
    avail = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(n or avail, avail))


GRAPH_OPTIMIZATION = {"none": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
                      "all": "ORT_ENABLE_ALL"}
EXECUTION_MODES = {"sequential": "ORT_SEQUENTIAL", "parallel": "ORT_PARALLEL"}


def ort_session_options(config: str = "default", threads: int | None = None, graph_optimization: str = "all",
                        execution_mode: str | None = None):
    """ONNX Runtime session options.

    default: full graph optimisation; `threads` (if given) intra-op threads and one inter-op thread.
    `graph_optimization` (none, basic, extended, all) and `execution_mode` (sequential, parallel)
    come from a backend entry's options (theseus_deploy/registry.py).
    latency: what a batch-1 caller wants: intra-op threads = physical cores (or `threads`),
    inter-op 1, sequential execution, spinning worker threads kept on
    (`session.intra_op.allow_spinning`), `session.dynamic_block_base` 4 (smaller, self-balancing
    work blocks for the small GEMMs of batch 1), denormals flushed to zero. Measured in
    docs/bench.md ("CPU batch 1"); ONNX Runtime's own defaults already give most of these, so it
    is measured, not assumed, whether it buys anything.
    """
    import onnxruntime as ort

    if config not in ORT_SESSION_CONFIGS:
        raise UsageError(f"unknown ONNX Runtime session config '{config}' ({', '.join(ORT_SESSION_CONFIGS)})")
    if graph_optimization not in GRAPH_OPTIMIZATION:
        raise UsageError(f"unknown graph optimisation '{graph_optimization}' ({', '.join(GRAPH_OPTIMIZATION)})")
    if execution_mode is not None and execution_mode not in EXECUTION_MODES:
        raise UsageError(f"unknown execution mode '{execution_mode}' ({', '.join(EXECUTION_MODES)})")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, GRAPH_OPTIMIZATION[graph_optimization])
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    if config == "latency":
        opts.intra_op_num_threads = threads or physical_cores()
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1")
        opts.add_session_config_entry("session.dynamic_block_base", "4")
        opts.add_session_config_entry("session.set_denormal_as_zero", "1")
    if execution_mode is not None:
        opts.execution_mode = getattr(ort.ExecutionMode, EXECUTION_MODES[execution_mode])
    return opts


def check_ort_provider(backend: str) -> str:
    """The execution provider an ONNX backend needs on CUDA; UsageError if ONNX Runtime lacks it."""
    import onnxruntime as ort

    spec = BACKENDS.get(backend)
    need = (spec.options if spec is not None else {}).get("provider", "CUDAExecutionProvider")
    have = ort.get_available_providers()
    if need not in have:
        raise UsageError(f"backend {backend} on --device cuda needs ONNX Runtime's {need} "
                         f"(pip install -e .[{'trt' if need == 'TensorrtExecutionProvider' else 'gpu'}], and uninstall the "
                         f"CPU-only onnxruntime package); available providers: {', '.join(have)}")
    return need


def _trt_ep_options(path: Path, folder: Path | None = None) -> dict:
    """TensorRT EP: engines cached beside the graph, and the export's profile, so that new
    shapes inside it do not trigger an engine rebuild inside a timed loop. The cache folder must
    resolve inside the export folder (a `trt-ep-cache` symlink pointing elsewhere is refused)."""
    base = (Path(folder) if folder is not None else Path(path).parent).resolve()
    cache = Path(path).resolve().parent / "trt-ep-cache"
    if not cache.resolve().is_relative_to(base):  # e.g. a trt-ep-cache symlink to elsewhere
        raise UsageError(f"TensorRT EP cache {cache} resolves outside the export folder {base}")
    opts = {"trt_fp16_enable": True, "trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache)}
    if is_export_folder(base):
        m = ExportFolder.read(base).manifest
        prof, names = m.get("profile"), m.get("input_names")
        if prof and names:
            for key in ("min", "opt", "max"):
                b, s = prof[key]
                opts[f"trt_profile_{key}_shapes"] = ",".join(f"{n}:{b}x{s}" for n in names)
    return opts


