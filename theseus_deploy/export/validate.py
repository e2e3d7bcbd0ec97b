"""Validate an artifact against PyTorch: names, then shapes, then values (explicit tolerance).

Shapes differ from the export example (2x16) on purpose, so that dynamic axes are exercised.
Each failure has its own exception type, and its message names the output, shape and error.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from theseus_deploy.loyalty import loyalty_value
from theseus_deploy.metrics import compute_metrics
from theseus_deploy.registry import FORMATS
from theseus_deploy.runtime import random_inputs

# Absolute tolerance on logits per format: `Format.atol` in theseus_deploy/registry.py (None:
# scale-relative below). What matters for INT8/bf16 is the task-level check (`--task`): the dev
# score may drop at most `MAX_TASK_DROP`, and with --min-loyalty the artifact must decide like
# PyTorch on at least that share of dev rows (theseus_deploy/loyalty.py).
REL_LOOSE = 0.5           # int8 / bf16: max |diff| <= REL_LOOSE * max |logit| (+ 1e-3)
MAX_TASK_DROP = 0.01      # with --task: artifact score >= PyTorch score - 1 point
VALIDATION_SHAPES = ((1, 16), (3, 37), (8, 128))


class ValidationError(Exception):
    pass


class OutputNamesMismatch(ValidationError):
    pass


class InputNamesMismatch(ValidationError):
    pass


class ShapeMismatch(ValidationError):
    pass


class ValuesMismatch(ValidationError):
    pass


@dataclass
class ShapeResult:
    shape: tuple
    max_abs_diff: float
    tolerance: float
    argmax_agreement: float

    def as_dict(self):
        return {"shape": list(self.shape), "max_abs_diff": self.max_abs_diff, "tolerance": self.tolerance,
                "argmax_agreement": self.argmax_agreement}


def shapes_for(max_batch: int, max_seq: int):
    out = []
    for b, s in VALIDATION_SHAPES:
        shape = (min(b, max_batch), min(s, max_seq))
        if shape not in out:
            out.append(shape)
    return out


def validate(reference, candidate, fmt: str, shapes, atol: float | None = None) -> list[dict]:
    """Compare `candidate` runner against `reference` (PyTorch fp32) runner; raise on failure."""
    if sorted(candidate.input_names) != sorted(reference.input_names):
        raise InputNamesMismatch(f"{fmt}: inputs {candidate.input_names} != PyTorch's {reference.input_names}")
    outputs = getattr(candidate, "output_names", ["logits"])
    if list(outputs) != ["logits"]:
        raise OutputNamesMismatch(f"{fmt}: outputs {outputs} != ['logits']")
    results = []
    # Rows 1.. of a batch are right-padded to random lengths: the attention mask must work too.
    raws = [random_inputs(b, s, candidate.vocab_size, candidate.input_names, seed=100 + i, padded=b > 1)
            for i, (b, s) in enumerate(shapes)]
    refs = [reference.logits(reference.encode(raw)) for raw in raws]
    tol = atol if atol is not None else (FORMATS[fmt].atol if fmt in FORMATS else None)
    if tol is None:  # scale-relative for quantised / reduced-precision formats
        # The scale is the model's, taken over every validation batch, not each batch's own: one
        # 1x16 row gives two logits, and on the tiny RoBERTa of the tests the per-batch max |logit|
        # ranged 0.010-0.023 for one model (a per-batch tolerance judged batches, not the artifact).
        tol = REL_LOOSE * max(float(np.abs(r).max()) for r in refs) + 1e-3
    for (b, s), raw, ref in zip(shapes, raws, refs):
        got = candidate.logits(candidate.encode(raw))
        if got.shape != ref.shape:
            raise ShapeMismatch(f"{fmt}: output 'logits' has shape {tuple(got.shape)} at input {b}x{s}, "
                                f"PyTorch gives {tuple(ref.shape)}")
        diff = float(np.abs(got - ref).max())
        agree = float((got.argmax(-1) == ref.argmax(-1)).mean()) if ref.shape[-1] > 1 else 1.0
        results.append(ShapeResult((b, s), diff, tol, agree).as_dict())
        if not np.isfinite(got).all() or diff > tol:
            raise ValuesMismatch(f"{fmt}: output 'logits' at input {b}x{s}: max abs diff {diff:.3g} > atol {tol:.3g}")
    return results


class TaskMetricDrop(ValidationError):
    pass


def check_task_drop(fmt: str, score: float, reference: float, max_drop: float = MAX_TASK_DROP):
    if score < reference - max_drop:
        raise TaskMetricDrop(f"{fmt}: dev score {score:.4f} is {reference - score:.4f} below PyTorch's {reference:.4f} "
                             f"(allowed drop {max_drop:.4f})")


class LoyaltyTooLow(ValidationError):
    pass


def check_loyalty(fmt: str, loy: dict, min_loyalty: float):
    if min_loyalty > 0 and loyalty_value(loy) < min_loyalty:
        what = "label loyalty" if "label" in loy else "prediction Pearson"
        raise LoyaltyTooLow(f"{fmt}: {what} to PyTorch on dev {loyalty_value(loy):.4f} < --min-loyalty {min_loyalty:g}")


def task_metric(runner, tokenizer, data, max_seq_length: int = 128, batch_size: int = 32, positive: int | None = None) -> dict:
    """Dev-set metric of any runner (the same loop for PyTorch and every artifact); `positive`: F1's
    class in the runner model's label ids (data.positive_id), where `data.labels` were remapped to them."""
    return compute_metrics(data.spec, task_logits(runner, tokenizer, data, max_seq_length, batch_size), data.labels,
                           positive)


def task_logits(runner, tokenizer, data, max_seq_length: int = 128, batch_size: int = 32) -> np.ndarray:
    """Dev-set logits of any runner, rows in the data's order, columns in the runner model's label ids."""
    logits = []
    for i in range(0, len(data.texts), batch_size):
        chunk = data.texts[i:i + batch_size]
        a = [t[0] for t in chunk]
        b = [t[1] for t in chunk] if chunk[0][1] is not None else None
        enc = tokenizer(a, b, truncation=True, max_length=max_seq_length, padding=True, return_tensors="np")
        logits.append(runner.logits(runner.encode(dict(enc))))
    return np.concatenate(logits)
