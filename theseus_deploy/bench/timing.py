"""Timing: a latency dataclass (mean / p50 / p90 / p99 / std) and timers.

CPU: time.perf_counter around each call. GPU: CUDA events around each call, synchronised, so
that asynchronous kernel launches are not mistaken for finished work.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np


def percentile(samples, q: float) -> float:
    """Linear-interpolated percentile (numpy's default), q in [0, 100]."""
    s = sorted(samples)
    if not s:
        raise ValueError("no samples")
    k = (len(s) - 1) * q / 100.0
    lo, hi = int(np.floor(k)), int(np.ceil(k))
    return float(s[lo] + (s[hi] - s[lo]) * (k - lo))


@dataclass
class Latency:
    """Seconds per call."""

    n: int
    mean: float
    std: float
    min: float
    p50: float
    p90: float
    p99: float

    @classmethod
    def from_samples(cls, samples) -> "Latency":
        a = np.asarray(samples, dtype=np.float64)
        return cls(len(a), float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0, float(a.min()),
                   percentile(a, 50), percentile(a, 90), percentile(a, 99))

    def as_dict(self) -> dict:
        return asdict(self)


def time_calls(fn, sync=None, iterations: int = 10, min_seconds: float = 0.0, cuda: bool = False) -> list[float]:
    """Call `fn` at least `iterations` times and for at least `min_seconds`; seconds per call."""
    samples: list[float] = []
    if cuda:
        import torch

        start_all = time.perf_counter()
        while len(samples) < iterations or time.perf_counter() - start_all < min_seconds:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1000.0)
        return samples
    start_all = time.perf_counter()
    while len(samples) < iterations or time.perf_counter() - start_all < min_seconds:
        t0 = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        samples.append(time.perf_counter() - t0)
    return samples
