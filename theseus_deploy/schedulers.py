"""Replacement-rate schedules p(t) for BERT-of-Theseus.

- linear (the paper's curriculum): p = min(1, k*t + b). k is given, or derived from the
  number of steps after which p must be 1: k = (1 - b) / steps_to_full.
- constant: p = b until steps_to_full, then 1 (the paper's constant-rate baseline).
- anti (anti-curriculum, for ablations): p starts at 1 and falls linearly to b at
  steps_to_full, mirroring `linear`; afterwards p = 1 so the successor still finishes alone.

Every schedule is a pure function of the step, so a resumed run has exactly the p it would
have had without the interruption.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import UsageError


@dataclass(frozen=True)
class ReplacementScheduler:
    kind: str
    b: float
    k: float

    @property
    def steps_to_full(self) -> int:
        """The first step of the successor-only phase (p = 1 from here on, for every kind)."""
        return max(0, math.ceil((1.0 - self.b) / self.k - 1e-9)) if self.k > 0 else 0

    def successor_only(self, step: int) -> bool:
        """True from the step on which p is 1 for good (the anti schedule also starts at p = 1,
        but that is the replacement phase)."""
        return step >= self.steps_to_full

    def __call__(self, step: int) -> float:
        if step >= self.steps_to_full:
            return 1.0
        if self.kind == "linear":
            return min(1.0, self.k * step + self.b)
        if self.kind == "constant":
            return self.b
        return max(self.b, 1.0 - self.k * step)  # anti


def make_scheduler(kind: str, replacing_rate: float, steps_to_full: int | None = None,
                   k: float | None = None) -> ReplacementScheduler:
    if kind not in ("linear", "constant", "anti"):
        raise UsageError(f"unknown scheduler '{kind}' (linear, constant, anti)")
    if not 0.0 <= replacing_rate <= 1.0:
        raise UsageError(f"--replacing-rate must be in [0, 1], got {replacing_rate}")
    if k is not None and steps_to_full is not None:
        raise UsageError("give either --k or --steps-to-full, not both")
    if k is None:
        if steps_to_full is None or steps_to_full < 1:
            raise UsageError(f"--steps-to-full must be at least 1, got {steps_to_full}")
        k = (1.0 - replacing_rate) / steps_to_full if replacing_rate < 1.0 else 1.0
    if k <= 0:
        raise UsageError(f"--k must be positive, got {k}")
    return ReplacementScheduler(kind, float(replacing_rate), float(k))
