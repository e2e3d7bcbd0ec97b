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
  kd           vanilla KD (`--methods`): truncation + soft targets from the predecessor
               (finetune --keep-layers n --distill-alpha A --distill-temperature T)
  theseus-kd   Theseus + KD (`--methods`): compress --distill-alpha A --distill-temperature T
Every method of a task gets the same number of steps (and, but for the cpu profile's truncation,
the same learning rate). Every run writes metrics.json (with its loyalty to the predecessor);
the task's summary.json collects them. Runs that already finished are not repeated, and a run
that was killed continues from its checkpoint (`--resume`) when the script is run again.
A report keeps its inputs (docs/records/<doc name>/: scores, no weights). To continue a grid whose
run folders are gone (a new machine), copy that folder to ROOT and run the same commands: finished
runs are kept, and a predecessor is fine-tuned again only where a run still needs its weights
(same CPU type: the same dev score to the last digit, as measured; on another, compare its new
metrics.json with the records', since the finished runs compressed the earlier one). A records
folder's earlier.json holds the tasks that ran before reports kept their inputs (the figures a report
printed then): the report shows them marked and counts them until the task is run again into ROOT.

--profile mpnet (docs/results-12to6.md): MPNet-base 12 -> 6, all five methods, MRPC and RTE first:

    python scripts/results.py --profile mpnet --model ~/.cache/theseus-models/all-mpnet-base-v2 \
        --data-dir ../shared/data/glue run --tasks mrpc,rte     # then --tasks stsb,cola; then `bench`
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
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
# --profile mpnet: MPNet-base (12 layers, hidden 768) -> 6 (docs/results-12to6.md). Predecessors:
# 3 epochs at 2e-5 (the BERT paper's fine-tuning recipe for base-size encoders); the 6-layer runs:
# compress's default budget for the task (the same rule as --profile full), every method the same
# steps and lr. Costs cut at no accuracy cost: batches grouped by length (each pads to
# its own longest, never to max_seq_length), max_seq_length = the 99th percentile of the task's
# tokenized training lengths (rounded up to 8, at most 256: RTE's p99 is 202 tokens: a cap of 128
# would truncate 13% of its training pairs, 208 truncates 0.7%); checkpoints every SAVE_STEPS so a
# killed run resumes (a CPU-hours run must survive a session's end).
MPNET = {"tasks": ("mrpc", "rte", "stsb", "cola"), "predecessor_epochs": 3, "predecessor_lr": "2e-5",
         "batch_size": 32, "seq_percentile": 99, "seq_cap": 256, "save_steps": 50, "successor_layers": 6}
PREDECESSOR_LR, SUCCESSOR_LR = "5e-5", "1e-4"
METHODS = ("theseus", "constant", "truncation")  # docs/results.md's grid (the default --methods)
ALL_METHODS = ("truncation", "constant", "kd", "theseus", "theseus-kd")
# Soft targets for kd and theseus-kd (--distill-alpha / --distill-temperature): an even mix and
# T = 2 (DistilBERT's temperature); not chosen by an ablation yet (the kd-* variants below are that
# ablation: `results.py ablation --variants unfreeze-short,kd-a0.5-t2,kd-a0.9-t2,kd-a0.5-t4`).
KD = {"alpha": "0.5", "temperature": "2"}
# Speed does not depend on the task's weights: one bench of predecessor vs successor serves all.
BENCH_BACKENDS = ("torch", "torch-bf16", "onnx", "onnx-int8")  # `bench --backends` picks among them
BENCH_ARGS = ["--batch-sizes", "1,8", "--seq-lens", "128", "--iterations", "20", "--rounds", "9", "--min-seconds", "0.5"]
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
    # what truncation trains and Theseus keeps frozen (docs/results.md's reading of SST-2): the embeddings
    "unfreeze-short-emb": lambda S: ["--unfreeze-head", "--unfreeze-embeddings", "--steps-to-full", max(1, S // 4)],
    # the distillation option on top of the default recipe (which soft targets, if any, compress
    # should default to): each names A and T, and the no-KD control is unfreeze-short itself
    "kd-a0.5-t2": lambda S: ["--unfreeze-head", "--steps-to-full", max(1, S // 4),
                             "--distill-alpha", "0.5", "--distill-temperature", "2"],
    "kd-a0.9-t2": lambda S: ["--unfreeze-head", "--steps-to-full", max(1, S // 4),
                             "--distill-alpha", "0.9", "--distill-temperature", "2"],
    "kd-a0.5-t4": lambda S: ["--unfreeze-head", "--steps-to-full", max(1, S // 4),
                             "--distill-alpha", "0.5", "--distill-temperature", "4"],
}
DEFAULT_VARIANT = "unfreeze-short"


DRY_RUN = False  # --dry-run: print the commands, run nothing
SUCCESSOR_STEPS = None  # --successor-steps: every method's step count (default: the profile's)
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
    with open(log, "a" if "--resume" in map(str, args) else "w") as f:  # a resumed run continues its log
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
    from theseus_deploy.recipes.loop import resolve_budget

    n = len(load_task(task, data_dir, "train").labels)
    spe = math.ceil(n / batch_size)
    return resolve_budget(CompressConfig(task=task, epochs=epochs, batch_size=batch_size), n, spe)[0]


def data_seq_length(task, data_dir, model, percentile=MPNET["seq_percentile"], cap=MPNET["seq_cap"]) -> int:
    """max_seq_length from the data: the `percentile` of the task's training lengths in the
    model's own tokens (special tokens included), rounded up to a multiple of 8, at most `cap`."""
    import math

    import numpy as np

    from theseus_deploy.data import load_task
    from theseus_deploy.hf import load_tokenizer

    data = load_task(task, data_dir, "train")
    a = [t[0] for t in data.texts]
    b = [t[1] for t in data.texts] if data.texts[0][1] is not None else None
    lengths = [len(x) for x in load_tokenizer(str(model))(a, b, truncation=False)["input_ids"]]
    return int(min(cap, max(8, 8 * math.ceil(float(np.percentile(lengths, percentile)) / 8))))


def budget(task, profile, data_dir, model=None):
    """(max_seq_length, predecessor budget flags, 3-layer steps, batch size) of a task."""
    if profile == "cpu":
        seq, ft_steps, steps, bs = BUDGET[task]
        return seq, ["--max-steps", ft_steps], steps, bs
    if profile == "mpnet":
        bs = MPNET["batch_size"]
        steps = SUCCESSOR_STEPS or default_steps(task, data_dir, bs)
        return (data_seq_length(task, data_dir, model), ["--epochs", MPNET["predecessor_epochs"]], steps, bs)
    seq, ft_epochs, epochs, bs = FULL[task]
    return seq, ["--epochs", ft_epochs], default_steps(task, data_dir, bs, epochs), bs


def has_weights(model_dir: Path) -> bool:
    """Whether MODEL_DIR holds a model a run can load (config.json and its safetensors), not only scores."""
    return (model_dir / "config.json").is_file() and any(model_dir.glob("*.safetensors"))


def resumable(args, out):
    """`args` plus --resume where a killed run left its checkpoint (OUT.partial/checkpoint.pt):
    finetune and compress then continue at the same step with the same data order and draws."""
    return [*args, "--resume"] if (Path(str(out) + ".partial") / "checkpoint.pt").is_file() else list(args)


def plan_task(task, model, root, seed, successor_layers, data_dir, predecessor_seed=None, profile="cpu",
              theseus_flags=(), constant=True, variant=None, methods=METHODS, needs_predecessor=False):
    """The runs one (task, seed) needs that are not finished yet: (predecessor job or None, [method jobs]).
    `needs_predecessor`: runs planned elsewhere (the ablation's) need the predecessor's weights too."""
    seq, pred_budget, steps, bs = budget(task, profile, data_dir, model)
    out = root / task / f"seed{seed}"
    # --predecessor-seed: compress one fine-tuned predecessor with several seeds (the paper's
    # spread is over compression runs); by default each seed fine-tunes its own predecessor.
    pred_seed = seed if predecessor_seed is None else predecessor_seed
    pred_out = root / task / f"seed{pred_seed}"
    pred = pred_out / "predecessor"

    def flags(s):  # the options every run of this task shares, with seed s
        return ["--task", task, "--seed", s, "--max-seq-length", seq, "--batch-size", bs, "--overwrite",
                *(["--group-by-length", "--save-steps", MPNET["save_steps"]] if profile == "mpnet" else []),
                *precision_flags(), *(["--data-dir", data_dir] if data_dir else [])]
    common = flags(seed)
    evals = max(1, steps // 5)
    pred_args = ["finetune", "--model", model, *pred_budget,
                 "--lr", MPNET["predecessor_lr"] if profile == "mpnet" else PREDECESSOR_LR]
    if profile == "cpu":
        pred_args += ["--eval-steps", max(1, pred_budget[1] // 3)]
    pred_common = flags(pred_seed)
    lr = SUCCESSOR_LR if profile in ("full", "mpnet") else None
    kd = ["--distill-alpha", KD["alpha"], "--distill-temperature", KD["temperature"]]
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
    # KD variants: the same runs as truncation and Theseus, plus the soft targets
    runs["kd"] = [*runs["truncation"], *kd]
    runs["theseus-kd"] = [*runs["theseus"], *kd]
    # in the order of `methods` (--methods): on a CPU budget, the runs that matter most start first
    runs = {k: runs[k] for k in methods if k in runs and (constant or k != "constant")}
    done = root / "ablation" / task / f"{variant}-seed{seed}"
    reuse = bool(variant) and (done / "metrics.json").is_file() and not (out / "theseus").exists()
    if reuse and DRY_RUN:
        print("+ ln -s", done, out / "theseus", flush=True)
    elif reuse:
        out.mkdir(parents=True, exist_ok=True)
        (out / "theseus").symlink_to(os.path.relpath(done, out))  # the same command, already run
    jobs = [(name, resumable([*TD, *args, *common, "--output", out / name], out / name), out / f"{name}.log")
            for name, args in runs.items()
            if not (out / name / "metrics.json").is_file() and not (reuse and name == "theseus")]
    # a predecessor is fine-tuned when it has no metrics.json, or when a run still needs its weights and
    # they are not there (a root continued from its records, docs/records/<doc>: scores, no weights)
    pred_job = None
    if not (pred / "metrics.json").is_file() or ((jobs or needs_predecessor) and not has_weights(pred)):
        pred_job = (resumable([*TD, *pred_args, *pred_common, "--output", pred], pred), pred_out / "predecessor.log")
    meta = {"task": task, "seed": seed, "model": str(model), "successor_layers": successor_layers,
            "budget": {"profile": profile, "max_seq_length": seq, "predecessor": " ".join(map(str, pred_budget)),
                       "compress_steps": steps, "batch_size": bs, "mixed_precision": PRECISION,
                       **({"max_seq_length_from": f"p{MPNET['seq_percentile']} of the tokenized train lengths, "
                                                  f"rounded up to 8, at most {MPNET['seq_cap']}",
                           "group_by_length": True, "save_steps": MPNET["save_steps"],
                           "distill": KD} if profile == "mpnet" else {})},
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
    # written again after every finished run, so a grid that takes CPU-days reports what it has:
    # the methods without a result yet are listed, and the report says so
    summary["unfinished"] = [k for k in meta["commands"] if k != "predecessor" and not (out / k / "metrics.json").is_file()]
    for name in meta["commands"]:
        if name == "predecessor" or name in summary["unfinished"]:
            continue
        m = json.loads((out / name / "metrics.json").read_text())
        summary[name] = m["dev"]
        if m.get("predecessor_layers"):  # compress records the depth
            summary.setdefault("predecessor_layers", m["predecessor_layers"])
        if m.get("loyalty"):  # to the predecessor, of the kept weights, on dev (compress; finetune --keep-layers)
            summary.setdefault("loyalty", {})[name] = m["loyalty"]
    # the machine each run was made on: the runs of this invocation here, earlier ones as recorded
    summary["machine"] = json.loads(old.read_text()).get("machine", {}) if old.is_file() else {}
    if timings:
        from theseus_deploy.bench.env import environment

        env = environment()
        summary["machine"].update({name: env for name in timings})
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def timed(job, timings):
    name, args, log = job
    t0 = time.time()
    sh(args, log)
    timings[name] = round(time.time() - t0, 1)


def run_tasks(pairs, model, root, successor_layers, data_dir, predecessor_seed=None, profile="cpu",
              theseus_flags=(), constant_seeds=None, n_jobs=1, predecessors_only=False, variant=None,
              methods=METHODS):
    """Every (task, seed) pair: predecessors first, then the 3-layer methods, `n_jobs` at a time."""
    plans = []
    for task, seed in pairs:
        constant = constant_seeds is None or seed in constant_seeds
        plans.append(plan_task(task, model, root, seed, successor_layers, data_dir, predecessor_seed, profile,
                               theseus_flags, constant, variant, methods))
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
    lock = threading.Lock()

    def finished(meta):  # the task's summary.json after each finished run, not only at the end
        with lock:
            summarize(root, meta, timings[(meta["task"], meta["seed"])])

    _parallel([(job, timings[(m["task"], m["seed"])], lambda m=m: finished(m)) for _, jobs, m in plans for job in jobs],
              n_jobs)
    return [summarize(root, meta, timings[(meta["task"], meta["seed"])]) for _, _, meta in plans]


def _parallel(items, n_jobs):
    """Run (job, timings[, after]) items, `n_jobs` at a time; `after()` once a job has finished."""
    def one(item):
        timed(item[0], item[1])
        if len(item) > 2:
            item[2]()

    if n_jobs <= 1:
        for item in items:
            one(item)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(n_jobs) as pool:
        for f in [pool.submit(one, item) for item in items]:
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
        pending = any(not (root / "ablation" / task / f"{v}-seed{seed}" / "metrics.json").is_file()
                      for v in variants for seed in seeds)
        pred_job, _, meta = plan_task(task, model, root, 42, successor_layers, data_dir, 42, profile, (), False,
                                      methods=(), needs_predecessor=pending)
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


def variant_distill(v: str):
    """The soft targets a variant trains with ({"alpha", "temperature"}), or None for one without:
    `run --from-ablation` gives vanilla KD the chosen variant's own, so kd and Theseus compare alike."""
    flags = [str(f) for f in VARIANTS[v](4000)]
    if "--distill-alpha" not in flags:
        return None
    get = lambda k, d: flags[flags.index(k) + 1] if k in flags else d  # noqa: E731
    return {"alpha": get("--distill-alpha", None), "temperature": get("--distill-temperature", "1")}


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


def run_bench(task, root, seed, backends=BENCH_BACKENDS):
    out = root / task / f"seed{seed}"
    if not DRY_RUN and not (out / "theseus" / "config.json").is_file():
        raise SystemExit(f"error: no finished runs for {task} seed {seed} in {root}: run them first")
    args = [*TD, "bench", "--model", out / "predecessor", "--model", out / "theseus",
            *[x for b in backends for x in ("--backend", b)], *BENCH_ARGS,
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

    def label_loyalty(r):  # the run's label loyalty to its predecessor (metrics.json), where recorded
        m = root / "ablation" / r["task"] / f"{r['variant']}-seed{r['seed']}" / "metrics.json"
        m = m if m.is_file() else Path(r["out"]) / "metrics.json"
        loy = json.loads(m.read_text()).get("loyalty") if m.is_file() else None
        return loy.get("label") if loy else None

    loyal = {id(r): label_loyalty(r) for r in rows}
    show = any(x is not None for x in loyal.values())  # ablations from before loyalty have none
    lines = ["", "## Ablation: what closes the gap (`python scripts/results.py ablation`)", "",
             "Theseus successor's dev score x100 on one predecessor per task, same steps and learning rate; mean over "
             "seeds; retention = mean of score / predecessor" + ("; label loyalty to the predecessor x100 beside each "
                                                                 "score" if show else "") + ".", "",
             "| variant | flags | " + " | ".join(tasks) + " | mean retention |", "|---|---|" + "---|" * len(tasks) + "---|"]
    for v in variants:
        sel = [r for r in rows if r["variant"] == v]
        cells = []
        for t in tasks:
            x = [r["score"] for r in sel if r["task"] == t]
            y = [loyal[id(r)] for r in sel if r["task"] == t and loyal[id(r)] is not None]
            cells.append((f"{100 * statistics.mean(x):.1f} ({len(x)})" if x else "-")
                         + (f", loyalty {100 * statistics.mean(y):.1f}" if y else ""))
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


# The targets docs/results.md (the full-budget results) is held to.
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


# ---------------------------------------------------------------------------- the report's inputs, kept
RECORDS_MARK = "records.json"  # what keep_records writes into its folder (and what lets it replace one)
# In a records folder (or ROOT): tasks whose run folders were lost before reports kept their inputs, as
# the figures a report printed from them (x100, with the commit of that doc). The report shows them,
# marked, beside the runs it has, and counts them in the targets; a task run again into ROOT replaces its entry.
EARLIER = "earlier.json"


def _eval_rows(log: Path) -> str:
    """The lines of a train_log.jsonl that the report reads (its dev evaluations), not every step's loss."""
    return "".join(line + "\n" for line in log.read_text().splitlines() if '"eval"' in line)


def keep_records(root: Path, dest: Path) -> int:
    """Copy what a report is generated from into DEST, in ROOT's layout: each summary.json, each run's
    metrics.json and the evaluation rows of its train_log.jsonl, the ablation's and the bench's
    results.json. `report --root DEST` then writes the same tables from these files alone, so a doc's
    figures stay re-derivable when the run folders are gone (they hold the weights and checkpoints,
    hundreds of MB a run, and live on one machine: a new machine starts without them). DEST is
    replaced whole (built beside it, then renamed), and only if it is such a folder already."""
    root, dest = Path(root), Path(dest)
    if root.resolve() == dest.resolve() or not root.is_dir():
        return 0
    if dest.exists() and not (dest / RECORDS_MARK).is_file():
        raise SystemExit(f"error: {dest} exists and is not a records folder (no {RECORDS_MARK}): pass another --records")
    files = {}  # path relative to DEST -> text

    def take(src: Path, rel: Path):
        if src.is_file():
            text = _eval_rows(src) if src.name == "train_log.jsonl" else src.read_text()
            files[rel] = text.replace(str(Path.home()) + "/", "~/")  # as the doc writes paths: no one's home

    for f in sorted(root.glob("*/seed*/summary.json")):
        s = json.loads(f.read_text())
        rel = f.parent.relative_to(root)
        take(f, rel / "summary.json")
        pred = Path(s["task"]) / f"seed{s.get('predecessor_seed', s['seed'])}" / "predecessor"
        take(root / pred / "metrics.json", pred / "metrics.json")
        for name in s.get("commands", {}):
            if name != "predecessor":
                for leaf in ("metrics.json", "train_log.jsonl"):
                    take(f.parent / name / leaf, rel / name / leaf)
    take(root / EARLIER if (root / EARLIER).is_file() else dest / EARLIER, Path(EARLIER))  # carried over
    a = root / "ablation" / "summary.json"
    if a.is_file():
        take(a, Path("ablation") / "summary.json")
        for r in json.loads(a.read_text())["rows"]:
            run = Path("ablation") / r["task"] / f"{r['variant']}-seed{r['seed']}"
            take(root / run / "metrics.json" if (root / run).is_dir() else Path(r["out"]) / "metrics.json",
                 run / "metrics.json")
    take(root / "bench" / "results.json", Path("bench") / "results.json")
    if not files:
        return 0
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for rel, text in files.items():
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / rel).write_text(text)
    (tmp / RECORDS_MARK).write_text(json.dumps({"from": str(root).replace(str(Path.home()), "~"),
                                                "files": len(files)}, indent=2) + "\n")
    old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
    if dest.exists():
        dest.rename(old)
    tmp.rename(dest)
    shutil.rmtree(old, ignore_errors=True)
    return len(files)


def records_dir(doc: Path) -> Path:
    """Where a doc's inputs are kept: docs/records/<doc name>/ beside docs/<doc name>.md."""
    return Path(doc).parent / "records" / Path(doc).stem


def records_note(root: Path, doc: Path, records: Path | None = None, flags: str = "") -> str:
    """The doc's line that says where its inputs are kept and the command that writes it again from them."""
    d = Path(records) if records else records_dir(doc)
    return (f"Its inputs are kept in `{d}/` (`python scripts/results.py{flags} report --root {d} --doc {doc}` "
            "writes these tables again)." if root.resolve() != d.resolve() else "")


def report(root: Path, doc: Path, records: Path | None = None):
    rows, partial = {}, []
    for f in sorted(root.glob("*/seed*/summary.json")):
        s = json.loads(f.read_text())
        if any(k in METHODS for k in s.get("unfinished", ())):  # this table needs all three methods of a run
            partial.append(f"{s['task']} seed {s['seed']} ({', '.join(s['unfinished'])} not finished)")
            continue
        rows.setdefault(s["task"], []).append(s)
    first = next(iter(rows.values()))[0] if rows else {}
    n_pred, n_succ = first.get("predecessor_layers") or "?", first.get("successor_layers", "?")
    model = Path(first.get("model", "MiniLM")).name
    lines = [f"# Results: {model}, {n_pred} -> {n_succ} layers on GLUE dev", "",
             f"Generated by `python scripts/results.py report` from `{root}/*/seed*/summary.json`;",
             "the runs themselves by `python scripts/results.py run` (commands below). Scores are the",
             "task's `score` (GLUE convention: mean of F1/accuracy for MRPC, of Pearson/Spearman for",
             "STS-B; Matthews for CoLA; accuracy otherwise) x 100, median over seeds.",
             *filter(None, [records_note(root, doc, records)]), "",
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
    if partial:
        lines += ["", f"Still running, not in the table: {'; '.join(partial)}."]
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


# ---------------------------------------------------------------------------- KD + loyalty report
# The KD + loyalty report's targets, each reported as met / not met and by how much, computed from the table
TARGETS_KD = {
    "12to6": {"macro_retention": 98.4, "must_tasks": ("mrpc", "rte"), "lowest_task_retention": 96.0,
              "every": ("truncation", "kd"), "most": ("constant",), "label_loyalty": True},
    "6to3": {"macro_retention": 98.0, "must_tasks": (), "lowest_task_retention": None, "of": 5,
             "every": ("truncation",), "at_least": {"constant": 4}, "label_loyalty": False},
}
LABELS = {"truncation": "truncation", "constant": "constant p=0.5", "kd": "vanilla KD", "theseus": "Theseus",
          "theseus-kd": "Theseus + KD"}


def _loyalty_cell(loy) -> str:
    if not loy:
        return "-"
    if "pearson" in loy:
        return f"r {loy['pearson']:.3f}"
    return f"{100 * loy['label']:.1f} / {100 * loy['probability']:.1f}"


def kd_table(rows: dict) -> dict:
    """Per task: medians over seeds (x100) of every method present; the best Theseus recipe (of
    theseus and theseus-kd, the one with the higher macro average over the tasks both ran: one
    recipe for every task, not a per-task pick)."""
    methods = [m for m in ALL_METHODS if any(m in r for runs in rows.values() for r in runs)]
    med, loy = {}, {}
    for task, runs in rows.items():
        med[task] = {k: statistics.median(r[k]["score"] for r in runs if k in r) * 100
                     for k in ("predecessor", *methods) if any(k in r for r in runs)}
        # loyalty of the median seed's run where there are several (the seed whose score is the median)
        loy[task] = {}
        for k in methods:
            have = sorted((r[k]["score"], r["seed"], (r.get("loyalty") or {}).get(k)) for r in runs if k in r)
            if have:
                loy[task][k] = have[(len(have) - 1) // 2][2]
    candidates = [m for m in ("theseus", "theseus-kd") if m in methods]
    both = [t for t in med if all(m in med[t] for m in candidates)]
    best = max(candidates, key=lambda m: (statistics.mean(med[t][m] for t in both) if both else -1,
                                          m == "theseus")) if candidates else None
    return {"methods": methods, "median": med, "loyalty": loy, "best": best}


def kd_targets(t: dict, which: str) -> list[tuple]:
    """(target, measured, met, by how much) rows for the best Theseus recipe."""
    spec, med, best = TARGETS_KD[which], t["median"], t["best"]
    tasks = [k for k in sorted(med) if best in med[k]]
    out = []
    if not tasks:
        return out
    pred = statistics.mean(med[k]["predecessor"] for k in tasks)
    macro = 100 * statistics.mean(med[k][best] for k in tasks) / pred
    must = [k for k in spec["must_tasks"] if k not in tasks]
    goal = spec["macro_retention"]
    out.append((f"macro retention >= {goal}% over the tasks run"
                + (f" ({', '.join(x.upper() for x in spec['must_tasks'])} among them)" if spec["must_tasks"] else ""),
                f"{macro:.1f}% over {len(tasks)} ({', '.join(tasks)})" + (f"; missing {', '.join(must)}" if must else ""),
                macro >= goal and not must, f"{macro - goal:+.1f} points"))
    ret = {k: 100 * med[k][best] / med[k]["predecessor"] for k in tasks}
    if spec.get("lowest_task_retention") is not None:
        low = min(ret, key=ret.get)
        goal = spec["lowest_task_retention"]
        out.append((f"lowest task >= {goal:.0f}%", f"{ret[low]:.1f}% ({low})", ret[low] >= goal,
                    f"{ret[low] - goal:+.1f} points"))
    n_of = spec.get("of", len(tasks))
    for base in spec["every"]:
        have = [k for k in tasks if base in med[k]]
        if not have:
            continue
        margin = {k: med[k][best] - med[k][base] for k in have}
        wins = sum(m > 0 for m in margin.values())
        worst = min(margin, key=margin.get)
        out.append((f"ahead of {LABELS[base]} on every task run" if "of" not in spec
                    else f"ahead of {LABELS[base]} on {n_of} of {n_of} tasks",
                    f"{wins} of {len(have)}", wins == len(have) and len(have) >= n_of,
                    f"smallest margin {margin[worst]:+.1f} points ({worst})"))
    for base in spec.get("most", ()):
        have = [k for k in tasks if base in med[k]]
        if have:
            wins = sum(med[k][best] > med[k][base] for k in have)
            need = len(have) // 2 + 1
            out.append((f"ahead of {LABELS[base]} on most tasks", f"{wins} of {len(have)}", wins >= need,
                        f"{wins - need:+d} tasks vs the {need} needed"))
    for base, need in spec.get("at_least", {}).items():
        have = [k for k in tasks if base in med[k]]
        if have:
            wins = sum(med[k][best] > med[k][base] for k in have)
            out.append((f"ahead of {LABELS[base]} on >= {need} of {n_of} tasks", f"{wins} of {len(have)}",
                        wins >= need, f"{wins - need:+d} tasks"))
    if spec.get("label_loyalty"):
        have = [k for k in tasks if t["loyalty"].get(k, {}).get(best)]
        out.append(("label loyalty reported per task", f"{len(have)} of {len(tasks)}", len(have) == len(tasks),
                    "" if len(have) == len(tasks) else f"missing {', '.join(k for k in tasks if k not in have)}"))
    return out


def last_eval(root: Path, task: str, seed: int, method: str):
    """The run's last dev evaluation (score), from its train_log.jsonl: what the run ends at with no
    choice among its evaluations. None where the log has none."""
    f = root / task / f"seed{seed}" / method / "train_log.jsonl"
    if not f.is_file():
        return None
    evals = [r["eval"]["score"] for r in map(json.loads, f.read_text().splitlines()) if "eval" in r]
    return evals[-1] if evals else None


def last_step_lines(root: Path, rows: dict, methods: list, best) -> list[str]:
    """The table again with each run's last evaluation instead of its best of the evaluations on dev:
    the runs keep their best dev evaluation (the usual GLUE protocol), which selects on dev; this shows
    how much of a figure that selection is."""
    last = {}
    for task, runs in rows.items():
        for m in methods:
            v = [x for x in ((r["last"].get(m) if "last" in r else last_eval(root, task, r["seed"], m))
                             for r in runs if m in r) if x is not None]
            if v:
                last.setdefault(task, {})[m] = 100 * statistics.median(v)
    if not last:
        return []
    pred = {task: 100 * statistics.median(r["predecessor"]["score"] for r in runs) for task, runs in rows.items()}
    lines = ["", "## Without selection on dev: each run's last evaluation", "",
             "Every run above keeps the best of its evaluations on dev (the usual GLUE protocol, which chooses on",
             "dev). Here each run's last evaluation instead (from its train_log.jsonl): no choice at all.", "",
             "| task | " + " | ".join(LABELS[m] for m in methods) + " |", "|---|" + "---|" * len(methods)]
    for task in sorted(last):
        lines.append(f"| {task} | " + " | ".join(
            f"{last[task][m]:.1f} ({100 * last[task][m] / pred[task]:.1f}%)" if m in last[task] else "-"
            for m in methods) + " |")
    have = [t for t in last if best in last[t]]
    if have:
        p = statistics.mean(pred[t] for t in have)
        lines += ["", f"Macro retention of {LABELS[best]} at the last evaluation: "
                      f"{100 * statistics.mean(last[t][best] for t in have) / p:.1f}% over {len(have)} "
                      f"({', '.join(sorted(have))})."]
    return lines


CEILING_SLACK = 1.0  # points: a successor this far above its predecessor is not noise on these dev sets


def ceiling_lines(med: dict, methods: list, rows: dict) -> list[str]:
    """Tasks where some successor beats its own predecessor by more than CEILING_SLACK points: there
    the predecessor is no ceiling (its fine-tuning budget is smaller than the successors'), so a
    retention above 100% measures budgets, not what compression keeps. Said under the targets."""
    over = {}
    for task, m in sorted(med.items()):
        top = max((m[k], k) for k in methods if k in m) if any(k in m for k in methods) else None
        if top and top[0] - m["predecessor"] > CEILING_SLACK:
            over[task] = top
    if not over:
        return []
    lines = ["", "**The predecessor is not a ceiling** on " + ", ".join(over) + ": a successor scores above it ("
             + "; ".join(f"{task}: {LABELS[k]} {v:.1f} vs {med[task]['predecessor']:.1f}, {v - med[task]['predecessor']:+.1f} "
                         "points" for task, (v, k) in over.items())
             + "). There the predecessor got the smaller fine-tuning budget ("
             + "; ".join(f"{task}: predecessor {rows[task][0]['budget'].get('predecessor', '?')}, each successor "
                         f"{rows[task][0]['budget'].get('compress_steps', '?')} steps" for task in over)
             + "), so retention above 100% there reflects the predecessor's smaller budget, not a gain from compression; "
               "the comparison that isolates the method is between the successors, which share steps and learning rate."]
    return lines


def _machines(rows: dict) -> list[str]:
    seen = {}
    for runs in rows.values():
        for r in runs:
            for env in (r.get("machine") or {}).values():
                v = env.get("versions", {})
                key = (f"{env.get('gpu') or env.get('cpu')} ({', '.join(env.get('cpu_flags') or ['no AVX512/AMX flags'])}"
                       f"{'; CPU ' + env['cpu'] if env.get('gpu') else ''}), {env.get('torch_threads')} threads, "
                       f"torch {v.get('torch')}, transformers {v.get('transformers')}, python {env.get('python')}")
                seen[key] = seen.get(key, 0) + 1
    return [f"- {k}: {n} runs" for k, n in seen.items()]


def earlier_rows(root: Path, records: Path, have) -> tuple[dict, dict | None, Path | None]:
    """The EARLIER tasks not in HAVE (the tasks ROOT ran), as summary-shaped rows (scores back to
    fractions; `last`: the last evaluations), with the file's own fields and its path. ROOT's EARLIER
    first, else the records folder's."""
    f = next((x for x in (root / EARLIER, Path(records) / EARLIER) if x.is_file()), None)
    if f is None:
        return {}, None, None
    e = json.loads(f.read_text())

    def frac(d):
        return {m: v / 100 for m, v in d.items()}
    rows = {task: [{"task": task, "seed": t["seeds"][0], "predecessor": {"score": t["predecessor"] / 100},
                    **{m: {"score": v} for m, v in frac(t["scores"]).items()},
                    "loyalty": {m: frac(v) for m, v in t["loyalty"].items()}, "last": frac(t["last"]),
                    "budget": t["budget"], "seconds": t["seconds"], "commands": t["commands"]}]
            for task, t in e["tasks"].items() if task not in have}
    return rows, e, f


def report_kd(root: Path, doc: Path, which: str = "12to6", records: Path | None = None):
    """docs/results-12to6.md (and the 6 -> 3 table with KD): every method beside the predecessor,
    retention, loyalty, the targets as met / not met and by how much, budgets, commands, machine."""
    rows = {}
    for f in sorted(root.glob("*/seed*/summary.json")):
        s = json.loads(f.read_text())
        rows.setdefault(s["task"], []).append(s)
    prior, earlier, earlier_file = earlier_rows(root, records or records_dir(doc), set(rows))
    rows.update(prior)
    first = next(iter(rows.values()))[0] if rows else {}
    planned = ("all-mpnet-base-v2", 12, 6) if which == "12to6" else ("all-MiniLM-L6-v2", 6, 3)  # before any result
    n_pred, n_succ = first.get("predecessor_layers") or planned[1], first.get("successor_layers", planned[2])
    model = Path(first.get("model", planned[0])).name
    t = kd_table(rows)
    methods, med, best = t["methods"], t["median"], t["best"]
    lines = [f"# Results: {model}, {n_pred} -> {n_succ} layers on GLUE dev: Theseus, distillation, loyalty", "",
             f"Generated by `python scripts/results.py{' --profile mpnet' if which == '12to6' else ''} report` from "
             f"`{root}/*/seed*/summary.json`" + (f" and `{earlier_file}` (tasks marked †)" if prior else "")
             + "; the runs by `python scripts/results.py run` (commands below). Scores:",
             "the task's `score` (MRPC mean of F1 and accuracy, STS-B of Pearson and Spearman, CoLA Matthews, else",
             "accuracy) x 100, median over seeds; retention = successor / predecessor (macro retention: of the",
             "macro averages, as the paper's 98.4%). Every method of a task has the same steps and learning rate;",
             "kd = vanilla KD (truncation + soft targets)"
             + (", Theseus + KD = compress with the same soft targets." if "theseus-kd" in methods else "."),
             *filter(None, [records_note(root, doc, records, " --profile mpnet" if which == "12to6" else
                                         f" --profile full --methods {','.join(methods)}")]), ""]
    if not rows:
        lines += ["No results yet."]
    else:
        head = ["task", "seeds", f"predecessor ({n_pred}L)"] + [f"{LABELS[m]} ({n_succ}L)" for m in methods]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for task in sorted(med):
            cells = [task + (" †" if task in prior else ""), str(len(rows[task])), f"{med[task]['predecessor']:.1f}"]
            for m in methods:
                v = med[task].get(m)
                cells.append("-" if v is None else f"{v:.1f} ({100 * v / med[task]['predecessor']:.1f}%)"
                             + (" **best**" if v is not None and v == max(med[task].get(x, -1e9) for x in methods) else ""))
            lines.append("| " + " | ".join(cells) + " |")
        full = [k for k in sorted(med) if all(m in med[k] for m in methods)]
        if full:
            pred = statistics.mean(med[k]["predecessor"] for k in full)
            cells = [f"**macro avg** ({len(full)} tasks)", "", f"{pred:.1f}"]
            for m in methods:
                v = statistics.mean(med[k][m] for k in full)
                cells.append(f"{v:.1f} ({100 * v / pred:.1f}%)")
            lines.append("| " + " | ".join(cells) + " |")
        if prior:
            lines += ["", f"† {', '.join(sorted(prior))}: run before the report kept its inputs; their run folders are "
                          f"gone. The figures are those the report printed from them at commit {earlier['commit']} "
                          f"(x100, rounded to 0.1, so a retention or average here can differ from that doc's by 0.1), kept in "
                          f"`{earlier_file}` (its `why` says more); every table and target here counts them. Running "
                          "such a task again into ROOT replaces its row."]
        lines += ["", f"Best Theseus recipe (higher macro average over the tasks both ran): **{LABELS.get(best, '-')}**"
                      + (f" (soft targets: --distill-alpha {first['budget'].get('distill', KD)['alpha']} "
                         f"--distill-temperature {first['budget'].get('distill', KD)['temperature']})"
                         if best == "theseus-kd" else "") + "."]
        lines += ["", "## Loyalty to the predecessor (dev)", "",
                  "Label loyalty / probability loyalty x 100 (Xu et al., EMNLP 2021: share of rows with the same predicted",
                  "label; 1 - mean Jensen-Shannon distance of the two softmax distributions, base 2); STS-B: Pearson r of",
                  "the two predictions. From each run's metrics.json (the kept weights; the median seed's run).", "",
                  "| task | " + " | ".join(LABELS[m] for m in methods) + " |", "|---|" + "---|" * len(methods)]
        for task in sorted(med):
            lines.append(f"| {task} | " + " | ".join(_loyalty_cell(t["loyalty"][task].get(m)) for m in methods) + " |")
        if any(len(r) > 1 for r in rows.values()):
            lines += ["", "Per seed:", "", "| task | seed | predecessor | " + " | ".join(LABELS[m] for m in methods) + " |",
                      "|---|---|---|" + "---|" * len(methods)]
            for task, runs in sorted(rows.items()):
                for r in sorted(runs, key=lambda r: r["seed"]):
                    lines.append(f"| {task} | {r['seed']} | {100 * r['predecessor']['score']:.1f} | "
                                 + " | ".join(f"{100 * r[m]['score']:.1f}" if m in r else "-" for m in methods) + " |")
        targets = kd_targets(t, which)
        lines += ["", f"## Targets ({n_pred} -> {n_succ}, best Theseus recipe: {LABELS.get(best, '-')})", "",
                  "| target | measured | met | by |", "|---|---|---|---|"]
        lines += [f"| {n} | {v} | {'yes' if ok else '**no**'} | {by} |" for n, v, ok, by in targets]
        lines += ceiling_lines(med, methods, rows)
    unfinished = {f"{task} seed {r['seed']}": r["unfinished"] for task, runs in sorted(rows.items())
                  for r in runs if r.get("unfinished")}
    if unfinished:
        lines += ["", "**Partial grid**: runs not finished yet (their cells are `-`, and the targets above count only "
                      "what finished): " + "; ".join(f"{k}: {', '.join(v)}" for k, v in unfinished.items()) + "."]
    planned = MPNET["tasks"] if which == "12to6" else tuple(BUDGET)
    missing = [k for k in planned if k not in rows]
    if missing:
        lines += ["", f"Not run yet: {', '.join(missing)}."]
    if rows:
        lines += last_step_lines(root, rows, methods, best)
    lines += ablation_lines(root)
    lines += bench_lines(root)
    machines = _machines(rows) + ([f"- {m} (†: {', '.join(sorted(prior))})" for m in earlier.get("machine", ())]
                                  if prior else [])
    lines += ["", "## Machine and versions", ""] + (machines or ["Not recorded."])
    lines += ["", "## Budgets and commands", ""]
    for task, runs in sorted(rows.items()):
        runs = sorted(runs, key=lambda r: r["seed"])
        r = runs[0]
        lines.append(f"**{task}**: {json.dumps(r['budget'])}; seeds {', '.join(str(x['seed']) for x in runs)}; "
                     f"wall seconds (seed {r['seed']}; a resumed run: since its last resume) {json.dumps(r['seconds'])}")
        lines += ["```"] + [r["commands"][k] for k in ("predecessor", *ALL_METHODS) if k in r["commands"]] + ["```"]
    notes = ""
    if doc.is_file() and NOTES in doc.read_text():
        notes = doc.read_text().split(NOTES, 1)[1]
    text = "\n".join(lines).replace(str(REPO) + "/", "").replace(str(Path.home()), "~")
    doc.write_text(text + "\n\n" + NOTES + notes.rstrip("\n") + "\n")
    print("\n".join(lines))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["run", "predecessors", "ablation", "bench", "report"])
    ap.add_argument("--tasks", default=None, help="default: mrpc,rte,stsb,cola,sst2 (--profile mpnet: mrpc,rte,stsb,cola)")
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--seeds", default="42")
    ap.add_argument("--predecessor-seed", type=int, default=None,
                    help="compress this seed's fine-tuned predecessor for every seed (default: each seed its own)")
    ap.add_argument("--constant-seeds", default=None, help="run the constant-rate baseline only for these seeds")
    ap.add_argument("--profile", choices=["cpu", "full", "mpnet"], default="cpu",
                    help="cpu: step counts cut for 2 CPU cores; full: whole epochs and compress's default budget; "
                         "mpnet: MPNet-base 12 -> 6 (docs/results-12to6.md): 3-epoch predecessors at 2e-5, compress's "
                         "default budget, length-grouped batches, max_seq_length from the data, all five methods")
    ap.add_argument("--methods", default=None,
                    help=f"comma-separated, of {','.join(ALL_METHODS)}, run in this order (default: {','.join(METHODS)}; "
                         "--profile mpnet: all five)")
    ap.add_argument("--distill-alpha", default=None,
                    help=f"kd, theseus-kd: compress/finetune --distill-alpha (default {KD['alpha']}; with "
                         "--from-ablation, the chosen variant's where it has one)")
    ap.add_argument("--distill-temperature", default=None,
                    help=f"kd, theseus-kd: --distill-temperature (default {KD['temperature']}; as --distill-alpha)")
    ap.add_argument("--successor-steps", type=int, default=None,
                    help="every method's step count instead of the profile's (a smaller CPU budget)")
    ap.add_argument("--backends", default=",".join(BENCH_BACKENDS),
                    help="bench: the backends timed (an artifact that fails validation ends the bench: leave it out)")
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time (a GPU trains several small models at once)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="ablation: variants to run")
    ap.add_argument("--from-ablation", action="store_true",
                    help="run: Theseus with the flags of the ablation's chosen variant (ROOT/ablation/summary.json)")
    ap.add_argument("--successor-layers", type=int, default=None, help="default 3 (--profile mpnet: 6)")
    ap.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default="no",
                    help="every run's --mixed-precision (bf16: about 2x faster training on CPUs with AVX512-BF16)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--dry-run", action="store_true", help="print the commands that would run")
    ap.add_argument("--root", default=None, help="default runs/results (--profile mpnet: runs/results-12to6)")
    ap.add_argument("--doc", default=None, help="default docs/results.md (--profile mpnet: docs/results-12to6.md)")
    ap.add_argument("--records", default=None,
                    help="where the report's inputs are copied (summaries, metrics, evaluations; no weights) "
                         "so the doc can be written again from them (default: docs/records/<doc name>)")
    a = ap.parse_args()
    mpnet = a.profile == "mpnet"
    a.tasks = a.tasks or ",".join(MPNET["tasks"] if mpnet else ("mrpc", "rte", "stsb", "cola", "sst2"))
    a.successor_layers = a.successor_layers or (MPNET["successor_layers"] if mpnet else 3)
    methods = tuple(a.methods.split(",")) if a.methods else (ALL_METHODS if mpnet else METHODS)
    bad = [m for m in methods if m not in ALL_METHODS]
    if bad:
        ap.error(f"unknown --methods {','.join(bad)} (choose from {','.join(ALL_METHODS)})")
    root = Path(a.root or REPO / "runs" / ("results-12to6" if mpnet else "results"))
    a.doc = a.doc or str(REPO / "docs" / ("results-12to6.md" if mpnet else "results.md"))
    tasks, seeds = a.tasks.split(","), [int(x) for x in a.seeds.split(",")]
    # refused before any run starts (a grid takes hours), not when its report is written
    records = Path(a.records) if a.records else records_dir(Path(a.doc))
    if records.exists() and not (records / RECORDS_MARK).is_file() and records.resolve() != root.resolve():
        ap.error(f"--records {records} exists and is not a records folder (no {RECORDS_MARK}): pass another")
    global DRY_RUN, PRECISION, SUCCESSOR_STEPS
    DRY_RUN, PRECISION, SUCCESSOR_STEPS = a.dry_run, a.mixed_precision, a.successor_steps
    KD.update({k: str(v) for k, v in (("alpha", a.distill_alpha), ("temperature", a.distill_temperature)) if v is not None})
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
            chosen = variant_distill(winner)
            if chosen:  # vanilla KD (and theseus-kd) with the chosen soft targets: like with like
                given = {k: str(v) for k, v in (("alpha", a.distill_alpha), ("temperature", a.distill_temperature))
                         if v is not None}
                if any(chosen[k] != v for k, v in given.items()):
                    ap.error(f"--distill-alpha/--distill-temperature {given} differ from the ablation's chosen "
                             f"variant {winner} ({chosen}): drop them, or run without --from-ablation")
                KD.update(chosen)
                print(f"Soft targets from the ablation: alpha {KD['alpha']}, temperature {KD['temperature']}", flush=True)
        const = None if a.constant_seeds is None else {int(x) for x in a.constant_seeds.split(",")}
        run_tasks([(t, s) for s in seeds for t in tasks], a.model, root, a.successor_layers, a.data_dir,
                  a.predecessor_seed, a.profile, flags, const, a.jobs, variant=winner, methods=methods)
    if a.what == "bench":
        bad = [b for b in a.backends.split(",") if b not in BENCH_BACKENDS]
        if bad:
            ap.error(f"unknown --backends {','.join(bad)} (choose from {','.join(BENCH_BACKENDS)})")
        run_bench(tasks[0], root, seeds[0], a.backends.split(","))
    if not DRY_RUN:
        if mpnet or any(m in methods for m in ("kd", "theseus-kd")):
            report_kd(root, Path(a.doc), "12to6" if mpnet else "6to3", records)
        else:
            report(root, Path(a.doc), records)
        n = keep_records(root, records)
        if n:
            print(f"kept the report's inputs: {n} files in {records}", flush=True)


if __name__ == "__main__":
    main()
