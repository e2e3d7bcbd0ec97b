"""The sweep: every (model, backend) runner at every (batch, sequence) shape, interleaved.

Within a shape, runners take turns in rounds (A B C, then C B A, ...), each timing a chunk of
calls, so machine drift (thermal, other load) hits all of them alike. A speedup is the median
over rounds of the paired ratio of round medians, reported with its spread (min, max).
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from .flops import encoder_flops
from .timing import Latency, time_calls


@dataclass
class Entry:
    """One runner in the sweep: a model (tag, config) in one backend."""

    tag: str
    role: str          # predecessor / successor / model-N
    backend: str
    runner: object
    config: object
    rounds: dict = field(default_factory=dict)   # (b, s) -> [round medians]
    samples: dict = field(default_factory=dict)  # (b, s) -> [all samples]

    @property
    def key(self) -> str:
        return f"{self.tag}|{self.backend}"


def _rss_mb() -> float | None:
    try:
        import psutil

        return psutil.Process().memory_info().rss / 1e6
    except ImportError:
        return None


def run_sweep(entries: list[Entry], shapes, device: str = "cpu", warmup: int = 3, iterations: int = 10,
              min_seconds: float = 0.0, rounds: int = 5, progress=None) -> list[dict]:
    cuda = device == "cuda"
    cells = []
    per_round = max(1, math.ceil(iterations / rounds))
    for b, s in shapes:
        feeds = {e.key: e.runner.make_inputs(b, s, seed=0) for e in entries}
        mem = {}
        for e in entries:  # warm-up (allocations, kernel selection, ORT's first-run work)
            for _ in range(warmup):
                e.runner(feeds[e.key])
            e.runner.synchronize()
            e.rounds[(b, s)], e.samples[(b, s)] = [], []
        for r in range(rounds):
            order = entries if r % 2 == 0 else entries[::-1]
            for e in order:
                if cuda:
                    import torch

                    torch.cuda.reset_peak_memory_stats()
                chunk = time_calls(lambda: e.runner(feeds[e.key]), e.runner.synchronize, per_round,
                                   min_seconds / rounds, cuda=cuda)
                if cuda:
                    mem[e.key] = max(mem.get(e.key, 0.0), torch.cuda.max_memory_allocated() / 1e6)
                e.rounds[(b, s)].append(statistics.median(chunk))
                e.samples[(b, s)].extend(chunk)
                if progress is not None:
                    progress.update(1)
        rss = _rss_mb()
        for e in entries:
            lat = Latency.from_samples(e.samples[(b, s)])
            flops = encoder_flops(e.config, b, s)
            cells.append({"model": e.tag, "role": e.role, "layers": e.config.num_hidden_layers, "backend": e.backend,
                          "device": device, "batch_size": b, "seq_len": s, "latency_s": lat.as_dict(),
                          "throughput_seq_s": b / lat.p50, "throughput_tok_s": b * s / lat.p50,
                          "gflops": flops / 1e9, "achieved_gflops_s": flops / 1e9 / lat.p50,
                          "peak_mem_mb": mem.get(e.key) if cuda else None, "process_rss_mb": rss})
    return cells


def paired_speedup(ref: Entry, other: Entry, shape) -> dict:
    """Median over rounds of ref/other (>1: `other` is faster), with min/max and every round's ratio
    (`values`: the CI gate tests the rounds, not only their median)."""
    ratios = [a / b for a, b in zip(ref.rounds[shape], other.rounds[shape])]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "rounds": len(ratios),
            "values": ratios}


def speedups(entries: list[Entry], shapes) -> list[dict]:
    """Depth speedup (vs the predecessor, same backend) and deploy speedup (vs predecessor, PyTorch fp32)."""
    pred = entries[0].tag
    by_key = {(e.tag, e.backend): e for e in entries}
    out = []
    for shape in shapes:
        for e in entries:
            rec = {"model": e.tag, "role": e.role, "backend": e.backend, "batch_size": shape[0], "seq_len": shape[1]}
            same = by_key.get((pred, e.backend))
            if same is not None and e.tag != pred:
                rec["vs_predecessor_same_backend"] = paired_speedup(same, e, shape)
                ideal = encoder_flops(same.config, *shape) / encoder_flops(e.config, *shape)
                rec["ideal_speedup"] = ideal
                rec["efficiency"] = rec["vs_predecessor_same_backend"]["median"] / ideal
            base = by_key.get((pred, "torch"))
            if base is not None and not (e.tag == pred and e.backend == "torch"):
                rec["vs_predecessor_torch_fp32"] = paired_speedup(base, e, shape)
            torch_same = by_key.get((e.tag, "torch"))
            if torch_same is not None and e.backend != "torch":
                rec["vs_same_model_torch_fp32"] = paired_speedup(torch_same, e, shape)
            if len(rec) > 5:
                out.append(rec)
    return out
