"""The training loop the stages share: epochs with early stopping on a validation score, the best
epoch's weights kept, and one optimiser step.

Stage 1 (text_finetune), stage 2 (speech_branch: the CNN and the heads on cached vectors), stage 3
(recipe: fusion) and the single-corpus Trainer (loop.py) all train the same way: run an epoch,
score the validation set, remember a snapshot of the weights when the score is the best so far,
stop after `patience` epochs without a better one, put the best snapshot back. `KeepBest` is that
loop; each stage says what an epoch is, what its score is and what its snapshot holds.

    keep = KeepBest(patience=3, snapshot=lambda: module_state(model))
    for epoch in keep.epochs(max_epochs):
        loss = ...one epoch...
        keep.update(epoch, validation_score())
    model.load_state_dict(keep.state)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch


def module_state(module: torch.nn.Module, cpu: bool = False) -> dict[str, torch.Tensor]:
    """A copy of a module's weights and buffers, detached (the snapshot most stages keep); with
    `cpu`, on the CPU (to be saved as it is)."""
    return {k: (v.detach().cpu() if cpu else v.detach()).clone() for k, v in module.state_dict().items()}


class KeepBest:
    """Early stopping on a validation score (higher is better): the best score, its epoch and a
    snapshot taken when it was reached; `patience` epochs in a row without a better score end the
    loop (None: run every epoch). `best` / `bad` may be given to resume a run."""

    def __init__(self, patience: int | None = None, snapshot: Callable[[], Any] | None = None,
                 best: float = -math.inf, bad: int = 0) -> None:
        if patience is not None and patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        self.patience, self.snapshot = patience, snapshot
        self.best, self.bad = best, bad
        self.epoch = 0  # the best epoch (0: none scored yet)
        self._state: Any = None

    @property
    def stopped(self) -> bool:
        """`patience` epochs in a row brought no better score."""
        return self.patience is not None and self.bad >= self.patience

    def epochs(self, last: int, first: int = 1) -> Iterator[int]:
        """Epoch numbers first..last, ending early once stopped (checked before each epoch)."""
        for epoch in range(first, last + 1):
            if self.stopped:
                return
            yield epoch

    def update(self, epoch: int, score: float) -> bool:
        """Record an epoch's validation score; True when it is the best so far (the snapshot is
        taken then)."""
        if score > self.best:
            self.best, self.epoch, self.bad = score, epoch, 0
            if self.snapshot is not None:
                self._state = self.snapshot()
            return True
        self.bad += 1
        return False

    @property
    def state(self) -> Any:
        """The best epoch's snapshot."""
        if self._state is None:
            raise RuntimeError("no epoch was scored (or no snapshot was asked for)")
        return self._state


def step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, clip: float = 0.0,
         params: Iterable[torch.nn.Parameter] | None = None,
         scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
         scaler: torch.amp.GradScaler | None = None) -> float:
    """One optimiser step on `loss`: zero the gradients, backward, clip their norm to `clip` (when
    > 0, over `params`, default every parameter the optimiser holds), step, then the scheduler.
    With `scaler` (fp16 autocast on CUDA) the loss is scaled for backward and the gradients are
    unscaled before clipping. Returns the loss's value."""
    optimizer.zero_grad(set_to_none=True)
    (loss if scaler is None else scaler.scale(loss)).backward()
    if clip > 0:
        if scaler is not None:
            scaler.unscale_(optimizer)
        if params is None:
            params = [p for g in optimizer.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, clip)
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)
        scaler.update()
    if scheduler is not None:
        scheduler.step()
    return float(loss.detach())
