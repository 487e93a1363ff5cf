"""Temperature scaling, expected calibration error and the reliability diagram (training.calibration)."""

from __future__ import annotations

import numpy as np
import pytest

from training.calibration import calibration_report, ece, fit_temperature, nll, reliability_plot, softmax


def _synthetic(scale: float, n: int = 20000, c: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from softmax(z) (z are the 'true' logits), and the model's logits scale * z:
    scale > 1 is over-confident (best T = scale), scale < 1 under-confident."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, c)) * 1.5
    p = softmax(z)
    labels = (rng.random(n)[:, None] > np.cumsum(p, axis=1)).sum(axis=1)
    return z * scale, labels


# ---- ECE --------------------------------------------------------------------------------------------
def test_ece_equals_hand_computed_value():
    # 5 bins of width 0.2; confidences 0.95, 0.85 -> (0.8, 1]; 0.65, 0.75 -> (0.6, 0.8]
    probs = np.array([[0.95, 0.05], [0.15, 0.85], [0.65, 0.35], [0.25, 0.75]])
    labels = np.array([0, 0, 0, 1])  # right, wrong, right, right
    # (0.8, 1]: 2/4 * |0.5 - 0.9| = 0.2 ; (0.6, 0.8]: 2/4 * |1.0 - 0.7| = 0.15
    assert ece(probs, labels, n_bins=5) == pytest.approx(35.0, abs=1e-9)
    # default 15 bins (width 1/15): 0.97, 0.96 share (14/15, 1]; 0.5 lies in (7/15, 8/15]
    probs = np.array([[0.97, 0.02, 0.01], [0.02, 0.96, 0.02], [0.3, 0.2, 0.5]])
    labels = np.array([0, 0, 2])  # right, wrong, right
    hand = 2 / 3 * abs(0.5 - 0.965) + 1 / 3 * abs(1.0 - 0.5)
    assert ece(probs, labels) == pytest.approx(100 * hand, abs=1e-9)


def test_ece_of_a_perfectly_calibrated_bin_is_zero_and_of_a_confident_mistake_is_large():
    assert ece(np.array([[0.75, 0.25]] * 4), np.array([0, 0, 0, 1])) == pytest.approx(0.0, abs=1e-9)
    assert ece(np.array([[0.99, 0.01]] * 4), np.array([1, 1, 1, 1])) == pytest.approx(99.0)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError):
        ece(np.ones((3, 2)) / 2, np.array([0, 1]))
    with pytest.raises(ValueError):
        fit_temperature(np.zeros((2, 3)), np.array([0, 3]))


# ---- temperature ------------------------------------------------------------------------------------
def test_over_confident_logits_give_t_near_the_scale_and_lower_ece():
    logits, labels = _synthetic(3.0)
    T = fit_temperature(logits, labels)
    assert abs(T - 3.0) / 3.0 < 0.15, T
    rep = calibration_report(logits, labels, T)
    assert rep["temperature"] == T
    assert rep["ece_after"] < rep["ece_before"] / 2, rep
    assert rep["nll_after"] < rep["nll_before"], rep


def test_under_confident_logits_give_t_below_one():
    logits, labels = _synthetic(0.4, seed=1)
    T = fit_temperature(logits, labels)
    assert T < 1.0
    assert abs(T - 0.4) / 0.4 < 0.15, T
    rep = calibration_report(logits, labels, T)
    assert rep["ece_after"] < rep["ece_before"] and rep["nll_after"] < rep["nll_before"]


def test_fitted_t_minimises_nll_and_is_deterministic():
    logits, labels = _synthetic(2.0, n=3000, seed=2)
    T = fit_temperature(logits, labels)
    assert fit_temperature(logits, labels) == T
    best = nll(logits, labels, T)
    for other in (T * 0.97, T / 0.97, 1.0, 0.5 * T, 2 * T):
        assert best <= nll(logits, labels, other) + 1e-9


def test_temperature_stays_in_bounds_for_degenerate_data():
    logits = np.array([[5.0, 0.0], [0.0, 5.0]])
    assert fit_temperature(logits, np.array([0, 1])) == pytest.approx(0.05, rel=1e-3)  # all right: sharpen fully
    assert fit_temperature(logits, np.array([1, 0])) == pytest.approx(20.0, rel=1e-3)  # all wrong: soften fully
    t = fit_temperature(np.zeros((4, 3)), np.array([0, 1, 2, 0]))  # constant logits: any T, still in range
    assert 0.05 <= t <= 20.0


@pytest.mark.parametrize("scale", [0.3, 1.0, 4.0])
def test_accuracy_never_changes(scale):
    logits, labels = _synthetic(scale, n=2000, seed=3)
    T = fit_temperature(logits, labels)
    assert np.array_equal(softmax(logits, T).argmax(1), logits.argmax(1))
    assert np.allclose(softmax(logits, T).sum(1), 1.0)


# ---- reliability diagram ----------------------------------------------------------------------------
def test_reliability_plot_writes_png(tmp_path):
    logits, labels = _synthetic(3.0, n=2000, seed=4)
    T = fit_temperature(logits, labels)
    one = reliability_plot(softmax(logits), labels, tmp_path / "a" / "before.png", title="before")
    two = reliability_plot(softmax(logits), labels, tmp_path / "both.png", probs_after=softmax(logits, T))
    for p in (one, two):
        assert p.is_file() and p.stat().st_size > 1000
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
