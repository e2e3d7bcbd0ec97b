"""`run_bench`: resolve models and backends, build artifacts, sweep, traffic, report, gate."""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from theseus_deploy.errors import UsageError
from theseus_deploy.io import locks_output

from theseus_deploy.registry import BACKENDS, export_format


def parse_ints(text: str, flag: str) -> list[int]:
    try:
        vals = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{flag} takes comma-separated integers, got '{text}'") from None
    if not vals or min(vals) < 1:
        raise UsageError(f"{flag} needs positive integers, got '{text}'")
    return vals


def _has_weights(path: Path) -> bool:
    return any(path.glob("*.safetensors")) or any(path.glob("*.bin"))


def resolve_models(models, layers, workdir: Path) -> list[dict]:
    """Each --model as a folder with weights; config-only folders (or --layers) get random weights."""
    from theseus_deploy.hf import build_random_classifier, check_model_source, load_config, load_tokenizer

    if len(models) < 1:
        raise UsageError("give at least one --model (the first is the predecessor)")
    if layers and len(layers) not in (1, len(models)):
        raise UsageError(f"--layers: give one value, or one per --model ({len(models)}), got {len(layers)}")
    out = []
    for i, m in enumerate(models):
        source = check_model_source(m)
        n = layers[i] if len(layers) == len(models) else (layers[0] if layers else None)
        config = load_config(m)
        local = Path(source)
        random_init = n is not None or (local.is_dir() and not _has_weights(local))
        tag = f"{local.name if local.is_dir() else m.split('/')[-1]}-L{n or config.num_hidden_layers}"
        path = source
        if random_init:
            folder = workdir / "models" / f"{i}-{tag}"
            model = build_random_classifier(m, n, num_labels=config.num_labels if config.num_labels else 2)
            model.save_pretrained(folder)
            load_tokenizer(m).save_pretrained(folder)
            path, config = str(folder), model.config
        role = "predecessor" if i == 0 else ("successor" if len(models) == 2 else f"successor-{i}")
        out.append({"tag": tag, "path": path, "source": m, "random_init": random_init, "role": role, "config": config})
    tags = [o["tag"] for o in out]
    for o in out:
        if tags.count(o["tag"]) > 1:
            o["tag"] = f"{o['role']}-{o['tag']}"
    return out


def check_backends(backends, device: str):
    from theseus_deploy.runtime import check_device

    for b in backends:
        if b not in BACKENDS:
            raise UsageError(f"unknown backend '{b}': choose from {', '.join(BACKENDS)}")
    for b in backends:
        check_device(b, device)
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA GPU is visible on this machine")
    if any(b.startswith("torch-compile") for b in backends):
        from theseus_deploy.runtime import CompiledRunner

        for b in backends:
            if b.startswith("torch-compile"):
                CompiledRunner.precheck(b, device)
    if "trt" in backends:
        from theseus_deploy.runtime import check_trt_available

        check_trt_available()
    if device == "cuda":  # say it now, not after every model was exported
        from theseus_deploy.runtime import check_ort_provider

        for b in backends:
            if (BACKENDS[b].format or "").startswith("onnx"):
                check_ort_provider(b)


@locks_output("output")
def run_bench(models, output: str, layers=(), backends=("torch",), device: str = "cpu", batch_sizes="1,8,32",
              seq_lens="32,128,384", warmup: int = 3, iterations: int = 10, min_seconds: float = 0.5, rounds: int = 5,
              threads: int | None = None, check: str | None = None, tolerance: float = 0.1, task: str | None = None,
              data_dir: str | None = None, max_eval_samples: int | None = None, traffic_batch_size: int = 32,
              traffic_max_length: int = 128, traffic_rounds: int = 3, update_baseline: str | None = None,
              train_file: str | None = None, validation_file: str | None = None, text_columns: str | None = None,
              label_column: str | None = None, seq_bucket: int = 32, calibration_task: str | None = None,
              calibration_samples: int = 256, ort_session: str = "default",
              overwrite: bool = False, show_progress: bool = True) -> dict:
    from theseus_deploy.io import atomic_output_dir, check_output_dir, write_json

    backends = list(dict.fromkeys(backends or ["torch"]))
    bs, ss = parse_ints(batch_sizes, "--batch-sizes"), parse_ints(seq_lens, "--seq-lens")
    if iterations < 1 or rounds < 1 or warmup < 0:
        raise UsageError("--iterations and --rounds must be at least 1, --warmup at least 0")
    if not 0 <= tolerance < 1:
        raise UsageError(f"--tolerance must be in [0, 1), got {tolerance}")
    check_backends(backends, device)
    if check and not Path(check).is_file():
        raise UsageError(f"baseline not found: {check}")
    static_kw = {}
    if "onnx-int8-static" in backends:  # calibration texts: the training split of --calibration-task / --task
        if not (calibration_task or task):
            raise UsageError("backend onnx-int8-static needs calibration texts: give --calibration-task (or --task)")
        static_kw = {"calibration_task": calibration_task or task, "calibration_samples": calibration_samples,
                     "data_dir": data_dir}
        if static_kw["calibration_task"] == "custom":  # the user's files: the texts the traffic times
            static_kw.update(calibration_file=train_file or validation_file, calibration_text_columns=text_columns)
    check_output_dir(output, overwrite, protected=[*models, check, data_dir, train_file, validation_file])
    data = None
    if task:
        from theseus_deploy.data import load_task

        if task == "custom" and not train_file:
            train_file = validation_file  # only the texts are timed: the labels need no training file
        data = load_task(task, data_dir, "dev", max_eval_samples, train_file, validation_file, text_columns, label_column)

    import torch
    from tqdm.auto import tqdm

    from theseus_deploy.export.api import export_model
    from theseus_deploy.runtime import load_runner, torch_runner

    from . import gate as G
    from .env import environment
    from .report import markdown, plots, write_csv
    from .sweep import Entry, run_sweep, speedups
    from .traffic import run_traffic

    if threads:
        torch.set_num_threads(threads)
    work = Path(tempfile.mkdtemp(prefix="theseus-bench-"))
    try:
        specs = resolve_models(list(models), list(layers), work)
        max_seq = max(ss + ([traffic_max_length] if data else []))
        for sp in specs:
            from theseus_deploy.hf import max_positions

            cfg_max = max_positions(sp["config"]) or max_seq
            if max_seq > cfg_max:
                raise UsageError(f"--seq-lens {max_seq} exceeds what {sp['tag']} supports ({cfg_max})")
        entries = []
        onnx_formats = list(dict.fromkeys(export_format(b) for b in backends if export_format(b)))
        for sp in specs:
            art_dir = None
            if onnx_formats:
                art_dir = work / "artifacts" / sp["tag"]
                export_model(sp["path"], onnx_formats, str(art_dir), max_batch_size=max(bs + [traffic_batch_size]),
                             max_seq_length=max_seq, threads=threads, **static_kw)
            for b in backends:
                if export_format(b) is None:
                    from theseus_deploy.hf import load_classifier

                    runner = torch_runner(load_classifier(sp["path"]), b, device, threads, seq_bucket)
                else:
                    runner = load_runner(str(art_dir), b, device, threads, session_config=ort_session)
                    runner.vocab_size = sp["config"].vocab_size
                entries.append(Entry(sp["tag"], sp["role"], b, runner, sp["config"]))
        shapes = [(b, s) for b in bs for s in ss]
        compiled = {}
        for e in entries:  # torch-compile*: compile every bucket of the sweep now, not in a timed call
            if hasattr(e.runner, "compiled_buckets"):
                t = time.time()
                compiled[e.key] = {"buckets": [list(x) for x in e.runner.warmup(shapes)],
                                   "compile_seconds": round(time.time() - t, 1),
                                   "cudagraph_skipped": [list(x) for x in e.runner.cudagraph_skipped]}
        total = len(shapes) * rounds * len(entries) + (2 * len(entries) * traffic_rounds if data else 0)
        progress = tqdm(total=total, desc="bench", disable=not show_progress, dynamic_ncols=True)
        t0 = time.time()
        cells = run_sweep(entries, shapes, device, warmup, iterations, min_seconds, rounds, progress)
        traffic = None
        if data is not None:
            from theseus_deploy.hf import load_tokenizer

            traffic = run_traffic(entries, load_tokenizer(specs[0]["path"]), data.texts, traffic_batch_size,
                                  traffic_max_length, traffic_rounds, progress)
        progress.close()
        for e in entries:  # traffic's warm-up may have compiled more buckets (its padded widths)
            if e.key in compiled:
                compiled[e.key]["buckets"] = [list(x) for x in e.runner.compiled_buckets]
                compiled[e.key]["cudagraph_skipped"] = [list(x) for x in e.runner.cudagraph_skipped]
        config = {"models": list(models), "layers": list(layers), "backends": backends, "device": device,
                  "batch_sizes": bs, "seq_lens": ss, "warmup": warmup, "iterations": iterations,
                  "min_seconds": min_seconds, "rounds": rounds, "threads": threads or torch.get_num_threads(),
                  "task": task, "data_dir": data_dir, "max_eval_samples": max_eval_samples,
                  "traffic_batch_size": traffic_batch_size, "traffic_max_length": traffic_max_length,
                  "traffic_rounds": traffic_rounds,
                  "check": check, "tolerance": tolerance, "seq_bucket": seq_bucket, "ort_session": ort_session,
                  "calibration": static_kw or None}
        results = {"config": config, "environment": environment(threads),
                   "models": [{k: (v if k != "config" else v.to_dict()) for k, v in s.items()} for s in specs],
                   "cells": cells, "speedups": speedups(entries, shapes), "traffic": traffic,
                   "compiled": compiled or None,
                   "seconds": round(time.time() - t0, 1)}
        if check:
            results["gate"] = {"baseline": check, "tolerance": tolerance,
                               "failures": G.check(results, check, tolerance), "ratios": G.ratios(results)}
        with atomic_output_dir(output, overwrite, protected=models) as tmp:
            write_json(tmp / "results.json", results)
            write_csv(cells, tmp / "results.csv")
            (tmp / "report.md").write_text(markdown(results))
            results["plots"] = plots(results, tmp)
            if not results["plots"]:
                with open(tmp / "report.md", "a") as f:
                    f.write("\nNo plots: matplotlib is not installed (python -m theseus_deploy.bench.report "
                            "results.json DIR draws them elsewhere).\n")
            write_json(tmp / "config.json", config)
        if update_baseline:
            write_json(update_baseline, G.baseline_from(results))
        return results
    finally:
        shutil.rmtree(work, ignore_errors=True)
