"""Metrics: hand-computed values and scikit-learn agreement; plots are written."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support, recall_score

from training.metrics import classification_report, confusion, format_report

LABELS = ("a", "b", "c")


def test_hand_computed_small_case():
    # true a a a a b b c c ; pred a a b c b a c c
    y = [0, 0, 0, 0, 1, 1, 2, 2]
    p = [0, 0, 1, 2, 1, 0, 2, 2]
    r = classification_report(y, p, LABELS)
    assert r["confusion"] == [[2, 1, 1], [1, 1, 0], [0, 0, 2]]
    assert r["acc"] == pytest.approx(100 * 5 / 8)
    # recalls a 2/4, b 1/2, c 2/2 -> WA = mean = 2/3
    assert r["wa"] == pytest.approx(100 * (0.5 + 0.5 + 1.0) / 3)
    # precisions a 2/3, b 1/2, c 2/3; F1 a = 2*(2/3*1/2)/(2/3+1/2) = 4/7, b = 1/2, c = 0.8
    f1 = {"a": 4 / 7, "b": 0.5, "c": 0.8}
    for k, v in f1.items():
        assert r["per_class"][k]["f1"] == pytest.approx(100 * v)
    assert r["f1"] == pytest.approx(100 * sum(f1.values()) / 3)
    assert r["wf1"] == pytest.approx(100 * (4 * f1["a"] + 2 * f1["b"] + 2 * f1["c"]) / 8)
    assert r["per_class"]["a"]["support"] == 4 and r["per_class"]["a"]["precision"] == pytest.approx(100 * 2 / 3)
    assert {"acc", "f1", "wa", "wf1"} <= set(r)


def test_matches_scikit_learn_on_random_predictions():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 7, 500)
    p = np.where(rng.random(500) < 0.6, y, rng.integers(0, 7, 500))
    labels = [f"c{k}" for k in range(7)]
    r = classification_report(y.tolist(), p.tolist(), labels)
    assert r["acc"] == pytest.approx(100 * accuracy_score(y, p))
    assert r["f1"] == pytest.approx(100 * f1_score(y, p, average="macro"))
    assert r["wf1"] == pytest.approx(100 * f1_score(y, p, average="weighted"))
    assert r["wa"] == pytest.approx(100 * recall_score(y, p, average="macro"))
    prec, rec, f, sup = precision_recall_fscore_support(y, p, labels=range(7), zero_division=0)
    for k, lab in enumerate(labels):
        assert r["per_class"][lab]["precision"] == pytest.approx(100 * prec[k])
        assert r["per_class"][lab]["recall"] == pytest.approx(100 * rec[k])
        assert r["per_class"][lab]["support"] == sup[k]


def test_class_without_support_is_left_out_of_averages_but_counts_as_error():
    # a 7-output model scored where class 2 never occurs (MELD 'paper' split has no fear)
    y = [0, 0, 1, 1]
    p = [0, 2, 1, 1]
    r = classification_report(y, p, LABELS)
    assert r["acc"] == pytest.approx(75.0)
    assert r["wa"] == pytest.approx(100 * (0.5 + 1.0) / 2)
    assert r["wa"] == pytest.approx(100 * recall_score(y, p, labels=[0, 1], average="macro"))
    assert r["f1"] == pytest.approx(100 * f1_score(y, p, labels=[0, 1], average="macro"))
    assert r["wf1"] == pytest.approx(100 * f1_score(y, p, average="weighted", zero_division=0))
    assert "WA 75.0" in format_report(r)


def test_errors_and_confusion_shape():
    with pytest.raises(ValueError):
        classification_report([], [], LABELS)
    with pytest.raises(ValueError):
        classification_report([0], [0, 1], LABELS)
    assert confusion([0, 1], [1, 1], 3).sum() == 2


def test_plots_are_written(tmp_path):
    from training.report import plot_confusion, plot_curves

    cm = plot_confusion([[3, 1], [0, 4]], ["x", "y"], tmp_path / "cm.png")
    hist = [{"epoch": e, "train_loss": 1.0 / e, "val_loss": 1.1 / e, "val_wf1": 40 + e, "val_wa": 30 + e} for e in (1, 2, 3)]
    cu = plot_curves(hist, tmp_path / "curves.png")
    for p in (cm, cu):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5_000
