"""Pictures next to the numbers: confusion-matrix and learning-curve PNGs."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(cm: Sequence[Sequence[int]], labels: Sequence[str], path: str | Path, title: str = "") -> Path:
    """Row-normalised confusion matrix (recall per true class) with the raw counts in each cell."""
    plt = _plt()
    cm = np.asarray(cm, dtype=np.int64)
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros(cm.shape), where=rows > 0)
    fig, ax = plt.subplots(figsize=(1.1 * len(labels) + 2, 1.0 * len(labels) + 1.5))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(j, i, f"{cm[i, j]}\n{100 * norm[i, j]:.0f}%", ha="center", va="center", fontsize=7,
                    color="white" if norm[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_title(title or "confusion (row-normalised)")
    return _save(plt, fig, path)


def plot_curves(history: list[dict], path: str | Path, title: str = "") -> Path:
    """Training loss and validation metrics per epoch (history rows from training.loop)."""
    plt = _plt()
    epochs = [h["epoch"] for h in history]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    a1.plot(epochs, [h["train_loss"] for h in history], label="train loss")
    if any("val_loss" in h for h in history):
        a1.plot(epochs, [h.get("val_loss", np.nan) for h in history], label="val loss")
    a1.set_xlabel("epoch")
    a1.set_ylabel("cross-entropy")
    a1.legend()
    for key in ("val_wf1", "val_wa", "val_acc"):
        if any(key in h for h in history):
            a2.plot(epochs, [h.get(key, np.nan) for h in history], label=key)
    a2.set_xlabel("epoch")
    a2.set_ylabel("%")
    a2.legend()
    fig.suptitle(title or "learning curves")
    return _save(plt, fig, path)


def _save(plt, fig, path: str | Path) -> Path:  # type: ignore[no-untyped-def]
    """Write a figure as PNG (creating its folder) and free it."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
