"""TrainConfig: one frozen dataclass holding every training choice; saved with each checkpoint and
report. Defaults follow Makhmudov et al. (2024): Adam, lr 5e-4 with inverse-time decay 1e-4 per
step, L2 1e-4, dropout 0.3, batch 32, up to 300 epochs, early stopping on validation WF1."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TrainConfig:
    data: str  # dataset spec, e.g. "meld:/data/meld" or "emodb:/data/emodb" (see datasets.load_spec)
    out: str = "runs/train"  # run folder: checkpoints, history, report, PNGs
    split: str = "official"  # meld: official | paper | paper-dialogues; acted/mosei: speakers[:A+B]
    acted: tuple[str, ...] = ()  # acted-speech specs paired with text-only MELD utterances (fusion training)
    acted_split: str = "speakers"  # their speaker-disjoint split (only train speakers are paired)
    labels: str = "meld"  # meld: MELD's seven labels (native labels mapped); native: the corpus's own labels
    # optimisation (paper defaults)
    epochs: int = 300
    patience: int = 20  # epochs without a better validation WF1 before stopping
    batch_size: int = 32
    lr: float = 5e-4
    lr_decay: float = 1e-4  # lr_t = lr / (1 + lr_decay * step)
    weight_decay: float = 1e-4  # L2 (Adam's weight_decay adds wd * w to the gradient)
    encoder_lr: float = 2e-5  # fine-tuning mode only
    grad_clip: float = 5.0
    class_weight: str = "none"  # none | sqrt | balanced (inverse-frequency loss weights)
    label_smoothing: float = 0.0
    vector_dropout: float = 0.0  # training-only dropout on cached sentence vectors (frozen encoder)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    amp: bool = True  # float16 autocast + GradScaler on CUDA (ignored on CPU)
    threads: int = 0  # torch CPU threads (0: torch's default)
    # model
    encoder: str = ""  # "" = the packaged MiniLM (ModelConfig default); or a HF folder / hub name
    encoder_dim: int = 0  # 0 = ModelConfig default; must match `encoder`
    dropout: float = 0.3
    finetune: bool = False  # train the text encoder too (GPU users); default caches frozen vectors
    init: str = ""  # checkpoint to start from
    init_parts: str = "all"  # all | speech: which weights to take from `init`
    freeze_speech: bool = False  # keep the speech CNN fixed (its embeddings are then cached)
    # serving-matched windows and modality mixing
    lookahead_prob: float = 0.3  # P(window also holds the next utterance) = a revision, as served
    p_text_only: float = 0.5  # among paired MELD examples: text-only; the rest get an acted clip
    pair_match: float = 0.7  # P(paired clip has the utterance's class); else a random class
    speech_only_frac: float = 0.25  # acted clips added per epoch as speech-only examples (x len(train))
    specaugment: bool = True  # time/frequency masks + random crops when the CNN is trained
    max_train: int = 0  # >0: a stratified-ish subset of train targets (smoke tests)
    max_eval: int = 0  # >0: cap validation/test examples (smoke tests)
    cache_dir: str = "cache"
    progress: bool = True

    def __post_init__(self) -> None:
        if self.labels not in ("meld", "native"):
            raise ValueError("labels must be 'meld' or 'native'")
        if self.class_weight not in ("none", "sqrt", "balanced"):
            raise ValueError("class_weight must be none, sqrt or balanced")
        if self.init_parts not in ("all", "speech"):
            raise ValueError("init_parts must be all or speech")
        for name in ("lookahead_prob", "p_text_only", "pair_match"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]")
        if self.batch_size < 1 or self.epochs < 1:
            raise ValueError("batch_size and epochs must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["acted"] = list(self.acted)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        if "acted" in d:
            d["acted"] = tuple(d["acted"])
        return cls(**d)
