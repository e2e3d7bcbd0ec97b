"""`export_model`: a declarative map from format to build steps, validation and manifest.

    onnx       fp32 graph (dynamic batch/sequence) -> ORT transformer fusion
    onnx-int8  dynamic INT8 quantisation of the fused fp32 graph (CPU)
    onnx-fp16  fused graph converted to fp16, fp32 I/O (ONNX Runtime's CUDA execution provider)
    onnx-fp16-trt  the UNfused graph in fp16 (layer norm fp32): standard ops only, for TensorRT
               (the fused graph's com.microsoft ops are unknown to TensorRT's parser)
    trt        TensorRT engine built from onnx-fp16-trt with one optimisation profile
    torch-bf16 nothing to write: PyTorch bf16 (AMX CPUs) validated like an artifact
Everything is built in a temporary folder and renamed into place only when every format was
built and validated, so a failed export leaves nothing behind.
"""
from __future__ import annotations

import hashlib
import platform
import shutil
import time
from pathlib import Path

from theseus_deploy.errors import UsageError

from theseus_deploy.registry import FORMATS

FILES = {name: f.file for name, f in FORMATS.items() if f.file}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt", "theseus-deploy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def export_model(model_dir: str, formats, output: str, opset: int = 17, max_batch_size: int = 32,
                 max_seq_length: int = 512, opt_batch_size: int | None = None, opt_seq_length: int | None = None,
                 validate: bool = True, atol: float | None = None, task: str | None = None,
                 data_dir: str | None = None, max_eval_samples: int | None = None, overwrite: bool = False,
                 threads: int | None = None, max_task_drop: float = 0.01, int8_per_channel: bool = True,
                 int8_reduce_range: bool = False) -> dict:
    from theseus_deploy.hf import check_model_source, load_config
    from theseus_deploy.io import atomic_output_dir, check_output_dir, write_json

    from .trt import Profile, check_trt_available

    formats = list(dict.fromkeys(formats))
    if not formats:
        raise UsageError(f"no --format given ({', '.join(FORMATS)})")
    for f in formats:
        if f not in FORMATS:
            raise UsageError(f"unknown format '{f}': choose from {', '.join(FORMATS)}")
    if "triton" in formats:
        raise UsageError("--format triton is written by theseus_deploy.serve.repository.export_repository "
                         "(`theseus-deploy export --format triton`), not by export_model")
    if opset < 17:
        raise UsageError(f"--opset must be 17 or higher (fused attention needs it), got {opset}")
    # Everything that can fail on bad input fails here, before any file is written.
    check_model_source(model_dir)
    config = load_config(model_dir)
    profile = Profile.from_flags(max_batch_size, min(max_seq_length, getattr(config, "max_position_embeddings", 512)),
                                 opt_batch_size, opt_seq_length)
    if "trt" in formats:
        check_trt_available()
    check_output_dir(output, overwrite)
    data = None
    if task:
        from theseus_deploy.data import label_mapping, load_task

        data = load_task(task, data_dir, "dev", max_eval_samples)
        mapping = label_mapping(data.spec, config)
        if mapping is not None:
            data.labels = mapping[data.labels]

    from .onnx import export_onnx, fuse, plain_fp16
    from .ort import quantize_int8
    from .runtime import OrtRunner, TorchRunner
    from .validate import check_task_drop, shapes_for, task_metric
    from .validate import validate as check

    todo = []
    for f in formats:  # dependencies first
        todo += [d for d in FORMATS[f].needs if d not in todo] + ([f] if f not in todo else [])
    manifest = {"source_model": str(Path(model_dir).resolve()) if Path(model_dir).exists() else model_dir,
                "model_type": config.model_type, "num_layers": config.num_hidden_layers,
                "opset": opset, "profile": profile.as_dict(), "artifacts": [], "versions": _versions(),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    with atomic_output_dir(output, overwrite) as tmp:
        raw = tmp / "_raw.onnx"
        info = export_onnx(model_dir, raw, opset)
        manifest["input_names"], manifest["output_names"] = info["input_names"], info["output_names"]
        from theseus_deploy.hf import load_classifier, load_tokenizer

        reference = TorchRunner(load_classifier(model_dir), "torch", "cpu", threads)
        tokenizer = load_tokenizer(model_dir)
        if data is not None:
            manifest["task"] = {"name": data.spec.name, "split": "dev", "num_examples": len(data),
                                "pytorch": task_metric(reference, tokenizer, data, max_seq_length=min(128, profile.max[1]))}
        for fmt in todo:
            t0 = time.time()
            entry = {"format": fmt, "file": FILES.get(fmt)}
            if fmt == "onnx":
                entry["fused_ops"] = fuse(raw, tmp / FILES[fmt], info)
            elif fmt == "onnx-fp16":
                entry["fused_ops"] = fuse(raw, tmp / FILES[fmt], info, fp16=True)
            elif fmt == "onnx-fp16-trt":
                entry["ops"] = plain_fp16(raw, tmp / FILES[fmt])
            elif fmt == "onnx-int8":
                entry["quantized_ops"] = quantize_int8(tmp / FILES["onnx"], tmp / FILES[fmt], int8_per_channel,
                                                       int8_reduce_range)
                entry["quantization"] = {"mode": "dynamic", "weights": "int8",
                                         "per_channel": int8_per_channel, "reduce_range": int8_reduce_range}
            elif fmt == "trt":
                from .trt import build_engine

                entry.update(build_engine(tmp / FILES["onnx-fp16-trt"], tmp / FILES[fmt], info["input_names"], profile))
            entry["build_seconds"] = round(time.time() - t0, 2)
            runner = None
            if fmt == "torch-bf16":
                runner = TorchRunner(load_classifier(model_dir), "torch-bf16", "cpu", threads)
            elif fmt == "trt":
                from .trt import TrtRunner

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
        write_json(tmp / "manifest.json", manifest)
    return manifest
