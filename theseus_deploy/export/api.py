"""`export_model(cfg)`: build every format of the config (its builder, theseus_deploy/export/formats.py),
validate each against PyTorch (its backend's runner), and write the manifest (theseus_deploy/artifact.py).

Everything is built in a temporary folder and renamed into place only when every format was
built and validated, so a failed export leaves nothing behind. Which formats exist, what builds
them and what validates them is the registry's (theseus_deploy/registry.py); nothing here names
a format.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata as md
import platform
import shutil
import time
from pathlib import Path

from theseus_deploy import config as C
from theseus_deploy.artifact import write_manifest
from theseus_deploy.data import label_mapping, load_task, positive_id
from theseus_deploy.errors import UsageError
from theseus_deploy.hf import (check_fine_tuned, check_max_seq_length, check_model_source, check_tokenizer_fits, load_classifier,
                               load_config, load_tokenizer, max_positions)
from theseus_deploy.io import atomic_output_dir, check_output_dir, locks_output, write_json
from theseus_deploy.io import sha256_file as _sha256
from theseus_deploy.loyalty import loyalty
from theseus_deploy.metrics import compute_metrics
from theseus_deploy.registry import FORMATS
from theseus_deploy.runtime import TorchRunner, precheck

from .formats import BuildContext, check_calibration_flags
from .onnx import export_onnx
from .trt import Profile
from .validate import check_loyalty, check_task_drop, shapes_for, task_logits
from .validate import validate as check

DEFAULT_MAX_SEQ_LENGTH = 512  # export's --max-seq-length when none is given (capped at the position table)


def max_opset() -> int:
    """The highest opset both the installed onnx and torch's TorchScript exporter (the one we use) support."""
    import onnx

    try:
        from torch.onnx._constants import ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET as torch_max
    except ImportError:  # private constant moved: onnx's own limit still applies
        torch_max = 10 ** 6
    return min(onnx.defs.onnx_opset_version(), torch_max)


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt", "theseus-deploy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def _validation_device(backend) -> str:
    return "cpu" if "cpu" in backend.devices else backend.devices[0]


def _runner(fmt, path: Path | None, model_dir: str, cfg, vocab_size: int):
    """The validating runner of a format: its backend's runner over the new file (or the model)."""
    spec = fmt.validator
    cls, device = spec.runner_class(), _validation_device(spec)
    if fmt.file is None:
        return cls.open(spec, load_classifier(model_dir), device, cfg.threads)
    return cls.open(spec, path, device, threads=cfg.threads, vocab_size=vocab_size)


def export_inputs(cfg) -> list:
    """What an export reads: its output may not be (or lie inside) any of these."""
    return [cfg.model, cfg.data_dir, cfg.calibration.file]


@locks_output("cfg.output", protected=export_inputs)
def export_model(cfg) -> dict:
    """Export `cfg.model` to every format of `cfg.formats` (an ExportConfig) in `cfg.output`; returns the manifest."""
    model_dir, output, profile_cfg = cfg.model, cfg.output, cfg.profile
    formats = list(dict.fromkeys(cfg.formats))
    if not formats:
        raise UsageError(f"no --format given ({', '.join(FORMATS)})")
    for f in formats:
        if f not in FORMATS:
            raise UsageError(f"unknown format '{f}': choose from {', '.join(FORMATS)}")
    if cfg.opset < 17:
        raise UsageError(f"--opset must be 17 or higher (fused attention needs it), got {cfg.opset}")
    if cfg.opset > max_opset():
        raise UsageError(f"--opset {cfg.opset} is above what the installed onnx/torch exporter supports ({max_opset()})")
    # A loyalty limit is checked by the validation, on --task's dev set: without either it would check nothing.
    if cfg.min_loyalty > 0 and not cfg.task:
        raise UsageError(f"--min-loyalty needs --task: loyalty is measured on the task's dev set, without one "
                         f"--min-loyalty {cfg.min_loyalty:g} would check nothing")
    if cfg.min_loyalty > 0 and not cfg.validate:
        raise UsageError(f"--min-loyalty needs the validation (--validate, the default): with --no-validate "
                         f"--min-loyalty {cfg.min_loyalty:g} would check nothing")
    # Everything that can fail on bad input fails here, before any file is written.
    check_model_source(model_dir)
    config = load_config(model_dir)
    # Every format is a sequence-classification graph (output `logits`); there is no feature-extraction
    # export. A bare encoder got a new random head, and another one for the PyTorch reference: it failed
    # as "max abs diff 0.026 > atol 0.0001" after the transformers load report.
    check_fine_tuned(model_dir, config, "--model", "export builds a classifier's graph (output logits, no "
                     "feature-extraction export): fine-tune it on the task first (theseus-deploy finetune)")
    max_seq = profile_cfg.max_seq_length
    if max_seq is None:  # the default: 512, or the model's position limit when that is smaller
        max_seq = min(DEFAULT_MAX_SEQ_LENGTH, max_positions(config) or DEFAULT_MAX_SEQ_LENGTH)
    check_max_seq_length(config, max_seq)  # an explicit length above the position table: refused, not clipped
    profile = Profile.from_flags(profile_cfg.max_batch_size, max_seq, profile_cfg.opt_batch_size,
                                 profile_cfg.opt_seq_length)
    todo = []
    for f in formats:  # dependencies first
        todo += [d for d in FORMATS[f].needs if d not in todo] + ([f] if f not in todo else [])
    for f in todo:  # each validating backend can run here (compiler, CPU features, TensorRT ...)
        spec = FORMATS[f].validator
        precheck(spec.name, _validation_device(spec))
    ctx = BuildContext(cfg, Path(), profile)
    builders = {f: FORMATS[f].make_builder() for f in todo}
    check_calibration_flags(cfg, [b for b in builders.values() if b])
    for b in builders.values():
        if b:
            b.prepare(cfg, ctx)
    check_output_dir(output, cfg.overwrite, protected=export_inputs(cfg))
    # The model and tokenizer load (and are checked: weights match the config, finite) before any file is written.
    reference_model, tokenizer = load_classifier(model_dir), load_tokenizer(model_dir)
    check_tokenizer_fits(model_dir, config, tokenizer)
    ctx.tokenizer = tokenizer
    data = positive = None
    if cfg.task:
        data = load_task(cfg.task, cfg.data_dir, "dev", cfg.max_eval_samples)
        mapping = label_mapping(data.spec, config)
        if mapping is not None:
            data.labels = mapping[data.labels]
        positive = positive_id(data.spec, mapping)  # F1's class in the model's label ids, as evaluate scores it

    manifest = {"source_model": str(Path(model_dir).resolve()) if Path(model_dir).exists() else model_dir,
                "model_type": config.model_type, "num_layers": config.num_hidden_layers,
                "opset": cfg.opset, "profile": profile.as_dict(), "artifacts": [], "versions": _versions(),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    task_len = min(128, profile.max[1])
    with atomic_output_dir(output, cfg.overwrite, protected=[model_dir, cfg.data_dir]) as tmp:
        ctx.tmp, ctx.raw = tmp, tmp / "_raw.onnx"
        ctx.info = export_onnx(model_dir, ctx.raw, cfg.opset)
        manifest["input_names"], manifest["output_names"] = ctx.info["input_names"], ctx.info["output_names"]
        reference = TorchRunner(reference_model, "torch", "cpu", cfg.threads)
        if data is not None:
            ref_logits = task_logits(reference, tokenizer, data, max_seq_length=task_len)
            manifest["task"] = {"name": data.spec.name, "split": "dev", "num_examples": len(data),
                                "pytorch": compute_metrics(data.spec, ref_logits, data.labels, positive)}
        for name in todo:
            fmt, t0 = FORMATS[name], time.time()
            entry = {"format": name, "file": fmt.file}
            if builders[name]:
                entry.update(builders[name].build(ctx))
            entry["build_seconds"] = round(time.time() - t0, 2)
            runner = _runner(fmt, ctx.path(name) if fmt.file else None, model_dir, cfg, config.vocab_size)
            if cfg.validate:
                entry["validation"] = {"shapes": check(reference, runner, name, shapes_for(*profile.max), cfg.atol)}
                if data is not None:
                    got = task_logits(runner, tokenizer, data, max_seq_length=task_len)
                    m = compute_metrics(data.spec, got, data.labels, positive)
                    ref_score = manifest["task"]["pytorch"]["score"]
                    # loyalty: does the artifact decide like its PyTorch model, row by row (a score
                    # can hold while other rows flip)
                    loy = loyalty(got, ref_logits, data.spec.is_regression)
                    entry["validation"]["task"] = {**m, "delta_vs_pytorch": m["score"] - ref_score, "loyalty": loy}
                    check_task_drop(name, m["score"], ref_score, cfg.max_task_drop)
                    check_loyalty(name, loy, cfg.min_loyalty)
            if fmt.file:
                p = ctx.path(name)
                entry["bytes"], entry["sha256"] = p.stat().st_size, _sha256(p)
            manifest["artifacts"].append(entry)
        ctx.raw.unlink()
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
        # The resolved configuration beside the artifacts (not an artifact: the manifest does not list it).
        resolved = dataclasses.replace(cfg, formats=tuple(formats), profile=dataclasses.replace(profile_cfg, max_seq_length=max_seq))
        write_json(tmp / "run_config.json", {**C.to_dict(resolved), "command": "export"})
        manifest = write_manifest(tmp, manifest)
    return manifest
