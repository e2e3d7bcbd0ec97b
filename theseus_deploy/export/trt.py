"""TensorRT FP16 engines from the FP16 ONNX graph (the runner: theseus_deploy.runtime.trt).

TensorRT 11 is strongly typed: `BuilderFlag.FP16` is gone and precision comes from the graph, so
the engine is built from `model-fp16.onnx` with a strongly typed network. On TensorRT 10 the
same graph is used, also strongly typed where the flag exists (10.x has it), else with the FP16
builder flag. One optimisation profile covers min / opt / max (batch, sequence) shapes.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from theseus_deploy.errors import UsageError
from theseus_deploy.runtime.trt import INSTALL_HINT, check_trt_available  # noqa: F401  (re-exported: export checks it first)


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
