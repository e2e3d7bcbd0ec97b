#!/usr/bin/env python
"""Reproduce docs/results.md: predecessor, BERT-of-Theseus successor and baselines per GLUE task.

    python scripts/results.py run --tasks mrpc,rte --model ~/.cache/theseus-models/all-MiniLM-L6-v2
    python scripts/results.py bench --tasks mrpc  # speed of that task's predecessor vs Theseus successor
    python scripts/results.py report            # rewrites docs/results.md from runs/results/*/summary.json

Per task and seed, in runs/results/<task>/seed<seed>/:
  predecessor  finetune the encoder on the task (L layers)
  theseus      compress, linear curriculum (b=0.3), frozen predecessor; p = 1 and the head trained
               as the ablation's chosen variant says (`--from-ablation`), else compress's defaults
  constant     compress, constant replacement rate 0.5 then 1 (the paper's constant baseline)
  truncation   keep the predecessor's bottom n layers, fine-tune everything
Theseus, constant and truncation get the same number of steps. Every run writes metrics.json;
the task's summary.json collects them. Runs that already finished are not repeated.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TD = [sys.executable, "-m", "theseus_deploy"]
# --profile cpu: the budget that fits 2 CPU cores (about an hour per task). Fixed step counts.
BUDGET = {  # task: (max_seq_length, finetune steps, compress steps, batch size)
    "sst2": (64, 600, 1200, 32),
    "cola": (64, 600, 1200, 32),
    "mrpc": (128, 350, 1150, 32),   # 3 / 10 epochs
    "stsb": (128, 540, 1200, 32),   # 3 epochs / ~6.7 epochs
    "rte": (128, 240, 780, 32),     # 3 / 10 epochs
}
# --profile full: predecessors fine-tuned for whole epochs (SST-2 one epoch at seq 64, several on
# the small tasks); the 3-layer runs get the number of steps compress's default budget picks for
# the task (at least 3 epochs and --min-steps, at most --max-epochs), SST-2 one epoch (3 epochs of
# 67k sentences would triple the cost for little: see docs/results.md). Every 3-layer method of a
# task gets the same steps and learning rate.
FULL = {  # task: (max_seq_length, predecessor epochs, 3-layer epochs or None for the default budget, batch)
    "sst2": (64, 1, 1, 32),
    "cola": (64, 3, None, 32),
    "mrpc": (128, 5, None, 32),
    "stsb": (128, 5, None, 32),
    "rte": (128, 5, None, 32),
}
PREDECESSOR_LR, SUCCESSOR_LR = "5e-5", "1e-4"
METHODS = ("theseus", "constant", "truncation")
# Speed does not depend on the task's weights: one bench of predecessor vs successor serves all.
BENCH_ARGS = ["--backend", "torch", "--backend", "torch-bf16", "--backend", "onnx", "--backend", "onnx-int8",
              "--batch-sizes", "1,8", "--seq-lens", "128", "--iterations", "20", "--rounds", "9", "--min-seconds", "0.5"]
# The ablation (`results.py ablation`): what closes the gap to truncation. Each variant is the
# extra compress flags, given the run's step count S; both knobs are explicit in every variant, so a
# variant means the same run whatever compress's defaults are. `unfreeze-short` won the ablation in
# docs/results.md and became compress's default (DEFAULT_VARIANT: it wins a tie).
VARIANTS = {
    "frozen-half": lambda S: ["--no-unfreeze-head", "--steps-to-full", max(1, S // 2)],  # the paper's; old default
    "old-optimizer": lambda S: ["--no-unfreeze-head", "--steps-to-full", max(1, S // 2),
                                "--max-grad-norm", "0", "--decay-norm-and-bias"],  # before the recipe fix
    "unfreeze-head": lambda S: ["--unfreeze-head", "--steps-to-full", max(1, S // 2)],
    "short-replacement": lambda S: ["--no-unfreeze-head", "--steps-to-full", max(1, S // 4)],
    "long-replacement": lambda S: ["--no-unfreeze-head", "--steps-to-full", max(1, 3 * S // 4)],
    "unfreeze-short": lambda S: ["--unfreeze-head", "--steps-to-full", max(1, S // 4)],
}
DEFAULT_VARIANT = "unfreeze-short"


DRY_RUN = False  # --dry-run: print the commands, run nothing
# --mixed-precision: passed to every run (predecessors, the 3 methods, the ablation) so every method
# of a table trains at the same precision. bf16 autocast made a 3-layer compress step 2.3x faster on
# an AVX512-BF16 CPU without AMX (30 steps, SST-2 seq 64 b32, one thread: 0.69 s -> 0.30 s).
PRECISION = "no"


def precision_flags():
    return ["--mixed-precision", PRECISION] if PRECISION != "no" else []


def sh(args, log):
    print("+", " ".join(map(str, args)), flush=True)
    if DRY_RUN:  # a dry run writes nothing: run folders come into being with their first log
        return
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        subprocess.run(list(map(str, args)), check=True, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)


DEFAULT_MODEL = Path.home() / ".cache" / "theseus-models" / "all-MiniLM-L6-v2"


def ensure_model(model: str) -> str:
    """The default MiniLM folder is fetched on first use, as `make demo` does; without the
    shared fetch script, the hub id is used (real users have the hub)."""
    if Path(model) != DEFAULT_MODEL or (DEFAULT_MODEL / "config.json").is_file():
        return model
    fetch = REPO.parent / "shared" / "scripts" / "fetch-pretrained.sh"
    if fetch.is_file():
        subprocess.run(["bash", str(fetch), "minilm", str(DEFAULT_MODEL)], check=True,
                       env={**os.environ, "PYTHON": sys.executable})
        return model
    return "sentence-transformers/all-MiniLM-L6-v2"


def default_steps(task, data_dir, batch_size, epochs=None) -> int:
    """The step count `compress` picks for this task when given no --max-steps (its own rule)."""
    import math

    from theseus_deploy.config import CompressConfig
    from theseus_deploy.data import load_task
    from theseus_deploy.train import resolve_budget

    n = len(load_task(task, data_dir, "train").labels)
    spe = math.ceil(n / batch_size)
    return resolve_budget(CompressConfig(task=task, epochs=epochs, batch_size=batch_size), n, spe)[0]


def budget(task, profile, data_dir):
    """(max_seq_length, predecessor budget flags, 3-layer steps, batch size) of a task."""
    if profile == "cpu":
        seq, ft_steps, steps, bs = BUDGET[task]
        return seq, ["--max-steps", ft_steps], steps, bs
    seq, ft_epochs, epochs, bs = FULL[task]
    return seq, ["--epochs", ft_epochs], default_steps(task, data_dir, bs, epochs), bs


def plan_task(task, model, root, seed, successor_layers, data_dir, predecessor_seed=None, profile="cpu",
              theseus_flags=(), constant=True, variant=None):
    """The runs one (task, seed) needs that are not finished yet: (predecessor job or None, [method jobs])."""
    seq, pred_budget, steps, bs = budget(task, profile, data_dir)
    out = root / task / f"seed{seed}"
    # --predecessor-seed: compress one fine-tuned predecessor with several seeds (the paper's
    # spread is over compression runs); by default each seed fine-tunes its own predecessor.
    pred_seed = seed if predecessor_seed is None else predecessor_seed
    pred_out = root / task / f"seed{pred_seed}"
    pred = pred_out / "predecessor"

    def flags(s):  # the options every run of this task shares, with seed s
        return ["--task", task, "--seed", s, "--max-seq-length", seq, "--batch-size", bs, "--overwrite",
                *precision_flags(), *(["--data-dir", data_dir] if data_dir else [])]
    common = flags(seed)
    evals = max(1, steps // 5)
    pred_args = ["finetune", "--model", model, *pred_budget, "--lr", PREDECESSOR_LR]
    if profile == "cpu":
        pred_args += ["--eval-steps", max(1, pred_budget[1] // 3)]
    pred_common = flags(pred_seed)
    pred_job = None
    if not (pred / "metrics.json").is_file():
        pred_job = ([*TD, *pred_args, *pred_common, "--output", pred], pred_out / "predecessor.log")
    lr = SUCCESSOR_LR if profile == "full" else None
    theseus_flags = list(theseus_flags(steps) if callable(theseus_flags) else theseus_flags)
    runs = {
        "theseus": ["compress", "--model", pred, "--max-steps", steps, "--lr", "1e-4",
                    "--successor-layers", successor_layers, "--eval-steps", evals, *theseus_flags],
        "constant": ["compress", "--model", pred, "--max-steps", steps, "--lr", "1e-4",
                     "--successor-layers", successor_layers, "--scheduler", "constant", "--replacing-rate", "0.5",
                     "--steps-to-full", steps // 2, "--eval-steps", evals,
                     *[f for f in theseus_flags if f in ("--unfreeze-head", "--no-unfreeze-head")]],
        "truncation": ["finetune", "--model", pred, "--keep-layers", successor_layers,
                       "--max-steps", steps, "--lr", lr or "5e-5", "--eval-steps", evals],
    }
    if not constant:
        runs.pop("constant")
    done = root / "ablation" / task / f"{variant}-seed{seed}"
    reuse = bool(variant) and (done / "metrics.json").is_file() and not (out / "theseus").exists()
    if reuse and DRY_RUN:
        print("+ ln -s", done, out / "theseus", flush=True)
    elif reuse:
        out.mkdir(parents=True, exist_ok=True)
        (out / "theseus").symlink_to(os.path.relpath(done, out))  # the same command, already run
    jobs = [(name, [*TD, *args, *common, "--output", out / name], out / f"{name}.log")
            for name, args in runs.items()
            if not (out / name / "metrics.json").is_file() and not (reuse and name == "theseus")]
    meta = {"task": task, "seed": seed, "model": str(model), "successor_layers": successor_layers,
            "budget": {"profile": profile, "max_seq_length": seq, "predecessor": " ".join(map(str, pred_budget)),
                       "compress_steps": steps, "batch_size": bs, "mixed_precision": PRECISION},
            "predecessor_seed": pred_seed,
            "commands": {"predecessor": " ".join(map(str, ["theseus-deploy", *pred_args, *pred_common, "--output", pred])),
                         **{k: " ".join(map(str, ["theseus-deploy", *v, *common, "--output", out / k]))
                            for k, v in runs.items()}}}
    return pred_job, jobs, meta


def summarize(root, meta, timings):
    out = root / meta["task"] / f"seed{meta['seed']}"
    pred = root / meta["task"] / f"seed{meta['predecessor_seed']}" / "predecessor"
    old = out / "summary.json"  # wall times of runs finished by an earlier invocation are kept
    summary = {**meta, "seconds": {**(json.loads(old.read_text()).get("seconds", {}) if old.is_file() else {}),
                                   **timings}}
    summary["predecessor"] = json.loads((pred / "metrics.json").read_text())["dev"]
    for name in meta["commands"]:
        if name == "predecessor":
            continue
        m = json.loads((out / name / "metrics.json").read_text())
        summary[name] = m["dev"]
        summary.setdefault("predecessor_layers", m.get("predecessor_layers"))  # compress records the depth
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def timed(job, timings):
    name, args, log = job
    t0 = time.time()
    sh(args, log)
    timings[name] = round(time.time() - t0, 1)


def run_tasks(pairs, model, root, successor_layers, data_dir, predecessor_seed=None, profile="cpu",
              theseus_flags=(), constant_seeds=None, n_jobs=1, predecessors_only=False, variant=None):
    """Every (task, seed) pair: predecessors first, then the 3-layer methods, `n_jobs` at a time."""
    plans = []
    for task, seed in pairs:
        constant = constant_seeds is None or seed in constant_seeds
        plans.append(plan_task(task, model, root, seed, successor_layers, data_dir, predecessor_seed, profile,
                               theseus_flags, constant, variant))
    timings = {(m["task"], m["seed"]): {} for _, _, m in plans}
    preds = {}
    for pred_job, _, meta in plans:  # one predecessor per (task, predecessor seed)
        if pred_job is not None:
            preds[str(pred_job[0][-1])] = (pred_job, (meta["task"], meta["predecessor_seed"]))
    _parallel([(("predecessor", *job), timings.setdefault(key, {})) for job, key in preds.values()], n_jobs)
    if predecessors_only or DRY_RUN:
        if DRY_RUN and not predecessors_only:
            for _, jobs, _ in plans:
                for _, args, log in jobs:
                    sh(args, log)
        return []
    _parallel([(job, timings[(m["task"], m["seed"])]) for _, jobs, m in plans for job in jobs], n_jobs)
    return [summarize(root, meta, timings[(meta["task"], meta["seed"])]) for _, _, meta in plans]


def _parallel(items, n_jobs):
    if n_jobs <= 1:
        for job, t in items:
            timed(job, t)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(n_jobs) as pool:
        for f in [pool.submit(timed, job, t) for job, t in items]:
            f.result()


def run_task(task, model, root, seed, successor_layers, data_dir, predecessor_seed=None, profile="cpu",
             theseus_flags=(), constant=True):
    """One (task, seed): the predecessor (unless finished), then Theseus, constant and truncation."""
    return run_tasks([(task, seed)], model, root, successor_layers, data_dir, predecessor_seed, profile,
                     theseus_flags, None if constant else set())[0]


def run_ablation(tasks, seeds, variants, model, root, successor_layers, data_dir, profile="full", n_jobs=1):
    """Theseus with each variant's flags on the tasks' shared predecessors (seed 42 unless given),
    into ROOT/ablation/<task>/<variant>-seed<seed>/; writes ROOT/ablation/summary.json."""
    jobs, metas = [], []
    for task in tasks:
        pred_job, _, meta = plan_task(task, model, root, 42, successor_layers, data_dir, 42, profile, (), False)
        if pred_job is not None:
            _parallel([(("predecessor", *pred_job), {})], 1)
        steps, seq, bs = meta["budget"]["compress_steps"], meta["budget"]["max_seq_length"], meta["budget"]["batch_size"]
        pred = root / task / "seed42" / "predecessor"
        for v in variants:
            for seed in seeds:
                out = root / "ablation" / task / f"{v}-seed{seed}"
                args = [*TD, "compress", "--model", pred, "--task", task, "--seed", seed, "--max-seq-length", seq,
                        "--batch-size", bs, "--max-steps", steps, "--lr", SUCCESSOR_LR,
                        "--successor-layers", successor_layers, "--eval-steps", max(1, steps // 5), "--overwrite",
                        *VARIANTS[v](steps), *precision_flags(), *(["--data-dir", data_dir] if data_dir else []),
                        "--output", out]
                metas.append({"task": task, "variant": v, "seed": seed, "out": out,
                              "command": " ".join(map(str, ["theseus-deploy", *args[3:]]))})
                if not (out / "metrics.json").is_file():
                    jobs.append((f"{task}/{v}/{seed}", args, out.parent / f"{v}-seed{seed}.log"))
    _parallel([(j, {}) for j in jobs], n_jobs)
    if DRY_RUN:
        return {"rows": [], "winner": None}
    rows = []
    for m in metas:
        score = json.loads((m["out"] / "metrics.json").read_text())["dev"]["score"]
        pred = json.loads((root / m["task"] / "seed42" / "predecessor" / "metrics.json").read_text())["dev"]["score"]
        rows.append({k: (str(v) if k == "out" else v) for k, v in m.items()} | {"score": score, "predecessor": pred})
    summary = {"rows": rows, "winner": ablation_winner(rows)}
    (root / "ablation").mkdir(parents=True, exist_ok=True)
    (root / "ablation" / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def ablation_winner(rows, tie=0.001):
    """The variant with the best mean retention over (task, seed); within `tie` of the best, the
    current default (DEFAULT_VARIANT) wins, so a change of default must earn its place."""
    by = {}
    for r in rows:
        by.setdefault(r["variant"], []).append(r["score"] / r["predecessor"])
    mean = {v: statistics.mean(x) for v, x in by.items()}
    best = max(mean.values())
    close = [v for v in mean if mean[v] >= best - tie]
    return DEFAULT_VARIANT if DEFAULT_VARIANT in close else max(close, key=lambda v: mean[v])


def run_bench(task, root, seed):
    out = root / task / f"seed{seed}"
    if not DRY_RUN and not (out / "theseus" / "config.json").is_file():
        raise SystemExit(f"error: no finished runs for {task} seed {seed} in {root}: run them first")
    args = [*TD, "bench", "--model", out / "predecessor", "--model", out / "theseus", *BENCH_ARGS,
            "--output", root / "bench", "--overwrite"]
    sh(args, root / "bench.log")


def bench_lines(root: Path) -> list[str]:
    f = root / "bench" / "results.json"
    if not f.is_file():
        return ["", "## Speed", "", "Not measured yet: `python scripts/results.py bench`."]
    r = json.loads(f.read_text())
    env = r["environment"]
    layers = [m["config"].get("num_hidden_layers") for m in r["models"]]
    lines = ["", f"## Speed: {layers[1]}-layer successor vs {layers[0]}-layer predecessor (`python scripts/results.py bench`)", "",
             f"{env.get('cpu')} ({', '.join(env.get('cpu_flags') or ['no AVX512/AMX flags'])}), {env.get('torch_threads')} threads, "
             f"torch {env.get('versions', {}).get('torch')}, onnxruntime {env.get('versions', {}).get('onnxruntime')}; "
             "random-id inputs at the shapes below; median of "
             f"{r['config']['rounds']} interleaved paired ratios [min-max]. Speed depends on shapes, not on the task's "
             f"weights (models: `{r['models'][0]['source']}` vs `{r['models'][1]['source']}`).", "",
             "| backend | batch | seq | successor vs predecessor, same backend | ideal (FLOPs) | successor vs predecessor PyTorch fp32 |",
             "|---|---|---|---|---|---|"]
    for s in r["speedups"]:
        if "vs_predecessor_same_backend" not in s:
            continue
        a, b = s["vs_predecessor_same_backend"], s.get("vs_predecessor_torch_fp32", {})
        dep = f"{b['median']:.2f}x [{b['min']:.2f}-{b['max']:.2f}]" if b else "-"
        lines.append(f"| {s['backend']} | {s['batch_size']} | {s['seq_len']} | {a['median']:.2f}x [{a['min']:.2f}-{a['max']:.2f}] "
                     f"| {s['ideal_speedup']:.2f}x | {dep} |")
    return lines


def variant_flags_doc(v: str) -> str:
    """A variant's flags with the step count written as S (S/4, 3S/4) for the ablation table."""
    if v not in VARIANTS:
        return "?"
    return " ".join(map(str, VARIANTS[v](4000))).replace("3000", "3S/4").replace("2000", "S/2").replace("1000", "S/4")


def ablation_lines(root: Path) -> list[str]:
    f = root / "ablation" / "summary.json"
    if not f.is_file():
        return []
    a = json.loads(f.read_text())
    rows = a["rows"]
    tasks = sorted({r["task"] for r in rows})
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    lines = ["", "## Ablation: what closes the gap (`python scripts/results.py ablation`)", "",
             "Theseus 3-layer dev score x100 on one predecessor per task, same steps and learning rate; mean over "
             "seeds; retention = mean of score / predecessor.", "",
             "| variant | flags | " + " | ".join(tasks) + " | mean retention |", "|---|---|" + "---|" * len(tasks) + "---|"]
    for v in variants:
        sel = [r for r in rows if r["variant"] == v]
        cells = []
        for t in tasks:
            x = [r["score"] for r in sel if r["task"] == t]
            cells.append(f"{100 * statistics.mean(x):.1f} ({len(x)})" if x else "-")
        ret = statistics.mean(r["score"] / r["predecessor"] for r in sel)
        flags = variant_flags_doc(v)
        lines.append(f"| {v}{' **(chosen)**' if v == a['winner'] else ''} | `{flags or '(defaults)'}` | "
                     + " | ".join(cells) + f" | {100 * ret:.2f}% |")
    ref = {}
    for t in tasks:  # the grid's runs on the same predecessor, steps and learning rate, for comparison
        s = root / t / "seed42" / "summary.json"
        if s.is_file():
            ref[t] = json.loads(s.read_text())
    for k, label in (("truncation", "truncation, seed 42 (reference)"), ("constant", "constant p=0.5, seed 42 (reference)")):
        cells = [f"{100 * ref[t][k]['score']:.1f} (1)" if t in ref and k in ref[t] else "-" for t in tasks]
        rets = [ref[t][k]["score"] / ref[t]["predecessor"]["score"] for t in tasks if t in ref and k in ref[t]]
        if rets:
            lines.append(f"| {label} | | " + " | ".join(cells) + f" | {100 * statistics.mean(rets):.2f}% |")
    lines += ["", "S = the run's step count. The chosen variant has the best mean retention; within 0.1 point of "
                  "the best, compress's default wins. Commands:", "```"]
    lines += sorted({r["command"] for r in rows if r["seed"] == rows[0]["seed"]})
    lines.append("```")
    return lines


# The targets docs/results.md is held to (the issue that asked for the full-budget results).
TARGETS = {"macro_retention": 97.5, "lowest_task_retention": 93.0, "wins": 4, "of": 5}


def targets_lines(macro_ret, lowest, wins, wins_c, n_tasks):
    """Each target, its measured value and met / not met, computed from the table (not written by hand)."""
    t = TARGETS
    rows = [(f"macro retention >= {t['macro_retention']}%", f"{macro_ret:.1f}%", macro_ret >= t["macro_retention"]),
            (f"no task below {t['lowest_task_retention']:.0f}%", f"lowest {lowest:.1f}%", lowest >= t["lowest_task_retention"]),
            (f"ahead of truncation on >= {t['wins']} of {t['of']} tasks", f"{wins} of {n_tasks}", wins >= t["wins"]),
            (f"ahead of the constant rate on >= {t['wins']} of {t['of']} tasks", f"{wins_c} of {n_tasks}", wins_c >= t["wins"])]
    out = ["", "## Targets", "", "| target | measured | met |", "|---|---|---|"]
    out += [f"| {name} | {value} | {'yes' if ok else '**no**'} |" for name, value, ok in rows]
    if n_tasks < t["of"]:
        out.append(f"\nOnly {n_tasks} of {t['of']} tasks have results: the win counts are out of those.")
    return out


NOTES = "<!-- notes: written by hand below this line, kept by `results.py report` -->"


def report(root: Path, doc: Path):
    rows = {}
    for f in sorted(root.glob("*/seed*/summary.json")):
        s = json.loads(f.read_text())
        rows.setdefault(s["task"], []).append(s)
    first = next(iter(rows.values()))[0] if rows else {}
    n_pred, n_succ = first.get("predecessor_layers") or "?", first.get("successor_layers", "?")
    model = Path(first.get("model", "MiniLM")).name
    lines = [f"# Results: {model}, {n_pred} -> {n_succ} layers on GLUE dev", "",
             f"Generated by `python scripts/results.py report` from `{root}/*/seed*/summary.json`;",
             "the runs themselves by `python scripts/results.py run` (commands below). Scores are the",
             "task's `score` (GLUE convention: mean of F1/accuracy for MRPC, of Pearson/Spearman for",
             "STS-B; Matthews for CoLA; accuracy otherwise) x 100, median over seeds.", "",
             f"| task | seeds | predecessor ({n_pred}L) | Theseus ({n_succ}L) | retention | truncation ({n_succ}L) | "
             f"constant p=0.5 ({n_succ}L) | Theseus beats truncation | beats constant |",
             "|---|---|---|---|---|---|---|---|---|"]
    agg = {k: [] for k in ("predecessor", *METHODS)}
    wins = wins_c = 0
    for task, runs in sorted(rows.items()):
        med = {k: statistics.median(r[k]["score"] for r in runs if k in r) * 100 for k in agg}
        for k in agg:
            agg[k].append(med[k])
        win, win_c = med["theseus"] > med["truncation"], med["theseus"] > med["constant"]
        wins, wins_c = wins + win, wins_c + win_c
        lines.append(f"| {task} | {len(runs)} | {med['predecessor']:.1f} | {med['theseus']:.1f} | "
                     f"{100 * med['theseus'] / med['predecessor']:.1f}% | {med['truncation']:.1f} | "
                     f"{med['constant']:.1f} | {'yes' if win else 'no'} | {'yes' if win_c else 'no'} |")
    if rows:
        avg = {k: statistics.mean(v) for k, v in agg.items()}
        macro_ret = 100 * avg["theseus"] / avg["predecessor"]
        lines.append(f"| **macro avg** | | {avg['predecessor']:.1f} | {avg['theseus']:.1f} | "
                     f"{macro_ret:.1f}% | {avg['truncation']:.1f} | {avg['constant']:.1f} | "
                     f"{wins}/{len(rows)} | {wins_c}/{len(rows)} |")
    if any(len(runs) > 1 for runs in rows.values()):  # the spread behind each median
        lines += ["", "Per seed (predecessor seed in brackets where one predecessor was compressed with several seeds):", "",
                  "| task | seed | predecessor | Theseus | truncation | constant |", "|---|---|---|---|---|---|"]
        for task, runs in sorted(rows.items()):
            for r in sorted(runs, key=lambda r: r["seed"]):
                ps = r.get("predecessor_seed", r["seed"])
                lines.append(f"| {task} | {r['seed']}{f' [{ps}]' if ps != r['seed'] else ''} | "
                             + " | ".join(f"{100 * r[k]['score']:.1f}" if k in r else "-"
                                          for k in ("predecessor", "theseus", "truncation", "constant")) + " |")
    if rows:
        ret = [100 * t / p for t, p in zip(agg["theseus"], agg["predecessor"])]
        lines += ["", f"Retention of the macro average: {macro_ret:.1f}%; mean of the "
                      f"per-task retentions: {statistics.mean(ret):.2f}% (lowest {min(ret):.1f}%)."]
        lines += targets_lines(macro_ret, min(ret), wins, wins_c, len(rows))
    missing = [t for t in BUDGET if t not in rows]
    if missing:
        lines += ["", f"Not run yet: {', '.join(missing)} (`python scripts/results.py run --tasks {','.join(missing)}`)."]
    lines += ablation_lines(root)
    lines += bench_lines(root)
    lines += ["", "## Budgets and commands", ""]
    for task, runs in sorted(rows.items()):
        runs = sorted(runs, key=lambda r: r["seed"])
        r = runs[0]
        seeds = ", ".join(str(x["seed"]) for x in runs)
        lines.append(f"**{task}**: {json.dumps(r['budget'])}; seeds {seeds}; wall seconds (seed {r['seed']}) {json.dumps(r['seconds'])}")
        lines.append("```")
        lines += [r["commands"][k] for k in ("predecessor", *METHODS) if k in r["commands"]]
        lines.append("```")
    notes = ""
    if doc.is_file() and NOTES in doc.read_text():  # the hand-written reading survives a re-run
        notes = doc.read_text().split(NOTES, 1)[1]
    text = "\n".join(lines).replace(str(REPO) + "/", "").replace(str(Path.home()), "~")  # portable paths
    doc.write_text(text + "\n\n" + NOTES + notes.rstrip("\n") + "\n")
    print("\n".join(lines))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["run", "predecessors", "ablation", "bench", "report"])
    ap.add_argument("--tasks", default="mrpc,rte,stsb,cola,sst2")
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--seeds", default="42")
    ap.add_argument("--predecessor-seed", type=int, default=None,
                    help="compress this seed's fine-tuned predecessor for every seed (default: each seed its own)")
    ap.add_argument("--constant-seeds", default=None, help="run the constant-rate baseline only for these seeds")
    ap.add_argument("--profile", choices=["cpu", "full"], default="cpu",
                    help="cpu: step counts cut for 2 CPU cores; full: whole epochs and compress's default budget")
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time (a GPU trains several small models at once)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="ablation: variants to run")
    ap.add_argument("--from-ablation", action="store_true",
                    help="run: Theseus with the flags of the ablation's chosen variant (ROOT/ablation/summary.json)")
    ap.add_argument("--successor-layers", type=int, default=3)
    ap.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default="no",
                    help="every run's --mixed-precision (bf16: about 2x faster training on CPUs with AVX512-BF16)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--dry-run", action="store_true", help="print the commands that would run")
    ap.add_argument("--root", default=str(REPO / "runs" / "results"))
    ap.add_argument("--doc", default=str(REPO / "docs" / "results.md"))
    a = ap.parse_args()
    root = Path(a.root)
    tasks, seeds = a.tasks.split(","), [int(x) for x in a.seeds.split(",")]
    global DRY_RUN, PRECISION
    DRY_RUN, PRECISION = a.dry_run, a.mixed_precision
    if a.what in ("run", "predecessors", "ablation"):
        a.model = ensure_model(a.model)
    if a.what == "predecessors":  # every task's predecessor at once (then `ablation` and `run` share them)
        run_tasks([(t, a.predecessor_seed or seeds[0]) for t in tasks], a.model, root, a.successor_layers, a.data_dir,
                  a.predecessor_seed, a.profile, n_jobs=a.jobs, predecessors_only=True)
        return
    if a.what == "ablation":
        print(json.dumps(run_ablation(tasks, seeds, a.variants.split(","), a.model, root, a.successor_layers,
                                      a.data_dir, a.profile, a.jobs)["winner"]))
    if a.what == "run":
        flags, winner = (), None
        if a.from_ablation:
            f = root / "ablation" / "summary.json"
            # no ablation in ROOT (skipped, or a dry run): the default variant, which is compress's defaults
            winner = json.loads(f.read_text())["winner"] if f.is_file() else DEFAULT_VARIANT
            print(f"Theseus flags from the ablation: {winner}"
                  + ("" if f.is_file() else f" ({f} missing: compress's defaults)"), flush=True)
            flags = VARIANTS[winner]
        const = None if a.constant_seeds is None else {int(x) for x in a.constant_seeds.split(",")}
        run_tasks([(t, s) for s in seeds for t in tasks], a.model, root, a.successor_layers, a.data_dir,
                  a.predecessor_seed, a.profile, flags, const, a.jobs, variant=winner)
    if a.what == "bench":
        run_bench(tasks[0], root, seeds[0])
    if not DRY_RUN:
        report(root, Path(a.doc))


if __name__ == "__main__":
    main()
