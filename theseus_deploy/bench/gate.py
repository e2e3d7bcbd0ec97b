"""CI latency regression gate: compares speedup RATIOS, never absolute times.

Absolute latencies move with the machine; ratios measured in the same interleaved run
(successor vs predecessor on one backend, a backend vs PyTorch fp32 for the same model) do not,
so a baseline taken on one machine gates a run on another of the same kind.

A cell fails only when its paired rounds show the drop, not when their median merely dips: a
one-sided sign test over the rounds (H0: the ratio's median is at least the threshold, alpha 0.05).
Measured reason: CI's machine once gave the successor/torch b1 cell rounds from 0.92x to 1.66x
(median 1.30x against a 1.36x threshold) while the other depth cells sat within 3% of their
baselines; the median rule failed that run on noise. A real regression (a lost fusion, a model that
stops shrinking) moves every round, and the sign test fails it: with 8 rounds when at most 1
reaches the threshold. A dip the test cannot confirm is reported as `unclear`, never hidden.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from theseus_deploy.errors import UsageError


def ratios(results: dict) -> dict:
    """Flatten a results.json into {cell name: speedup (>1 faster)}: each cell's median over rounds."""
    return {name: entry["median"] for name, entry in _rounds(results).items()}


def _rounds(results: dict) -> dict:
    """{cell name: the speedup entry (median, min, max, values)}."""
    out = {}
    for r in results.get("speedups", []):
        cell = f"b{r['batch_size']}/s{r['seq_len']}"
        if "vs_predecessor_same_backend" in r:
            out[f"depth {r['role']}/{r['backend']} {cell}"] = r["vs_predecessor_same_backend"]
        if "vs_same_model_torch_fp32" in r:
            out[f"backend {r['role']}/{r['backend']} vs torch {cell}"] = r["vs_same_model_torch_fp32"]
    return out


def load_baseline(baseline_path: str) -> dict:
    """{cell name: ratio} of a baseline file (`--update-baseline`'s, or a whole results.json);
    UsageError naming the file for anything else (bench --check reads it before the bench runs)."""
    path = Path(baseline_path)
    if not path.is_file():
        raise UsageError(f"baseline not found: {baseline_path}")
    try:
        base = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise UsageError(f"baseline {baseline_path} is not valid JSON: {str(e).splitlines()[0][:200]}") from None
    except OSError as e:
        raise UsageError(f"cannot read baseline {baseline_path}: {e.strerror or e}") from None
    if isinstance(base, dict) and "ratios" in base:
        out = base["ratios"]
    elif isinstance(base, dict) and isinstance(base.get("speedups"), list):
        try:
            out = ratios(base)
        except (KeyError, TypeError, AttributeError) as e:
            raise UsageError(f"baseline {baseline_path}: a speedups entry lacks {e}") from None
    else:
        raise UsageError(f"baseline {baseline_path} has neither 'ratios' nor 'speedups' (write one with "
                         "--update-baseline)")
    if not isinstance(out, dict) or not all(isinstance(k, str) and isinstance(v, (int, float))
                                            and not isinstance(v, bool) and math.isfinite(v) and v > 0
                                            for k, v in out.items()):
        raise UsageError(f"baseline {baseline_path}: 'ratios' must map cell names to positive finite numbers")
    return out


ALPHA = 0.05
MIN_ROUNDS = 5  # the fewest rounds with which the sign test can reject at ALPHA (0.5 ** 5 = 0.031)


def sign_test_p(above: int, n: int) -> float:
    """P(at most `above` of `n` rounds at or over the threshold | the true median is on it)."""
    return sum(math.comb(n, i) for i in range(above + 1)) / 2 ** n


def check(results: dict, baseline_path: str, tolerance: float) -> dict:
    """{"failures": cells whose paired rounds fell more than `tolerance` (relative) below the
    baseline (sign test, module docstring), "unclear": cells whose median fell below it but whose
    rounds do not show it}."""
    base_ratios = load_baseline(baseline_path)
    now = _rounds(results)
    failures, unclear = [], []
    for name, want in sorted(base_ratios.items()):
        if name not in now:
            failures.append(f"{name}: in the baseline but not measured")
            continue
        got, threshold = now[name], want * (1.0 - tolerance)
        if got["median"] >= threshold:
            continue
        values = got["values"]
        above = sum(v >= threshold for v in values)
        what = (f"{name}: {got['median']:.2f}x < baseline {want:.2f}x - {tolerance:.0%} "
                f"({above} of {len(values)} rounds reached {threshold:.2f}x; rounds {got['min']:.2f}-{got['max']:.2f}x)")
        (failures if sign_test_p(above, len(values)) <= ALPHA else unclear).append(what)
    return {"failures": failures, "unclear": unclear}


def baseline_from(results: dict) -> dict:
    return {"about": "speedup ratios (>1 = faster); refresh with `make bench-baseline`", "ratios": ratios(results),
            "config": {k: results["config"][k] for k in ("batch_sizes", "seq_lens", "backends", "device")}}
