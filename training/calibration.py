"""Post-hoc calibration: temperature scaling (Guo et al. 2017) fitted on held-out logits, the
expected calibration error, and a reliability diagram.

A temperature divides every logit by the same T > 0, so the arg-max (and hence accuracy) never
changes; only how confident the served probabilities are. T > 1 softens an over-confident model,
T < 1 sharpens an under-confident one.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from training.report import _plt, _save

T_MIN, T_MAX = 0.05, 20.0


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax(logits / temperature), float64."""
    return np.exp(_log_softmax(np.asarray(logits, dtype=np.float64) / temperature))


def _check(logits_or_probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(logits_or_probs, dtype=np.float64)
    y = np.asarray(labels).astype(np.int64).reshape(-1)
    if x.ndim != 2 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f"expected (N, C) scores and (N,) labels with N > 0, got {x.shape} and {y.shape}")
    if y.min() < 0 or y.max() >= x.shape[1]:
        raise ValueError(f"labels must be in [0, {x.shape[1]}), got range [{y.min()}, {y.max()}]")
    return x, y


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of softmax(logits / temperature) (nats)."""
    x, y = _check(logits, labels)
    return float(-_log_softmax(x / temperature)[np.arange(y.size), y].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray, t_min: float = T_MIN, t_max: float = T_MAX,
                    tol: float = 1e-6) -> float:
    """The temperature T in [t_min, t_max] minimising the mean NLL of softmax(logits / T).

    The NLL is convex in 1/T (a log-sum-exp of a linear function minus a linear one), hence
    unimodal in log T, so a golden-section search over log T finds the global minimum without
    any randomness or step-size tuning: deterministic, and robust to extreme logits (computed in
    float64 with a stable log-softmax). A minimum outside the bounds returns the nearer bound.
    """
    x, y = _check(logits, labels)
    if not (0 < t_min < t_max):
        raise ValueError(f"need 0 < t_min < t_max, got {t_min}, {t_max}")
    rows = np.arange(y.size)

    def f(log_t: float) -> float:
        return float(-_log_softmax(x / math.exp(log_t))[rows, y].mean())

    a, b = math.log(t_min), math.log(t_max)
    g = (math.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f(c), f(d)
    while b - a > tol:
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = f(d)
    best = (a + b) / 2
    # the ends are candidates too (a flat or monotone NLL, e.g. all-correct data, runs to a bound)
    cands = [(f(best), best), (f(math.log(t_min)), math.log(t_min)), (f(math.log(t_max)), math.log(t_max))]
    return float(min(max(math.exp(min(cands)[1]), t_min), t_max))


def _bins(probs: np.ndarray, labels: np.ndarray, n_bins: int):  # type: ignore[no-untyped-def]
    """Per equal-width confidence bin: (count, mean confidence, accuracy); confidence = max prob."""
    p, y = _check(probs, labels)
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    # bin i holds conf in (i/n, (i+1)/n]; conf == 0 (impossible for probabilities) goes to bin 0
    idx = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins).astype(np.float64)
    conf_sum = np.bincount(idx, weights=conf, minlength=n_bins)
    acc_sum = np.bincount(idx, weights=correct, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return count, conf_sum / count, acc_sum / count


def ece(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """Expected calibration error in percent: sum over equal-width confidence bins of
    (bin count / N) * |accuracy - mean confidence|, confidence being the max probability."""
    if n_bins < 1:
        raise ValueError("n_bins must be >= 1")
    count, conf, acc = _bins(probs, labels, n_bins)
    used = count > 0
    return float(100.0 * np.sum(count[used] / count.sum() * np.abs(acc[used] - conf[used])))


def reliability_plot(probs: np.ndarray, labels: np.ndarray, path: str | Path, title: str = "",
                     probs_after: np.ndarray | None = None, n_bins: int = 15) -> Path:
    """Reliability diagram PNG: accuracy per confidence bin against the diagonal, with ECE in the
    legend; `probs_after` (e.g. temperature-scaled) drawn over it for comparison."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.8, 4.6))
    edges = np.linspace(0, 1, n_bins + 1)
    width = 1.0 / n_bins
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect")
    series = [("before", probs, "tab:red")] if probs_after is None else [("before", probs, "tab:red"),
                                                                         ("after", probs_after, "tab:blue")]
    bar_w = width * 0.9 / len(series)
    for i, (name, p, color) in enumerate(series):
        count, _, acc = _bins(p, labels, n_bins)
        shown = np.where(count > 0, acc, 0.0)
        label = f"{name if probs_after is not None else 'accuracy'} (ECE {ece(p, labels, n_bins):.1f}%)"
        x = edges[:-1] + width * 0.05 + i * bar_w
        ax.bar(x, shown, width=bar_w, align="edge", alpha=0.7, color=color, edgecolor="black", lw=0.5, label=label)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (max probability)")
    ax.set_ylabel("accuracy")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(title or "reliability diagram")
    return _save(plt, fig, path)


def calibration_report(logits: np.ndarray, labels: np.ndarray, T: float) -> dict[str, float]:
    """ECE (percent) and NLL (nats) of the held-out logits before (T = 1) and after scaling by T."""
    x, y = _check(logits, labels)
    if not T > 0:
        raise ValueError(f"temperature must be > 0, got {T}")
    return {
        "temperature": float(T),
        "ece_before": ece(softmax(x), y),
        "ece_after": ece(softmax(x, T), y),
        "nll_before": nll(x, y),
        "nll_after": nll(x, y, T),
    }
