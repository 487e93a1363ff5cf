"""Checkpoints: one file holding the format version, the ModelConfig, the weights and metadata.

A frozen encoder is referenced by name (config.encoder), not copied; a fine-tuned one is stored.
Loading uses torch.load(weights_only=True): no pickled code ever runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from model import DEFAULT_CHECKPOINT  # defined in model/__init__.py (no torch needed for a path)
from model.config import ModelConfig
from model.emotion_model import EmotionModel, resolve_device
from model.text_encoder import AbsentTextEncoder, TextEncoder

FORMAT = "emostream.emotion-model"
FORMAT_VERSION = 1
_ENCODER_PREFIX = "text_encoder."
_EMBEDDINGS_PREFIX = "text_encoder.model.embeddings."


class CheckpointError(ValueError):
    """The file is not a usable emostream checkpoint (corrupt, wrong format, wrong version)."""


def save_checkpoint(model: EmotionModel, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {}
    for k, v in model.state_dict().items():
        if k.startswith(_ENCODER_PREFIX):
            if model.config.freeze_encoder or (model.config.encoder_layers_only and k.startswith(_EMBEDDINGS_PREFIX)):
                continue  # read from the referenced encoder when loading
            if model.config.encoder_layers_only and v.is_floating_point():
                v = v.half()  # fine-tuned layers in fp16 (scores checked unchanged when the recipe saves)
        state[k] = v.detach().cpu()
    blob = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": model.config.to_dict(),
        "state_dict": state,
        "metadata": metadata or {},
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(blob, tmp)
    tmp.replace(path)  # atomic: a crash never leaves a half-written checkpoint
    return path


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load and validate the raw checkpoint dict (no model built)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt zip, truncated file, pickled code: all refused the same way
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an emostream checkpoint (format {blob.get('format') if isinstance(blob, dict) else type(blob).__name__!r})")
    version = blob.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{path} has format version {version!r}; this emostream reads <= {FORMAT_VERSION}")
    try:
        blob["config"] = ModelConfig.from_dict(blob["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path} has an invalid config: {e}") from e
    return blob


def load_checkpoint(
    path: str | Path = DEFAULT_CHECKPOINT,
    device: str | torch.device = "auto",
    encoder: str | None = None,
    text_encoder: TextEncoder | None = None,
    load_encoder: bool = True,
) -> EmotionModel:
    """Build the model a checkpoint describes, on `device` (auto|cpu|cuda), in eval mode.
    `encoder` overrides where the (frozen) text encoder is found, e.g. a local copy of bert.
    load_encoder=False: a head-only model (speech CNN, Bi-GRU, fusion, classifier) that predicts
    from EncodedUtterances computed elsewhere; the text encoder is neither loaded nor needed."""
    blob = read_checkpoint(path)
    config: ModelConfig = blob["config"]
    if encoder is not None:
        config = ModelConfig.from_dict({**config.to_dict(), "encoder": encoder})
    if not load_encoder:
        text_encoder = AbsentTextEncoder(config.encoder, config.encoder_dim)
    model = EmotionModel(config, text_encoder=text_encoder)
    state = blob["state_dict"]
    if not load_encoder:  # a fine-tuned encoder's stored weights are not needed either
        state = {k: v for k, v in state.items() if not k.startswith(_ENCODER_PREFIX)}
    missing, unexpected = model.load_state_dict(state, strict=False)  # fp16 layers are cast on copy
    missing = [k for k in missing if not ((config.freeze_encoder or not load_encoder) and k.startswith(_ENCODER_PREFIX))
               and not (config.encoder_layers_only and k.startswith(_EMBEDDINGS_PREFIX))]
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not match the config (missing {missing[:5]}, unexpected {unexpected[:5]})")
    model.metadata = blob.get("metadata", {})
    return model.to(resolve_device(device)).eval()
