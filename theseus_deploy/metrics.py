"""GLUE metrics computed locally (scikit-learn/scipy; `evaluate.load` would need the hub).

`score` is the mean of the task's metrics, the GLUE leaderboard's convention (MRPC: F1 and
accuracy; STS-B: Pearson and Spearman), and is what early stopping maximises.
"""
from __future__ import annotations

import numpy as np


def accuracy(pred, labels) -> float:
    return float((np.asarray(pred) == np.asarray(labels)).mean())


def f1(pred, labels, positive: int | None = 1) -> float:
    """Binary F1 of the class `positive` (a model label id); macro F1 when `positive` is None."""
    from sklearn.metrics import f1_score

    labels, pred = np.asarray(labels), np.asarray(pred)
    if positive is None:
        return float(f1_score(labels, pred, average="macro", zero_division=0))
    # by hand: sklearn's binary mode refuses a positive id absent from both arrays
    tp = int(((pred == positive) & (labels == positive)).sum())
    fp = int(((pred == positive) & (labels != positive)).sum())
    fn = int(((pred != positive) & (labels == positive)).sum())
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def matthews(pred, labels) -> float:
    from sklearn.metrics import matthews_corrcoef

    return float(matthews_corrcoef(labels, pred))


def pearson(pred, labels) -> float:
    from scipy.stats import pearsonr

    if np.std(pred) == 0:
        return 0.0  # undefined for a constant prediction; 0 is the honest score
    return float(pearsonr(pred, labels)[0])


def spearman(pred, labels) -> float:
    from scipy.stats import spearmanr

    if np.std(pred) == 0:
        return 0.0
    return float(spearmanr(pred, labels)[0])


METRICS = {"accuracy": accuracy, "f1": f1, "matthews": matthews, "pearson": pearson, "spearman": spearman}


def predictions(spec, logits: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits, dtype=np.float64)
    return logits.reshape(-1) if spec.is_regression else logits.argmax(-1)


def compute_metrics(spec, logits: np.ndarray, labels: np.ndarray, positive: int | None = None) -> dict:
    """Every metric of the task plus `score` (their mean). `positive`: the model's label id of the
    task's positive class (data.positive_id); default: the spec's own, without label remapping."""
    pred = predictions(spec, logits)
    if positive is None and getattr(spec, "positive", None) is not None:
        positive = list(spec.label_names).index(spec.positive)
    out = {name: (METRICS[name](pred, labels, positive) if name == "f1" else METRICS[name](pred, labels))
           for name in spec.metrics}
    out["score"] = float(np.mean([out[n] for n in spec.metrics]))
    return out
