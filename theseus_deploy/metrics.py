"""GLUE metrics computed locally (scikit-learn/scipy; `evaluate.load` would need the hub).

`score` is the mean of the task's metrics, the GLUE leaderboard's convention (MRPC: F1 and
accuracy; STS-B: Pearson and Spearman), and is what early stopping maximises.
"""
from __future__ import annotations

import numpy as np


def accuracy(pred, labels) -> float:
    return float((np.asarray(pred) == np.asarray(labels)).mean())


def f1(pred, labels) -> float:
    from sklearn.metrics import f1_score

    labels = np.asarray(labels)
    average = "binary" if len(np.unique(np.concatenate([labels, np.asarray(pred)]))) <= 2 else "macro"
    return float(f1_score(labels, pred, average=average, zero_division=0))


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


def compute_metrics(spec, logits: np.ndarray, labels: np.ndarray) -> dict:
    """Every metric of the task plus `score` (their mean)."""
    pred = predictions(spec, logits)
    out = {name: METRICS[name](pred, labels) for name in spec.metrics}
    out["score"] = float(np.mean([out[n] for n in spec.metrics]))
    return out
