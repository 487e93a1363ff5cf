"""The emotion model of Makhmudov, Kultimuratov & Cho (2024): speech CNN + BERT/Bi-GRU + attention
fusion. Public API: ModelConfig, EmotionModel, save_checkpoint, load_checkpoint."""

from model.checkpoint import DEFAULT_CHECKPOINT, CheckpointError, load_checkpoint, save_checkpoint
from model.config import MELD_LABELS, PACKAGED_ENCODER, ModelConfig
from model.emotion_model import Dialogue, EmotionModel, EncodedUtterance, ModelOutput, Prediction, resolve_device

__all__ = [
    "CheckpointError", "DEFAULT_CHECKPOINT", "Dialogue", "EmotionModel", "EncodedUtterance", "MELD_LABELS",
    "ModelConfig", "ModelOutput", "PACKAGED_ENCODER", "Prediction", "load_checkpoint", "resolve_device",
    "save_checkpoint",
]
