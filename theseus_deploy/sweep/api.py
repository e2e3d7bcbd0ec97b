"""`run_sweep`: compress to each depth, score, export to each backend, time, decide, report.

DIR layout (every stage writes atomically, so a killed sweep leaves only finished stages):

    sweep-config.json        the settings that decide the trained models and exports
    L4/model/                compress output (L4/model.partial/: its resumable checkpoint)
    L4/eval.json             PyTorch fp32 dev score and logits (the same loop as every artifact's)
    L4/export-onnx-int8/     export folder (manifest.json, artifact, config, tokenizer)
    L4/onnx-int8.json        that artifact's dev score and logits, or why it was rejected
    latency-1x128.json       timing of all points, reused while the points and settings are the same
    sweep.json run_config.json sweep.csv report.md pareto.png best/

A stage whose output exists is reused; `--overwrite` starts over. Settings that change a trained
model or an export (compress flags, export flags, data) must match `sweep-config.json`, otherwise
the sweep refuses: reusing models trained differently would mislabel them. Budget, percentile,
drop and loyalty limits, depths and backends may change freely: a new budget re-decides from
what is there (loyalty to the predecessor is computed from the stored dev logits).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from theseus_deploy import config as C
from theseus_deploy.bench.api import check_backends
from theseus_deploy.bench.env import environment
from theseus_deploy.bench.sweep import Entry
from theseus_deploy.data import label_mapping, load_from_config, positive_id
from theseus_deploy.distill import check_for_task
from theseus_deploy.errors import UsageError
from theseus_deploy.export.api import export_model
from theseus_deploy.export.validate import ValidationError, task_logits
from theseus_deploy.hf import check_fine_tuned, check_model_source, load_config, load_tokenizer
from theseus_deploy.io import locks_output, write_json
from theseus_deploy.loyalty import loyalty_value
from theseus_deploy.metrics import compute_metrics
from theseus_deploy.registry import BACKENDS, FORMATS, export_format
from theseus_deploy.runtime import load_runner
from theseus_deploy.recipes.compress import run_compress

from .latency import measure
from .pareto import Point, decide, nothing_message, parse_latency, parse_shape
from .progress import Progress
from .report import build_record, write_outputs

STATE = "sweep-config.json"
# What decides a stage's result, from field metadata: the fields that decide a training trajectory
# (`resume=True`: model, data, compress flags) and those that change an artifact or a score
# (`artifact=True`: opset, atol, INT8 weights, the evaluation batch), not budget, timing, backends.
DECIDING = tuple(name for name, f, _, _ in C.flat_fields(C.SweepConfig)
                 if f.metadata.get("resume") or f.metadata.get("artifact"))
# A sweep folder written before an option existed holds no value for it: it had the option's default
# (an option is added with a default that keeps what ran before, e.g. --distill-alpha 0).
DECIDING_DEFAULTS = {name: v for name, v in C.defaults(C.SweepConfig).items() if name in DECIDING}
OUTPUTS = ("sweep.json", "run_config.json", "sweep.csv", "report.md", "pareto.png", "best")
EVAL_MAX_LENGTH = 128  # dev scores of every point use the export's task check length


def parse_depths(text: str | None, pred_layers: int) -> list[int]:
    if text is None:
        depths = {pred_layers, round(2 * pred_layers / 3), -(-pred_layers // 2), round(pred_layers / 3)}
    else:
        try:
            depths = {int(x) for x in str(text).split(",") if x.strip()}
        except ValueError:
            raise UsageError(f"--depths takes comma-separated integers, got '{text}'") from None
        if not depths:
            raise UsageError(f"--depths takes comma-separated integers, got '{text}'")
        bad = sorted(d for d in depths if not 1 <= d <= pred_layers)
        if bad:
            raise UsageError(f"--depths must be between 1 and the predecessor's {pred_layers} layers, got {bad}")
    depths.add(pred_layers)  # the predecessor is always a candidate
    return sorted((d for d in depths if d >= 1), reverse=True)


def parse_backends(text: str, device: str) -> list[str]:
    names = list(dict.fromkeys(x.strip() for x in str(text).split(",") if x.strip()))
    if not names:
        raise UsageError("--backends needs at least one backend")
    for b in names:
        if b not in BACKENDS:
            raise UsageError(f"unknown backend '{b}' in --backends: choose from {', '.join(BACKENDS)}")
    check_backends(names, device)
    return names


def compress_config(cfg, depth: int, output: Path, resume: bool) -> C.CompressConfig:
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(C.CompressConfig)
              if f.name not in C.SWEEP_COMPRESS_SKIP}
    return C.CompressConfig(**fields, model=cfg.model, output=str(output), successor_layers=depth, resume=resume)


def _with_defaults(settings):
    """A latency stage's settings with the deciding options it predates at their defaults (DECIDING_DEFAULTS)."""
    if isinstance(settings, dict) and isinstance(settings.get("deciding"), dict):
        return {**settings, "deciding": {**DECIDING_DEFAULTS, **settings["deciding"]}}
    return settings


def _deciding(cfg) -> dict:
    flat = C.to_flat(cfg)
    return {k: flat[k] for k in DECIDING}


def read_stage(path: Path, check=None) -> dict:
    """A stage file written by an earlier run: a JSON object that `check` accepts; anything else
    (invalid JSON, wrong types: a file edited or damaged after the fact) is one UsageError naming it."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
        ok = isinstance(value, dict) and (check is None or check(value))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError, KeyError, TypeError, AttributeError):
        ok = False
    if not ok:
        raise UsageError(f"{path}: damaged sweep stage file (not the JSON this stage writes): delete it to recompute "
                         "that stage, or pass --overwrite to start the sweep over")
    return value


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _scored(v: dict) -> bool:
    logits = v.get("dev_logits")  # absent in stage files from before loyalty was recorded
    return isinstance(v.get("metrics"), dict) and _number(v["metrics"].get("score")) and (
        logits is None or (isinstance(logits, list) and logits and all(
            isinstance(row, list) and len(row) == len(logits[0]) and all(map(_number, row)) for row in logits)))


def _point(v: dict) -> bool:
    return isinstance(v.get("rejected"), str) or (_scored(v) and isinstance(v.get("run", ""), str))


def _timing(v: dict) -> bool:
    pts = v.get("points")
    return isinstance(v.get("settings"), dict) and isinstance(v.get("environment"), dict) and isinstance(pts, dict) and all(
        isinstance(t, dict) and isinstance(t.get("latency"), dict) and all(_number(t["latency"].get(q)) for q in PERCENTILES)
        for t in pts.values())


PERCENTILES = ("p50", "p90", "p99")


@dataclass
class Stage:
    """One resumable step of a sweep: `done()` when its output exists (and reads back as this stage's),
    `run()` writes that output atomically. A killed sweep leaves only finished stages behind."""

    kind: str                      # compress, eval, export, latency
    label: str                     # L4, L4 onnx-int8, 1x128
    output: Path                   # the file whose existence means done
    action: Callable[[], None]
    check: Callable[[dict], bool] | None = None  # what the output must hold (None: any JSON object)
    fresh: Callable[[dict], bool] | None = None   # a cache (latency): done only while its settings still hold

    def done(self) -> bool:
        if not self.output.is_file():
            return False
        value = read_stage(self.output, self.check)
        return self.fresh is None or self.fresh(value)

    def run(self) -> None:
        self.action()


def _check_dir(out: Path, cfg) -> None:
    """Refuse a folder that is not a sweep's, or a sweep made with other settings (unless --overwrite)."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"output path exists and is not a folder: {out}")
    if not out.is_dir() or not any(out.iterdir()) or cfg.overwrite:
        if cfg.overwrite and out.is_dir() and any(out.iterdir()) and not (out / STATE).is_file():
            raise UsageError(f"--overwrite: {out} is not a sweep folder (no {STATE}); not deleting it")
        return
    if not (out / STATE).is_file():
        raise UsageError(f"output folder is not empty and is not a sweep folder (no {STATE}): {out}")
    saved = {**DECIDING_DEFAULTS, **read_stage(out / STATE)}
    now = _deciding(cfg)
    diff = [f"--{k.replace('_', '-')} {saved.get(k)!r} -> {now[k]!r}" for k in DECIDING if saved.get(k) != now[k]]
    if diff:
        raise UsageError(f"{out} holds a sweep with other settings ({', '.join(diff)}): pass the same ones to "
                         "continue it, or --overwrite to start over")


def _start_over(out: Path) -> None:
    """--overwrite: the old sweep is renamed aside (atomic) and deleted once the new folder exists; a
    run killed in between leaves `.DIR.old-PID`, which the next run's lock cleans (theseus_deploy/io.py)."""
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    out.rename(old)
    out.mkdir()
    shutil.rmtree(old, ignore_errors=True)


def run_sweep(cfg, show_progress: bool = True) -> dict:
    """The whole sweep. Returns the sweep record (sweep.json) with `decision`; raises UsageError on bad input."""
    if not cfg.threads:
        return _run_sweep(cfg, show_progress)
    import torch

    before = torch.get_num_threads()
    try:
        return _run_sweep(cfg, show_progress)
    finally:
        torch.set_num_threads(before)


def sweep_inputs(cfg) -> list:
    """What a sweep reads: DIR holds trained models and is replaced by --overwrite, so never one that
    is, or holds, or lies inside, one of these."""
    return [cfg.model, cfg.data_dir, cfg.train_file, cfg.validation_file]


@locks_output("cfg.output", protected=sweep_inputs)
def _run_sweep(cfg, show_progress: bool) -> dict:
    # ---- everything that can fail on bad input fails here, before anything is written
    out = Path(cfg.output)  # not, nor holding, nor inside sweep_inputs: checked with its lock (locks_output)
    budget = parse_latency(cfg.latency_budget) if cfg.latency_budget is not None else None
    if cfg.traffic:
        mode = {"kind": "traffic", "max_length": max(EVAL_MAX_LENGTH, cfg.max_seq_length),
                "samples": cfg.traffic_samples, "name": "traffic"}
    else:
        b, s = parse_shape(cfg.latency_shape)
        mode = {"kind": "shape", "batch_size": b, "seq_len": s, "name": f"{b}x{s}"}
    if not cfg.task:
        raise UsageError("--task is required")
    backends = parse_backends(cfg.backends, cfg.device)
    check_model_source(cfg.model)
    pred_config = load_config(cfg.model)
    # Its depth is scored and exported before any compress stage (which refuses it too): a bare
    # encoder's random head would have been the sweep's predecessor.
    check_fine_tuned(cfg.model, pred_config, "--model", "sweep compresses and scores a model fine-tuned on the "
                     "task (theseus-deploy finetune gives one)")
    pred_layers = pred_config.num_hidden_layers
    depths = parse_depths(cfg.depths, pred_layers)
    max_pos = getattr(pred_config, "max_position_embeddings", 512)
    need = mode.get("seq_len", 0)
    if need > max_pos:
        raise UsageError(f"--latency-shape sequence {need} exceeds the model's {max_pos} positions")
    _check_dir(out, cfg)
    train = load_from_config(cfg, "train")
    dev = load_from_config(cfg, "dev", spec=train.spec)
    check_for_task(cfg.distill_alpha, cfg.distill_temperature, dev.spec.is_regression)  # as compress would, later
    mapping = label_mapping(dev.spec, pred_config)
    if mapping is not None:
        dev.labels = mapping[dev.labels]
    positive = positive_id(dev.spec, mapping)  # F1's class in the model's label ids (successors keep its config)
    del train

    if cfg.threads:  # training and scoring too: on a busy 2-core machine 2 threads ran 10x slower than 1
        import torch

        torch.set_num_threads(cfg.threads)

    # ---- the folder
    if cfg.overwrite and out.is_dir() and any(out.iterdir()):
        _start_over(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / STATE, _deciding(cfg))

    def model_dir(d: int) -> Path:
        return Path(cfg.model) if d == pred_layers else out / f"L{d}" / "model"

    tokenizer_cache = {}

    def score(runner, d) -> dict:
        """Dev metrics and logits (kept in the stage file: loyalty to the predecessor is computed from
        them when the sweep decides, so a new --min-loyalty re-decides without scoring again)."""
        if d not in tokenizer_cache:
            tokenizer_cache[d] = load_tokenizer(str(model_dir(d)))
        length = min(max(EVAL_MAX_LENGTH, cfg.max_seq_length), max_pos)
        logits = task_logits(runner, tokenizer_cache[d], dev, max_seq_length=length, batch_size=cfg.eval_batch_size)
        return {"metrics": compute_metrics(dev.spec, logits, dev.labels, positive), "dev_logits": logits.tolist()}

    def compress(d: int):
        folder = model_dir(d)
        resume = (folder.with_name(folder.name + ".partial") / "checkpoint.pt").is_file()
        run_compress(compress_config(cfg, d, folder, resume))

    def evaluate(d: int):
        runner = load_runner(str(model_dir(d)), "torch", cfg.device, cfg.threads)
        write_json(out / f"L{d}" / "eval.json", {"layers": d, "backend": "torch", "model": str(model_dir(d)),
                                                 **score(runner, d)})

    def export(d: int, bk: str):
        write_json(out / f"L{d}" / f"{bk}.json", _export_point(cfg, d, bk, model_dir(d), out / f"L{d}", mode, max_pos, score))

    stages = []
    for d in depths:
        if d < pred_layers:
            stages.append(Stage("compress", f"L{d}", model_dir(d) / "metrics.json", lambda d=d: compress(d)))
        stages.append(Stage("eval", f"L{d}", out / f"L{d}" / "eval.json", lambda d=d: evaluate(d), _scored))
        stages += [Stage("export", f"L{d} {bk}", out / f"L{d}" / f"{bk}.json", lambda d=d, bk=bk: export(d, bk), _point)
                   for bk in backends if bk != "torch"]

    # ---- latency (reused while the same points are timed with the same settings)
    points = [(d, bk) for d in depths for bk in backends]
    lat_path = out / f"latency-{mode['name']}.json"
    timing = {}

    def points_info() -> dict:
        info = {}
        for d in depths:
            ev = read_stage(out / f"L{d}" / "eval.json", _scored)
            info[(d, "torch")] = {"metrics": ev["metrics"], "dev_logits": ev.get("dev_logits"),
                                  "run": str(model_dir(d))}  # also the reference
            for bk in backends:
                if bk != "torch":
                    info[(d, bk)] = read_stage(out / f"L{d}" / f"{bk}.json", _point)
        return info

    def settings() -> dict:
        if "settings" not in timing:
            info = timing["info"] = points_info()
            timed = [(pred_layers, "torch")] + [p for p in points if p != (pred_layers, "torch")
                                                and not info[p].get("rejected")]
            timing["timed"] = timed
            timing["settings"] = {"points": [f"L{d}|{bk}" for d, bk in timed], "mode": mode, "device": cfg.device,
                                  "warmup": cfg.warmup, "iterations": cfg.iterations, "min_seconds": cfg.min_seconds,
                                  "rounds": cfg.rounds, "threads": cfg.threads, "deciding": _deciding(cfg)}
        return timing["settings"]

    def measure_latency():
        settings()
        write_json(lat_path, {"settings": timing["settings"], "environment": _environment(cfg.threads),
                              "points": _time_points(cfg, timing["timed"], timing["info"], pred_layers, mode, dev,
                                                     model_dir)})

    stages.append(Stage("latency", mode["name"], lat_path, measure_latency, _timing,
                        fresh=lambda cached: _with_defaults(cached.get("settings")) == settings()))

    progress = Progress([(st.kind, st.label) for st in stages], enabled=show_progress)
    record_stages, t_start = [], time.time()
    for i, st in enumerate(stages):
        if st.done():
            progress.finish(i, reused=True)
            record_stages.append({"stage": st.kind, "what": st.label, "reused": True})
            continue
        progress.start(i)
        t0 = time.time()
        st.run()
        progress.finish(i)
        rec = {"stage": st.kind, "what": st.label, "reused": False, "seconds": round(time.time() - t0, 1)}
        record_stages.append(rec)
        # sweep.json describes the latest invocation; this log keeps every executed stage's wall time
        with open(out / "stages.jsonl", "a") as f:
            f.write(json.dumps({**rec, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")
    latency = read_stage(lat_path, _timing)
    info = timing.get("info") or points_info()

    # ---- decide, report
    record = build_record(cfg, mode, budget, depths, backends, pred_layers, info, latency, record_stages,
                          time.time() - t_start)
    pts = [Point(r["layers"], r["backend"], r["score"], r["latency_s"][cfg.percentile], r["drop"],
                 loyalty_value(r["loyalty"]) if r.get("loyalty") else None)
           for r in record["points"] if r.get("candidate")]
    decision = decide(pts, budget, cfg.max_task_drop, cfg.min_loyalty) if pts else None
    write_outputs(out, record, pts, decision, cfg, info, model_dir)
    if decision is not None and decision.choice is None:
        record["decision"]["message"] = nothing_message(pts, decision, cfg.percentile)
    return record


def _environment(threads):
    return environment(threads)


def _export_point(cfg, d: int, backend: str, model: Path, folder: Path, mode: dict, max_pos: int, score) -> dict:
    """Export (when the backend runs an artifact), validate against PyTorch, score on dev."""
    fmt = export_format(backend) or (backend if backend in FORMATS else None)
    rec = {"layers": d, "backend": backend, "format": fmt}
    run_from = model
    if fmt is not None:
        export_dir = folder / f"export-{backend}"
        seq = max(mode.get("seq_len", 0), mode.get("max_length", 0), EVAL_MAX_LENGTH, cfg.max_seq_length)
        try:
            manifest = export_model(C.ExportConfig(
                model=str(model), formats=(fmt,), output=str(export_dir), opset=cfg.opset, atol=cfg.atol, validate=True,
                profile=C.ProfileConfig(max_batch_size=max(mode.get("batch_size", 1), cfg.eval_batch_size),
                                        max_seq_length=min(seq, max_pos)),
                int8=cfg.int8, threads=cfg.threads, overwrite=export_dir.exists()))
        except ValidationError as e:
            return {**rec, "rejected": f"validation failed: {e}"}
        rec["validation"] = manifest["artifacts"][0].get("validation")
        rec["export"] = str(export_dir)
        if fmt in FORMATS and FORMATS[fmt].file:
            run_from = export_dir
    runner = load_runner(str(run_from), backend, cfg.device, cfg.threads)
    rec["run"] = str(run_from)
    rec.update(score(runner, d))
    return rec


def _time_points(cfg, timed, info, pred_layers, mode, dev, model_dir) -> dict:
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    entries = []
    for d, bk in timed:
        run = info[(d, bk)].get("run") or str(model_dir(d))
        runner = load_runner(run, bk, cfg.device, cfg.threads)
        hf = load_config(str(model_dir(d)))
        runner.vocab_size = hf.vocab_size
        entries.append(Entry(f"L{d}", "predecessor" if d == pred_layers else "successor", bk, runner, hf))
    texts = dev.texts[:mode["samples"]] if mode["kind"] == "traffic" and mode["samples"] else dev.texts
    res = measure(entries, mode, cfg.device, cfg.warmup, cfg.iterations, cfg.min_seconds, cfg.rounds,
                  tokenizer=load_tokenizer(str(model_dir(pred_layers))), texts=texts)
    if mode["kind"] == "traffic":
        for r in res.values():
            r["num_requests_per_round"] = len(texts)
    return res
