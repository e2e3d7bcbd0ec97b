"""`export_model`: a declarative map from format to build steps, validation and manifest.

    onnx       fp32 graph (dynamic batch/sequence) -> ORT transformer fusion
    onnx-int8  dynamic INT8 quantisation of the fused fp32 graph (CPU)
    onnx-int8-static  static INT8 (QDQ or QOperator), activation scales calibrated on training texts
    onnx-fp16  fused graph converted to fp16, fp32 I/O (ONNX Runtime's CUDA execution provider)
    onnx-fp16-trt  the UNfused graph in fp16 (layer norm fp32): standard ops only, for TensorRT
               (the fused graph's com.microsoft ops are unknown to TensorRT's parser)
    trt        TensorRT engine built from onnx-fp16-trt with one optimisation profile
    torch-bf16 nothing to write: PyTorch bf16 (AMX CPUs) validated like an artifact
    torch-compile, torch-compile-bf16
               load-time only, nothing written: torch.compile (Inductor on CPU) validated like an
               artifact; the compiled graph lives in the process that loads the model
Everything is built in a temporary folder and renamed into place only when every format was
built and validated, so a failed export leaves nothing behind.
"""
from __future__ import annotations

import platform
import shutil
import time
from pathlib import Path

from theseus_deploy.errors import UsageError
from theseus_deploy.io import locks_output, sha256_file as _sha256

from theseus_deploy.artifact import write_manifest
from theseus_deploy.registry import FORMATS
from theseus_deploy.runtime import CompiledRunner, OrtRunner, TorchRunner, TrtRunner, torch_runner

FILES = {name: f.file for name, f in FORMATS.items() if f.file}


def max_opset() -> int:
    """The highest opset both the installed onnx and torch's TorchScript exporter (the one we use) support."""
    import onnx

    try:
        from torch.onnx._constants import ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET as torch_max
    except ImportError:  # private constant moved: onnx's own limit still applies
        torch_max = 10 ** 6
    return min(onnx.defs.onnx_opset_version(), torch_max)


def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt", "theseus-deploy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


@locks_output("output")
def export_model(model_dir: str, formats, output: str, opset: int = 17, max_batch_size: int = 32,
                 max_seq_length: int = 512, opt_batch_size: int | None = None, opt_seq_length: int | None = None,
                 validate: bool = True, atol: float | None = None, task: str | None = None,
                 data_dir: str | None = None, max_eval_samples: int | None = None, overwrite: bool = False,
                 threads: int | None = None, max_task_drop: float = 0.01, int8_per_channel: bool = True,
                 int8_reduce_range: bool = False, allow_unfused: bool = False, calibration_task: str | None = None,
                 calibration_file: str | None = None, calibration_text_columns: str | None = None,
                 calibration_samples: int = 256, calibration_seq_length: int | None = None,
                 int8_static_format: str = "qdq", int8_static_attention: str = "dynamic") -> dict:
    from theseus_deploy.hf import check_model_source, load_classifier, load_config, load_tokenizer, max_positions
    from theseus_deploy.io import atomic_output_dir, check_output_dir, write_json

    from .trt import Profile, check_trt_available

    formats = list(dict.fromkeys(formats))
    if not formats:
        raise UsageError(f"no --format given ({', '.join(FORMATS)})")
    for f in formats:
        if f not in FORMATS:
            raise UsageError(f"unknown format '{f}': choose from {', '.join(FORMATS)}")
    if "triton" in formats:
        raise UsageError("--format triton is written by theseus_deploy.export.triton.export_repository "
                         "(`theseus-deploy export --format triton`), not by export_model")
    if opset < 17:
        raise UsageError(f"--opset must be 17 or higher (fused attention needs it), got {opset}")
    if opset > max_opset():
        raise UsageError(f"--opset {opset} is above what the installed onnx/torch exporter supports ({max_opset()})")
    # Everything that can fail on bad input fails here, before any file is written.
    check_model_source(model_dir)
    config = load_config(model_dir)
    profile = Profile.from_flags(max_batch_size, min(max_seq_length, max_positions(config) or max_seq_length),
                                 opt_batch_size, opt_seq_length)
    if "trt" in formats:
        check_trt_available()
    for f in formats:
        if f.startswith("torch-compile"):
            CompiledRunner.precheck(f, "cpu")  # a C++ compiler for Inductor; bf16 CPU features
    calibration = None
    if "onnx-int8-static" in formats:  # calibration texts: checked before anything is written
        from .calibration import load_calibration

        calib_seq = min(calibration_seq_length or 128, profile.max[1])
        calib_texts, calibration = load_calibration(calibration_task or task, data_dir, calibration_file,
                                                    calibration_text_columns, calibration_samples)
        calibration.update({"seq_length": calib_seq, "batch_size": 1, "method": "minmax"})
    elif calibration_task or calibration_file:
        raise UsageError("--calibration-task / --calibration-file only apply to --format onnx-int8-static")
    check_output_dir(output, overwrite, protected=[model_dir, data_dir, calibration_file])
    # The model and tokenizer load (and are checked: weights match the config, finite) before any file is written.
    reference_model, tokenizer = load_classifier(model_dir), load_tokenizer(model_dir)
    data = None
    if task:
        from theseus_deploy.data import label_mapping, load_task

        data = load_task(task, data_dir, "dev", max_eval_samples)
        mapping = label_mapping(data.spec, config)
        if mapping is not None:
            data.labels = mapping[data.labels]

    from .onnx import check_fusion, export_onnx, fuse, plain_fp16
    from .ort import quantize_int8
    from .validate import check_task_drop, shapes_for, task_metric
    from .validate import validate as check

    todo = []
    for f in formats:  # dependencies first
        todo += [d for d in FORMATS[f].needs if d not in todo] + ([f] if f not in todo else [])
    manifest = {"source_model": str(Path(model_dir).resolve()) if Path(model_dir).exists() else model_dir,
                "model_type": config.model_type, "num_layers": config.num_hidden_layers,
                "opset": opset, "profile": profile.as_dict(), "artifacts": [], "versions": _versions(),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    with atomic_output_dir(output, overwrite, protected=[model_dir, data_dir]) as tmp:
        raw = tmp / "_raw.onnx"
        info = export_onnx(model_dir, raw, opset)
        manifest["input_names"], manifest["output_names"] = info["input_names"], info["output_names"]
        reference = TorchRunner(reference_model, "torch", "cpu", threads)
        if data is not None:
            manifest["task"] = {"name": data.spec.name, "split": "dev", "num_examples": len(data),
                                "pytorch": task_metric(reference, tokenizer, data, max_seq_length=min(128, profile.max[1]))}
        for fmt in todo:
            t0 = time.time()
            entry = {"format": fmt, "file": FILES.get(fmt)}
            if fmt in ("onnx", "onnx-fp16"):
                entry["fused_ops"] = fuse(raw, tmp / FILES[fmt], info, fp16=fmt == "onnx-fp16")
                check_fusion(entry["fused_ops"], info, allow_unfused)
            elif fmt == "onnx-fp16-trt":
                entry["ops"] = plain_fp16(raw, tmp / FILES[fmt])
            elif fmt == "onnx-int8":
                entry["quantized_ops"] = quantize_int8(tmp / FILES["onnx"], tmp / FILES[fmt], int8_per_channel,
                                                       int8_reduce_range)
                entry["quantization"] = {"mode": "dynamic", "weights": "int8",
                                         "per_channel": int8_per_channel, "reduce_range": int8_reduce_range}
            elif fmt == "onnx-int8-static":
                from .ort import calibration_feeds, quantize_int8_static

                feeds = calibration_feeds(tokenizer, calib_texts, info["input_names"], calibration["seq_length"])
                entry["quantized_ops"] = quantize_int8_static(tmp / FILES["onnx"], tmp / FILES[fmt], feeds,
                                                              int8_static_format, int8_per_channel, int8_static_attention)
                entry["quantization"] = {"mode": "static", "format": int8_static_format, "weights": "int8",
                                         "activations": "uint8", "per_channel": int8_per_channel,
                                         "attention": int8_static_attention, "calibration": calibration}
            elif fmt == "trt":
                from .trt import build_engine

                entry.update(build_engine(tmp / FILES["onnx-fp16-trt"], tmp / FILES[fmt], info["input_names"], profile))
            entry["build_seconds"] = round(time.time() - t0, 2)
            runner = None
            if fmt.startswith("torch-"):
                runner = torch_runner(load_classifier(model_dir), fmt, "cpu", threads)
            elif fmt == "trt":
                runner = TrtRunner(tmp / FILES[fmt], vocab_size=config.vocab_size)
            else:
                runner = OrtRunner(tmp / FILES[fmt], fmt, "cpu", threads, config.vocab_size)
            if validate:
                entry["validation"] = {"shapes": check(reference, runner, fmt, shapes_for(*profile.max), atol)}
                if data is not None:
                    m = task_metric(runner, tokenizer, data, max_seq_length=min(128, profile.max[1]))
                    ref_score = manifest["task"]["pytorch"]["score"]
                    entry["validation"]["task"] = {**m, "delta_vs_pytorch": m["score"] - ref_score}
                    check_task_drop(fmt, m["score"], ref_score, max_task_drop)
            if entry["file"]:
                p = tmp / entry["file"]
                entry["bytes"], entry["sha256"] = p.stat().st_size, _sha256(p)
            manifest["artifacts"].append(entry)
        raw.unlink()
        # Keep only what was asked for (a dependency built on the way is dropped unless requested).
        keep = [a for a in manifest["artifacts"] if a["format"] in formats]
        for a in manifest["artifacts"]:
            if a not in keep and a["file"]:
                (tmp / a["file"]).unlink()
        manifest["artifacts"] = keep
        # The folder is self-contained: config and tokenizer beside the artifacts.
        src = Path(check_model_source(model_dir))
        if src.is_dir():
            for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json",
                         "merges.txt", "vocab.json"):
                if (src / name).is_file():
                    shutil.copy(src / name, tmp / name)
        else:
            config.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        manifest = write_manifest(tmp, manifest)
    return manifest
