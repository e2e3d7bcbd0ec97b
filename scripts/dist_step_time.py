#!/usr/bin/env python
"""Training step time and examples/s of `finetune` on 1 vs N processes (torchrun, gloo on CPU,
or GPUs when there are some), for docs/distributed.md. Nothing asserts a speed.

Each configuration is a real `finetune` run (`--log-steps 1`); a step's time is the difference of
consecutive `elapsed_s` in its train_log.jsonl, the first `--warmup` steps dropped; rounds are
interleaved (A B C A B C ...) so machine drift hits every configuration; medians are reported.
The model is a random BERT (default 6 layers, hidden 384: MiniLM's shape, heads 2) built by
tests/tiny.py; the data are toy sentences long enough to fill `--seq-len` tokens.

    python scripts/dist_step_time.py --out runs/dist-step-time.json            # CPU: 1 vs 2 processes
    python scripts/dist_step_time.py --procs 1,4 --threads 0 --out gpu.json    # a 4-GPU node
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cpu_info() -> dict:
    info = {"model": None, "flags": [], "logical_cpus": os.cpu_count()}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        if line.startswith("model name") and info["model"] is None:
            info["model"] = line.split(":", 1)[1].strip()
        if line.startswith("flags") and not info["flags"]:
            info["flags"] = sorted(f for f in line.split(":", 1)[1].split()
                                   if f.startswith(("avx", "amx", "fma", "sse4")))
    return info


def versions() -> dict:
    import accelerate
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "accelerate": accelerate.__version__, "cuda_devices": torch.cuda.device_count()}


def write_data(path: Path, n: int, words: int):
    rng = random.Random(0)
    vocab = "the a movie film plot actor scene story music ending time people way thing day great bad".split()
    lines = ["text,label"] + [f"{' '.join(rng.choices(vocab, k=words))},{i % 2}" for i in range(n)]
    path.write_text("\n".join(lines) + "\n")


def run(model, data, out, procs, batch, seq, steps, threads) -> list[float]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    import torch

    if not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "true"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs),
           "-m", "theseus_deploy", "finetune", "--model", str(model), "--task", "custom", "--train-file", str(data),
           "--validation-file", str(data), "--max-eval-samples", "8", "--text-columns", "text", "--label-column", "label",
           "--max-seq-length", str(seq), "--batch-size", str(batch), "--max-steps", str(steps), "--eval-steps",
           str(steps), "--log-steps", "1", "--lr", "1e-4", "--output", str(out), "--overwrite"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr[-3000:]}")
    elapsed = [json.loads(line)["elapsed_s"] for line in (out / "train_log.jsonl").read_text().splitlines()
               if "loss" in json.loads(line)]
    return [b - a for a, b in zip(elapsed, elapsed[1:])]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--procs", default="1,2", help="process counts to compare")
    ap.add_argument("--batch-size", type=int, default=16, help="per process")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--threads", type=int, default=None,
                    help="OMP threads per process (default: the logical CPUs divided by the process count; 0: unset)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    sys.path.insert(0, str(REPO / "tests"))
    from tiny import make_tiny_model  # tests/tiny.py

    procs = [int(p) for p in a.procs.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = make_tiny_model(tmp / "model", "bert", a.layers, hidden=a.hidden)
        data = tmp / "train.csv"
        write_data(data, max(procs) * a.batch_size * (a.steps + 1), a.seq_len)
        steps: dict[int, list[float]] = {n: [] for n in procs}
        for _ in range(a.rounds):
            for n in procs:
                threads = a.threads if a.threads is not None else max(1, (os.cpu_count() or 1) // n)
                steps[n] += run(model, data, tmp / f"out{n}", n, a.batch_size, a.seq_len, a.steps, threads)[a.warmup:]
    result = {"cpu": cpu_info(), "versions": versions(), "loadavg_end": os.getloadavg(),
              "settings": {k: v for k, v in vars(a).items() if k != "out"}, "configs": []}
    for n in procs:
        med = statistics.median(steps[n])
        result["configs"].append({"processes": n, "per_process_batch": a.batch_size, "global_batch": n * a.batch_size,
                                  "median_step_s": round(med, 4), "examples_per_s": round(n * a.batch_size / med, 1),
                                  "steps_timed": len(steps[n])})
        print(f"{n} process(es) x batch {a.batch_size}: median step {med * 1000:.0f} ms, "
              f"{n * a.batch_size / med:.1f} examples/s ({len(steps[n])} steps)")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
