#!/usr/bin/env python
"""Reproduce docs/results.md: predecessor, BERT-of-Theseus successor and baselines per GLUE task.

    python scripts/results.py run --tasks mrpc,rte --model ~/.cache/theseus-models/all-MiniLM-L6-v2
    python scripts/results.py bench --tasks mrpc  # speed of that task's predecessor vs Theseus successor
    python scripts/results.py report            # rewrites docs/results.md from runs/results/*/summary.json

Per task and seed, in runs/results/<task>/seed<seed>/:
  predecessor  finetune the encoder on the task (L layers)
  theseus      compress, linear curriculum (b=0.3, p=1 half-way), frozen predecessor and head
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
# CPU budget per task (2 cores): sequence length fits the task's texts; steps keep each task
# within about an hour. They are recorded in summary.json and in the report.
BUDGET = {  # task: (max_seq_length, finetune steps, compress steps, batch size)
    "sst2": (64, 600, 1200, 32),
    "cola": (64, 600, 1200, 32),
    "mrpc": (128, 350, 1150, 32),   # 3 / 10 epochs
    "stsb": (128, 540, 1200, 32),   # 3 epochs / ~6.7 epochs
    "rte": (128, 240, 780, 32),     # 3 / 10 epochs
}
METHODS = ("theseus", "constant", "truncation")
# Speed does not depend on the task's weights: one bench of predecessor vs successor serves all.
BENCH_ARGS = ["--backend", "torch", "--backend", "torch-bf16", "--backend", "onnx", "--backend", "onnx-int8",
              "--batch-sizes", "1,8", "--seq-lens", "128", "--iterations", "20", "--rounds", "5", "--min-seconds", "0.5"]


def sh(args, log):
    print("+", " ".join(map(str, args)), flush=True)
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


def run_task(task, model, root, seed, successor_layers, data_dir, predecessor_seed=None):
    seq, ft_steps, steps, bs = BUDGET[task]
    out = root / task / f"seed{seed}"
    out.mkdir(parents=True, exist_ok=True)
    # --predecessor-seed: compress one fine-tuned predecessor with several seeds (the paper's
    # spread is over compression runs); by default each seed fine-tunes its own predecessor.
    pred_seed = seed if predecessor_seed is None else predecessor_seed
    pred_out = root / task / f"seed{pred_seed}"
    pred = pred_out / "predecessor"
    def flags(s):  # the options every run of this task shares, with seed s
        return ["--task", task, "--seed", s, "--max-seq-length", seq, "--batch-size", bs, "--overwrite",
                *(["--data-dir", data_dir] if data_dir else [])]
    common = flags(seed)
    evals = max(1, steps // 5)
    old = out / "summary.json"  # wall times of runs finished by an earlier invocation are kept
    timings = json.loads(old.read_text()).get("seconds", {}) if old.is_file() else {}
    pred_args = ["finetune", "--model", model, "--max-steps", ft_steps, "--lr", "5e-5",
                 "--eval-steps", max(1, ft_steps // 3)]
    pred_common = flags(pred_seed)
    if not (pred / "metrics.json").is_file():  # the predecessor first (its own seed)
        pred_out.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        sh([*TD, *pred_args, *pred_common, "--output", pred], pred_out / "predecessor.log")
        if pred_seed == seed:
            timings["predecessor"] = round(time.time() - t0, 1)
    runs = {
        "theseus": ["compress", "--model", pred, "--max-steps", steps, "--lr", "1e-4",
                    "--successor-layers", successor_layers, "--eval-steps", evals],
        "constant": ["compress", "--model", pred, "--max-steps", steps, "--lr", "1e-4",
                     "--successor-layers", successor_layers, "--scheduler", "constant", "--replacing-rate", "0.5",
                     "--steps-to-full", steps // 2, "--eval-steps", evals],
        "truncation": ["finetune", "--model", pred, "--keep-layers", successor_layers,
                       "--max-steps", steps, "--lr", "5e-5", "--eval-steps", evals],
    }
    for name, args in runs.items():
        if (out / name / "metrics.json").is_file():
            continue
        t0 = time.time()
        sh([*TD, *args, *common, "--output", out / name], out / f"{name}.log")
        timings[name] = round(time.time() - t0, 1)
    summary = {"task": task, "seed": seed, "model": str(model), "successor_layers": successor_layers,
               "budget": {"max_seq_length": seq, "finetune_steps": ft_steps, "compress_steps": steps, "batch_size": bs},
               "predecessor_seed": pred_seed, "seconds": timings,
               "commands": {"predecessor": " ".join(map(str, ["theseus-deploy", *pred_args, *pred_common, "--output", pred])),
                            **{k: " ".join(map(str, ["theseus-deploy", *v, *common, "--output", out / k]))
                               for k, v in runs.items()}}}
    summary["predecessor"] = json.loads((pred / "metrics.json").read_text())["dev"]
    for name in runs:
        m = json.loads((out / name / "metrics.json").read_text())
        summary[name] = m["dev"]
        summary.setdefault("predecessor_layers", m.get("predecessor_layers"))  # compress records the depth
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def run_bench(task, root, seed):
    out = root / task / f"seed{seed}"
    if not (out / "theseus" / "config.json").is_file():
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
             f"{env.get('cpu')}, {env.get('torch_threads')} threads; random-id inputs at the shapes below; median of "
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
             "Generated by `python scripts/results.py report` from `runs/results/*/seed*/summary.json`;",
             "the runs themselves by `python scripts/results.py run` (commands below). Scores are the",
             "task's `score` (GLUE convention: mean of F1/accuracy for MRPC, of Pearson/Spearman for",
             "STS-B; Matthews for CoLA; accuracy otherwise) x 100, median over seeds.", "",
             f"| task | seeds | predecessor ({n_pred}L) | Theseus ({n_succ}L) | retention | truncation ({n_succ}L) | "
             f"constant p=0.5 ({n_succ}L) | Theseus beats truncation |",
             "|---|---|---|---|---|---|---|---|"]
    agg = {k: [] for k in ("predecessor", *METHODS)}
    wins = 0
    for task, runs in sorted(rows.items()):
        med = {k: statistics.median(r[k]["score"] for r in runs) * 100 for k in agg}
        for k in agg:
            agg[k].append(med[k])
        win = med["theseus"] > med["truncation"]
        wins += win
        lines.append(f"| {task} | {len(runs)} | {med['predecessor']:.1f} | {med['theseus']:.1f} | "
                     f"{100 * med['theseus'] / med['predecessor']:.1f}% | {med['truncation']:.1f} | "
                     f"{med['constant']:.1f} | {'yes' if win else 'no'} |")
    if rows:
        avg = {k: statistics.mean(v) for k, v in agg.items()}
        macro_ret = 100 * avg["theseus"] / avg["predecessor"]
        lines.append(f"| **macro avg** | | {avg['predecessor']:.1f} | {avg['theseus']:.1f} | "
                     f"{macro_ret:.1f}% | {avg['truncation']:.1f} | {avg['constant']:.1f} | "
                     f"{wins}/{len(rows)} |")
    if any(len(runs) > 1 for runs in rows.values()):  # the spread behind each median
        lines += ["", "Per seed (predecessor seed in brackets where one predecessor was compressed with several seeds):", "",
                  "| task | seed | predecessor | Theseus | truncation | constant |", "|---|---|---|---|---|---|"]
        for task, runs in sorted(rows.items()):
            for r in sorted(runs, key=lambda r: r["seed"]):
                ps = r.get("predecessor_seed", r["seed"])
                lines.append(f"| {task} | {r['seed']}{f' [{ps}]' if ps != r['seed'] else ''} | "
                             + " | ".join(f"{100 * r[k]['score']:.1f}" for k in ("predecessor", "theseus", "truncation", "constant")) + " |")
    if rows:
        ret = [100 * t / p for t, p in zip(agg["theseus"], agg["predecessor"])]
        lines += ["", f"Retention of the macro average: {macro_ret:.1f}%; mean of the "
                      f"per-task retentions: {statistics.mean(ret):.2f}% (lowest {min(ret):.1f}%)."]
    missing = [t for t in BUDGET if t not in rows]
    if missing:
        lines += ["", f"Not run yet: {', '.join(missing)} (`python scripts/results.py run --tasks {','.join(missing)}`)."]
    lines += bench_lines(root)
    lines += ["", "## Budgets and commands", ""]
    for task, runs in sorted(rows.items()):
        runs = sorted(runs, key=lambda r: r["seed"])
        r = runs[0]
        seeds = ", ".join(str(x["seed"]) for x in runs)
        lines.append(f"**{task}**: {json.dumps(r['budget'])}; seeds {seeds}; wall seconds (seed {r['seed']}) {json.dumps(r['seconds'])}")
        lines.append("```")
        lines += [r["commands"][k] for k in ("predecessor", *METHODS)]
        lines.append("```")
    notes = ""
    if doc.is_file() and NOTES in doc.read_text():  # the hand-written reading survives a re-run
        notes = doc.read_text().split(NOTES, 1)[1]
    text = "\n".join(lines).replace(str(REPO) + "/", "").replace(str(Path.home()), "~")  # portable paths
    doc.write_text(text + "\n\n" + NOTES + notes.rstrip("\n") + "\n")
    print("\n".join(lines))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["run", "bench", "report"])
    ap.add_argument("--tasks", default="mrpc,rte,stsb,cola,sst2")
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--seeds", default="42")
    ap.add_argument("--predecessor-seed", type=int, default=None,
                    help="compress this seed's fine-tuned predecessor for every seed (default: each seed its own)")
    ap.add_argument("--successor-layers", type=int, default=3)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--root", default=str(REPO / "runs" / "results"))
    ap.add_argument("--doc", default=str(REPO / "docs" / "results.md"))
    a = ap.parse_args()
    root = Path(a.root)
    if a.what == "run":
        a.model = ensure_model(a.model)
        for task in a.tasks.split(","):
            for seed in a.seeds.split(","):
                run_task(task, a.model, root, int(seed), a.successor_layers, a.data_dir, a.predecessor_seed)
    if a.what == "bench":
        run_bench(a.tasks.split(",")[0], root, a.seeds.split(",")[0])
    report(root, Path(a.doc))


if __name__ == "__main__":
    main()
