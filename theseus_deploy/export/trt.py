"""TensorRT FP16 engines from the FP16 ONNX graph, and a runner for them.

TensorRT 11 is strongly typed: `BuilderFlag.FP16` is gone and precision comes from the graph, so
the engine is built from `model-fp16.onnx` with a strongly typed network. On TensorRT 10 the
same graph is used, also strongly typed where the flag exists (10.x has it), else with the FP16
builder flag. One optimisation profile covers min / opt / max (batch, sequence) shapes.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from theseus_deploy.errors import UsageError

INSTALL_HINT = "install the extra with `pip install -e .[trt]` on a machine with an NVIDIA GPU and driver"


def check_trt_available() -> str:
    """TensorRT version; UsageError naming what is missing (checked before anything is written)."""
    try:
        import tensorrt as trt
    except ImportError:
        raise UsageError(f"--format trt needs TensorRT, which is not installed: {INSTALL_HINT}") from None
    try:
        import torch
        ok = torch.cuda.is_available()
    except ImportError:
        ok = False
    if not ok:
        raise UsageError(f"--format trt needs a CUDA GPU, and none is visible here (TensorRT {trt.__version__} is installed)")
    return trt.__version__


@dataclass(frozen=True)
class Profile:
    """min / opt / max (batch, sequence) shapes of the engine's one optimisation profile."""

    min: tuple
    opt: tuple
    max: tuple

    @classmethod
    def from_flags(cls, max_batch_size: int, max_seq_length: int, opt_batch_size: int | None = None,
                   opt_seq_length: int | None = None) -> "Profile":
        if max_batch_size < 1 or max_seq_length < 1:
            raise UsageError("--max-batch-size and --max-seq-length must be at least 1")
        ob = opt_batch_size if opt_batch_size is not None else max(1, max_batch_size // 2)
        os_ = opt_seq_length if opt_seq_length is not None else max(1, max_seq_length // 2)
        if not (1 <= ob <= max_batch_size and 1 <= os_ <= max_seq_length):
            raise UsageError(f"opt shape ({ob}, {os_}) must lie between (1, 1) and the max shape "
                             f"({max_batch_size}, {max_seq_length})")
        return cls((1, 1), (ob, os_), (max_batch_size, max_seq_length))

    def as_dict(self) -> dict:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}


def build_engine(onnx_path: Path, engine_path: Path, input_names: list, profile: Profile,
                 workspace_gb: float = 4.0) -> dict:
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    strongly_typed = hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
    if strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):  # implicit in 10+, gone in 11
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if not strongly_typed and hasattr(trt.BuilderFlag, "FP16"):
        config.set_flag(trt.BuilderFlag.FP16)
    prof = builder.create_optimization_profile()
    for name in input_names:
        prof.set_shape(name, profile.min, profile.opt, profile.max)
    config.add_optimization_profile(prof)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT engine build failed (see the TensorRT log above)")
    engine_path.write_bytes(bytes(serialized))
    return {"tensorrt": trt.__version__, "strongly_typed": strongly_typed, "profile": profile.as_dict()}


class TrtRunner:
    """Run a serialized engine on CUDA torch tensors; returns logits."""

    backend = "trt"

    def __init__(self, engine_path: Path, device: str = "cuda", vocab_size: int | None = None):
        check_trt_available()
        if device != "cuda":
            raise UsageError("backend trt runs on --device cuda only")
        import tensorrt as trt
        import torch

        self.torch, self.device, self.name = torch, "cuda", "trt@cuda"
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = lambda n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT  # noqa: E731
        self.input_names = [n for n in names if is_input(n)]
        self.output_name = next(n for n in names if not is_input(n))
        self.num_labels = self.engine.get_tensor_shape(self.output_name)[-1]
        self.out_dtype = torch.float16 if self.engine.get_tensor_dtype(self.output_name) == trt.DataType.HALF else torch.float32
        if vocab_size is None:  # random validation/bench ids must stay inside the model's vocabulary
            cfg = Path(engine_path).parent / "config.json"
            vocab_size = json.loads(cfg.read_text()).get("vocab_size", 30522) if cfg.is_file() else 30522
        self.vocab_size = vocab_size

    def make_inputs(self, batch_size, seq_len, seed=0):
        from .runtime import _random_ids

        return self.encode(_random_ids(batch_size, seq_len, self.vocab_size, self.input_names, seed))

    def encode(self, encoded):
        import numpy as np

        return {n: self.torch.as_tensor(np.asarray(encoded[n]), dtype=self.torch.int64, device="cuda").contiguous()
                for n in self.input_names}

    def __call__(self, feeds):
        batch = next(iter(feeds.values())).shape[0]
        out = self.torch.empty((batch, self.num_labels), dtype=self.out_dtype, device="cuda")
        for n in self.input_names:
            self.context.set_input_shape(n, tuple(feeds[n].shape))
            self.context.set_tensor_address(n, feeds[n].data_ptr())
        self.context.set_tensor_address(self.output_name, out.data_ptr())
        # Enqueue on torch's current stream: the inputs were written there, the caller reads `out`
        # there, and CUDA events recorded there (bench timing) bracket the engine's work.
        self.context.execute_async_v3(self.torch.cuda.current_stream().cuda_stream)
        return out

    def logits(self, feeds):
        out = self(feeds)
        return out.float().cpu().numpy()  # .cpu() waits for the current stream

    def synchronize(self):
        self.torch.cuda.current_stream().synchronize()
