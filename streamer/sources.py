"""Audio sources for server-side sessions: files (paced in real time or as fast as possible) and
the desktop microphone (sounddevice). Each yields float32 16 kHz mono chunks asynchronously."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import numpy as np

from streamer.config import SAMPLE_RATE

FILE_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg", ".oga", ".opus", ".m4a")


class SourceError(RuntimeError):
    """An audio source cannot be opened (missing file, unknown device, no audio backend)."""


def load_file(path: str | Path, channels: int | None = None) -> np.ndarray:
    """Any file librosa/soundfile can decode (wav, flac, mp3, ogg) -> float32 16 kHz mono, or with
    `channels`, (channels, n) kept apart (a call recording with one speaker per channel)."""
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"audio file not found: {path}")
    import librosa

    try:
        audio, _ = librosa.load(str(path), sr=SAMPLE_RATE, mono=channels is None)
    except Exception as e:  # soundfile/audioread raise many types for undecodable files
        raise SourceError(f"cannot decode {path}: {type(e).__name__}: {e}") from e
    if channels is not None and (audio.ndim != 2 or audio.shape[0] != channels):
        got = 1 if audio.ndim == 1 else audio.shape[0]
        raise SourceError(f"{path} has {got} channel(s); {channels} speakers were named")
    return audio.astype(np.float32, copy=False)


async def paced(
    audio: np.ndarray,
    chunk_s: float = 0.1,
    realtime: bool = True,
    clock: Callable[[], float] = time.monotonic,
) -> AsyncIterator[np.ndarray]:
    """Yield `audio` in chunks; with `realtime`, chunk k is released at start + k * chunk_s."""
    n = max(1, int(round(chunk_s * SAMPLE_RATE)))
    t0 = clock()
    for k, i in enumerate(range(0, len(audio), n)):
        if realtime:
            delay = t0 + k * chunk_s - clock()
            if delay > 0:
                await asyncio.sleep(delay)  # pacing to the audio's own clock
        else:
            await asyncio.sleep(0)  # let the loop breathe between chunks
        yield audio[i : i + n]


def list_devices() -> str:
    try:
        import sounddevice as sd
    except OSError as e:  # PortAudio library missing
        raise SourceError(f"sounddevice/PortAudio not usable: {e}") from e
    return str(sd.query_devices())


def _resolve_input_device(device: str | int | None) -> int | str | None:
    if device is None or isinstance(device, int):
        return device
    return int(device) if device.isdigit() else device


class Microphone:
    """An input device, opened (and checked) at construction. `start()` begins capturing into a
    bounded queue, so nothing said after the caller announces "listening" is lost while the rest
    of the pipeline gets going; `chunks()` (which starts it if needed) yields 16 kHz float32 until
    cancelled or `stop` is set. Captures at the device's default rate, resampled; chunks that
    overflow the queue are dropped (a stalled consumer must not grow memory)."""

    def __init__(self, device: str | int | None = None, block_s: float = 0.05, queue_size: int = 200) -> None:
        try:
            import sounddevice as sd
        except OSError as e:
            raise SourceError(f"sounddevice/PortAudio not usable: {e}") from e
        self.device = _resolve_input_device(device)
        try:
            self.info = sd.query_devices(self.device, "input")
        except (ValueError, sd.PortAudioError) as e:
            raise SourceError(f"no input device {device!r}: {e} (see --list-devices)") from e
        self.rate = int(self.info["default_samplerate"])
        self.block_s = block_s
        self.dropped = 0
        self._queue: asyncio.Queue[np.ndarray] = asyncio.Queue(queue_size)
        self._loop: asyncio.AbstractEventLoop | None = None
        try:
            self._stream = sd.InputStream(device=self.device, channels=1, samplerate=self.rate, dtype="float32",
                                          blocksize=int(self.rate * block_s), callback=self._callback)
        except sd.PortAudioError as e:
            raise SourceError(f"cannot open input device {self.info['name']!r}: {e}") from e

    def _push(self, x: np.ndarray) -> None:
        try:
            self._queue.put_nowait(x)
        except asyncio.QueueFull:
            self.dropped += 1

    def _callback(self, indata: np.ndarray, frames: int, t: object, status: object) -> None:  # PortAudio thread
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._push, indata[:, 0].copy())

    def start(self) -> None:
        """Begin capturing (from the running event loop); idempotent."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._stream.start()

    async def chunks(self, stop: asyncio.Event | None = None) -> AsyncIterator[np.ndarray]:
        from streamer.pipeline.session import PcmDecoder  # the service's one streaming resampler

        self.start()
        to_16k = PcmDecoder(self.rate, 1)
        stop_wait = asyncio.ensure_future(stop.wait()) if stop is not None else None
        with self._stream:
            try:
                while True:
                    get = asyncio.ensure_future(self._queue.get())
                    waits = {get} | ({stop_wait} if stop_wait is not None else set())
                    done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                    if get not in done:
                        get.cancel()
                        return
                    yield to_16k.resample(get.result())
            finally:
                if stop_wait is not None:
                    stop_wait.cancel()
