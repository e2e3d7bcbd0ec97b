"""One progress line per sweep stage: stage, depth, elapsed, estimated remaining.

The estimate is the mean measured duration of finished stages of the same kind (compress,
eval, export, latency) times the stages of that kind still to run; reused stages take no time
and do not count. Kinds not yet timed are named instead of guessed ("+ 2 compress not yet
timed"): compress time depends on the budget and the machine, and a made-up figure would mislead.
"""
from __future__ import annotations

import sys
import time


def hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Progress:
    def __init__(self, stages: list[tuple[str, str]], enabled: bool = True, stream=None, clock=time.monotonic):
        """stages: (kind, label) in run order, e.g. ("compress", "L4")."""
        self.stages, self.enabled, self.stream, self.clock = stages, enabled, stream or sys.stderr, clock
        self.t0 = clock()
        self.durations: dict[str, list[float]] = {}
        self.done: set[int] = set()
        self.current: tuple[int, float] | None = None

    def remaining(self) -> tuple[float, dict]:
        """(seconds estimated for the stages not finished, {kind: count not yet timed})."""
        est, unknown = 0.0, {}
        for i, (kind, _) in enumerate(self.stages):
            if i in self.done:
                continue
            d = self.durations.get(kind)
            if d:
                mean = sum(d) / len(d)
                if self.current and self.current[0] == i:  # the running stage: what is left of it
                    mean = max(0.0, mean - (self.clock() - self.current[1]))
                est += mean
            else:
                unknown[kind] = unknown.get(kind, 0) + 1
        return est, unknown

    def line(self, i: int, note: str = "") -> str:
        kind, label = self.stages[i]
        est, unknown = self.remaining()
        rem = (f"~{hms(est)}" if est or not unknown else "?") + "".join(f" + {n} {k} not yet timed" for k, n in unknown.items())
        return (f"[sweep {i + 1}/{len(self.stages)}] {kind} {label}{note} | elapsed {hms(self.clock() - self.t0)} "
                f"| remaining {rem}")

    def start(self, i: int):
        self.current = (i, self.clock())
        self._print(self.line(i))

    def finish(self, i: int, reused: bool = False):
        kind, _ = self.stages[i]
        if self.current and self.current[0] == i and not reused:
            self.durations.setdefault(kind, []).append(self.clock() - self.current[1])
        self.done.add(i)
        self.current = None
        if reused:
            self._print(self.line(i, " (reused)"))

    def _print(self, text: str):
        if self.enabled:
            print(text, file=self.stream, flush=True)
