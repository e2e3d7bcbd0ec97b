"""One builder per export format (named by its registry entry, theseus_deploy/registry.py).

A builder has two steps: `prepare(cfg, ctx)` runs before anything is written (everything that can
fail on bad input fails there: calibration texts, TensorRT present), and `build(ctx)` writes
`ctx.path(fmt)` from the exported graph and returns what the manifest records about it.

    onnx       fp32 graph (dynamic batch/sequence) -> ORT transformer fusion
    onnx-int8  dynamic INT8 quantisation of the fused fp32 graph (CPU)
    onnx-int8-static  static INT8 (QDQ or QOperator), activation scales calibrated on training texts
    onnx-fp16  fused graph converted to fp16, fp32 I/O (ONNX Runtime's CUDA execution provider)
    onnx-fp16-trt  the UNfused graph in fp16 (layer norm fp32): standard ops only, for TensorRT
               (the fused graph's com.microsoft ops are unknown to TensorRT's parser)
    trt        TensorRT engine built from onnx-fp16-trt with one optimisation profile
Load-time formats (torch-bf16, torch-compile*) have no builder: nothing is written, they are
validated like an artifact by their backend's runner.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from theseus_deploy.cpu import int8_dot_product, int8_reduce_range_default
from theseus_deploy.errors import UsageError
from theseus_deploy.registry import FORMATS
from theseus_deploy.runtime import check_trt_available

from .calibration import load_calibration
from .onnx import check_fusion, fuse, plain_fp16
from .ort import calibration_feeds, quantize_int8, quantize_int8_static
from .trt import build_engine


@dataclass
class BuildContext:
    """What every builder may read: the config, the temp folder, the raw graph, the tokenizer."""

    cfg: object                      # ExportConfig
    tmp: Path
    profile: object                  # export.trt.Profile
    tokenizer: object = None
    raw: Path | None = None          # the exported, unfused fp32 graph
    info: dict = field(default_factory=dict)  # input/output names of the raw graph
    state: dict = field(default_factory=dict)  # what `prepare` found (calibration texts ...)

    def path(self, fmt: str) -> Path:
        return self.tmp / FORMATS[fmt].file


class Builder:
    calibrated = False  # uses the --calibration-* texts

    def __init__(self, fmt):
        self.fmt = fmt

    def prepare(self, cfg, ctx: BuildContext) -> None:
        pass

    def build(self, ctx: BuildContext) -> dict:
        raise NotImplementedError


class FusedGraph(Builder):
    """onnx / onnx-fp16: ONNX Runtime's transformer fusion (fp16 when the entry's options say so)."""

    def build(self, ctx):
        ops = fuse(ctx.raw, ctx.path(self.fmt.name), ctx.info, fp16=bool(self.fmt.options.get("fp16")))
        check_fusion(ops, ctx.info, ctx.cfg.allow_unfused)
        return {"fused_ops": ops}


class PlainFp16(Builder):
    def build(self, ctx):
        return {"ops": plain_fp16(ctx.raw, ctx.path(self.fmt.name))}


class DynamicInt8(Builder):
    def build(self, ctx):
        q = ctx.cfg.int8
        if q.reduce_range is None:  # follow the CPU the artifact is built (and validated) on
            reduce_range, why = int8_reduce_range_default()
        else:
            reduce_range, why = q.reduce_range, ("--int8-reduce-range" if q.reduce_range else "--no-int8-reduce-range")
        ops = quantize_int8(ctx.path("onnx"), ctx.path(self.fmt.name), q.per_channel, reduce_range)
        return {"quantized_ops": ops, "quantization": {"mode": "dynamic", "weights": "int8",
                                                       "per_channel": q.per_channel, "reduce_range": reduce_range,
                                                       "reduce_range_chosen_by": why,
                                                       "built_on_cpu_int8": int8_dot_product() or ["none (AVX2 or older)"]}}


class StaticInt8(Builder):
    calibrated = True

    def prepare(self, cfg, ctx):
        cal = cfg.calibration
        texts, record = load_calibration(cal.task or cfg.task, cfg.data_dir, cal.file, cal.text_columns, cal.samples)
        record.update({"seq_length": min(cal.seq_length or 128, ctx.profile.max[1]), "batch_size": 1, "method": "minmax"})
        ctx.state["calibration"] = (texts, record)

    def build(self, ctx):
        texts, record = ctx.state["calibration"]
        q, s = ctx.cfg.int8, ctx.cfg.int8_static
        feeds = calibration_feeds(ctx.tokenizer, texts, ctx.info["input_names"], record["seq_length"])
        ops = quantize_int8_static(ctx.path("onnx"), ctx.path(self.fmt.name), feeds, s.format, q.per_channel, s.attention)
        return {"quantized_ops": ops,
                "quantization": {"mode": "static", "format": s.format, "weights": "int8", "activations": "uint8",
                                 "per_channel": q.per_channel, "attention": s.attention, "calibration": record}}


class TrtEngine(Builder):
    def prepare(self, cfg, ctx):
        check_trt_available()

    def build(self, ctx):
        return build_engine(ctx.path("onnx-fp16-trt"), ctx.path(self.fmt.name), ctx.info["input_names"], ctx.profile)


def check_calibration_flags(cfg, builders) -> None:
    """--calibration-* only mean something for a calibrated format."""
    if (cfg.calibration.task or cfg.calibration.file) and not any(b.calibrated for b in builders):
        names = ", ".join(f.name for f in FORMATS.values() if f.builder and f.make_builder().calibrated)
        raise UsageError(f"--calibration-task / --calibration-file only apply to --format {names}")
