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
                 vocab_size: int = 30522, folder: Path | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        if device == "cuda":
            need = check_ort_provider(backend)
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
            if backend == "onnx-trt-ep":  # the plain fp16 graph: TensorRT takes all of it
                providers.insert(0, ("TensorrtExecutionProvider", _trt_ep_options(Path(path), folder)))
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


def _trt_ep_options(path: Path, folder: Path | None = None) -> dict:
    """TensorRT EP: engines cached beside the graph, and the export's profile, so that new
    shapes inside it do not trigger an engine rebuild inside a timed loop. The cache folder must
    resolve inside the export folder (a `trt-ep-cache` symlink pointing elsewhere is refused)."""
    base = (Path(folder) if folder is not None else Path(path).parent).resolve()
    cache = Path(path).resolve().parent / "trt-ep-cache"
    if not cache.resolve().is_relative_to(base):  # e.g. a trt-ep-cache symlink to elsewhere
        raise UsageError(f"TensorRT EP cache {cache} resolves outside the export folder {base}")
    opts = {"trt_fp16_enable": True, "trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache)}
    manifest = base / "manifest.json"
    if manifest.is_file():
        m = _read_manifest(base)
        prof, names = m.get("profile"), m.get("input_names")
        if prof and names:
            for key in ("min", "opt", "max"):
                b, s = prof[key]
                opts[f"trt_profile_{key}_shapes"] = ",".join(f"{n}:{b}x{s}" for n in names)
    return opts


def _read_manifest(folder: Path) -> dict:
    try:
        m = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"{folder}/manifest.json is not readable JSON: {e}") from None
    if not isinstance(m, dict) or not isinstance(m.get("artifacts", []), list):
        raise UsageError(f"{folder}/manifest.json: not an export manifest")
    return m


def _manifest_artifact(folder: Path, backend: str, verify_hash: bool = True) -> Path | None:
    """The artifact file of `backend` in an export folder: the manifest's "file", resolved inside the
    folder only (no absolute path, no `..`, no symlink out), and its recorded sha256 checked."""
    from theseus_deploy.io import safe_member, sha256_file

    if (folder / "manifest.json").is_file():
        for art in _read_manifest(folder).get("artifacts", []):
            if isinstance(art, dict) and art.get("format") == export_format(backend):
                path = safe_member(folder, art.get("file"), "artifact")
                if verify_hash and path.is_file():
                    want = art.get("sha256")
                    if not want:
                        raise UsageError(f"{folder}/manifest.json records no sha256 for {art.get('file')} "
                                         "(verify_hash=False to load it unchecked)")
                    if sha256_file(path) != want:
                        raise UsageError(f"{path}: sha256 does not match manifest.json (file changed or corrupt; "
                                         "verify_hash=False to load it anyway)")
                return path
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
                artifact: str | None = None, verify_hash: bool = True) -> Runner:
    """A runner for `backend` over a model folder (torch*) or an exported artifact (onnx*, trt).

    From an export folder, the artifact is the file manifest.json names, only inside that folder,
    and its sha256 must match the manifest's (`verify_hash=False` skips the check)."""
    if backend not in BACKENDS:
        raise UsageError(f"unknown backend '{backend}': choose from {', '.join(BACKENDS)}")
    check_device(backend, device)
    from theseus_deploy.hf import load_classifier, load_config

    if BACKENDS[backend].format is None:
        return TorchRunner(load_classifier(model), backend, device, threads)
    path = Path(artifact) if artifact else _manifest_artifact(Path(model), backend, verify_hash)
    if path is None or not path.is_file():
        raise UsageError(f"no {backend} artifact for {model}: run `theseus-deploy export --format {backend}` first"
                         + (f" ({artifact} does not exist)" if artifact else ""))
    if backend == "trt":
        from .trt import TrtRunner

        return TrtRunner(path, device=device)
    vocab = getattr(load_config(model), "vocab_size", 30522) if (Path(model) / "config.json").is_file() else 30522
    return OrtRunner(path, backend, device, threads, vocab, folder=None if artifact else Path(model))


class TextClassifier:
    """Tokenizer + runner: classify raw text with any backend."""

    def __init__(self, tokenizer, runner: Runner, id2label: dict, max_length: int = 128):
        self.tokenizer, self.runner, self.id2label, self.max_length = tokenizer, runner, id2label, max_length

    @classmethod
    def load(cls, model: str, backend: str = "torch", device: str = "cpu", artifact: str | None = None,
             max_length: int = 128, threads: int | None = None, verify_hash: bool = True) -> "TextClassifier":
        """`verify_hash`: check the artifact against the sha256 in manifest.json (see `load_runner`)."""
        from theseus_deploy.hf import load_config, load_tokenizer

        config = load_config(model)
        runner = load_runner(model, backend, device, threads, artifact, verify_hash)
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
