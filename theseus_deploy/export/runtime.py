"""One runner per backend, shared by `export` validation, `bench` and users.

    runner = load_runner("runs/succ", "torch-bf16")            # a model folder
    runner = load_runner("exports/succ", "onnx-int8")           # a folder written by `export`
    clf = TextClassifier.load("exports/succ", backend="onnx-int8")
    clf(["a great movie", "a dull movie"])  -> [{"label": "positive", "score": 0.97}, ...]

A runner takes native feeds (`make_inputs` / `encode`), runs one forward with `__call__` (what a
timer times; results may stay on the device), and returns fp32 numpy logits with `logits`.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from theseus_deploy.errors import UsageError

from theseus_deploy.registry import BACKENDS, DEVICES, artifact_file, export_format


def _random_ids(batch_size: int, seq_len: int, vocab_size: int, names, seed: int = 0, padded: bool = False) -> dict:
    """Random token ids; `padded`: rows 1.. get random lengths, zero ids and mask beyond them
    (a right-padded batch, as a tokenizer makes it), so the mask handling is exercised too."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000 if vocab_size > 2000 else 5, vocab_size - 1, size=(batch_size, seq_len), dtype=np.int64)
    mask = np.ones_like(ids)
    if padded:
        for row in range(1, batch_size):
            length = int(rng.integers(max(1, seq_len // 3), seq_len + 1))
            ids[row, length:], mask[row, length:] = 0, 0
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    return {n: feeds[n] for n in names}


class Runner:
    name: str
    backend: str
    device: str
    input_names: list
    vocab_size: int

    def make_inputs(self, batch_size: int, seq_len: int, seed: int = 0):
        return self.encode(_random_ids(batch_size, seq_len, self.vocab_size, self.input_names, seed))

    def encode(self, encoded: dict):
        raise NotImplementedError

    def __call__(self, feeds) -> None:
        raise NotImplementedError

    def logits(self, feeds) -> np.ndarray:
        raise NotImplementedError

    def synchronize(self) -> None:
        pass


class TorchRunner(Runner):
    """PyTorch eager, fp32 / bf16 / fp16, CPU or CUDA."""

    DTYPES = {"torch": "float32", "torch-bf16": "bfloat16", "torch-fp16": "float16"}

    def __init__(self, model, backend: str = "torch", device: str = "cpu", threads: int | None = None):
        import torch

        from theseus_deploy.hf import model_input_names

        if threads:
            torch.set_num_threads(threads)
        if device == "cuda" and not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA GPU is visible to PyTorch on this machine")
        check_device(backend, device)
        self.torch = torch
        self.dtype = getattr(torch, self.DTYPES[backend])
        self.model = model.to(device=device, dtype=self.dtype).eval()
        self.backend, self.device, self.name = backend, device, f"{backend}@{device}"
        self.input_names = model_input_names(model)
        self.vocab_size = model.config.vocab_size

    def encode(self, encoded: dict):
        return {n: self.torch.as_tensor(np.asarray(encoded[n]), dtype=self.torch.long, device=self.device)
                for n in self.input_names}

    def __call__(self, feeds):
        with self.torch.inference_mode():
            return self.model(**feeds).logits

    def logits(self, feeds) -> np.ndarray:
        return self(feeds).float().cpu().numpy()

    def synchronize(self):
        if self.device == "cuda":
            self.torch.cuda.synchronize()


class OrtRunner(Runner):
    """ONNX Runtime: CPU EP, or CUDA / TensorRT EPs when onnxruntime-gpu is installed."""

    def __init__(self, path: Path, backend: str, device: str = "cpu", threads: int | None = None,
                 vocab_size: int = 30522, session_config: str = "default"):
        import onnxruntime as ort

        opts = ort_session_options(session_config, threads)
        if device == "cuda":
            need = check_ort_provider(backend)
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
            if backend == "onnx-trt-ep":  # the plain fp16 graph: TensorRT takes all of it
                providers.insert(0, ("TensorrtExecutionProvider", _trt_ep_options(Path(path))))
        else:
            check_device(backend, device)
            providers = ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(path), opts, providers=providers)
        if device == "cuda" and need not in self.session.get_providers():
            # listed as available but its libraries (cuDNN, TensorRT) did not load: ORT fell back quietly
            raise UsageError(f"backend {backend}: {need} could not be loaded (session runs on "
                             f"{', '.join(self.session.get_providers())}); check the CUDA/cuDNN/TensorRT libraries")
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.backend, self.device, self.name = backend, device, f"{backend}@{device}"
        self.vocab_size = vocab_size
        self.path = Path(path)

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
    import os

    try:
        import psutil

        n = psutil.cpu_count(logical=False)
    except ImportError:
        n = None
    avail = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(n or avail, avail))


def ort_session_options(config: str = "default", threads: int | None = None):
    """ONNX Runtime session options.

    default: full graph optimisation; `threads` (if given) intra-op threads and one inter-op thread.
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
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
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
    return opts


def check_ort_provider(backend: str) -> str:
    """The execution provider an ONNX backend needs on CUDA; UsageError if ONNX Runtime lacks it."""
    import onnxruntime as ort

    need = "TensorrtExecutionProvider" if backend == "onnx-trt-ep" else "CUDAExecutionProvider"
    have = ort.get_available_providers()
    if need not in have:
        raise UsageError(f"backend {backend} on --device cuda needs ONNX Runtime's {need} "
                         f"(pip install -e .[{'trt' if backend == 'onnx-trt-ep' else 'gpu'}], and uninstall the "
                         f"CPU-only onnxruntime package); available providers: {', '.join(have)}")
    return need


def _trt_ep_options(path: Path) -> dict:
    """TensorRT EP: engines cached beside the graph, and the export's profile, so that new
    shapes inside it do not trigger an engine rebuild inside a timed loop."""
    opts = {"trt_fp16_enable": True, "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(path.parent / "trt-ep-cache")}
    manifest = path.parent / "manifest.json"
    if manifest.is_file():
        m = json.loads(manifest.read_text())
        prof, names = m.get("profile"), m.get("input_names")
        if prof and names:
            for key in ("min", "opt", "max"):
                b, s = prof[key]
                opts[f"trt_profile_{key}_shapes"] = ",".join(f"{n}:{b}x{s}" for n in names)
    return opts


def _manifest_artifact(folder: Path, backend: str) -> Path | None:
    manifest = folder / "manifest.json"
    if manifest.is_file():
        for art in json.loads(manifest.read_text()).get("artifacts", []):
            if art["format"] == export_format(backend):
                return folder / art["file"]
    cand = folder / (artifact_file(backend) or "")
    return cand if cand.is_file() else None


def check_device(backend: str, device: str) -> None:
    """UsageError unless `backend` runs on `device` (from the registry)."""
    if device not in DEVICES:
        raise UsageError(f"unknown device '{device}' ({', '.join(DEVICES)})")
    spec = BACKENDS.get(backend)  # export validates formats (e.g. onnx-fp16-trt) on the CPU session too
    if spec is not None and device not in spec.devices:
        raise UsageError(f"backend {backend} ({BACKENDS[backend].help}) needs --device "
                         f"{' or '.join(BACKENDS[backend].devices)}")


def load_runner(model: str, backend: str, device: str = "cpu", threads: int | None = None,
                artifact: str | None = None, session_config: str = "default") -> Runner:
    """A runner for `backend` over a model folder (torch*) or an exported artifact (onnx*, trt).
    `session_config`: ONNX Runtime session options (`ort_session_options`: default or latency)."""
    if backend not in BACKENDS:
        raise UsageError(f"unknown backend '{backend}': choose from {', '.join(BACKENDS)}")
    check_device(backend, device)
    from theseus_deploy.hf import load_classifier, load_config

    if BACKENDS[backend].format is None:
        return TorchRunner(load_classifier(model), backend, device, threads)
    path = Path(artifact) if artifact else _manifest_artifact(Path(model), backend)
    if path is None or not path.is_file():
        raise UsageError(f"no {backend} artifact for {model}: run `theseus-deploy export --format {backend}` first"
                         + (f" ({artifact} does not exist)" if artifact else ""))
    if backend == "trt":
        from .trt import TrtRunner

        return TrtRunner(path, device=device)
    vocab = getattr(load_config(model), "vocab_size", 30522) if (Path(model) / "config.json").is_file() else 30522
    return OrtRunner(path, backend, device, threads, vocab, session_config)


class TextClassifier:
    """Tokenizer + runner: classify raw text with any backend."""

    def __init__(self, tokenizer, runner: Runner, id2label: dict, max_length: int = 128):
        self.tokenizer, self.runner, self.id2label, self.max_length = tokenizer, runner, id2label, max_length

    @classmethod
    def load(cls, model: str, backend: str = "torch", device: str = "cpu", artifact: str | None = None,
             max_length: int = 128, threads: int | None = None, session_config: str = "default") -> "TextClassifier":
        from theseus_deploy.hf import load_config, load_tokenizer

        config = load_config(model)
        runner = load_runner(model, backend, device, threads, artifact, session_config)
        return cls(load_tokenizer(model), runner, {int(k): v for k, v in config.id2label.items()}, max_length)

    def __call__(self, texts, text_pairs=None) -> list[dict]:
        if isinstance(texts, str):
            texts = [texts]
            text_pairs = [text_pairs] if isinstance(text_pairs, str) else text_pairs
        enc = self.tokenizer(list(texts), text_pairs, truncation=True, max_length=self.max_length,
                             padding=True, return_tensors="np")
        logits = self.runner.logits(self.runner.encode(dict(enc)))
        if logits.shape[-1] == 1:
            return [{"label": "score", "score": float(v)} for v in logits[:, 0]]
        e = np.exp(logits - logits.max(-1, keepdims=True))
        probs = e / e.sum(-1, keepdims=True)
        return [{"label": self.id2label.get(int(i), str(int(i))), "score": float(p[i])}
                for p, i in zip(probs, probs.argmax(-1))]
