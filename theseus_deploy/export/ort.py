"""ONNX Runtime variants of the fused graph: dynamic INT8 (CPU) and FP16 (GPU EPs, TensorRT input)."""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np

from .onnx import count_ops


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

    ops = count_ops(dst)
    return {op: ops.get(op, 0) for op in ("QAttention", "MatMulInteger", "DynamicQuantizeMatMul",
                                           "DynamicQuantizeLinear", "Attention")}


def calibration_feeds(tokenizer, texts, input_names, seq_len: int, batch_size: int = 1) -> list[dict]:
    """Tokenized calibration batches: real texts padded to the export's calibration length.

    Padding to the fixed `seq_len` (not to the batch's longest text) makes the calibration see
    the padded positions a fixed-shape caller feeds too (their hidden states are computed and
    only masked in attention), so their ranges are covered.
    """
    feeds = []
    for i in range(0, len(texts), batch_size):
        chunk = texts[i:i + batch_size]
        a = [t[0] for t in chunk]
        b = [t[1] for t in chunk] if chunk[0][1] is not None else None
        enc = tokenizer(a, b, truncation=True, max_length=seq_len, padding="max_length", return_tensors="np")
        feeds.append({n: np.ascontiguousarray(enc[n], dtype=np.int64) if n in enc
                      else np.zeros_like(enc["input_ids"], dtype=np.int64) for n in input_names})
    return feeds


def quantize_int8_static(src: Path, dst: Path, feeds: list[dict], qformat: str = "qdq", per_channel: bool = True,
                         attention: str = "dynamic") -> dict:
    """Static INT8: weights and activation scales fixed offline from calibration `feeds` (MinMax).

    `qformat`: "qdq" (QuantizeLinear/DequantizeLinear pairs around each MatMul, which ONNX
    Runtime's CPU provider fuses into integer kernels at load) or "qoperator" (QLinearMatMul
    nodes). ONNX Runtime's static quantiser has no rule for the fused com.microsoft `Attention`
    node (only its dynamic quantiser has: QAttention), so with `attention="dynamic"` the graph's
    Attention nodes (the QKV projection, a quarter of an encoder layer's weights) are then
    quantised dynamically (QAttention, its input quantised per call by DynamicQuantizeLinear);
    with "static" that DynamicQuantizeLinear is replaced by a QuantizeLinear with the calibrated
    range of the Attention input too, so no activation is quantised dynamically; with "fp32"
    Attention stays in fp32.
    """
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic,
                                          quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self, batches):
            self.it = iter(batches)

        def get_next(self):
            return next(self.it, None)

    fmt = {"qdq": QuantFormat.QDQ, "qoperator": QuantFormat.QOperator}[qformat]
    with tempfile.TemporaryDirectory(prefix="theseus-calib-") as tmp:
        staged = Path(tmp) / "static.onnx"
        # ONNX's own shape inference cannot type the outputs of the fused contrib ops (BiasGelu,
        # SkipLayerNormalization ...); the static quantiser then skips every MatMul behind them
        # (measured: only weights got DequantizeLinear, activations stayed fp32). ONNX Runtime's
        # symbolic shape inference knows these ops, so the graph is typed first.
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        typed = Path(tmp) / "typed.onnx"
        onnx.save(SymbolicShapeInference.infer_shapes(onnx.load(str(src)), auto_merge=True), str(typed))
        src = typed

        root, level = logging.getLogger(), logging.getLogger().level
        root.setLevel(logging.ERROR)  # the quantiser logs a pre-processing hint per call on the root logger
        try:
            _quantize_static(quantize_static, src, dst if attention == "fp32" else staged, Reader(feeds), fmt,
                             per_channel)
        finally:
            root.setLevel(level)
        if attention in ("dynamic", "static"):
            quantize_dynamic(str(staged), str(dst), weight_type=QuantType.QInt8, per_channel=per_channel,
                             op_types_to_quantize=["Attention"],
                             extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        if attention == "static":
            _static_attention_inputs(src, dst, feeds)

    ops = count_ops(dst)
    return {op: ops.get(op, 0) for op in ("QuantizeLinear", "DequantizeLinear", "QLinearMatMul", "QAttention",
                                           "MatMul", "Attention", "MatMulInteger", "DynamicQuantizeLinear")}


def _quantize_static(quantize_static, src, dst, reader, fmt, per_channel):
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantType

    # Activations u8 (asymmetric: after GELU and layer norm ranges are lopsided), weights s8:
    # the pair ONNX Runtime's VNNI kernels take. MatMul only: the Gather of the embeddings is
    # fused into EmbedLayerNormalization and stays fp32.
    quantize_static(str(src), str(dst), reader, quant_format=fmt, op_types_to_quantize=["MatMul"],
                    per_channel=per_channel, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax,
                    extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT, "MatMulConstBOnly": True},
                    calibration_providers=["CPUExecutionProvider"])


def _static_attention_inputs(fp32: Path, path: Path, feeds: list[dict]) -> int:
    """Replace each DynamicQuantizeLinear in front of a QAttention with a QuantizeLinear whose
    u8 scale and zero point come from the min/max of that tensor over the calibration `feeds`
    (run on the fp32 graph `fp32`). Returns how many were replaced."""
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    g = model.graph
    qatt_inputs = {n.input[0] for n in g.node if n.op_type == "QAttention"}
    dql = [n for n in g.node if n.op_type == "DynamicQuantizeLinear" and n.output[0] in qatt_inputs]
    if not dql:
        return 0
    names = sorted({n.input[0] for n in dql})
    ref = onnx.load(str(fp32))
    have = {o.name for o in ref.graph.output}
    for name in names:
        if name not in have:
            ref.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(ref.SerializeToString(), providers=["CPUExecutionProvider"])
    lo = {n: 0.0 for n in names}  # the u8 range always contains 0 (as DynamicQuantizeLinear's does)
    hi = {n: 0.0 for n in names}
    for f in feeds:
        for name, v in zip(names, sess.run(names, f)):
            lo[name], hi[name] = min(lo[name], float(v.min())), max(hi[name], float(v.max()))
    rename = {}
    for n in dql:
        x = n.input[0]
        scale = max(hi[x] - lo[x], 1e-8) / 255.0
        zp = int(np.clip(round(-lo[x] / scale), 0, 255))
        s_name, z_name = f"{x}_static_scale", f"{x}_static_zero_point"
        if s_name not in {i.name for i in g.initializer}:
            g.initializer.extend([numpy_helper.from_array(np.array(scale, dtype=np.float32), s_name),
                                  numpy_helper.from_array(np.array(zp, dtype=np.uint8), z_name)])
        rename[n.output[1]], rename[n.output[2]] = s_name, z_name
        q = helper.make_node("QuantizeLinear", [x, s_name, z_name], [n.output[0]], name=n.name + "_static")
        idx = list(g.node).index(n)
        g.node.remove(n)
        g.node.insert(idx, q)
    for node in g.node:
        for i, inp in enumerate(node.input):
            if inp in rename:
                node.input[i] = rename[inp]
    onnx.save(model, str(path))
    return len(dql)
