"""CI latency regression gate: compares speedup RATIOS, never absolute times.

Absolute latencies move with the machine; ratios measured in the same interleaved run
(successor vs predecessor on one backend, a backend vs PyTorch fp32 for the same model) do not,
so a baseline taken on one machine gates a run on another of the same kind.
"""
from __future__ import annotations

import json
from pathlib import Path

from theseus_deploy.errors import UsageError


def ratios(results: dict) -> dict:
    """Flatten a results.json into {cell name: speedup (>1 faster)}."""
    out = {}
    for r in results.get("speedups", []):
        cell = f"b{r['batch_size']}/s{r['seq_len']}"
        if "vs_predecessor_same_backend" in r:
            out[f"depth {r['role']}/{r['backend']} {cell}"] = r["vs_predecessor_same_backend"]["median"]
        if "vs_same_model_torch_fp32" in r:
            out[f"backend {r['role']}/{r['backend']} vs torch {cell}"] = r["vs_same_model_torch_fp32"]["median"]
    return out


def check(results: dict, baseline_path: str, tolerance: float) -> list[str]:
    """Names of the cells whose ratio fell more than `tolerance` (relative) below the baseline."""
    path = Path(baseline_path)
    if not path.is_file():
        raise UsageError(f"baseline not found: {baseline_path}")
    try:
        base = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UsageError(f"baseline {baseline_path} is not valid JSON: {e}") from None
    base_ratios = base["ratios"] if "ratios" in base else ratios(base)
    now = ratios(results)
    failures = []
    for name, want in sorted(base_ratios.items()):
        if name not in now:
            failures.append(f"{name}: in the baseline but not measured")
            continue
        if now[name] < want * (1.0 - tolerance):
            failures.append(f"{name}: {now[name]:.2f}x < baseline {want:.2f}x - {tolerance:.0%}")
    return failures


def baseline_from(results: dict) -> dict:
    return {"about": "speedup ratios (>1 = faster); refresh with `make bench-baseline`", "ratios": ratios(results),
            "config": {k: results["config"][k] for k in ("batch_sizes", "seq_lens", "backends", "device")}}
