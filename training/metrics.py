"""Classification metrics as the emotion literature reports them.

acc  = accuracy
f1   = macro F1 (unweighted mean over classes)
wa   = "weighted accuracy" in the SER sense: mean per-class recall (= unweighted average recall)
wf1  = support-weighted F1 (MELD's usual headline)
All in percent. Classes that have no support in y_true are left out of f1/wa/wf1 (a model with
MELD's seven outputs scored on a split without fear, or on EmoDB mapped onto MELD labels, is
averaged over the classes that occur), but still count as wrong predictions.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def confusion(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int) -> np.ndarray:
    """(C, C) counts, rows = true class, columns = predicted class."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    for t, p in zip(y_true, y_pred):
        cm[int(t), int(p)] += 1
    return cm


def classification_report(y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence[str]) -> dict:
    """{'acc','f1','wa','wf1','n','per_class':{label:{precision,recall,f1,support}},'confusion':[[..]],'labels':[..]}"""
    if len(y_true) != len(y_pred):
        raise ValueError("y_true and y_pred differ in length")
    if len(y_true) == 0:
        raise ValueError("no examples to score")
    cm = confusion(y_true, y_pred, len(labels))
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    tp = np.diag(cm).astype(np.float64)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    present = support > 0
    n = int(support.sum())
    return {
        "acc": 100.0 * float(tp.sum()) / n,
        "f1": 100.0 * float(f1[present].mean()),
        "wa": 100.0 * float(recall[present].mean()),
        "wf1": 100.0 * float((f1 * support).sum() / n),
        "n": n,
        "labels": list(labels),
        "per_class": {
            lab: {"precision": 100.0 * float(precision[k]), "recall": 100.0 * float(recall[k]),
                  "f1": 100.0 * float(f1[k]), "support": int(support[k])}
            for k, lab in enumerate(labels)
        },
        "confusion": cm.tolist(),
    }


def format_report(rep: dict, title: str = "") -> str:
    """Plain-text table for the terminal."""
    lines = [title] if title else []
    lines.append(f"n={rep['n']}  Acc {rep['acc']:.1f}  macro-F1 {rep['f1']:.1f}  WA {rep['wa']:.1f}  WF1 {rep['wf1']:.1f}")
    lines.append(f"{'class':<12}{'prec':>7}{'recall':>8}{'f1':>7}{'support':>9}")
    for lab, r in rep["per_class"].items():
        lines.append(f"{lab:<12}{r['precision']:>7.1f}{r['recall']:>8.1f}{r['f1']:>7.1f}{r['support']:>9d}")
    return "\n".join(lines)
