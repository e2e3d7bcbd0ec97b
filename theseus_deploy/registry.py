"""The one registry of export formats and runtime backends.

Every command reads its choices from here (`export --format`, `bench --backend`,
`load_runner`, `TextClassifier.load`), so a new format or backend is one entry in this file plus
its build/run code, not five hand-kept lists. Standard library only: the CLI imports this module
to build `--help`, which must stay instant.

A *format* is something `export` writes (or, for load-time formats such as `torch-bf16`, checks
without writing a file). A *backend* is something a runner executes; it runs either the model
folder itself (`format=None`) or the artifact of one format.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Format:
    name: str
    file: str | None        # the artifact's file name in the export folder; None: nothing is written
    needs: tuple = ()        # formats built first (their files are dropped unless asked for)
    help: str = ""
    # Validation tolerance on logits against PyTorch fp32 (export/validate.py). fp32 is bit-close;
    # fp16 keeps ~3 significant digits through 2L+ matmuls. None: scale-relative, for INT8 and bf16,
    # which perturb logits on random token ids far more (measured up to ~35% of the largest logit
    # on a real MiniLM): that check only catches a broken graph, the task-drop check (--task) is
    # what judges them.
    atol: float | None = None


@dataclass(frozen=True)
class Backend:
    name: str
    format: str | None       # the export format whose artifact it runs; None: the model folder (PyTorch)
    devices: tuple = ("cpu", "cuda")
    help: str = ""


_FORMATS = [
    Format("onnx", "model.onnx", (), "fp32 graph with ONNX Runtime's transformer fusion", 1e-4),
    Format("onnx-int8", "model-int8.onnx", ("onnx",), "dynamic INT8 quantisation of the fused graph (CPU)"),
    Format("onnx-int8-static", "model-int8-static.onnx", ("onnx",),
           "static INT8 of the fused graph, activation scales calibrated on training texts (CPU)"),
    Format("onnx-fp16", "model-fp16.onnx", (), "fused graph in fp16 with fp32 I/O (ONNX Runtime CUDA)", 2e-2),
    Format("onnx-fp16-trt", "model-fp16-trt.onnx", (), "unfused fp16 graph, standard ops only, for TensorRT", 2e-2),
    Format("trt", "model-fp16.plan", ("onnx-fp16-trt",), "TensorRT FP16 engine (NVIDIA GPU)", 2e-2),
    Format("torch-bf16", None, (), "nothing written: PyTorch bf16 validated like an artifact"),
    Format("torch-compile", None, (), "nothing written (load-time): torch.compile (Inductor) validated like an artifact", 1e-4),
    Format("torch-compile-bf16", None, (), "nothing written (load-time): torch.compile in bf16 (AVX512-BF16/AMX CPUs)"),
    Format("triton", None, (), "a Triton model repository (tokenizer + classifier + postprocess ensemble) of the other "
           "formats given (default onnx-int8: CPU instances; onnx-fp16/trt: GPU instances), checked offline"),
]

_BACKENDS = [
    Backend("torch", None, ("cpu", "cuda"), "PyTorch eager fp32"),
    Backend("torch-bf16", None, ("cpu", "cuda"), "PyTorch eager bf16 (AVX512-BF16/AMX CPUs, GPUs)"),
    Backend("torch-fp16", None, ("cuda",), "PyTorch eager fp16"),
    Backend("torch-compile", None, ("cpu", "cuda"), "torch.compile fp32 over shape buckets: CUDA graphs on GPU, Inductor on CPU"),
    Backend("torch-compile-bf16", None, ("cpu", "cuda"), "torch.compile bf16 (CPU: AVX512-BF16/AMX only)"),
    Backend("torch-compile-fp16", None, ("cuda",), "torch.compile fp16 with CUDA graphs"),
    Backend("onnx", "onnx", ("cpu", "cuda"), "ONNX Runtime, fused fp32 graph"),
    Backend("onnx-int8", "onnx-int8", ("cpu", "cuda"), "ONNX Runtime, dynamic INT8 graph"),
    Backend("onnx-int8-static", "onnx-int8-static", ("cpu",), "ONNX Runtime, static (calibrated) INT8 graph"),
    Backend("onnx-fp16", "onnx-fp16", ("cpu", "cuda"), "ONNX Runtime, fused fp16 graph (CUDA EP; on CPU for validation)"),
    Backend("onnx-trt-ep", "onnx-fp16-trt", ("cuda",), "ONNX Runtime's TensorRT execution provider"),
    Backend("trt", "trt", ("cuda",), "a TensorRT engine"),
]

FORMATS: dict[str, Format] = {f.name: f for f in _FORMATS}
BACKENDS: dict[str, Backend] = {b.name: b for b in _BACKENDS}
DEVICES = ("cpu", "cuda")


def format_names() -> list[str]:
    return list(FORMATS)


def backend_names() -> list[str]:
    return list(BACKENDS)


def artifact_file(backend: str) -> str | None:
    """The file name a backend runs inside an export folder (None: it runs the model folder)."""
    fmt = BACKENDS[backend].format
    return FORMATS[fmt].file if fmt else None


def export_format(backend: str) -> str | None:
    """The export format that must be built for a backend (None: none)."""
    return BACKENDS[backend].format
