"""Loyalty: whether a compressed model decides like the model it replaces (Xu et al., EMNLP 2021,
"Beyond Preserved Accuracy: Evaluating Loyalty and Robustness of BERT Compression").

Preserved accuracy can hide a successor that is right and wrong on *other* rows than its
predecessor; a user replacing a model in production is asked whether the new one decides the same.

- label loyalty: the share of rows where both models predict the same label;
- probability loyalty: 1 - mean over rows of the Jensen-Shannon *distance* of the two softmax
  distributions, with base-2 logarithms, so each distance (the square root of the JS divergence
  in bits) lies in [0, 1] and so does the loyalty (1: identical distributions on every row);
- regression: the Pearson correlation of the two models' predictions (`pearson`).

Both arrays of logits must be in the same label order (`to_data_order` puts a model's logits in
the data's label order, given its `data.label_mapping`).
"""
from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def js_distance(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Per-row Jensen-Shannon distance (base 2, in [0, 1]) of probability rows p and q."""
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    m = (p + q) / 2

    def kl(a, b):  # 0 * log(0 / x) = 0
        with np.errstate(divide="ignore", invalid="ignore"):
            t = np.where(a > 0, a * (np.log2(a) - np.log2(b)), 0.0)
        return t.sum(axis=-1)

    div = (kl(p, m) + kl(q, m)) / 2
    return np.sqrt(np.clip(div, 0.0, 1.0))  # rounding can leave -1e-17 or 1 + 1e-16


def loyalty(logits: np.ndarray, reference: np.ndarray, regression: bool) -> dict:
    """Loyalty of `logits` to `reference` (rows x labels, same label order; regression: rows x 1)."""
    a, b = np.asarray(logits, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"loyalty: shapes differ {a.shape} vs {b.shape}")
    if regression:
        x, y = a.reshape(-1), b.reshape(-1)
        if np.std(x) == 0 or np.std(y) == 0:
            return {"pearson": 0.0}  # undefined for a constant prediction: 0, as metrics.pearson
        return {"pearson": float(np.corrcoef(x, y)[0, 1])}
    return {"label": float((a.argmax(-1) == b.argmax(-1)).mean()),
            "probability": float(1.0 - js_distance(softmax(a), softmax(b)).mean())}


def to_data_order(logits: np.ndarray, mapping) -> np.ndarray:
    """A model's logits with columns in the data's label order (`mapping`: data label -> model id)."""
    return logits if mapping is None else np.asarray(logits)[:, np.asarray(mapping)]


def loyalty_value(loy: dict) -> float:
    """The one number a loyalty limit compares: label loyalty, or for regression the Pearson
    correlation of the two models' predictions."""
    return loy["label"] if "label" in loy else loy["pearson"]


def describe(loy: dict) -> str:
    """One line for a summary print."""
    if "pearson" in loy:
        return f"prediction Pearson {loy['pearson']:.4f}"
    return f"label {loy['label']:.4f}, probability {loy['probability']:.4f}"
