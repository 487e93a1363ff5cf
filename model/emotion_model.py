"""EmotionModel: speech CNN + text encoder/Bi-GRU + attention fusion -> FC -> softmax, and the
serving API for live dialogues (per-utterance caches, batched prediction across sessions)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from model import features
from model.audio_encoder import SpeechCNN
from model.config import SENTIMENT_LABELS, ModelConfig
from model.fusion import AttentionFusion
from model.text_encoder import DialogueGRU, TextEncoder


SPEECH_BATCH_FRAMES_CPU = 3_000  # padded log-mel frames per CNN sub-batch (30 s of audio)
SPEECH_BATCH_FRAMES_CUDA = 200_000
LOW_CONFIDENCE, OK_CONFIDENCE = "low", "ok"  # Prediction.confidence (the `confidence` of emotion events)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cuda' without a GPU is a clear error."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but torch sees no CUDA GPU (use --device cpu or auto)")
    return torch.device(device)


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, C)
    weights: torch.Tensor  # (B, 2) modality weights [speech, text], rows sum to 1
    text: torch.Tensor | None = None  # (B, text_dim) the Bi-GRU's dialogue vector at each target

    @property
    def probs(self) -> torch.Tensor:
        return torch.softmax(self.logits.float(), dim=-1)


@dataclass
class EncodedUtterance:
    """What serving caches per utterance: computed once, reused by every later prediction."""

    text_vec: torch.Tensor | None  # (D,) sentence vector; None when the transcript is empty
    speech_vec: torch.Tensor | None  # (S,) speech-CNN embedding; None when there is no audio
    # Mahalanobis distance of its pooled Whisper states from the speech branch's training clips
    # (EmotionModel.speech_distances); None without states or without the check in the checkpoint
    speech_distance: float | None = None


def confidence_of(scores: dict[str, float], threshold: float) -> str:
    """LOW_CONFIDENCE when the top calibrated score is below `threshold` (at the default 0.5 the model
    is then more likely wrong than right), else OK_CONFIDENCE."""
    return LOW_CONFIDENCE if max(scores.values()) < threshold else OK_CONFIDENCE


# emotions whose probability counts as positive / negative sentiment when there are no words
POSITIVE_EMOTIONS = frozenset({"joy", "happy"})
NEGATIVE_EMOTIONS = frozenset({"anger", "angry", "sadness", "sad", "disgust", "fear", "fearful"})


def sentiment_of(probs: dict[str, float]) -> tuple[str, float]:
    """(label, score in [-1, 1]) from probabilities over SENTIMENT_LABELS: score = P(positive) - P(negative)."""
    label = max(SENTIMENT_LABELS, key=lambda k: probs[k])
    return label, round(float(probs["positive"] - probs["negative"]), 4)


def sentiment_from_emotion(scores: dict[str, float]) -> tuple[str, float]:
    """Sentiment when an utterance has no words: positive = P(joy), negative = P(anger, sadness,
    disgust, fear), neutral = the rest (neutral, surprise)."""
    pos = sum(v for k, v in scores.items() if k in POSITIVE_EMOTIONS)
    neg = sum(v for k, v in scores.items() if k in NEGATIVE_EMOTIONS)
    return sentiment_of({"positive": pos, "negative": neg, "neutral": max(0.0, 1.0 - pos - neg)})


@dataclass
class Prediction:
    label: str
    scores: dict[str, float]  # calibrated probabilities, summing to 1
    modality_weights: dict[str, float]
    confidence: str  # LOW_CONFIDENCE or OK_CONFIDENCE: the top score against a threshold
    # positive | neutral | negative and P(positive) - P(negative): from the words (the sentiment head)
    # or, without words, from the emotion scores; None when the checkpoint has no sentiment head
    sentiment: str | None = None
    sentiment_score: float | None = None
    # whether the target's voice is like the speech the model learned from (ModelConfig.familiar_max_distance);
    # None when unknown (no audio, no Whisper states, or a checkpoint without the check)
    familiar_voice: bool | None = None


@dataclass
class Dialogue:
    """One live dialogue's rolling cache of encoded utterances. Plain data, no I/O, not shared."""

    max_len: int
    utterances: deque[EncodedUtterance] = field(default_factory=deque)
    first_index: int = 0  # absolute index of utterances[0]

    def append(self, utt: EncodedUtterance) -> int:
        """Add the newest utterance; returns its absolute index in the dialogue."""
        self.utterances.append(utt)
        while len(self.utterances) > self.max_len:
            self.utterances.popleft()
            self.first_index += 1
        return self.first_index + len(self.utterances) - 1

    @property
    def last_index(self) -> int:
        return self.first_index + len(self.utterances) - 1

    def __getitem__(self, index: int) -> EncodedUtterance:
        return self.utterances[index - self.first_index]


class EmotionModel(nn.Module):
    """The paper's model. `text_encoder` may be passed in (tests, sharing one across models)."""

    def __init__(self, config: ModelConfig, text_encoder: TextEncoder | None = None) -> None:
        super().__init__()
        self.config = config
        self.text_encoder = text_encoder or TextEncoder(config.encoder, config.max_text_tokens, config.freeze_encoder)
        if self.text_encoder.hidden_size != config.encoder_dim:
            raise ValueError(
                f"encoder {config.encoder!r} has hidden size {self.text_encoder.hidden_size}, "
                f"config.encoder_dim is {config.encoder_dim}"
            )
        self.speech = SpeechCNN(config.n_mels, config.speech_dim, config.speech_freq_bins, config.dropout)
        if config.whisper_dim:  # pooled Whisper encoder states -> FC, mixed with the CNN's vector
            self.whisper_proj = nn.Sequential(
                nn.LayerNorm(config.whisper_dim), nn.Linear(config.whisper_dim, config.speech_dim), nn.ReLU(), nn.Dropout(config.dropout),
            )
            self.speech_mix = nn.Sequential(nn.Linear(2 * config.speech_dim, config.speech_dim), nn.ReLU(), nn.Dropout(config.dropout))
        self.dialogue = DialogueGRU(config.encoder_dim, config.text_fc, config.gru_hidden, config.text_dim, config.dropout)
        self.fusion = AttentionFusion(config.speech_dim, config.text_dim, config.fusion_dim)
        self.dropout = nn.Dropout(config.dropout)
        self.classifier = nn.Linear(config.fusion_dim, config.num_labels)
        if config.sentiment_labels:  # on the target's sentence vector (training.sentiment fits it)
            self.sentiment_head = nn.Linear(config.encoder_dim + config.text_dim * config.sentiment_dialogue, len(config.sentiment_labels))
        if config.familiar_max_distance:  # set by training.familiar: mean and whitening of the training clips' states
            self.register_buffer("familiar_mean", torch.zeros(config.whisper_dim))
            self.register_buffer("familiar_whiten", torch.eye(config.whisper_dim))

    @property
    def device(self) -> torch.device:
        return self.classifier.weight.device

    # ---- training / full forward -------------------------------------------------------------
    def forward_features(
        self,
        speech_vec: torch.Tensor,  # (B, S) from self.speech
        text_ctx: torch.Tensor,  # (B, W, D) cached sentence vectors, zero-padded
        ctx_lengths: torch.Tensor,  # (B,) valid window length
        target: torch.Tensor,  # (B,) index of the predicted utterance in its window
        present: torch.Tensor,  # (B, 2) bool [speech, text]
    ) -> ModelOutput:
        text_vec = self.dialogue(text_ctx, ctx_lengths, target)  # (B, text_dim)
        fused, weights = self.fusion(speech_vec, text_vec, present)  # (B, n), (B, 2)
        logits = self.classifier(self.dropout(fused))  # (B, C)
        return ModelOutput(logits=logits, weights=weights, text=text_vec)

    def forward(self, mel, mel_lengths, text_ctx, ctx_lengths, target, present, whisper=None) -> ModelOutput:
        """mel (B, 1, n_mels, T) + lengths; text windows as in forward_features; whisper (B, Dw) or None."""
        return self.forward_features(self.speech_vector(self.speech(mel, mel_lengths), whisper), text_ctx, ctx_lengths, target, present)

    def speech_vector(self, cnn_vec: torch.Tensor, whisper: torch.Tensor | None = None,
                      has_whisper: torch.Tensor | None = None) -> torch.Tensor:
        """The speech branch's output (B, S): the CNN's vector, mixed with the projected pooled
        Whisper states when the config has them (rows without states get a zero projection)."""
        if not self.config.whisper_dim:
            return cnn_vec
        if whisper is None:
            w = torch.zeros_like(cnn_vec)
        else:
            w = self.whisper_proj(whisper.to(cnn_vec.dtype))  # (B, S)
            if has_whisper is not None:
                w = w * has_whisper[:, None].to(w.dtype)
        return self.speech_mix(torch.cat([cnn_vec, w], dim=-1))  # (B, S)

    def accepts_whisper(self, asr_name: str | None, dim: int) -> bool:
        """Whether pooled states from this ASR model fit the speech branch."""
        cfg = self.config
        return bool(cfg.whisper_dim) and dim == cfg.whisper_dim and (not cfg.whisper_model or asr_name == cfg.whisper_model)

    # ---- serving ------------------------------------------------------------------------------
    def new_dialogue(self) -> Dialogue:
        return Dialogue(max_len=self.config.context_window + self.config.lookahead)

    @torch.inference_mode()
    def encode_utterances(self, texts: list[str | None], audios: list[np.ndarray | None],
                          whisper: list[np.ndarray | None] | None = None,
                          contexts: list[list[str]] | None = None) -> list[EncodedUtterance]:
        """Encode a batch of utterances (any sessions) once: sentence vectors and speech embeddings.
        `audios` are float32 mono at features.SAMPLE_RATE; None or empty means no audio.
        `whisper`: each utterance's pooled Whisper encoder states (features.pool_whisper_states),
        used when the config has whisper_dim. `contexts`: each utterance's earlier transcripts, most
        recent first; the encoder reads the last config.text_context of them with it."""
        if len(texts) != len(audios):
            raise ValueError("texts and audios must have the same length")
        self.eval()
        has_text = [bool(t and t.strip()) for t in texts]
        ctx = None
        if self.config.text_context:
            ctx = [list(c or [])[: self.config.text_context] for c in (contexts or [[] for _ in texts])]
        text_vecs = self.text_encoder([t if h else "" for t, h in zip(texts, has_text)], contexts=ctx)
        speech_idx = [i for i, a in enumerate(audios) if a is not None and len(a) > 0]
        speech_vecs: dict[int, torch.Tensor] = {}
        if speech_idx:
            states = None if whisper is None else [whisper[i] for i in speech_idx]
            emb = self.embed_speech([features.log_mel(audios[i]) for i in speech_idx], whisper=states)
            speech_vecs = {i: emb[k] for k, i in enumerate(speech_idx)}
        distances: dict[int, float | None] = {}
        if speech_idx and whisper is not None:
            distances = dict(zip(speech_idx, self.speech_distances([whisper[i] for i in speech_idx])))
        return [
            EncodedUtterance(text_vec=text_vecs[i] if has_text[i] else None, speech_vec=speech_vecs.get(i),
                             speech_distance=distances.get(i))
            for i in range(len(texts))
        ]

    def _usable_states(self, states: np.ndarray | None) -> bool:
        """Whether one utterance's pooled Whisper states are there and of the size the model reads."""
        return states is not None and np.shape(states) == (self.config.whisper_dim,)

    @torch.inference_mode()
    def speech_distances(self, states: list[np.ndarray | None]) -> list[float | None]:
        """Mahalanobis distance of each utterance's pooled Whisper states from the speech branch's
        training clips (||(x - mean) W||, W the whitening training.familiar fitted); None for an
        utterance without usable states, and for all when the checkpoint has no such check."""
        cfg = self.config
        if not cfg.familiar_max_distance:
            return [None] * len(states)
        ok = [i for i, w in enumerate(states) if self._usable_states(w)]
        out: list[float | None] = [None] * len(states)
        if ok:
            x = torch.as_tensor(np.stack([np.asarray(states[i], np.float32) for i in ok]), device=self.familiar_mean.device)
            d = torch.linalg.vector_norm((x - self.familiar_mean) @ self.familiar_whiten, dim=-1).cpu().numpy()
            for k, i in enumerate(ok):
                out[i] = float(d[k])
        return out

    def familiar(self, utt: EncodedUtterance) -> bool | None:
        """Whether an utterance's voice is within ModelConfig.familiar_max_distance of the training
        clips; None when that is not known (no speech or states, or no check in the checkpoint)."""
        if not self.config.familiar_max_distance or utt.speech_vec is None or utt.speech_distance is None:
            return None
        return utt.speech_distance <= self.config.familiar_max_distance

    @torch.inference_mode()
    def embed_speech(self, mels: list[np.ndarray], max_frames: int | None = None,
                     whisper: list[np.ndarray | None] | None = None) -> torch.Tensor:
        """Speech-CNN embeddings (N, speech_dim) of log-mels of any lengths. Utterances are sorted by
        length and run in sub-batches of at most `max_frames` padded frames in total: on a CPU a
        batch larger than the caches costs more per utterance than several small ones (measured in
        bench/model_bench.py), on a GPU the budget is large. Results do not depend on the batching."""
        self.eval()
        dev = self.device
        if max_frames is None:
            max_frames = SPEECH_BATCH_FRAMES_CUDA if dev.type == "cuda" else SPEECH_BATCH_FRAMES_CPU
        order = sorted(range(len(mels)), key=lambda i: mels[i].shape[1])
        out = torch.empty(len(mels), self.config.speech_dim, device=dev)
        start = 0
        while start < len(order):
            end = start + 1  # sorted ascending: the last one added is the longest, so it sets the padding
            while end < len(order) and (end - start + 1) * mels[order[end]].shape[1] <= max_frames:
                end += 1
            chunk = order[start:end]
            batch, lengths = features.pad_batch([mels[i] for i in chunk])
            with torch.autocast("cuda", dtype=torch.float16, enabled=dev.type == "cuda"):
                emb = self.speech(torch.from_numpy(batch).to(dev), torch.from_numpy(lengths).to(dev)).float()
            out[chunk] = emb
            start = end
        if self.config.whisper_dim:
            dw = self.config.whisper_dim
            ok = [self._usable_states(w) for w in (whisper or [None] * len(mels))]
            states = torch.zeros(len(mels), dw, device=dev)
            for i, good in enumerate(ok):
                if good:
                    states[i] = torch.as_tensor(np.asarray(whisper[i], np.float32), device=dev)  # type: ignore[index]
            out = self.speech_vector(out, states, torch.tensor(ok, device=dev))
        return out

    @torch.inference_mode()
    def predict(self, requests: list[tuple[Dialogue, int]],
                confidence_threshold: float | None = None) -> list[Prediction]:
        """Predict utterance `index` of each dialogue in one batched forward pass. The window is the
        target, up to context_window-1 utterances before it and up to `lookahead` after it that
        already exist (live: none; a revision: the next one). `confidence_threshold` overrides
        ModelConfig.confidence_threshold for Prediction.confidence."""
        if not requests:
            return []
        self.eval()
        cfg, dev = self.config, self.device
        threshold = cfg.confidence_threshold if confidence_threshold is None else confidence_threshold
        windows, targets, present, speech = [], [], [], []
        for dlg, index in requests:
            if not dlg.first_index <= index <= dlg.last_index:
                raise IndexError(f"utterance {index} is not cached (have {dlg.first_index}..{dlg.last_index})")
            lo = max(dlg.first_index, index - cfg.context_window + 1)
            hi = min(dlg.last_index, index + cfg.lookahead)
            windows.append([dlg[i].text_vec for i in range(lo, hi + 1)])
            targets.append(index - lo)
            utt = dlg[index]
            present.append([utt.speech_vec is not None, utt.text_vec is not None])
            speech.append(utt.speech_vec)
        W = max(len(w) for w in windows)
        ctx = torch.zeros(len(requests), W, cfg.encoder_dim, device=dev)
        for b, w in enumerate(windows):
            for j, v in enumerate(w):
                if v is not None:
                    ctx[b, j] = v
        speech_t = torch.zeros(len(requests), cfg.speech_dim, device=dev)
        for b, v in enumerate(speech):
            if v is not None:
                speech_t[b] = v
        out = self.forward_features(
            speech_t, ctx,
            torch.tensor([len(w) for w in windows]),
            torch.tensor(targets, device=dev),
            torch.tensor(present, dtype=torch.bool, device=dev),
        )
        probs = torch.softmax(out.logits.float() / cfg.temperature, dim=-1).cpu().numpy()  # calibrated
        weights = out.weights.float().cpu().numpy()
        senti = self._sentiment([dlg[index].text_vec for dlg, index in requests], out.text)
        results = []
        for b, (dlg, index) in enumerate(requests):
            scores = {lab: float(p) for lab, p in zip(cfg.labels, probs[b])}
            familiar = self.familiar(dlg[index])
            confidence = confidence_of(scores, threshold)
            if familiar is False and weights[b, 0] >= 0.5:
                confidence = LOW_CONFIDENCE  # it leaned on a voice unlike any it learned from
            pred = Prediction(
                label=cfg.labels[int(probs[b].argmax())],
                scores=scores,
                modality_weights={"speech": float(weights[b, 0]), "text": float(weights[b, 1])},
                confidence=confidence,
                familiar_voice=familiar,
            )
            if senti is not None:
                pred.sentiment, pred.sentiment_score = senti[b] if senti[b] is not None else sentiment_from_emotion(scores)
            results.append(pred)
        return results

    def _sentiment(self, text_vecs: list[torch.Tensor | None], dialogue: torch.Tensor | None) -> list[tuple[str, float] | None] | None:
        """The sentiment head on each target's sentence vector (and, with sentiment_dialogue, its
        dialogue vector): None where it has no words, None for every row without a head."""
        if not self.config.sentiment_labels:
            return None
        rows = [i for i, v in enumerate(text_vecs) if v is not None]
        out: list[tuple[str, float] | None] = [None] * len(text_vecs)
        if rows:
            x = torch.stack([text_vecs[i] for i in rows])  # type: ignore[misc]
            if self.config.sentiment_dialogue:
                x = torch.cat([x, dialogue[rows].to(x.device)], dim=-1)  # type: ignore[index]
            x = x.to(self.sentiment_head.weight.dtype)
            p = torch.softmax(self.sentiment_head(x).float(), dim=-1).cpu().numpy()
            for k, i in enumerate(rows):
                out[i] = sentiment_of(dict(zip(self.config.sentiment_labels, map(float, p[k]))))
        return out
