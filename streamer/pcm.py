"""PCM conversion and real-time pacing, in one place for every sender: the service's own client
(streamer/client.py: the demo, --file, benches, tests) and the clients/ package (which may import
this module and streamer.protocol only). numpy and the standard library only."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import numpy as np

SAMPLE_RATE = 16_000
CHUNK_S = 0.1  # 100 ms frames, like a microphone


def pcm16(audio: np.ndarray) -> bytes:
    """float audio in [-1, 1] (or int16) -> little-endian PCM s16 bytes (frames interleaved as given)."""
    if audio.dtype == np.int16:
        return audio.astype("<i2").tobytes()
    return (np.clip(audio, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


async def paced_chunks(audio: np.ndarray, sample_rate: int = SAMPLE_RATE, realtime: bool = True,
                       chunk_s: float = CHUNK_S, speed: float = 1.0,
                       clock: Callable[[], float] = time.monotonic) -> AsyncIterator[np.ndarray]:
    """Consecutive chunks of `audio` ((n,) or (channels, n)); with `realtime`, chunk k no sooner
    than k * chunk_s / speed after the first (2.0: twice real time; the service throttles beyond
    20x), paced to the audio's own clock so delays never accumulate."""
    if speed <= 0:
        raise ValueError(f"speed must be > 0, got {speed}")
    n = max(1, int(round(sample_rate * chunk_s)))
    t0 = clock()
    for k, start in enumerate(range(0, audio.shape[-1], n)):
        if realtime:
            delay = t0 + k * chunk_s / speed - clock()
            if delay > 0:
                await asyncio.sleep(delay)
        else:
            await asyncio.sleep(0)  # let the receiver run between chunks
        yield audio[..., start : start + n]
