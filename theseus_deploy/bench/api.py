"""`run_bench(cfg)`: resolve models and backends, get each backend's artifact, sweep, traffic, report, gate.

What is timed is what ships: an export folder (manifest.json) is timed as it is, its own
artifacts (listed, confined, sha256-checked by theseus_deploy.artifact), with the backends its
manifest holds unless --backend names some of them; nothing is re-exported. A model folder with
weights is exported on the fly for ONNX/TensorRT backends; a config-only folder (or --layers)
gets random weights first, and only then does the report say "random weights". results.json
records the sha256 of every artifact timed.
"""
from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
from pathlib import Path

from tqdm.auto import tqdm

from theseus_deploy import config as C
from theseus_deploy.artifact import ExportFolder, is_export_folder
from theseus_deploy.data import load_task
from theseus_deploy.errors import UsageError
from theseus_deploy.export.api import export_model
from theseus_deploy.export.validate import ValidationError
from theseus_deploy.hf import (build_random_classifier, check_fine_tuned, check_model_source, check_tokenizer_fits, load_config,
                               load_tokenizer, max_positions)
from theseus_deploy.io import (atomic_output_dir, check_output_dir, check_output_file, locks_output, sha256_file,
                               write_json)
from theseus_deploy.registry import BACKENDS, export_format
from theseus_deploy.runtime import load_runner, precheck

from . import gate as G
from .env import environment
from .gate import load_baseline
from .report import markdown, plots, write_csv
from .sweep import Entry, run_sweep, speedups
from .traffic import run_traffic


def parse_ints(text: str, flag: str) -> list[int]:
    try:
        vals = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{flag} takes comma-separated integers, got '{text}'") from None
    if not vals or min(vals) < 1:
        raise UsageError(f"{flag} needs positive integers, got '{text}'")
    twice = repeated(vals)
    if twice:  # a value twice was run twice and reported twice (loadtest: each row with both runs summed)
        raise UsageError(f"{flag} lists {', '.join(map(str, twice))} more than once: give each value once")
    return vals


def repeated(values) -> list:
    """The values that occur more than once in `values`, sorted."""
    values = list(values)
    return sorted({v for v in values if values.count(v) > 1})


def _has_weights(path: Path) -> bool:
    return any(path.glob("*.safetensors")) or any(path.glob("*.bin"))


def resolve_models(models, layers, workdir: Path) -> list[dict]:
    """Each --model as a folder with weights, or an export folder timed as it is; config-only
    folders (or --layers) get random weights."""
    if len(models) < 1:
        raise UsageError("give at least one --model (the first is the predecessor)")
    if layers and len(layers) not in (1, len(models)):
        raise UsageError(f"--layers: give one value, or one per --model ({len(models)}), got {len(layers)}")
    out = []
    for i, m in enumerate(models):
        source = check_model_source(m)
        n = layers[i] if len(layers) == len(models) else (layers[0] if layers else None)
        local = Path(source)
        export = ExportFolder.read(local) if local.is_dir() and is_export_folder(local) else None
        if export is not None and n is not None:
            raise UsageError(f"--layers builds random weights; {m} is an export folder, timed as it is")
        config = load_config(m)
        check_tokenizer_fits(m, config, load_tokenizer(m))  # a broken or too large tokenizer: refused before any timing
        random_init = export is None and (n is not None or (local.is_dir() and not _has_weights(local)))
        if export is None and not random_init:  # a bare encoder's weights would be timed with a new random head
            check_fine_tuned(m, config, "--model", "bench times a fine-tuned classifier: fine-tune it first "
                             "(theseus-deploy finetune), or give --layers N to time random weights of its architecture")
        tag = f"{local.name if local.is_dir() else m.split('/')[-1]}-L{n or config.num_hidden_layers}"
        path = source
        if random_init:
            folder = workdir / "models" / f"{i}-{tag}"
            model = build_random_classifier(m, n, num_labels=config.num_labels if config.num_labels else 2)
            model.save_pretrained(folder)
            load_tokenizer(m).save_pretrained(folder)
            path, config = str(folder), model.config
        role = "predecessor" if i == 0 else ("successor" if len(models) == 2 else f"successor-{i}")
        out.append({"tag": tag, "path": path, "source": m, "random_init": random_init, "role": role, "config": config,
                    "export": export})
    tags = [o["tag"] for o in out]
    for o in out:
        if tags.count(o["tag"]) > 1:
            o["tag"] = f"{o['role']}-{o['tag']}"
    return out


def check_backends(backends, device: str):
    """Refuse, before any work, a backend that cannot run on `device` here (runner prechecks)."""
    for b in backends:
        if b not in BACKENDS:
            raise UsageError(f"unknown backend '{b}': choose from {', '.join(BACKENDS)}")
    for b in backends:
        precheck(b, device)


def model_backends(spec: dict, asked: list, device: str) -> list:
    """The backends timed for one model: an export folder's own (those --backend names, else every
    one its manifest holds that runs on `device`); a model folder: --backend, default torch."""
    export = spec["export"]
    if export is None:
        return asked or ["torch"]
    have = export.backends
    if asked:
        missing = [b for b in asked if b not in have]
        if missing:
            raise UsageError(f"{spec['source']} is an export folder; its manifest holds no artifact for "
                             f"{', '.join(missing)} (it holds: {', '.join(have) or 'none'}): time its own backends, "
                             "or give the model folder to export on the fly")
        return asked
    runnable = [b for b in have if device in BACKENDS[b].devices]
    if not runnable:
        raise UsageError(f"{spec['source']}: no artifact of its manifest ({', '.join(export.formats) or 'none'}) "
                         f"runs on --device {device}")
    return runnable


def bench_inputs(cfg) -> list:
    """What a bench reads: its outputs may not be (or lie inside) any of these."""
    return [*cfg.models, cfg.check, cfg.data_dir, cfg.train_file, cfg.validation_file]


def baseline_protected(cfg) -> list:
    """--update-baseline: the inputs, and the --output folder (replaced whole by the next --overwrite,
    and holding a config.json, so it must not be named "the model folder")."""
    return [*bench_inputs(cfg), (cfg.output, "the --output folder, which --overwrite replaces whole")]


@locks_output("cfg.update_baseline", what="--update-baseline", protected=baseline_protected)
@locks_output("cfg.output", protected=bench_inputs)
def run_bench(cfg, show_progress: bool = True) -> dict:
    """The whole bench of a BenchConfig; returns results.json's content (with `gate` when --check)."""
    asked = list(dict.fromkeys(cfg.backends))
    bs, ss = parse_ints(cfg.batch_sizes, "--batch-sizes"), parse_ints(cfg.seq_lens, "--seq-lens")
    check_backends(asked or ["torch"], cfg.device)
    if cfg.check is not None:  # the baseline is read (and refused) now, not after the bench ran
        load_baseline(cfg.check)
        if cfg.rounds < G.MIN_ROUNDS:
            raise UsageError(f"--check needs --rounds {G.MIN_ROUNDS} or more (got {cfg.rounds}): with fewer paired "
                             "rounds the gate cannot tell a regression from noise")
    task, train_file = cfg.task, cfg.train_file
    check_output_dir(cfg.output, cfg.overwrite, protected=bench_inputs(cfg))
    if cfg.update_baseline is not None:  # the same rules as --output (inputs, --overwrite, atomic, lock), checked now
        check_output_file(cfg.update_baseline, cfg.overwrite, protected=baseline_protected(cfg),
                          what="--update-baseline")
    work = Path(tempfile.mkdtemp(prefix="theseus-bench-"))
    try:
        specs = resolve_models(list(cfg.models), list(cfg.layers), work)
        for sp in specs:
            sp["backends"] = model_backends(sp, asked, cfg.device)
            check_backends(sp["backends"], cfg.device)
        backends = list(dict.fromkeys(b for sp in specs for b in sp["backends"]))
        static_kw = {}
        builds_static = any(sp["export"] is None and "onnx-int8-static" in sp["backends"] for sp in specs)
        if builds_static:  # calibration texts: the training split of --calibration-task / --task
            cal = cfg.calibration
            if not (cal.task or task):
                raise UsageError("backend onnx-int8-static needs calibration texts: give --calibration-task (or --task)")
            static_kw = {"calibration_task": cal.task or task, "calibration_samples": cal.samples, "data_dir": cfg.data_dir}
            if static_kw["calibration_task"] == "custom":  # the user's files: the texts the traffic times
                static_kw.update(calibration_file=train_file or cfg.validation_file,
                                 calibration_text_columns=cfg.text_columns)
        data = None
        if task:
            if task == "custom" and not train_file:
                train_file = cfg.validation_file  # only the texts are timed: the labels need no training file
            data = load_task(task, cfg.data_dir, "dev", cfg.max_eval_samples, train_file, cfg.validation_file,
                             cfg.text_columns, cfg.label_column)
        return _bench(cfg, specs, backends, bs, ss, data, static_kw, work, show_progress)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _bench(cfg, specs, backends, bs, ss, data, static_kw, work, show_progress) -> dict:
    import torch

    threads, device, traffic_cfg = cfg.threads, cfg.device, cfg.traffic
    if threads:
        torch.set_num_threads(threads)
    max_seq = max(ss + ([traffic_cfg.max_length] if data else []))
    for sp in specs:
        cfg_max = max_positions(sp["config"]) or max_seq
        if max_seq > cfg_max:
            raise UsageError(f"--seq-lens {max_seq} exceeds what {sp['tag']} supports ({cfg_max})")
        if sp["export"] is not None:
            prof = (sp["export"].manifest.get("profile") or {}).get("max")
            if prof and (max(bs + ([traffic_cfg.batch_size] if data else [])) > prof[0] and "trt" in sp["backends"]
                         or max_seq > prof[1]):
                raise UsageError(f"{sp['source']}: the shapes asked for exceed the export's profile "
                                 f"(max batch {prof[0]}, sequence {prof[1]})")
    entries, artifacts = [], []
    for sp in specs:
        formats = list(dict.fromkeys(export_format(b) for b in sp["backends"] if export_format(b)))
        folder = sp["export"].path if sp["export"] is not None else None
        built = False
        if formats and folder is None:
            folder = work / "artifacts" / sp["tag"]
            try:
                export_model(C.ExportConfig.of(model=sp["path"], formats=tuple(formats), output=str(folder),
                                               max_batch_size=max(bs + [traffic_cfg.batch_size]), max_seq_length=max_seq,
                                               threads=threads, **static_kw))
            except ValidationError as e:  # bench times only what validates: one line, as `export` says it
                raise UsageError(f"{sp['source']}: the artifact bench built failed validation against PyTorch, nothing "
                                 f"written ({e}); to time it anyway, export it with `theseus-deploy export --atol X` (--task T checks "
                                 "the dev set too) and pass the export folder as --model") from None
            built = True
        for b in sp["backends"]:
            if export_format(b) is None:
                runner = load_runner(sp["path"], b, device, threads, seq_bucket=cfg.seq_bucket)
            else:
                runner = load_runner(str(folder), b, device, threads, session_config=cfg.ort_session)
                runner.vocab_size = sp["config"].vocab_size
                art = ExportFolder.read(folder).artifact(export_format(b))
                artifacts.append({"model": sp["tag"], "backend": b, "format": art.format, "file": art.file,
                                  "sha256": sha256_file(runner.path if hasattr(runner, "path") else folder / art.file),
                                  "manifest_sha256": art.sha256,
                                  "source": "built by bench" if built else f"export folder {sp['source']}"})
            entries.append(Entry(sp["tag"], sp["role"], b, runner, sp["config"]))
    shapes = [(b, s) for b in bs for s in ss]
    compiled = {}
    for e in entries:  # torch-compile*: compile every bucket of the sweep now, not in a timed call
        if hasattr(e.runner, "compiled_buckets"):
            t = time.time()
            compiled[e.key] = {"buckets": [list(x) for x in e.runner.warmup(shapes)],
                               "compile_seconds": round(time.time() - t, 1),
                               "cudagraph_skipped": [list(x) for x in e.runner.cudagraph_skipped]}
    total = len(shapes) * cfg.rounds * len(entries) + (2 * len(entries) * traffic_cfg.rounds if data else 0)
    progress = tqdm(total=total, desc="bench", disable=not show_progress, dynamic_ncols=True)
    t0 = time.time()
    cells = run_sweep(entries, shapes, device, cfg.warmup, cfg.iterations, cfg.min_seconds, cfg.rounds, progress)
    traffic = None
    if data is not None:
        traffic = run_traffic(entries, load_tokenizer(specs[0]["path"]), data.texts, traffic_cfg.batch_size,
                              traffic_cfg.max_length, traffic_cfg.rounds, progress)
    progress.close()
    for e in entries:  # traffic's warm-up may have compiled more buckets (its padded widths)
        if e.key in compiled:
            compiled[e.key]["buckets"] = [list(x) for x in e.runner.compiled_buckets]
            compiled[e.key]["cudagraph_skipped"] = [list(x) for x in e.runner.cudagraph_skipped]
    config = {"models": list(cfg.models), "layers": list(cfg.layers), "backends": backends, "device": device,
              "batch_sizes": bs, "seq_lens": ss, "warmup": cfg.warmup, "iterations": cfg.iterations,
              "min_seconds": cfg.min_seconds, "rounds": cfg.rounds, "threads": threads or torch.get_num_threads(),
              "task": cfg.task, "data_dir": cfg.data_dir, "max_eval_samples": cfg.max_eval_samples,
              "traffic_batch_size": traffic_cfg.batch_size, "traffic_max_length": traffic_cfg.max_length,
              "traffic_rounds": traffic_cfg.rounds,
              "check": cfg.check, "tolerance": cfg.tolerance, "seq_bucket": cfg.seq_bucket, "ort_session": cfg.ort_session,
              "calibration": static_kw or None}
    models = []
    for s in specs:
        rec = {k: v for k, v in s.items() if k not in ("config", "export")}
        rec["config"] = s["config"].to_dict()
        rec["export_folder"] = s["export"] is not None
        models.append(rec)
    results = {"config": config, "environment": environment(threads), "models": models, "artifacts": artifacts,
               "cells": cells, "speedups": speedups(entries, shapes), "traffic": traffic,
               "compiled": compiled or None, "seconds": round(time.time() - t0, 1)}
    if cfg.check:
        results["gate"] = {"baseline": cfg.check, "tolerance": cfg.tolerance, "test": f"sign test, alpha {G.ALPHA}",
                           **G.check(results, cfg.check, cfg.tolerance), "ratios": G.ratios(results)}
    with atomic_output_dir(cfg.output, cfg.overwrite, protected=cfg.models) as tmp:
        write_json(tmp / "results.json", results)
        write_csv(cells, tmp / "results.csv")
        (tmp / "report.md").write_text(markdown(results))
        results["plots"] = plots(results, tmp)
        if not results["plots"]:
            with open(tmp / "report.md", "a") as f:
                f.write("\nNo plots: matplotlib is not installed (python -m theseus_deploy.bench.report "
                        "results.json DIR draws them elsewhere).\n")
        write_json(tmp / "config.json", config)
        write_json(tmp / "run_config.json", {**C.to_dict(dataclasses.replace(cfg, threads=config["threads"])), "command": "bench"})
    if cfg.update_baseline is not None:
        write_json(cfg.update_baseline, G.baseline_from(results))
    return results

