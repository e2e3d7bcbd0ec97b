"""PyTorch -> ONNX (fp32, dynamic batch and sequence axes) and the ONNX Runtime fusion pass.

Measured with torch 2.13: the default dynamo exporter's graph gets no Attention fusion from
`onnxruntime.transformers.optimizer`; the TorchScript-based exporter (`dynamo=False`) over a
model loaded with eager attention gives full fusion (EmbedLayerNormalization, Attention,
SkipLayerNormalization, BiasGelu). So that is the path we take.
"""
from __future__ import annotations

import warnings
from pathlib import Path

from theseus_deploy.arch import arch
from theseus_deploy.errors import UsageError
from theseus_deploy.hf import check_model_source, model_input_names

FUSED_OPS = ("EmbedLayerNormalization", "Attention", "MultiHeadAttention", "SkipLayerNormalization",
             "LayerNormalization", "BiasGelu", "FastGelu", "Gelu")


class _LogitsOnly:
    """Wrap a HF classifier so that ONNX sees named tensor inputs and one `logits` output."""

    def __new__(cls, model, input_names):
        import torch

        class Wrapper(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.model = model

            def forward(self, *args):
                return self.model(**dict(zip(input_names, args))).logits

        return Wrapper().eval()


def export_onnx(model_dir: str, path: Path, opset: int = 17) -> dict:
    """Write an fp32 ONNX graph of the classifier at `model_dir`; returns its description."""
    import torch
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(
        check_model_source(model_dir), attn_implementation="eager", dtype=torch.float32).eval()
    names = model_input_names(model)
    ids = torch.randint(5, min(1000, model.config.vocab_size), (2, 16))
    example = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    axes = {n: {0: "batch", 1: "sequence"} for n in names}
    axes["logits"] = {0: "batch"}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TracerWarnings about python control flow on shapes
        torch.onnx.export(_LogitsOnly(model, names), tuple(example[n] for n in names), str(path),
                          input_names=names, output_names=["logits"], dynamic_axes=axes,
                          opset_version=opset, do_constant_folding=True, dynamo=False)
    return {"input_names": names, "output_names": ["logits"], "num_labels": model.config.num_labels,
            "model_type": model.config.model_type, "num_layers": model.config.num_hidden_layers,
            "num_heads": model.config.num_attention_heads, "hidden_size": model.config.hidden_size}


def count_ops(onnx_path: Path) -> dict:
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    counts: dict[str, int] = {}
    for node in graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


# Standard ONNX ops only: what TensorRT's parser (and ORT's TensorRT EP) can take. LayerNorm stays
# fp32: TensorRT warns that fp16 layer norm after attention can overflow, and a strongly typed
# network (TensorRT 11) runs each op in the precision the graph gives it.
PLAIN_FP16_KEEP_FP32 = ("LayerNormalization", "ReduceMean", "Pow", "Sqrt")


def plain_fp16(src: Path, dst: Path) -> dict:
    """The unfused graph in fp16 (fp32 inputs/outputs, layer norm in fp32), for TensorRT.

    ONNX Runtime's fused graph is made of com.microsoft contrib ops (Attention,
    SkipLayerNormalization ...) that TensorRT's ONNX parser does not know, so the engine is
    built from this graph instead. Returns op counts (no contrib op may remain).
    """
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    model = onnx.load(str(src))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = convert_float_to_float16(model, keep_io_types=True,
                                         op_block_list=DEFAULT_OP_BLOCK_LIST + list(PLAIN_FP16_KEEP_FP32))
    onnx.save(model, str(dst))
    contrib = sorted({n.op_type for n in model.graph.node if n.domain not in ("", "ai.onnx")})
    if contrib:
        raise RuntimeError(f"plain fp16 graph has non-standard ops {contrib}: TensorRT cannot parse it")
    ops = count_ops(dst)
    return {"standard_ops_only": True, "LayerNormalization": ops.get("LayerNormalization", 0),
            "MatMul": ops.get("MatMul", 0), "Softmax": ops.get("Softmax", 0)}


def check_fusion(ops: dict, info: dict, allow_unfused: bool = False) -> None:
    """UsageError (one line naming the onnxruntime version) when an encoder graph whose fusion we
    know did not fuse: Attention count != number of layers, or no EmbedLayerNormalization."""
    a = arch(info.get("model_type"))
    want = a.fused if a else ()
    if not want or allow_unfused:
        return
    layers = info["num_layers"]
    missing = []
    if "Attention" in want and ops.get("Attention", 0) != layers:
        missing.append(f"{ops.get('Attention', 0)} Attention for {layers} layers")
    if "EmbedLayerNormalization" in want and ops.get("EmbedLayerNormalization", 0) < 1:
        missing.append("no EmbedLayerNormalization")
    if missing:
        import onnxruntime

        raise UsageError(f"onnxruntime {onnxruntime.__version__} did not fuse the {info['model_type']} graph "
                         f"({', '.join(missing)}): install onnxruntime>=1.31 (see constraints.txt), or pass "
                         f"--allow-unfused to keep the unfused, slower graph")


def fuse(src: Path, dst: Path, info: dict, fp16: bool = False) -> dict:
    """ONNX Runtime transformer fusion (and optionally fp16 conversion); returns fused op counts.

    A partial fusion (e.g. MPNet's relative attention bias keeps Attention unfused) is not an
    error: the graph stays valid and the counts say what was fused.
    """
    from onnxruntime.transformers.optimizer import optimize_model

    model_type = (arch(info["model_type"]) or arch("bert")).ort_type
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = optimize_model(str(src), model_type=model_type, num_heads=info["num_heads"],
                             hidden_size=info["hidden_size"], opt_level=0)
        if fp16:
            # fp32 inputs/outputs stay (ids are int64 anyway; logits come back as fp32)
            opt.convert_float_to_float16(keep_io_types=True)
    opt.save_model_to_file(str(dst))
    ops = count_ops(dst)
    return {op: ops.get(op, 0) for op in FUSED_OPS}
