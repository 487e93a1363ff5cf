"""Distributed training: `torchrun --nproc_per_node 2 -m training train` (gloo, CPU) on a small MELD
subset with the tiny test encoder (tests/conftest.py), checked against the single-process run.

What "identical to the single-process run" means here: the global batch (`--batch-size`) is kept,
every rank draws the same epoch and takes its slice of each batch, and the per-rank loss is scaled
so DDP's averaged gradient is the single-process gradient up to float summation order. With no
randomness inside a batch (dropout 0; MELD without audio, so no SpecAugment or BatchNorm), weights
agree to float rounding, which Adam's normalised steps let grow slowly: measured max |Δw| 1.2e-5
after 22 steps at lr 5e-3 (weights ~0.15); we allow 2e-4, while a real mismatch (e.g. rank 0 on its
freshly built float32 features, the others on the cached float16 ones) gives ~2e-2. Losses agree to ~1e-7 relative (allowed 1e-5) and validation probabilities to ~1e-7 (allowed
1e-4); the tiny model's top-2 margins (>= ~1e-4) dwarf that, so every label and every reported metric
is equal.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model import load_checkpoint
from training import distributed
from training.config import TrainConfig
from training.loop import Trainer, eval_examples, predict

ROOT = Path(__file__).resolve().parents[1]
MELD_DIR = ROOT.parent / "shared" / "data" / "meld"
# odd global batch (31 = 16 + 15 per rank, last batch 10 = 5 + 5), weighted + smoothed loss as in
# the default recipe, a learning rate that moves the tiny model, patience 1 so early stopping fires
RUN = dict(epochs=4, patience=1, batch_size=31, lr=5e-3, dropout=0.0, class_weight="balanced",
           label_smoothing=0.1, max_train=320, max_eval=96, threads=1, seed=0)
WEIGHT_TOL, LOSS_RTOL, PROB_TOL = 2e-4, 1e-5, 1e-4


def _flags(cfg: dict) -> list[str]:
    out = []
    for k, v in cfg.items():
        out += [f"--{k.replace('_', '-')}", str(v)]
    return out


def _torchrun(args: list[str], logs: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--log-dir", str(logs), "--redirects", "3", "-m", "training", "train", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    if proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}):\n{proc.stderr[-3000:]}\n{_rank_logs(logs)}")
    return proc


def _rank_logs(logs: Path) -> dict[str, str]:
    """{'0/stdout': ..., '1/stderr': ...} from torchrun's per-rank log files (the latest run)."""
    runs = sorted(logs.glob("*/attempt_0"), key=lambda p: p.stat().st_mtime)
    if not runs:
        return {}
    return {f"{f.parent.name}/{f.stem}": f.read_text() for f in runs[-1].glob("*/*.log")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_encoder_dir):
    """DDP: 1 epoch, then --resume until early stopping; single process: the same run in one go.
    The DDP run starts on an empty feature cache, so rank 0 must build it while rank 1 waits."""
    root = tmp_path_factory.mktemp("ddp")
    base = dict(data=f"meld:{MELD_DIR}", encoder=str(tiny_encoder_dir), encoder_dim=32, cache_dir=str(root / "cache"))
    ddp, logs = root / "ddp", root / "logs"
    flags = _flags({**base, **RUN}) + ["--no-progress"]
    _torchrun(flags + ["--out", str(ddp), "--epochs", "1"], logs)
    first = _rank_logs(logs)
    _torchrun(flags + ["--out", str(ddp), "--resume"], logs)
    resumed = _rank_logs(logs)
    threads = torch.get_num_threads()
    try:
        single = Trainer(TrainConfig(**base, **RUN, out=str(root / "single"), progress=False))
        single.fit()
    finally:
        torch.set_num_threads(threads)
    return {"ddp": ddp, "single": root / "single", "trainer": single, "first": first, "resumed": resumed}


def test_ddp_smoke_train_lowers_loss_and_rank0_writes_one_loadable_checkpoint(runs):
    hist = json.loads((runs["ddp"] / "history.json").read_text())
    assert [h["epoch"] for h in hist] == [1, 2]  # resumed at 1; patience 1 stopped it at 2 of 4
    assert hist[1]["train_loss"] < hist[0]["train_loss"]
    model = load_checkpoint(runs["ddp"] / "best.pt", device="cpu")
    assert model.metadata["epoch"] == 1 and [h["epoch"] for h in model.metadata["history"]] == [1, 2]
    assert load_checkpoint(runs["ddp"] / "last.pt", device="cpu").metadata["epoch"] == 2
    assert sorted(p.name for p in runs["ddp"].glob("*.pt")) == ["best.pt", "last.pt", "last.state.pt"]
    assert not list(runs["ddp"].glob("*.tmp"))
    for logs in (runs["first"], runs["resumed"]):
        assert set(logs) == {"0/stdout", "0/stderr", "1/stdout", "1/stderr"}
        assert "run folder:" in logs["0/stdout"] and logs["1/stdout"].strip() == ""  # rank 1 reports nothing
    assert "epoch   2" in runs["resumed"]["0/stdout"] and "resumed" in runs["resumed"]["0/stdout"]
    # rank 0 encoded the texts into the empty cache; rank 1 waited at the barrier and only loaded
    assert "encode texts" in runs["first"]["0/stderr"] and "encode texts" not in runs["first"]["1/stderr"]
    assert "encode texts" not in runs["resumed"]["0/stderr"] + runs["resumed"]["1/stderr"]


def test_ddp_matches_single_process_run(runs):
    d, s = runs["ddp"], runs["single"]
    hd, hs = (json.loads((p / "history.json").read_text()) for p in (d, s))
    assert len(hd) == len(hs) == 2  # early stopping took the same decision
    for a, b in zip(hd, hs):
        for k in ("train_loss", "val_loss"):
            assert a[k] == pytest.approx(b[k], rel=LOSS_RTOL), k
        for k in ("val_acc", "val_f1", "val_wa", "val_wf1", "lr"):
            assert a[k] == pytest.approx(b[k], abs=1e-9), k
    for name in ("best.pt", "last.pt"):
        wd, ws = (torch.load(p / name, weights_only=True)["state_dict"] for p in (d, s))
        assert wd.keys() == ws.keys()
        diff = max((wd[k].float() - ws[k].float()).abs().max().item() for k in wd if wd[k].is_floating_point())
        assert diff < WEIGHT_TOL, f"{name}: max |w_ddp - w_single| = {diff:.2e}"
    # the final weights score the validation set alike, example by example
    tr = runs["trainer"]
    ex = eval_examples(tr.table, tr.val_targets)
    shared = tr.model.text_encoder
    _, pd = predict(load_checkpoint(d / "last.pt", device="cpu", text_encoder=shared), tr.table, ex)
    _, ps = predict(load_checkpoint(s / "last.pt", device="cpu", text_encoder=shared), tr.table, ex)
    gap = float(np.abs(pd - ps).max())
    assert gap < PROB_TOL
    top2 = np.sort(ps, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * gap  # examples rounding cannot flip (here: all of them)
    assert clear.mean() > 0.9 and (pd.argmax(1)[clear] == ps.argmax(1)[clear]).all()
    for part in ("val", "test"):
        rd, rs = (json.loads((p / f"{part}.json").read_text()) for p in (d, s))
        assert rd["confusion"] == rs["confusion"]
        for m in ("acc", "f1", "wa", "wf1"):
            assert rd[m] == pytest.approx(rs[m], abs=1e-9), (part, m)


# ---- the pieces, without a process group ------------------------------------------------------
def test_alone_every_helper_is_the_single_process_path(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert not distributed.launched() and distributed.world_size() == 1 and distributed.is_main()
    assert distributed.setup(torch.device("cpu")) == torch.device("cpu") and not torch.distributed.is_initialized()
    rng = np.random.default_rng(0)
    assert distributed.epoch_rng(rng, 0, 3) is rng
    assert distributed.main_first(lambda x: x + 1, 1, rerun=True) == 2 and distributed.from_main(lambda: 5) == 5
    batches = [np.arange(4)]
    assert distributed.agreed(batches, np.arange(3)) is batches and distributed.mean_over_ranks(2.5) == 2.5
    b = np.array([5, 2, 7])
    share = distributed.BatchShare(b, np.zeros(10, np.int64), None)
    assert share.rows is b
    logits, y = torch.randn(3, 7), torch.tensor([0, 3, 6])
    assert torch.equal(share.loss(logits, y, 0.1), F.cross_entropy(logits, y, label_smoothing=0.1))


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("size", [31, 10, 1])  # uneven shares; a batch smaller than the world: empty shares
def test_batch_shares_average_to_the_global_loss_and_gradient(weighted, size):
    """DDP averages per-rank gradients: mean over ranks of each share's loss (and its gradient)
    must be the global batch's mean loss (and gradient), with class weights and label smoothing."""
    gen = torch.Generator().manual_seed(size)
    labels = torch.randint(0, 7, (40,), generator=gen).numpy()
    w = torch.rand(7, generator=gen) + 0.5 if weighted else None
    batch = np.random.default_rng(size).permutation(40)[:size]
    logits = torch.randn(40, 7, generator=gen)
    x = logits[batch].clone().requires_grad_(True)
    ref = F.cross_entropy(x, torch.from_numpy(labels[batch]), weight=w, label_smoothing=0.1)
    ref.backward()
    world, total, grads = 4, 0.0, torch.zeros(40, 7)
    rows_seen = []
    for r in range(world):
        share = distributed.BatchShare(batch, labels, w, world=world, this_rank=r)
        xr = logits[share.rows].clone().requires_grad_(True)
        loss = share.loss(xr, torch.from_numpy(labels[share.rows]), label_smoothing=0.1)
        loss.backward()
        total += float(loss.detach()) / world
        grads[share.rows] += xr.grad / world
        if share.live:
            rows_seen += share.rows.tolist()
    assert sorted(rows_seen) == sorted(batch.tolist())  # every row on exactly one rank
    assert total == pytest.approx(float(ref.detach()), rel=1e-6)
    assert torch.allclose(grads[batch], x.grad, atol=1e-7)
