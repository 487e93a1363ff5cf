"""Training and evaluation for the emotion model: released dataset formats, the paper's splits,
serving-matched windows, metrics and reports. CLI: `python -m training {train,evaluate}`."""

from training.config import TrainConfig
from training.metrics import classification_report

__all__ = ["TrainConfig", "classification_report"]
