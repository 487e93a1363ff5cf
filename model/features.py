"""Audio front end: every audio constant lives here, and the librosa log-mel the speech CNN reads.

Variable-length policy: any utterance length works. Audio shorter than MIN_SECONDS is zero-padded
(after normalisation, so padding is the utterance mean); audio longer than MAX_SECONDS is cut to its
central MAX_SECONDS. The CNN pools over frequency to a fixed size and takes a masked mean over
valid time frames, so a 0.5 s and a 15 s utterance give the same embedding size, and padding in a
batch never changes an utterance's result beyond convolution edge effects.
"""

from __future__ import annotations

import numpy as np

SAMPLE_RATE = 16_000  # Hz, mono: everything entering the model is resampled to this
N_FFT = 400  # 25 ms window
WIN_LENGTH = 400
HOP_LENGTH = 160  # 10 ms hop -> 100 frames per second
N_MELS = 64
FMIN = 20.0
FMAX = 8_000.0
TOP_DB = 80.0
MIN_SECONDS = 0.5
MAX_SECONDS = 15.0
FRAMES_PER_SECOND = SAMPLE_RATE // HOP_LENGTH
MIN_FRAMES = int(MIN_SECONDS * FRAMES_PER_SECOND)
MAX_FRAMES = int(MAX_SECONDS * FRAMES_PER_SECOND)


def load_audio(path: str, sr: int = SAMPLE_RATE) -> np.ndarray:
    """Decode any audio file librosa/soundfile can read to float32 mono at ``sr``."""
    import librosa

    audio, _ = librosa.load(path, sr=sr, mono=True)
    return audio.astype(np.float32, copy=False)


def resample(audio: np.ndarray, orig_sr: int, target_sr: int = SAMPLE_RATE) -> np.ndarray:
    """Band-limited resampling (soxr via librosa)."""
    if orig_sr == target_sr:
        return audio.astype(np.float32, copy=False)
    import librosa

    return librosa.resample(audio.astype(np.float32), orig_sr=orig_sr, target_sr=target_sr).astype(np.float32)


def log_mel(audio: np.ndarray, sr: int = SAMPLE_RATE) -> np.ndarray:
    """Per-utterance normalised log-mel spectrogram, shape (N_MELS, T) float32, T >= MIN_FRAMES.

    dB scale (ref = max, floor TOP_DB below it), then zero mean / unit variance over the whole
    utterance, which removes microphone gain differences between training and live audio.
    """
    import librosa

    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim != 1:
        raise ValueError(f"log_mel expects mono audio of shape (n,), got {audio.shape}")
    if sr != SAMPLE_RATE:
        audio = resample(audio, sr, SAMPLE_RATE)
    max_samples = int(MAX_SECONDS * SAMPLE_RATE)
    if audio.size > max_samples:
        start = (audio.size - max_samples) // 2
        audio = audio[start : start + max_samples]
    if audio.size < N_FFT:
        audio = np.pad(audio, (0, N_FFT - audio.size))
    mel = librosa.feature.melspectrogram(
        y=audio, sr=SAMPLE_RATE, n_fft=N_FFT, win_length=WIN_LENGTH, hop_length=HOP_LENGTH,
        n_mels=N_MELS, fmin=FMIN, fmax=FMAX, power=2.0, center=True,
    )  # (N_MELS, T)
    db = librosa.power_to_db(mel, ref=np.max, top_db=TOP_DB)
    db = (db - db.mean()) / (db.std() + 1e-5)
    if db.shape[1] < MIN_FRAMES:
        db = np.pad(db, ((0, 0), (0, MIN_FRAMES - db.shape[1])))
    return db.astype(np.float32)


def pad_batch(mels: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Stack log-mels of different lengths: ((B, 1, N_MELS, T_max) zero-padded, (B,) lengths)."""
    if not mels:
        raise ValueError("pad_batch needs at least one spectrogram")
    lengths = np.array([m.shape[1] for m in mels], dtype=np.int64)
    out = np.zeros((len(mels), 1, N_MELS, int(lengths.max())), dtype=np.float32)
    for i, m in enumerate(mels):
        out[i, 0, :, : m.shape[1]] = m
    return out, lengths


# ---- Whisper encoder states: the optional second speech input -----------------------------------
WHISPER_STATE_HOP = 320  # samples per Whisper encoder state (20 ms at 16 kHz)


def whisper_window_frames(n_samples: int, min_window_s: float = 10.0, margin_s: float = 2.0, step_s: float = 5.0) -> int:
    """Whisper encoder window (in 10 ms mel frames) for an utterance: its length plus a margin,
    rounded up to `step_s`, within [min_window_s, 30 s]. The service's ASR (AsrConfig, the same
    defaults) and training both use this, so pooled states seen in training match the ones served.
    The bundled checkpoint was trained with a 15 s minimum; MODEL_CARD.md has how its predictions
    with 10 s states compare."""
    import math

    seconds = n_samples / SAMPLE_RATE + margin_s
    seconds = math.ceil(seconds / step_s) * step_s
    seconds = min(30.0, max(min_window_s, seconds))
    return int(round(seconds * 100))


def pool_whisper_states(states: np.ndarray, n_samples: int) -> np.ndarray:
    """(T, D) encoder states of one padded window -> (2D,) float32: mean and std over the states
    that cover the utterance's `n_samples` (the padding after it is left out)."""
    states = np.asarray(states, dtype=np.float32)
    n = int(min(states.shape[0], max(1, -(-n_samples // WHISPER_STATE_HOP))))
    valid = states[:n]
    return np.concatenate([valid.mean(axis=0), valid.std(axis=0)]).astype(np.float32)


def whisper_tokenizer(whisper_model, language: str = "en"):  # type: ignore[no-untyped-def]
    """(Tokenizer, prompt) of a faster-whisper model for timestamp-free transcription in `language`
    (English-only models ignore it): what the service's ASR and the training recipe decode with."""
    from faster_whisper.tokenizer import Tokenizer

    multilingual = whisper_model.model.is_multilingual
    tok = Tokenizer(whisper_model.hf_tokenizer, multilingual, task="transcribe", language=language if multilingual else None)
    return tok, whisper_model.get_prompt(tok, [], without_timestamps=True)


def whisper_decode(whisper_model, tokenizer, prompt: list[int], enc, n: int, beam_size: int = 1,  # type: ignore[no-untyped-def]
                   max_new_tokens: int = 128, no_speech_threshold: float = 0.6,
                   logprob_threshold: float = -1.0) -> list[tuple[str, list[int], float, float]]:
    """Decode `n` utterances from their encoder output `enc` in one call: per utterance (text,
    tokens, no-speech probability, average log-probability). Whisper's own "this was not speech"
    rule (no-speech probability above the threshold and a low log-probability) gives "" and no tokens."""
    results = whisper_model.model.generate(
        enc, [list(prompt) for _ in range(n)], beam_size=beam_size, max_length=len(prompt) + max_new_tokens,
        suppress_blank=True, suppress_tokens=[-1], return_scores=True, return_no_speech_prob=True,
    )
    out: list[tuple[str, list[int], float, float]] = []
    for r in results:
        tokens = [t for t in r.sequences_ids[0] if t < tokenizer.eot]
        length = max(1, len(r.sequences_ids[0]))
        avg_logprob = float(r.scores[0]) * length / (length + 1)
        text = tokenizer.decode(tokens).strip()
        nsp = float(r.no_speech_prob)
        if nsp > no_speech_threshold and avg_logprob < logprob_threshold:
            text = ""
        out.append((text, tokens if text else [], nsp, avg_logprob))
    return out
