"""Speaker (voice) embeddings for diarization: resemblyzer's VoiceEncoder (a 3-layer LSTM d-vector
model, 256-d, trained on LibriSpeech / VoxCeleb; its weights ship inside the PyPI package, so
nothing is downloaded), on one thread of its own so the event loop never waits for it.

The model is loaded on first use (once, thread-safe), or at startup with `serve --diarize`; it runs
on the service's device (--device). One embedding costs ~20-35 ms of CPU for a 3-5 s utterance on
the project's 2-core CPU (measured); the runner starts it when the segmenter first sees the pause
(with the speculative Whisper decode), so it is normally done before the transcript is.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from streamer.config import SAMPLE_RATE
from streamer.infer.engine import Overloaded
from streamer.pipeline.diarize import VoiceSpace

log = logging.getLogger(__name__)

EMBEDDING_DIM = 256  # resemblyzer's d-vector
INT16_MAX = 2**15 - 1

MIN_VOICED_S = 0.3  # under this much voiced audio after trimming, the untrimmed utterance is embedded
# where the clustering compares voices (streamer.pipeline.diarize.VoiceSpace): the VoiceEncoder's mean
# embedding over RAVDESS actors 1-20 + EmoDB clips, and a within-speaker whitening fitted on the same
# clips (bench/diarization.py --tune --write-space writes it). Centring separates voices far better
# than raw cosine (resemblyzer's embeddings all lie in one positive cone); the whitening discounts
# the directions in which one speaker's voice moves with emotion and sentence
SPACE_FILE = Path(__file__).resolve().parent.parent / "assets" / "voice_space.npz"


def voice_space(path: Path = SPACE_FILE) -> VoiceSpace:
    """The voice space the clustering works in (checked: finite, EMBEDDING_DIM dimensions)."""
    return VoiceSpace.load(path, EMBEDDING_DIM)


def available() -> bool:
    """resemblyzer is installed (scripts/setup.sh installs it with --no-deps)."""
    return importlib.util.find_spec("resemblyzer") is not None


def trim_long_silences(wav: np.ndarray) -> np.ndarray:
    """resemblyzer.audio.trim_long_silences with the PCM bytes made by numpy: the same output
    (checked in tests), but resemblyzer's struct.pack of every sample held the GIL ~5 ms per 5 s
    utterance, time the event loop and the decoders' Python side then wait for."""
    import webrtcvad
    from resemblyzer.hparams import vad_max_silence_length, vad_moving_average_width, vad_window_length
    from scipy.ndimage import binary_dilation

    step = vad_window_length * SAMPLE_RATE // 1000  # 30 ms windows
    wav = wav[: len(wav) - len(wav) % step]
    pcm = np.round(wav * INT16_MAX).astype("<i2").tobytes()
    vad = webrtcvad.Vad(mode=3)
    flags = np.array([vad.is_speech(pcm[i * 2 : (i + step) * 2], sample_rate=SAMPLE_RATE)
                      for i in range(0, len(wav), step)], dtype=np.float64)
    width = vad_moving_average_width  # moving average, as resemblyzer computes it
    padded = np.concatenate((np.zeros((width - 1) // 2), flags, np.zeros(width // 2)))
    ret = np.cumsum(padded, dtype=float)
    ret[width:] = ret[width:] - ret[:-width]
    mask = np.round(ret[width - 1 :] / width).astype(bool)
    mask = binary_dilation(mask, np.ones(vad_max_silence_length + 1))
    return wav[np.repeat(mask, step)]


def prepare(audio: np.ndarray) -> np.ndarray | None:
    """The utterance as resemblyzer expects it (16 kHz float32, quiet audio raised to -30 dBFS, long
    silences cut with webrtcvad: resemblyzer.preprocess_wav without resampling); None when it is
    silent (an all-zero utterance has no voice to embed)."""
    from resemblyzer.audio import normalize_volume
    from resemblyzer.hparams import audio_norm_target_dBFS

    wav = np.asarray(audio, dtype=np.float32).reshape(-1)
    if wav.size == 0 or not np.isfinite(wav).all() or float(np.abs(wav).max()) < 1e-4:
        return None
    wav = np.clip(normalize_volume(wav, audio_norm_target_dBFS, increase_only=True), -1.0, 1.0).astype(np.float32)
    voiced = trim_long_silences(wav)
    return voiced if len(voiced) >= MIN_VOICED_S * SAMPLE_RATE else wav


def lower_thread_priority(by: int) -> None:
    """Raise the calling thread's nice value by `by` (Linux schedules threads as tasks; raising
    needs no privilege). Run on the voice thread: its embedding is needed only once Whisper's
    decode of the same utterance is done (several times longer), so on a busy CPU the decoders
    should get the cores first. Elsewhere (no per-thread nice) it does nothing."""
    if by <= 0:
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + by))
    except (AttributeError, OSError) as e:  # not Linux, or not permitted: run at the normal priority
        log.info("voice thread priority unchanged: %s", e)


class VoiceEmbedder:
    """resemblyzer's VoiceEncoder on a single worker thread. embed() returns an asyncio future of
    the utterance's (unit 256-d embedding, seconds of voice it was computed from), None for a silent
    utterance; at most `max_pending` jobs wait."""

    def __init__(self, device: str = "auto", max_pending: int = 64, nice: int = 0) -> None:
        self.device = device
        self.max_pending = max_pending
        self._encoder: Any = None
        self._lock = threading.Lock()  # guards the one-time load
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="emostream-voice",
                                            initializer=lower_thread_priority, initargs=(nice,))
        self._pending = 0
        self._space: VoiceSpace | None = None
        self.load_s: float | None = None

    @property
    def space(self) -> VoiceSpace:
        """Where the clustering compares voices (read once from SPACE_FILE)."""
        if self._space is None:
            self._space = voice_space()
        return self._space

    @property
    def loaded(self) -> bool:
        return self._encoder is not None

    def load(self) -> None:
        """Load the model and run one embedding (the first one pays the lazy set-up); idempotent,
        thread-safe. Raises RuntimeError when resemblyzer is not installed."""
        with self._lock:
            if self._encoder is not None:
                return
            t0 = time.perf_counter()
            try:
                from resemblyzer import VoiceEncoder
            except ImportError as e:
                raise RuntimeError("diarization needs resemblyzer: .venv/bin/pip install --no-deps resemblyzer==0.1.4 "
                                   "(scripts/setup.sh does it)") from e
            from model.emotion_model import resolve_device

            encoder = VoiceEncoder(device=resolve_device(self.device), verbose=False)
            encoder.embed_utterance(np.zeros(SAMPLE_RATE, np.float32) + 1e-3)  # warm up: mel filters, LSTM kernels
            self._encoder = encoder
            self.load_s = time.perf_counter() - t0
            log.info("voice encoder loaded on %s in %.2f s", encoder.device, self.load_s)

    def preload(self) -> asyncio.Future[None] | None:
        """load() on the voice thread (call from the event loop); None when loaded already. A load
        that fails is logged here, and each embedding that needs the model raises it again."""
        if self._encoder is not None:
            return None
        fut = asyncio.get_running_loop().run_in_executor(self._executor, self.load)

        def report(f: asyncio.Future[None]) -> None:
            if not f.cancelled() and f.exception() is not None:
                log.error("voice encoder failed to load: %s", f.exception())

        fut.add_done_callback(report)
        return fut

    def embed_now(self, audio: np.ndarray) -> tuple[np.ndarray, float] | None:
        """(embedding, seconds of voice), computed on the calling thread (the voice thread; the
        bench's offline mode); None for a silent utterance."""
        self.load()
        wav = prepare(audio)
        if wav is None:
            return None
        return np.asarray(self._encoder.embed_utterance(wav), dtype=np.float32), len(wav) / SAMPLE_RATE

    def embed(self, audio: np.ndarray) -> asyncio.Future[tuple[np.ndarray, float] | None]:
        """Queue one utterance (16 kHz float32); raises Overloaded past `max_pending` waiting jobs.
        Cancelling the future before the thread starts on it skips the work."""
        if self._pending >= self.max_pending:
            raise Overloaded(f"{self._pending} voice embeddings waiting (limit {self.max_pending})")
        self._pending += 1
        fut = asyncio.get_running_loop().run_in_executor(self._executor, self.embed_now, audio)

        def done(_: object) -> None:
            self._pending -= 1

        fut.add_done_callback(done)
        return fut

    def stop(self) -> None:
        """Finish the running job, drop the waiting ones, end the thread."""
        self._executor.shutdown(wait=True, cancel_futures=True)
