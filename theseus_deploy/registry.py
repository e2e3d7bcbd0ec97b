"""The one registry of export formats, repository writers and runtime backends.

Every command reads its choices from here (`export --format`, `bench --backend`, `sweep
--backends`, `load_runner`, `TextClassifier.load`), and every entry carries its behaviour:

- a `Format` names its builder (what writes the artifact from the exported graph, and what it
  checks before anything is written) and the backend that validates it against PyTorch;
- a `Backend` names its runner class (how it is loaded, prechecked and run), its devices, its
  dtype and its runner options;
- a `Writer` (`triton`) packages other formats' artifacts into a serving layout.

So a new backend is one `Backend` entry plus, if no existing runner fits, its runner class
(docs/design.md). Behaviour is named by "module:attribute" and imported on use: this module stays
standard library only, because the CLI imports it to build `--help`, which must stay instant.

A *format* is something `export` writes (or, for load-time formats such as `torch-bf16`, checks
without writing a file). A *backend* is something a runner executes; it runs either the model
folder itself (`format=None`) or the artifact of one format.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field


def load(ref: str):
    """The object a "module:attribute" reference names."""
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


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
    builder: str | None = None      # "module:Class" of its builder (theseus_deploy/export/formats.py); None: load-time
    validate_on: str | None = None  # the backend whose runner validates it (default: the backend of the same name)
    options: dict = field(default_factory=dict, compare=False, hash=False)  # the builder's settings

    def make_builder(self):
        return load(self.builder)(self) if self.builder else None

    @property
    def validator(self) -> "Backend":
        return BACKENDS[self.validate_on or self.name]


@dataclass(frozen=True)
class Backend:
    name: str
    format: str | None       # the export format whose artifact it runs; None: the model folder (PyTorch)
    devices: tuple = ("cpu", "cuda")
    help: str = ""
    runner: str = "theseus_deploy.runtime.pytorch:TorchRunner"  # "module:Class" of its runner
    dtype: str = "float32"   # the precision it computes in (PyTorch runners cast the model to it)
    options: dict = field(default_factory=dict, compare=False, hash=False)  # the runner's settings

    def runner_class(self):
        return load(self.runner)


@dataclass(frozen=True)
class Writer:
    """An output beside the formats: packages the artifacts of other formats (built first if needed)."""

    name: str
    writer: str              # "module:function" taking the ExportConfig
    default_formats: tuple = ()
    help: str = ""


_ORT = "theseus_deploy.runtime.ort:OrtRunner"
_COMPILED = "theseus_deploy.runtime.pytorch:CompiledRunner"
_BUILD = "theseus_deploy.export.formats:"

_FORMATS = [
    Format("onnx", "model.onnx", (), "fp32 graph with ONNX Runtime's transformer fusion", 1e-4, _BUILD + "FusedGraph"),
    Format("onnx-int8", "model-int8.onnx", ("onnx",), "dynamic INT8 quantisation of the fused graph (CPU)",
           builder=_BUILD + "DynamicInt8"),
    Format("onnx-int8-static", "model-int8-static.onnx", ("onnx",),
           "static INT8 of the fused graph, activation scales calibrated on training texts (CPU)",
           builder=_BUILD + "StaticInt8"),
    Format("onnx-fp16", "model-fp16.onnx", (), "fused graph in fp16 with fp32 I/O (ONNX Runtime CUDA)", 2e-2,
           _BUILD + "FusedGraph", options={"fp16": True}),
    Format("onnx-fp16-trt", "model-fp16-trt.onnx", (), "unfused fp16 graph, standard ops only, for TensorRT", 2e-2,
           _BUILD + "PlainFp16", validate_on="onnx-fp16"),
    Format("trt", "model-fp16.plan", ("onnx-fp16-trt",), "TensorRT FP16 engine (NVIDIA GPU)", 2e-2, _BUILD + "TrtEngine"),
    Format("torch-bf16", None, (), "nothing written: PyTorch bf16 validated like an artifact"),
    Format("torch-compile", None, (), "nothing written (load-time): torch.compile (Inductor) validated like an artifact", 1e-4),
    Format("torch-compile-bf16", None, (), "nothing written (load-time): torch.compile in bf16 (AVX512-BF16/AMX CPUs)"),
]

_WRITERS = [
    Writer("triton", "theseus_deploy.export.triton:export_repository", ("onnx-int8",),
           "a Triton model repository (tokenizer + classifier + postprocess ensemble) of the other formats given "
           "(default onnx-int8: CPU instances; onnx-fp16/trt: GPU instances), checked offline"),
]

_BACKENDS = [
    Backend("torch", None, ("cpu", "cuda"), "PyTorch eager fp32"),
    Backend("torch-bf16", None, ("cpu", "cuda"), "PyTorch eager bf16 (AVX512-BF16/AMX CPUs, GPUs)", dtype="bfloat16"),
    Backend("torch-fp16", None, ("cuda",), "PyTorch eager fp16", dtype="float16"),
    Backend("torch-compile", None, ("cpu", "cuda"), "torch.compile fp32 over shape buckets: CUDA graphs on GPU, Inductor on CPU",
            runner=_COMPILED),
    Backend("torch-compile-bf16", None, ("cpu", "cuda"), "torch.compile bf16 (CPU: AVX512-BF16/AMX only)",
            runner=_COMPILED, dtype="bfloat16"),
    Backend("torch-compile-fp16", None, ("cuda",), "torch.compile fp16 with CUDA graphs", runner=_COMPILED, dtype="float16"),
    Backend("onnx", "onnx", ("cpu", "cuda"), "ONNX Runtime, fused fp32 graph", runner=_ORT),
    Backend("onnx-int8", "onnx-int8", ("cpu", "cuda"), "ONNX Runtime, dynamic INT8 graph", runner=_ORT),
    Backend("onnx-int8-static", "onnx-int8-static", ("cpu",), "ONNX Runtime, static (calibrated) INT8 graph", runner=_ORT),
    Backend("onnx-fp16", "onnx-fp16", ("cpu", "cuda"), "ONNX Runtime, fused fp16 graph (CUDA EP; on CPU for validation)",
            runner=_ORT, dtype="float16"),
    Backend("onnx-trt-ep", "onnx-fp16-trt", ("cuda",), "ONNX Runtime's TensorRT execution provider", runner=_ORT,
            dtype="float16", options={"provider": "TensorrtExecutionProvider"}),
    Backend("trt", "trt", ("cuda",), "a TensorRT engine", runner="theseus_deploy.runtime.trt:TrtRunner", dtype="float16"),
    Backend("onnx-parallel", "onnx", ("cpu",), "ONNX Runtime, fused fp32 graph on the parallel executor (independent "
            "nodes on 2 inter-op threads)", runner="theseus_deploy.runtime.ort_parallel:OrtParallelRunner",
            options={"inter_op_threads": 2}),
]

FORMATS: dict[str, Format] = {f.name: f for f in _FORMATS}
WRITERS: dict[str, Writer] = {w.name: w for w in _WRITERS}
BACKENDS: dict[str, Backend] = {b.name: b for b in _BACKENDS}
DEVICES = ("cpu", "cuda")


def format_names() -> list[str]:
    return list(FORMATS)


def output_names() -> list[str]:
    """What `export --format` accepts: the formats and the repository writers."""
    return list(FORMATS) + list(WRITERS)


def backend_names() -> list[str]:
    return list(BACKENDS)


def artifact_file(backend: str) -> str | None:
    """The file name a backend runs inside an export folder (None: it runs the model folder)."""
    fmt = BACKENDS[backend].format
    return FORMATS[fmt].file if fmt else None


def export_format(backend: str) -> str | None:
    """The export format that must be built for a backend (None: none)."""
    return BACKENDS[backend].format
