"""DistributedDataParallel for `torchrun --nproc_per_node N -m training train ...`.

Without torchrun's environment (RANK, WORLD_SIZE > 1) every helper here is the identity and no
process group exists, so single-process training runs exactly the code it ran before.

Under torchrun the run is the single-process run with each global batch split across ranks:
  * every rank draws the same epoch (examples, modality mixing, batch order) from the run's own
    seeded generator, which stays in lockstep on all ranks; `agreed` checks it each epoch;
  * `BatchShare` gives rank r the r-th slice of each global batch (`--batch-size` stays the global
    batch) and scales its summed loss by N / (global normaliser), so DDP's gradient average is the
    single-process mean-loss gradient up to float reduction order;
  * what is random *inside* a batch (dropout masks, SpecAugment) is drawn per rank (`epoch_rng`);
  * rank 0 builds the feature caches while the others wait (`main_first`), scores validation and
    broadcasts the report (`from_main`) so early stopping decides the same everywhere, and writes
    every file.
Backends: nccl when the run's device is CUDA (one GPU per rank, cuda:LOCAL_RANK), gloo on CPU.
"""

from __future__ import annotations

import os
import zlib
from datetime import timedelta
from typing import Any, Callable, Sequence, TypeVar

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from model.emotion_model import ModelOutput

T = TypeVar("T")

# rank 0 may spend a long first run extracting audio and encoding texts while the others wait at a
# barrier: the process-group timeout must outlast that (torchrun still stops every rank on a crash)
CACHE_BUILD_TIMEOUT = timedelta(hours=2)


def launched() -> bool:
    """True when torchrun (or another launcher) started this process as one of several ranks."""
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """The rank that writes checkpoints, reports, logs and progress bars (always true alone)."""
    return rank() == 0


def setup(device: torch.device) -> torch.device:
    """Join torchrun's process group (once) and return this rank's device: cuda:LOCAL_RANK with
    nccl when `device` is CUDA, `device` with gloo otherwise. Not launched: `device` unchanged."""
    if not launched():
        return device
    if device.type == "cuda":
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
        if torch.cuda.device_count() < local_ranks:  # nccl refuses two ranks on one GPU
            raise RuntimeError(f"{local_ranks} ranks on this node need {local_ranks} GPUs, torch sees "
                               f"{torch.cuda.device_count()}: lower --nproc_per_node or train with --device cpu (gloo)")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=CACHE_BUILD_TIMEOUT)
    return device


def teardown() -> None:
    """Leave the process group (no-op when there is none)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main_first(fn: Callable[..., T], *args: Any, rerun: bool = False, **kwargs: Any) -> T:
    """fn(*args, **kwargs) on rank 0 first while the others wait at a barrier, then on the others,
    so on-disk caches are built by one process and loaded by the rest. `rerun`: rank 0 calls fn
    again after the barrier, so every rank holds what the cache stores (the caches keep float16,
    a freshly built table holds float32) and all ranks train on identical features."""
    if world_size() == 1:
        return fn(*args, **kwargs)
    out = fn(*args, **kwargs) if is_main() else None
    dist.barrier()
    if not is_main() or rerun:
        out = fn(*args, **kwargs)
    return out  # type: ignore[return-value]


def from_main(fn: Callable[[], T]) -> T:
    """fn() computed on rank 0 only and broadcast to every rank (validation: one exact score of the
    whole set, so decisions taken from it, like early stopping, agree everywhere)."""
    if world_size() == 1:
        return fn()
    box = [fn() if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]  # type: ignore[return-value]


def mean_over_ranks(x: float) -> float:
    """The mean of a Python float over ranks (identity alone)."""
    if world_size() == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t)
    return float(t.item()) / world_size()


def agreed(batches: list[np.ndarray], *arrays: np.ndarray) -> list[np.ndarray]:
    """`batches`, after checking that every rank drew the same epoch (a checksum of the batch order
    and `arrays`); a mismatch would silently train on overlapping shards, so it is an error."""
    if world_size() == 1:
        return batches
    crc = 0
    for a in (*arrays, *batches):
        crc = zlib.crc32(np.ascontiguousarray(a).tobytes(), crc)
    seen: list[int | None] = [None] * world_size()
    dist.all_gather_object(seen, crc)
    if len(set(seen)) != 1:
        raise RuntimeError(f"ranks drew different epochs (checksums {seen}); the run's seeded generator diverged")
    return batches


def epoch_rng(rng: np.random.Generator, seed: int, epoch: int) -> np.random.Generator:
    """The generator for randomness inside a batch (SpecAugment). Alone: the run's own `rng`, as
    before. Under DDP: a per-rank generator seeded from (seed, epoch, rank), and torch's generator
    (dropout masks) reseeded the same way, so ranks draw independently, the shared `rng` stays in
    lockstep, and a resumed run repeats its draws."""
    if world_size() == 1:
        return rng
    ss = np.random.SeedSequence([seed, epoch, rank()])
    torch.manual_seed(int(ss.generate_state(1, np.uint64)[0] >> np.uint64(1)))
    return np.random.default_rng(ss)


class BatchShare:
    """This rank's rows of one global batch and the loss whose DDP average is the global mean loss.

    Rank r takes the r-th of N near-equal contiguous slices; a rank whose slice is empty (a last
    batch smaller than N) runs one stand-in row with weight 0, because every rank must take part
    in every DDP step. Alone (N = 1) `rows` is the batch and `loss` is exactly F.cross_entropy."""

    def __init__(self, batch: np.ndarray, labels: np.ndarray, class_weight: torch.Tensor | None,
                 world: int | None = None, this_rank: int | None = None) -> None:
        self.world = world_size() if world is None else world
        r = rank() if this_rank is None else this_rank
        self.class_weight = class_weight
        self.size = len(batch)
        mine = np.array_split(batch, self.world)[r] if self.world > 1 else batch
        self.live = len(mine) > 0
        self.rows = mine if self.live else batch[:1]
        # cross_entropy's mean divides by the number of rows, or by the summed weights of their
        # labels when classes are weighted (label smoothing included): the global batch's value
        self.norm: torch.Tensor | float = float(self.size)
        if self.world > 1 and class_weight is not None:
            y = torch.from_numpy(np.asarray(labels)[batch]).to(class_weight.device)
            self.norm = class_weight[y].sum()

    def loss(self, logits: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
        if self.world == 1:
            return F.cross_entropy(logits, y, weight=self.class_weight, label_smoothing=label_smoothing)
        per = F.cross_entropy(logits, y, weight=self.class_weight, label_smoothing=label_smoothing, reduction="none")
        return per.sum() * (self.world / self.norm if self.live else 0.0)


class _Forward(nn.Module):
    """What DDP wraps: the model plus the batch-building forward, so every step goes through
    DDP.forward (unused-parameter search, buffer broadcast) before its backward."""

    def __init__(self, model: nn.Module, fn: Callable[..., ModelOutput]) -> None:
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.fn(self.model, *args, **kwargs)
        return out.logits, out.weights  # a tuple: DDP routes each tensor through its sink


def wrap_forward(model: nn.Module, fn: Callable[..., ModelOutput]) -> Callable[..., ModelOutput]:
    """`fn(model, *args)` (training's forward_examples) for training steps. Alone: `fn` itself.
    Under DDP: the same call through DistributedDataParallel, which broadcasts rank 0's weights
    once (identical init) and all-reduces (averages) gradients in backward. Parameters a batch does
    not reach (the speech CNN on text-only rows) are expected, hence find_unused_parameters."""
    if world_size() == 1:
        return fn
    ddp = nn.parallel.DistributedDataParallel(_Forward(model, fn), find_unused_parameters=True)

    def run(m: nn.Module, *args: Any, **kwargs: Any) -> ModelOutput:
        if m is not model:
            raise ValueError("this DDP forward was built for another model")
        logits, weights = ddp(*args, **kwargs)
        return ModelOutput(logits=logits, weights=weights)

    return run


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


__all__: Sequence[str] = ("launched", "world_size", "rank", "is_main", "setup", "teardown", "main_first",
                          "from_main", "mean_over_ranks", "agreed", "epoch_rng", "BatchShare", "wrap_forward")
