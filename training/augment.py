"""Audio augmentation for the speech branch: make acted studio clips look like live audio.

Live utterances arrive cut by the VAD (speech plus a short pre-roll, no long silences), from
microphones in rooms with background noise, or from phone calls (8 kHz G.711 mu-law). Each function
takes and returns float32 mono 16 kHz audio and draws its randomness from the `rng` it is given,
so a cache of augmented features is reproducible from its seed.
"""

from __future__ import annotations

import numpy as np

from model.features import SAMPLE_RATE, resample


def trim_silence(audio: np.ndarray, top_db: float = 35.0, margin_s: float = 0.25) -> np.ndarray:
    """Cut leading/trailing silence (frames more than top_db below the loudest), keeping
    `margin_s` around the speech, as the service's segmenter keeps its pre-roll."""
    import librosa

    if audio.size == 0:
        return audio
    _, (start, end) = librosa.effects.trim(audio, top_db=top_db, frame_length=512, hop_length=128)
    m = int(margin_s * SAMPLE_RATE)
    return audio[max(0, start - m) : min(audio.size, end + m)].astype(np.float32)


def random_crop(audio: np.ndarray, rng: np.random.Generator, min_frac: float = 0.7) -> np.ndarray:
    """A random contiguous part of at least min_frac of the clip (and at least 0.5 s)."""
    n = audio.size
    keep = int(n * rng.uniform(min_frac, 1.0))
    keep = min(n, max(keep, SAMPLE_RATE // 2))
    start = int(rng.integers(0, n - keep + 1))
    return audio[start : start + keep]


def colored_noise(n: int, rng: np.random.Generator, exponent: float) -> np.ndarray:
    """Noise with power spectrum ~ 1/f^exponent (0 white, 1 pink, 2 brown), unit RMS."""
    spec = rng.standard_normal(n // 2 + 1) + 1j * rng.standard_normal(n // 2 + 1)
    f = np.fft.rfftfreq(n)
    f[0] = f[1] if n > 1 else 1.0
    noise = np.fft.irfft(spec / f ** (exponent / 2), n)
    return (noise / (np.sqrt(np.mean(noise**2)) + 1e-12)).astype(np.float32)


def add_noise(audio: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """Mix `noise` (looped or cut to length) under `audio` at the given speech-to-noise ratio."""
    if noise.size < audio.size:
        noise = np.tile(noise, int(np.ceil(audio.size / max(1, noise.size))))
    noise = noise[: audio.size]
    p_s = float(np.mean(audio**2)) + 1e-12
    p_n = float(np.mean(noise**2)) + 1e-12
    return (audio + noise * np.sqrt(p_s / (p_n * 10 ** (snr_db / 10)))).astype(np.float32)


def reverb(audio: np.ndarray, rng: np.random.Generator, rt60: tuple[float, float] = (0.15, 0.7)) -> np.ndarray:
    """Convolve with a synthetic room impulse response (exponentially decaying noise, random RT60)."""
    t60 = rng.uniform(*rt60)
    n = int(t60 * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    rir = rng.standard_normal(n) * np.exp(-6.9 * t / t60)  # -60 dB at t60
    rir[0] = 1.0
    rir /= np.sqrt(np.sum(rir**2))
    from scipy.signal import fftconvolve

    wet = fftconvolve(audio, rir)[: audio.size]
    peak = np.max(np.abs(wet)) + 1e-9
    return (wet * min(1.0, np.max(np.abs(audio)) / peak)).astype(np.float32)


def mulaw_phone(audio: np.ndarray, mu: float = 255.0) -> np.ndarray:
    """A phone call: band-limited to 8 kHz sampling, G.711 mu-law companded to 8 bits, back to 16 kHz."""
    x = np.clip(resample(audio, SAMPLE_RATE, 8000), -1.0, 1.0)
    y = np.sign(x) * np.log1p(mu * np.abs(x)) / np.log1p(mu)
    q = np.round((y + 1) / 2 * 255) / 255 * 2 - 1  # 8-bit quantisation
    x = np.sign(q) * ((1 + mu) ** np.abs(q) - 1) / mu
    return resample(x.astype(np.float32), 8000, SAMPLE_RATE)


def gain(audio: np.ndarray, db: float) -> np.ndarray:
    return np.clip(audio * 10 ** (db / 20), -1.0, 1.0).astype(np.float32)


def live_like(audio: np.ndarray, rng: np.random.Generator, babble: list[np.ndarray] | None = None) -> np.ndarray:
    """One random live-audio version of a trimmed clip: crop, then each of reverberation, noise
    (coloured or babble of other speakers, SNR 5-25 dB), phone line and gain with some probability."""
    x = random_crop(audio, rng)
    if rng.random() < 0.3:
        x = reverb(x, rng)
    if rng.random() < 0.6:
        if babble and rng.random() < 0.4:
            noise = babble[int(rng.integers(len(babble)))]
            noise = np.roll(noise, int(rng.integers(noise.size)))
        else:
            noise = colored_noise(x.size, rng, float(rng.choice([0.0, 1.0, 2.0])))
        x = add_noise(x, noise, float(rng.uniform(5, 25)))
    if rng.random() < 0.25:
        x = mulaw_phone(x)
    return gain(x, float(rng.uniform(-12, 6)))
