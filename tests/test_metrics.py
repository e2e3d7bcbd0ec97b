import numpy as np
import pytest

from theseus_deploy.data import GLUE_TASKS
from theseus_deploy.metrics import compute_metrics


def onehot(pred, n=2):
    out = np.zeros((len(pred), n))
    out[np.arange(len(pred)), pred] = 1.0
    return out


def test_accuracy_and_f1_by_hand():
    labels = np.array([1, 1, 0, 0, 1])
    pred = np.array([1, 0, 0, 1, 1])       # TP=2 FP=1 FN=1 TN=1
    m = compute_metrics(GLUE_TASKS["mrpc"], onehot(pred), labels)
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))  # 2TP/(2TP+FP+FN) = 4/6
    assert m["score"] == pytest.approx((3 / 5 + 4 / 6) / 2)


def test_matthews_by_hand():
    labels = np.array([1, 1, 0, 0, 1])
    pred = np.array([1, 0, 0, 1, 1])       # TP=2 TN=1 FP=1 FN=1
    mcc = (2 * 1 - 1 * 1) / np.sqrt((2 + 1) * (2 + 1) * (1 + 1) * (1 + 1))
    m = compute_metrics(GLUE_TASKS["cola"], onehot(pred), labels)
    assert m["matthews"] == pytest.approx(mcc) and m["score"] == pytest.approx(mcc)


def test_pearson_spearman_by_hand():
    labels = np.array([1.0, 2.0, 3.0, 4.0])
    pred = np.array([1.0, 3.0, 2.0, 4.0])
    m = compute_metrics(GLUE_TASKS["stsb"], pred[:, None], labels)
    # pearson: centred x=(-1.5,.5,-.5,1.5) y=(-1.5,-.5,.5,1.5): sum xy=2.25-.25-.25+2.25=4, sum x^2=5
    assert m["pearson"] == pytest.approx(4 / 5)
    # spearman: ranks equal the values here -> same as pearson
    assert m["spearman"] == pytest.approx(4 / 5)


def test_constant_regression_prediction_scores_zero():
    m = compute_metrics(GLUE_TASKS["stsb"], np.ones((4, 1)), np.array([1.0, 2.0, 3.0, 4.0]))
    assert m["pearson"] == 0.0 and m["spearman"] == 0.0


def test_f1_scores_the_declared_positive_class_after_label_remapping():
    """MRPC's F1 is that of `equivalent`, even for a model that gives `equivalent` id 0."""
    spec = GLUE_TASKS["mrpc"]
    data_labels = np.array([1, 1, 0])        # equivalent, equivalent, not_equivalent (data ids)
    mapping = np.array([1, 0])               # data id -> model id: equivalent is the model's 0
    labels = mapping[data_labels]            # [0, 0, 1]
    pred = np.array([0, 0, 0])               # the model says `equivalent` every time
    m = compute_metrics(spec, onehot(pred), labels, positive=0)
    assert m["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1))  # TP=2 FP=1 FN=0 for `equivalent`
    assert compute_metrics(spec, onehot(np.array([1, 1, 0])), data_labels)["f1"] == 1.0  # default: the spec's id
