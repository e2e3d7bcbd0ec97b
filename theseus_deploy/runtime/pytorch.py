"""PyTorch runners: eager (fp32 / bf16 / fp16) and torch.compile over shape buckets."""
from __future__ import annotations

import numpy as np

from theseus_deploy.arch import max_positions
from theseus_deploy.errors import UsageError
from theseus_deploy.hf import model_input_names
from theseus_deploy.registry import BACKENDS

from .base import Runner, check_device


class TorchRunner(Runner):
    """PyTorch eager, fp32 / bf16 / fp16, CPU or CUDA."""

    def __init__(self, model, backend: str = "torch", device: str = "cpu", threads: int | None = None):
        import torch

        if threads:
            torch.set_num_threads(threads)
        type(self).precheck(BACKENDS[backend], device)
        self.torch = torch
        self.dtype = getattr(torch, BACKENDS[backend].dtype)
        self.model = model.to(device=device, dtype=self.dtype).eval()
        self.backend, self.device, self.name = backend, device, f"{backend}@{device}"
        self.input_names = model_input_names(model)
        self.vocab_size = model.config.vocab_size

    @classmethod
    def precheck(cls, spec, device: str) -> None:
        """Everything that can be refused before a model is loaded."""
        import torch

        check_device(spec.name, device)
        if device == "cuda" and not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA GPU is visible to PyTorch on this machine")

    @classmethod
    def open(cls, spec, model, device: str = "cpu", threads: int | None = None, **options) -> "TorchRunner":
        """The runner over a loaded model (what `load_runner` calls for a backend with format None)."""
        return cls(model, spec.name, device, threads)

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

    MAX_BATCH_BUCKET = 1024  # for sizing dynamo's recompile limit only; larger batches still work

    def __init__(self, model, backend: str = "torch-compile", device: str = "cpu", threads: int | None = None,
                 seq_bucket: int = 32):
        import torch

        if seq_bucket < 1:
            raise UsageError(f"--seq-bucket must be at least 1, got {seq_bucket}")
        super().__init__(model, backend, device, threads)  # prechecks (device, bf16 support, compiler)
        cfg = model.config
        self.max_seq_length = int(max_positions(cfg) or 512)
        self.pad_id = int(cfg.pad_token_id or 0)
        self.seq_bucket = seq_bucket
        self.compiled_buckets: list = []
        self.cudagraph_skipped: list = []  # CUDA buckets Inductor compiled but could not capture
        self.possible_buckets = (self.MAX_BATCH_BUCKET.bit_length()) * -(-self.max_seq_length // seq_bucket)
        mode = "reduce-overhead" if device == "cuda" else None
        self.compiled = torch.compile(self.model, mode=mode, dynamic=False, fullgraph=True)

    @classmethod
    def precheck(cls, spec, device: str) -> None:
        """Everything that can be refused before a model is loaded: device, bf16 support, compiler."""
        super().precheck(spec, device)
        if spec.dtype == "bfloat16" and device == "cpu" and not cpu_has_bf16():
            raise UsageError(f"{spec.name} on CPU needs AVX512-BF16 or AMX (this CPU has neither); use torch-compile")
        check_compiler(device)

    @classmethod
    def open(cls, spec, model, device: str = "cpu", threads: int | None = None, seq_bucket: int = 32,
             **options) -> "CompiledRunner":
        return cls(model, spec.name, device, threads, seq_bucket)

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


