"""The decision: Pareto frontier over (latency, dev score) and the choice within a budget.

Pure functions on plain numbers (standard library only), so that the rule is tested on known
points and a new budget re-decides from a finished sweep without loading a model:

- a point is on the frontier when no other point is at least as fast *and* at least as accurate,
  and strictly better in one of the two (exact duplicates: the first listed stays);
- the choice is the point with the best dev score among those within the latency budget, the
  drop limit (drop = predecessor's score - point's score) and, when one is set, the loyalty limit
  (label loyalty to the predecessor: the share of dev rows where the point predicts the
  predecessor's label; regression: the Pearson correlation of the two predictions); ties go to
  the lower latency, then to the shallower model. Without a loyalty limit such a point is always
  on the frontier: a point that dominated it would also meet both limits and win the tie-break
  (loyalty is a third axis: a loyal point may be dominated in latency and score by a disloyal one);
- when nothing meets the limits, the *closest* point is the one with the smallest sum of relative
  excesses: latency over budget (as a fraction of the budget) plus drop over the limit (as a
  fraction of the limit, floor 1 point) plus loyalty under its limit (as a fraction of what the
  limit leaves, 1 - limit, floor 1 point), i.e. "10% too slow" weighs like "0.1 points too lossy"
  at a 1-point limit; ties go to the better score, then the lower latency.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

from theseus_deploy.errors import UsageError

UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6}
_BUDGET = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([a-zµ]+)\s*$")
EPS = 1e-12


def parse_latency(text: str, flag: str = "--latency-budget") -> float:
    """'5ms' / '0.005s' / '500us' -> seconds. A missing or unknown unit is a usage error."""
    m = _BUDGET.match(str(text))
    if not m or m.group(2) not in UNITS:
        raise UsageError(f"{flag} takes a positive number with a unit (s, ms, us), e.g. 5ms, 0.005s or 500us; "
                         f"got '{text}'")
    value = float(m.group(1)) * UNITS[m.group(2)]
    if not value > 0 or not math.isfinite(value):
        raise UsageError(f"{flag} must be positive, got '{text}'")
    return value


def parse_shape(text: str, flag: str = "--latency-shape") -> tuple[int, int]:
    """'1x128' -> (1, 128)."""
    m = re.fullmatch(r"\s*([0-9]+)\s*[xX]\s*([0-9]+)\s*", str(text))
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise UsageError(f"{flag} takes BATCHxSEQUENCE with positive integers, e.g. 1x128; got '{text}'")
    return int(m.group(1)), int(m.group(2))


@dataclass
class Point:
    layers: int
    backend: str
    score: float
    latency: float          # seconds, at the percentile the decision uses
    drop: float = 0.0       # predecessor's score - this score (negative: better than the predecessor)
    loyalty: float | None = None  # label loyalty to the predecessor (regression: Pearson); None: unknown

    @property
    def name(self) -> str:
        return f"L{self.layers} {self.backend}"


def frontier(points: list[Point]) -> list[int]:
    """Indices of the Pareto-optimal points (lower latency, higher score), fastest first."""
    order = sorted(range(len(points)), key=lambda i: (points[i].latency, -points[i].score, i))
    out, best = [], -math.inf
    for i in order:
        if points[i].score > best:
            out.append(i)
            best = points[i].score
    return out


def loyal(p: Point, min_loyalty: float) -> bool:
    """Within the loyalty limit (no limit: always; a point of unknown loyalty never meets one)."""
    return min_loyalty <= 0 or (p.loyalty is not None and p.loyalty >= min_loyalty - EPS)


def meets(p: Point, budget: float | None, max_drop: float, min_loyalty: float = 0.0) -> bool:
    return (budget is None or p.latency <= budget + EPS) and p.drop <= max_drop + EPS and loyal(p, min_loyalty)


def excess(p: Point, budget: float | None, max_drop: float, min_loyalty: float = 0.0) -> float:
    lat = max(0.0, p.latency / budget - 1.0) if budget else 0.0
    drop = max(0.0, p.drop - max_drop) / max(max_drop, 0.01)
    short = 0.0
    if min_loyalty > 0:
        short = (max(0.0, min_loyalty - p.loyalty) if p.loyalty is not None else 1.0) / max(1.0 - min_loyalty, 0.01)
    return lat + drop + short


@dataclass
class Decision:
    frontier: list[int]
    choice: int | None
    closest: int | None     # only when nothing meets both limits
    budget: float | None
    max_drop: float
    min_loyalty: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


def decide(points: list[Point], budget: float | None, max_drop: float, min_loyalty: float = 0.0) -> Decision:
    if not points:
        raise ValueError("no points")
    front = frontier(points)
    ok = [i for i in range(len(points)) if meets(points[i], budget, max_drop, min_loyalty)]
    if ok:
        choice = min(ok, key=lambda i: (-points[i].score, points[i].latency, points[i].layers, i))
        return Decision(front, choice, None, budget, max_drop, min_loyalty)
    closest = min(range(len(points)), key=lambda i: (excess(points[i], budget, max_drop, min_loyalty),
                                                     -points[i].score, points[i].latency, i))
    return Decision(front, None, closest, budget, max_drop, min_loyalty)


def own_drop_rejection(own: float, score: float, max_drop: float) -> str | None:
    """Why an exported point is no candidate: its dev score falls more than the drop limit below
    its own PyTorch model's (the export broke it); None: it stays a candidate."""
    if own - score > max_drop + EPS:
        return (f"task check: dev {score:.4f} is {own - score:.4f} below its own PyTorch model's {own:.4f} "
                f"(allowed drop {max_drop:g})")
    return None


def marks(points: list[Point], d: Decision) -> list[dict]:
    """Per point: on the frontier, meets the limits, chosen."""
    return [{"on_frontier": j in d.frontier, "meets": meets(p, d.budget, d.max_drop, d.min_loyalty),
             "chosen": j == d.choice}
            for j, p in enumerate(points)]


def fmt_latency(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.3g} s"
    return f"{1e6 * seconds:.0f} us" if seconds < 1e-3 else f"{1e3 * seconds:.2f} ms"


def nothing_message(points: list[Point], d: Decision, percentile: str) -> str:
    """One line: which limits, and the closest point with what it misses by."""
    p = points[d.closest]
    limits = (([f"{percentile} <= {fmt_latency(d.budget)}"] if d.budget else []) + [f"drop <= {d.max_drop:g}"]
              + ([f"loyalty >= {d.min_loyalty:g}"] if d.min_loyalty > 0 else []))
    misses = []
    if d.budget and p.latency > d.budget + EPS:
        misses.append(f"{percentile} {fmt_latency(p.latency)}, {100 * (p.latency / d.budget - 1):.0f}% over budget")
    if p.drop > d.max_drop + EPS:
        misses.append(f"drop {p.drop:.4f} > {d.max_drop:g}")
    if not loyal(p, d.min_loyalty):
        misses.append(f"loyalty {p.loyalty:.4f} < {d.min_loyalty:g}" if p.loyalty is not None else
                      "loyalty unknown (a stage file from before loyalty was recorded: delete it to recompute)")
    return (f"no point meets {' and '.join(limits)}; closest: {p.name} (dev {p.score:.4f}, "
            f"{'; '.join(misses)})")
