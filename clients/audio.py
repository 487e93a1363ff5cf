"""Audio helpers for the clients: decode any file to 16 kHz mono PCM and chunk it in real time."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import numpy as np

SAMPLE_RATE = 16_000
CHUNK_S = 0.1  # 100 ms frames, like a microphone


def decode(path: str, sample_rate: int = SAMPLE_RATE, mono: bool = True) -> np.ndarray:
    """Any format soundfile or ffmpeg (via librosa/audioread) reads -> float32, (n,) or (channels, n)."""
    import librosa

    audio, _ = librosa.load(path, sr=sample_rate, mono=mono)
    return audio.astype(np.float32, copy=False)


async def paced_chunks(audio: np.ndarray, sample_rate: int = SAMPLE_RATE, realtime: bool = True,
                       chunk_s: float = CHUNK_S, speed: float = 1.0) -> AsyncIterator[np.ndarray]:
    """Yield consecutive chunks; with `realtime`, each chunk no sooner than its wall-clock time
    divided by `speed` (2.0: twice real time; the service throttles beyond 20x)."""
    if speed <= 0:
        raise ValueError(f"speed must be > 0, got {speed}")
    n = max(1, int(sample_rate * chunk_s))
    total = audio.shape[-1]
    t0 = time.monotonic()
    for i, start in enumerate(range(0, total, n)):
        if realtime:
            delay = t0 + i * chunk_s / speed - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)  # pacing to the audio clock
        else:
            await asyncio.sleep(0)
        yield audio[..., start : start + n]
