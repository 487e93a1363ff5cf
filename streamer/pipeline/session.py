"""One live audio session, synchronous and I/O-free: resampling, segmentation, event numbering
and latency bookkeeping. The clock is injected; the asyncio layer (routes/, runner.py) moves the bytes."""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np

from streamer import protocol as P
from streamer.config import SAMPLE_RATE, SegmenterConfig
from streamer.pipeline.segmenter import FrameVad, SegmentEvent, Segmenter

_ARRIVALS_KEPT = 4096  # chunk arrival records kept for latency lookups (minutes of audio)


class SeqCounter:
    """Per-session event numbers; created with the connection so pre-start errors are numbered too."""

    def __init__(self) -> None:
        self.value = -1

    def next(self) -> int:
        self.value += 1
        return self.value


class PcmDecoder:
    """pcm_s16le bytes at any rate/channels -> float32 16 kHz mono, streaming (soxr keeps state)."""

    def __init__(self, sample_rate: int, channels: int) -> None:
        self.sample_rate = sample_rate
        self.channels = channels
        self.bytes_per_frame = 2 * channels
        self._resampler = None
        if sample_rate != SAMPLE_RATE:
            import soxr

            self._resampler = soxr.ResampleStream(sample_rate, SAMPLE_RATE, 1, dtype="float32", quality="HQ")

    def decode(self, data: bytes) -> tuple[np.ndarray, int]:
        """(16 kHz float32 samples, bytes dropped because they were not a whole sample frame)."""
        extra = len(data) % self.bytes_per_frame
        if extra:
            data = data[: len(data) - extra]
        x = np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
        if self.channels > 1:
            x = x.reshape(-1, self.channels).mean(axis=1)
        return self.resample(x), extra

    def resample(self, x: np.ndarray, last: bool = False) -> np.ndarray:
        if self._resampler is None:
            return x.astype(np.float32, copy=False)
        return self._resampler.resample_chunk(x.astype(np.float32, copy=False), last=last)

    def flush(self) -> np.ndarray:
        return self.resample(np.zeros(0, np.float32), last=True)


class Session:
    """Audio in, segment events out, plus the helpers that turn results into numbered events."""

    def __init__(
        self,
        session_id: str,
        seg_config: SegmenterConfig,
        clock: Callable[[], float],
        seq: SeqCounter | None = None,
        source: str = "websocket",
        vad: FrameVad | None = None,
    ) -> None:
        self.session_id = session_id
        self.segmenter = Segmenter(seg_config, vad)
        self.clock = clock
        self.seq = seq or SeqCounter()
        self.source = source
        self.created = clock()
        self._arrivals: deque[tuple[float, float]] = deque(maxlen=_ARRIVALS_KEPT)  # (stream end s, wall t)
        self.utterances = 0
        self.ended = False

    def feed(self, audio: np.ndarray, now: float | None = None) -> list[SegmentEvent]:
        """16 kHz float32 mono samples that arrived at `now` (default: the clock)."""
        events = self.segmenter.feed(audio)
        self._arrivals.append((self.segmenter.position_s, self.clock() if now is None else now))
        return events

    def flush(self, reason: str = "end_of_stream") -> list[SegmentEvent]:
        return self.segmenter.flush(reason)

    def arrival_time(self, stream_s: float) -> float:
        """Wall time at which the audio up to stream position `stream_s` had arrived."""
        if not self._arrivals:
            return self.created
        ends = [e for e, _ in self._arrivals]
        i = bisect.bisect_left(ends, stream_s - 1e-9)
        return self._arrivals[min(i, len(self._arrivals) - 1)][1]

    def latency_ms(self, end_s: float, now: float | None = None) -> float:
        now = self.clock() if now is None else now
        return round(max(0.0, now - self.arrival_time(end_s)) * 1000, 1)

    def event(self, type_: str, **fields: Any) -> dict[str, Any]:
        return P.event(type_, self.session_id, self.seq.next(), **fields)
