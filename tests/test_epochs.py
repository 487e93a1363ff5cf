"""The training loop the stages share (training.epochs): early stopping, the best epoch's snapshot
put back, one optimiser step."""

from __future__ import annotations

import math

import pytest
import torch

from training.epochs import KeepBest, module_state, step


def run(scores: list[float], patience: int | None, epochs: int) -> tuple[list[int], KeepBest]:
    """Drive KeepBest as a stage does: the snapshot is the epoch's number."""
    seen: list[int] = []
    current = {"epoch": 0}
    keep = KeepBest(patience, snapshot=lambda: current["epoch"])
    for epoch in keep.epochs(epochs):
        seen.append(epoch)
        current["epoch"] = epoch
        keep.update(epoch, scores[epoch - 1])
    return seen, keep


def test_patience_stops_after_that_many_epochs_without_a_better_score_and_keeps_the_best():
    seen, keep = run([1.0, 3.0, 2.0, 3.0, 5.0, 9.0], patience=2, epochs=6)
    assert seen == [1, 2, 3, 4]  # 3 and 4 are no better than 2 (a tie is not better)
    assert keep.stopped and (keep.best, keep.epoch, keep.state) == (3.0, 2, 2)


def test_without_patience_every_epoch_runs():
    seen, keep = run([5.0, 1.0, 1.0, 1.0], patience=None, epochs=4)
    assert seen == [1, 2, 3, 4] and not keep.stopped and keep.state == 1 and keep.bad == 3


def test_a_resumed_run_starts_where_it_stopped():
    keep = KeepBest(3, best=4.0, bad=2)  # two bad epochs behind it: the next no-better one is the third
    got = []
    for epoch in keep.epochs(10, first=6):
        got.append(epoch)
        keep.update(epoch, 3.0)
    assert got == [6] and keep.stopped and keep.best == 4.0


def test_state_before_any_better_epoch_is_an_error_and_patience_must_be_positive():
    keep = KeepBest(2, snapshot=lambda: "s")
    with pytest.raises(RuntimeError):
        keep.state
    keep.update(1, -math.inf)  # not better than -inf
    with pytest.raises(RuntimeError):
        keep.state
    with pytest.raises(ValueError):
        KeepBest(0)


def test_step_clips_the_gradient_norm_steps_the_scheduler_and_the_snapshot_is_a_copy():
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 1)
    before = module_state(layer)
    opt = torch.optim.SGD(layer.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    loss = (layer(torch.full((8, 4), 100.0)) ** 2).mean()
    value = step(opt, loss, clip=1.0, scheduler=sched)
    assert value == pytest.approx(float(loss))
    grad = torch.cat([p.grad.flatten() for p in layer.parameters()])
    assert float(grad.norm()) == pytest.approx(1.0, rel=1e-4)  # clipped from thousands
    moved = torch.cat([(layer.state_dict()[k] - before[k]).flatten() for k in before])
    assert float(moved.norm()) == pytest.approx(1.0, rel=1e-4)  # lr 1 times the clipped gradient
    assert sched.get_last_lr() == [0.5]
    assert not torch.equal(before["weight"], layer.weight.detach())  # the snapshot did not follow the step


def test_step_with_a_grad_scaler_matches_the_plain_step():
    """The Trainer's path (GradScaler; disabled off CUDA, where it must change nothing)."""
    results = []
    for scaler in (None, torch.amp.GradScaler("cuda", enabled=False)):
        torch.manual_seed(0)
        layer = torch.nn.Linear(4, 1)
        opt = torch.optim.Adam(layer.parameters(), lr=0.1)
        loss = (layer(torch.full((8, 4), 100.0)) ** 2).mean()
        step(opt, loss, clip=1.0, scaler=scaler)
        results.append(module_state(layer))
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])
