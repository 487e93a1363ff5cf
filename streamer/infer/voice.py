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
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from streamer.config import SAMPLE_RATE
from streamer.infer.engine import Overloaded

log = logging.getLogger(__name__)

EMBEDDING_DIM = 256  # resemblyzer's d-vector

MIN_VOICED_S = 0.3  # under this much voiced audio after trimming, the untrimmed utterance is embedded
# the VoiceEncoder's mean embedding over RAVDESS actors 1-20 + EmoDB clips (bench/diarization.py --tune
# writes it): the clustering centres embeddings on it, which separates voices far better than raw
# cosine (resemblyzer's embeddings all lie in one positive cone)
CENTER_FILE = Path(__file__).resolve().parent.parent / "assets" / "voice_mean.npy"


def voice_center(path: Path = CENTER_FILE) -> np.ndarray:
    """The mean embedding the clustering subtracts (float64, 256)."""
    center = np.load(path).astype(np.float64).reshape(-1)
    if center.shape != (EMBEDDING_DIM,) or not np.isfinite(center).all():
        raise ValueError(f"{path}: not a {EMBEDDING_DIM}-d voice embedding mean")
    return center


def available() -> bool:
    """resemblyzer is installed (scripts/setup.sh installs it with --no-deps)."""
    return importlib.util.find_spec("resemblyzer") is not None


def prepare(audio: np.ndarray) -> np.ndarray | None:
    """The utterance as resemblyzer expects it (16 kHz float32, quiet audio raised to -30 dBFS, long
    silences cut with webrtcvad: resemblyzer.preprocess_wav without resampling); None when it is
    silent (an all-zero utterance has no voice to embed)."""
    from resemblyzer.audio import normalize_volume, trim_long_silences
    from resemblyzer.hparams import audio_norm_target_dBFS

    wav = np.asarray(audio, dtype=np.float32).reshape(-1)
    if wav.size == 0 or not np.isfinite(wav).all() or float(np.abs(wav).max()) < 1e-4:
        return None
    wav = np.clip(normalize_volume(wav, audio_norm_target_dBFS, increase_only=True), -1.0, 1.0).astype(np.float32)
    voiced = trim_long_silences(wav)
    return voiced if len(voiced) >= MIN_VOICED_S * SAMPLE_RATE else wav


class VoiceEmbedder:
    """resemblyzer's VoiceEncoder on a single worker thread. embed() returns an asyncio future of
    the utterance's unit 256-d embedding (None for a silent one); at most `max_pending` jobs wait."""

    def __init__(self, device: str = "auto", max_pending: int = 64) -> None:
        self.device = device
        self.max_pending = max_pending
        self._encoder: Any = None
        self._lock = threading.Lock()  # guards the one-time load
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="emostream-voice")
        self._pending = 0
        self._center: np.ndarray | None = None
        self.load_s: float | None = None

    @property
    def center(self) -> np.ndarray:
        """The mean embedding the clustering subtracts (read once from CENTER_FILE)."""
        if self._center is None:
            self._center = voice_center()
        return self._center

    @property
    def loaded(self) -> bool:
        return self._encoder is not None

    def load(self) -> None:
        """Load the model and run one embedding (the first costs ~1.5 s of lazy set-up); idempotent,
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

    def embed_now(self, audio: np.ndarray) -> np.ndarray | None:
        """The embedding, computed on the calling thread (the bench's offline mode, tests)."""
        self.load()
        wav = prepare(audio)
        if wav is None:
            return None
        return np.asarray(self._encoder.embed_utterance(wav), dtype=np.float32)

    def embed(self, audio: np.ndarray) -> asyncio.Future[np.ndarray | None]:
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
