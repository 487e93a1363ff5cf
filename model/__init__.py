"""The emotion model of Makhmudov, Kultimuratov & Cho (2024): speech CNN + BERT/Bi-GRU + attention
fusion. Public API: ModelConfig, EmotionModel, save_checkpoint, load_checkpoint.

The names are loaded on first use (PEP 562), so code that needs only DEFAULT_CHECKPOINT (a CLI's
`--help`, its argument defaults) does not import torch."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "checkpoints" / "default.pt"

_WHERE = {
    "CheckpointError": "model.checkpoint", "load_checkpoint": "model.checkpoint", "save_checkpoint": "model.checkpoint",
    "MELD_LABELS": "model.config", "PACKAGED_ENCODER": "model.config", "ModelConfig": "model.config",
    "Dialogue": "model.emotion_model", "EmotionModel": "model.emotion_model", "EncodedUtterance": "model.emotion_model",
    "ModelOutput": "model.emotion_model", "Prediction": "model.emotion_model", "resolve_device": "model.emotion_model",
}

__all__ = ["DEFAULT_CHECKPOINT", *_WHERE]

if TYPE_CHECKING:
    from model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
    from model.config import MELD_LABELS, PACKAGED_ENCODER, ModelConfig
    from model.emotion_model import Dialogue, EmotionModel, EncodedUtterance, ModelOutput, Prediction, resolve_device


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value  # once: later lookups are ordinary attributes
    return value
