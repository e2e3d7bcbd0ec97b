"""Latency of every sweep point, interleaved and paired with the predecessor.

Two modes, both through the bench machinery's runners (theseus_deploy.bench.sweep.Entry):

- shape: `bench.sweep.run_sweep` at one (batch, sequence) shape: rounds A B C, C B A, ...,
  every call timed;
- traffic: single requests of real dev sentences, each padded only to its own length (what a
  server answering one user at a time sees); per round every runner answers the same sentences in
  data order, runners take turns (forward, then reversed), every request is timed.

Per point: p50/p90/p99 over all timed calls, and per round the median, so that a speedup is the
median over rounds of paired ratios (bench.sweep.paired_speedup), robust to the 2x swings of a
shared machine.
"""
from __future__ import annotations

import statistics
import time

import numpy as np

from theseus_deploy.bench.sweep import Entry, paired_speedup, run_sweep
from theseus_deploy.bench.timing import Latency

TRAFFIC = "traffic"


def single_requests(tokenizer, texts, max_length: int, input_names) -> list[dict]:
    """One feed per sentence (batch 1, no padding), in data order."""
    out = []
    for a, b in texts:
        enc = tokenizer(a, b, truncation=True, max_length=max_length, return_tensors="np")
        n = enc["input_ids"].shape[1]
        out.append({k: (np.asarray(enc[k], dtype=np.int64) if k in enc else np.zeros((1, n), dtype=np.int64))
                    for k in input_names})
    return out


def time_traffic(entries: list[Entry], tokenizer, texts, max_length: int, rounds: int, warmup: int,
                 device: str = "cpu", on_round=None) -> None:
    """Fill each entry's rounds/samples under the key TRAFFIC."""
    feeds = {}
    for e in entries:
        feeds[e.key] = [e.runner.encode(x) for x in single_requests(tokenizer, texts, max_length, e.runner.input_names)]
        for x in feeds[e.key][:max(1, warmup)]:
            e.runner(x)
        e.runner.synchronize()
        e.rounds[TRAFFIC], e.samples[TRAFFIC] = [], []
    for r in range(rounds):
        for e in (entries if r % 2 == 0 else entries[::-1]):
            chunk = []
            for x in feeds[e.key]:
                t0 = time.perf_counter()
                e.runner(x)
                e.runner.synchronize()
                chunk.append(time.perf_counter() - t0)
            e.rounds[TRAFFIC].append(statistics.median(chunk))
            e.samples[TRAFFIC].extend(chunk)
        if on_round:
            on_round(r)


def measure(entries: list[Entry], mode: dict, device: str, warmup: int, iterations: int, min_seconds: float,
            rounds: int, tokenizer=None, texts=None) -> dict:
    """{entry key: {"latency": Latency dict, "round_medians": [...]}} plus paired speedups.
    entries[0] must be the predecessor in PyTorch fp32 (the reference of every ratio)."""
    if mode["kind"] == "shape":
        key = (mode["batch_size"], mode["seq_len"])
        run_sweep(entries, [key], device, warmup, iterations, min_seconds, rounds)
    else:
        key = TRAFFIC
        time_traffic(entries, tokenizer, texts, mode["max_length"], rounds, warmup, device)
    ref = entries[0]
    out = {}
    for e in entries:
        rec = {"latency": Latency.from_samples(e.samples[key]).as_dict(), "round_medians": e.rounds[key]}
        if e is not ref:
            rec["vs_predecessor_torch_fp32"] = paired_speedup(ref, e, key)
        same = next((x for x in entries if x.role == "predecessor" and x.backend == e.backend), None)
        if same is not None and same is not e:
            rec["vs_predecessor_same_backend"] = paired_speedup(same, e, key)
        out[e.key] = rec
    return out
