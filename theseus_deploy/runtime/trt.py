"""TensorRT: the availability check and a runner for serialized engines (built by export/trt.py)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from theseus_deploy.errors import UsageError

from .base import Runner, check_device

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


class TrtRunner(Runner):
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
        if self.engine is None:  # TensorRT logs why; the file is not an engine of this TensorRT/GPU
            raise UsageError(f"{engine_path}: not a TensorRT engine this TensorRT {trt.__version__} and GPU can load")
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

    @classmethod
    def precheck(cls, spec, device: str) -> None:
        check_device(spec.name, device)
        check_trt_available()

    @classmethod
    def open(cls, spec, path, device: str = "cuda", vocab_size: int | None = None, **options) -> "TrtRunner":
        return cls(path, device=device, vocab_size=vocab_size)

    def encode(self, encoded):
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
