"""ONNX Runtime variants of the fused graph: dynamic INT8 (CPU) and FP16 (GPU EPs, TensorRT input)."""
from __future__ import annotations

from pathlib import Path


def quantize_int8(src: Path, dst: Path, per_channel: bool = True, reduce_range: bool = False) -> dict:
    """Dynamic INT8: weights quantised offline, activations per batch at run time.

    Per-channel weight scales by default: on the demo's fine-tuned MiniLM (SST-2 dev, 872
    sentences) per-tensor scales lost 1.26 points, per-channel 0.57 (docs/export.md).
    `reduce_range` (7-bit weights) is for CPUs without VNNI, where u8 x s8 products can saturate.
    On a fused graph `quantize_dynamic` needs DefaultTensorType, or it cannot type the fused
    contrib ops' outputs (measured here).
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=per_channel,
                     reduce_range=reduce_range, extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    from .onnx import count_ops

    ops = count_ops(dst)
    return {op: ops.get(op, 0) for op in ("QAttention", "MatMulInteger", "DynamicQuantizeMatMul",
                                           "DynamicQuantizeLinear", "Attention")}
