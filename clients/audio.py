"""Audio helpers for the clients: decode any file to 16 kHz mono PCM and chunk it in real time."""

from __future__ import annotations

import numpy as np

from streamer.pcm import CHUNK_S, SAMPLE_RATE, paced_chunks

__all__ = ["CHUNK_S", "SAMPLE_RATE", "decode", "paced_chunks"]  # pacing lives in streamer.pcm (one home)


def decode(path: str, sample_rate: int = SAMPLE_RATE, mono: bool = True) -> np.ndarray:
    """Any format soundfile or ffmpeg (via librosa/audioread) reads -> float32, (n,) or (channels, n)."""
    import librosa

    audio, _ = librosa.load(path, sr=sample_rate, mono=mono)
    return audio.astype(np.float32, copy=False)
