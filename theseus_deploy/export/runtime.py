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

    def warmup(self, shapes) -> list:
        """Run each (batch, seq) shape once, untimed; returns the shapes met."""
        for b, s in shapes:
            self.logits(self.make_inputs(b, s))
        self.synchronize()
        return [tuple(x) for x in shapes]


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


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def check_compiler(device: str) -> None:
    """UsageError unless torch.compile can build code here: Inductor's C++ compiler on CPU,
    Triton on CUDA."""
    if device == "cpu":
        from torch._inductor import config as inductor_config

        search = inductor_config.cpp.cxx if isinstance(inductor_config.cpp.cxx, (list, tuple)) else (inductor_config.cpp.cxx,)
        try:
            from torch._inductor.cpp_builder import get_cpp_compiler

            get_cpp_compiler()
        except Exception as e:  # InvalidCxxCompiler, or a broken compiler
            raise UsageError(f"torch-compile on CPU needs a working C++ compiler for Inductor (searched "
                             f"{', '.join(str(c) for c in search if c)}; set CXX or install g++): "
                             f"{type(e).__name__}") from None
    else:
        from torch.utils._triton import has_triton

        if not has_triton():
            raise UsageError("torch-compile on CUDA needs Triton (it ships with the CUDA builds of torch)")


def cpu_has_bf16() -> bool:
    """AVX512-BF16 or AMX: the CPU features that make bf16 matmuls fast (otherwise bf16 is emulated)."""
    import torch

    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


class CompiledRunner(TorchRunner):
    """torch.compile over shape buckets: CUDA graphs on GPU (mode="reduce-overhead"), Inductor on CPU.

    Why: on an H200 eager PyTorch at batch 1 is all kernel-launch overhead (6 layers fp16 2.54 ms
    eager, 0.47 ms with plain `torch.compile(mode="reduce-overhead", dynamic=False)`). A compiled
    graph (and a CUDA graph) has static shapes, so inputs are padded up to a bucket: batch to the
    next power of two, sequence to the next multiple of `seq_bucket`, which bounds the number of
    graphs. Padding never changes the logits of the real rows: padded tokens get attention_mask 0
    and input_ids = the pad token (positions of real tokens are unchanged, RoBERTa's included),
    padded rows repeat row 0, and the output is sliced back (tests/test_compile.py).

    No bucket falls back to eager silently: the graph is compiled with fullgraph=True (a graph
    break raises), and each new bucket is compiled with dynamo's recompile limit raised to cover
    every possible bucket and `fail_on_recompile_limit_hit`, so exceeding it raises. Compile
    failures (no C++ compiler, Triton missing) are one-line UsageErrors. On CPU the graph is
    frozen (weights constant-folded and prepacked, Inductor's `freezing`).

    `warmup(shapes)` compiles the buckets of the named shapes; any other bucket compiles on first use.
    """

    DTYPES = {"torch-compile": "float32", "torch-compile-bf16": "bfloat16", "torch-compile-fp16": "float16"}
    MAX_BATCH_BUCKET = 1024  # for sizing dynamo's recompile limit only; larger batches still work

    def __init__(self, model, backend: str = "torch-compile", device: str = "cpu", threads: int | None = None,
                 seq_bucket: int = 32):
        import torch

        if seq_bucket < 1:
            raise UsageError(f"--seq-bucket must be at least 1, got {seq_bucket}")
        self.precheck(backend, device)
        super().__init__(model, backend, device, threads)
        cfg = model.config
        from theseus_deploy.arch import max_positions

        self.max_seq_length = int(max_positions(cfg) or 512)
        self.pad_id = int(cfg.pad_token_id or 0)
        self.seq_bucket = seq_bucket
        self.compiled_buckets: list = []
        self.cudagraph_skipped: list = []  # CUDA buckets Inductor compiled but could not capture
        self.possible_buckets = (self.MAX_BATCH_BUCKET.bit_length()) * -(-self.max_seq_length // seq_bucket)
        mode = "reduce-overhead" if device == "cuda" else None
        self.compiled = torch.compile(self.model, mode=mode, dynamic=False, fullgraph=True)

    @staticmethod
    def precheck(backend: str, device: str) -> None:
        """Everything that can be refused before a model is loaded: device, bf16 support, compiler."""
        import torch

        check_device(backend, device)
        if device == "cuda" and not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA GPU is visible to PyTorch on this machine")
        if backend == "torch-compile-bf16" and device == "cpu" and not cpu_has_bf16():
            raise UsageError("torch-compile-bf16 on CPU needs AVX512-BF16 or AMX (this CPU has neither); use torch-compile")
        check_compiler(device)

    def bucket(self, batch_size: int, seq_len: int) -> tuple:
        b, s = _pow2(batch_size), _round_up(seq_len, self.seq_bucket)
        if s > self.max_seq_length:
            raise UsageError(f"{self.backend}: sequence {seq_len} pads to a bucket of {s}, beyond the model's "
                             f"{self.max_seq_length} positions (choose a --seq-bucket that divides {self.max_seq_length})")
        return b, s

    def _pad(self, feeds: dict, b: int, s: int) -> dict:
        torch = self.torch
        out = {}
        for name, t in feeds.items():
            rows, width = t.shape
            if width < s:
                fill = self.pad_id if name == "input_ids" else 0
                t = torch.nn.functional.pad(t, (0, s - width), value=fill)
            if rows < b:  # extra rows repeat row 0 (never a fully masked row); they are sliced off
                t = torch.cat([t, t[:1].expand(b - rows, -1)])
            out[name] = t
        return out

    def __call__(self, feeds):
        rows, width = next(iter(feeds.values())).shape
        b, s = self.bucket(rows, width)
        if (b, s) != (rows, width):
            feeds = self._pad(feeds, b, s)
        if (b, s) not in self.compiled_buckets:
            out = self._compile(feeds, (b, s))
        else:
            with self.torch.inference_mode():
                if self.device == "cuda":
                    self.torch.compiler.cudagraph_mark_step_begin()
                out = self.compiled(**feeds).logits
        return out if b == rows else out[:rows]

    def _compile(self, feeds, bucket):
        import torch

        dyn = torch._dynamo.config
        # the limit's name changed across torch versions (cache_size_limit before 2.6)
        names = ("recompile_limit", "accumulated_recompile_limit", "fail_on_recompile_limit_hit")
        if not hasattr(dyn, "recompile_limit"):
            names = ("cache_size_limit", "accumulated_cache_size_limit", "fail_on_cache_limit_hit")
        limit = max(getattr(dyn, names[0]), 8 * self.possible_buckets)
        patch = {names[0]: limit, names[1]: max(getattr(dyn, names[1]), limit)}
        if hasattr(dyn, names[2]):
            patch[names[2]] = True
        from torch._dynamo.utils import counters

        skips = counters["inductor"]["cudagraph_skips"]
        try:
            with dyn.patch(**patch), torch._inductor.config.patch(freezing=self.device == "cpu"), torch.inference_mode():
                if self.device == "cuda":
                    torch.compiler.cudagraph_mark_step_begin()
                out = self.compiled(**feeds).logits
                if self.device == "cuda":  # CUDA graphs are recorded on the first calls after compilation
                    for _ in range(2):
                        out = out.clone()
                        torch.compiler.cudagraph_mark_step_begin()
                        out = self.compiled(**feeds).logits
        except UsageError:
            raise
        except Exception as e:
            first = (str(e).strip().splitlines() or [""])[0][:300]
            raise UsageError(f"{self.backend}: torch.compile failed for bucket {bucket[0]}x{bucket[1]} on "
                             f"{self.device} ({type(e).__name__}: {first})") from None
        self.compiled_buckets.append(bucket)
        if self.device == "cuda" and counters["inductor"]["cudagraph_skips"] > skips:
            # compiled, but Inductor ran it without a CUDA graph (TORCH_LOGS=cudagraphs says why)
            self.cudagraph_skipped.append(bucket)
        return out

    def warmup(self, shapes) -> list:
        """Compile (and on CUDA, capture) the bucket of every (batch, seq) shape; returns the buckets."""
        buckets = list(dict.fromkeys(self.bucket(b, s) for b, s in shapes))  # errors before any compile
        for b, s in buckets:
            if (b, s) not in self.compiled_buckets:
                self(self.make_inputs(b, s))
        self.synchronize()
        return buckets


class OrtRunner(Runner):
    """ONNX Runtime: CPU EP, or CUDA / TensorRT EPs when onnxruntime-gpu is installed."""

    def __init__(self, path: Path, backend: str, device: str = "cpu", threads: int | None = None,
                 vocab_size: int = 30522, folder: Path | None = None, session_config: str = "default"):
        import onnxruntime as ort

        opts = ort_session_options(session_config, threads)
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


def torch_runner(model, backend: str, device: str = "cpu", threads: int | None = None,
                 seq_bucket: int = 32) -> TorchRunner:
    """The runner of a PyTorch backend (eager or compiled) over a loaded model."""
    if backend in CompiledRunner.DTYPES:
        return CompiledRunner(model, backend, device, threads, seq_bucket)
    return TorchRunner(model, backend, device, threads)


def load_runner(model: str, backend: str, device: str = "cpu", threads: int | None = None,
                artifact: str | None = None, verify_hash: bool = True, seq_bucket: int = 32,
                session_config: str = "default") -> Runner:
    """A runner for `backend` over a model folder (torch*) or an exported artifact (onnx*, trt).

    From an export folder, the artifact is the file manifest.json names, only inside that folder,
    and its sha256 must match the manifest's (`verify_hash=False` skips the check).
    `seq_bucket`: torch-compile* pad sequences to a multiple of it (batches to a power of two).
    `session_config`: ONNX Runtime session options (`ort_session_options`: default or latency)."""
    if backend not in BACKENDS:
        raise UsageError(f"unknown backend '{backend}': choose from {', '.join(BACKENDS)}")
    check_device(backend, device)
    from theseus_deploy.hf import load_classifier, load_config

    if BACKENDS[backend].format is None:
        if backend in CompiledRunner.DTYPES:  # say it before loading the weights
            CompiledRunner.precheck(backend, device)
        return torch_runner(load_classifier(model), backend, device, threads, seq_bucket)
    path = Path(artifact) if artifact else _manifest_artifact(Path(model), backend, verify_hash)
    if path is None or not path.is_file():
        raise UsageError(f"no {backend} artifact for {model}: run `theseus-deploy export --format {backend}` first"
                         + (f" ({artifact} does not exist)" if artifact else ""))
    if backend == "trt":
        from .trt import TrtRunner

        return TrtRunner(path, device=device)
    vocab = getattr(load_config(model), "vocab_size", 30522) if (Path(model) / "config.json").is_file() else 30522
    return OrtRunner(path, backend, device, threads, vocab, folder=None if artifact else Path(model),
                     session_config=session_config)


class TextClassifier:
    """Tokenizer + runner: classify raw text with any backend."""

    def __init__(self, tokenizer, runner: Runner, id2label: dict, max_length: int = 128):
        self.tokenizer, self.runner, self.id2label, self.max_length = tokenizer, runner, id2label, max_length

    @classmethod
    def load(cls, model: str, backend: str = "torch", device: str = "cpu", artifact: str | None = None,
             max_length: int = 128, threads: int | None = None, verify_hash: bool = True,
             seq_bucket: int = 32, session_config: str = "default") -> "TextClassifier":
        """`verify_hash`: check the artifact against the sha256 in manifest.json (see `load_runner`);
        `seq_bucket`: the sequence bucket of torch-compile* backends; `session_config`: ONNX Runtime
        session options (default or latency)."""
        from theseus_deploy.hf import load_config, load_tokenizer

        config = load_config(model)
        runner = load_runner(model, backend, device, threads, artifact, verify_hash=verify_hash, seq_bucket=seq_bucket,
                             session_config=session_config)
        return cls(load_tokenizer(model), runner, {int(k): v for k, v in config.id2label.items()}, max_length)

    def warmup(self, shapes) -> list:
        """Run (for torch-compile*: compile) each (batch, seq) shape once before serving; else
        each new shape (bucket) is compiled on first use. Returns the shapes (buckets) met."""
        return self.runner.warmup(shapes)

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
