"""On-disk feature caches for frozen-encoder training: each utterance's sentence vector and log-mel
are computed once, so a CPU epoch over MELD takes seconds.

Layout under the cache folder (gitignored `cache/` by default):
  text/<encoder-key>.npz   unique normalised texts -> (N, D) float16 vectors, grown on demand
  mel/<hash>.npz           one array of concatenated (n_mels, T_i) log-mels + offsets per corpus
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from model import features
from training.datasets import Corpus, Utterance


def _key(*parts: str) -> str:
    return hashlib.sha1("\x1f".join(parts).encode()).hexdigest()[:16]


def encoder_key(text_encoder) -> str:
    """Cache key of a text encoder: its configured name plus a checksum of a few weights, so a
    different model saved under the same folder name never reuses stale vectors."""
    with torch.no_grad():
        params = list(text_encoder.model.parameters())
        # first and last tensors: a fine-tuned encoder (embeddings frozen) differs in its top layers
        probe = [p.detach().float().flatten()[:64].cpu().numpy().tobytes() for p in params[:3] + params[-3:]]
    return _key(str(text_encoder.name), str(text_encoder.max_tokens), *[hashlib.sha1(b).hexdigest() for b in probe])


_CTX = "\x1e"  # joins a text and its context into one cache key


def text_vectors(text_encoder, texts: Sequence[str], cache_dir: str | Path, batch_size: int = 64,
                 contexts: Sequence[Sequence[str]] | None = None) -> torch.Tensor:
    """(N, D) float32 sentence vectors for `texts` (zeros for empty text), computed once per
    distinct text (with its context, when the encoder reads earlier utterances) and encoder, and
    stored under cache_dir/text/."""
    if contexts is not None:  # the key is the text and its context; split again before encoding
        texts = [_CTX.join([t, *c]) if t else "" for t, c in zip(texts, contexts)]
    path = Path(cache_dir) / "text" / f"{encoder_key(text_encoder)}.npz"
    known: dict[str, int] = {}
    vecs = np.zeros((0, text_encoder.hidden_size), np.float32)
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            known = {t: i for i, t in enumerate(z["texts"].tolist())}
            vecs = z["vectors"].astype(np.float32)
    todo = sorted({t for t in texts if t and t not in known})
    if todo:
        new = np.zeros((len(todo), text_encoder.hidden_size), np.float32)
        # longest first keeps padding waste low; progress per chunk
        order = sorted(range(len(todo)), key=lambda i: -len(todo[i]))
        chunk = batch_size * 8
        with torch.inference_mode():
            for s in tqdm(range(0, len(order), chunk), desc="encode texts", unit="chunk", leave=False):
                ids = order[s : s + chunk]
                split = [todo[i].split(_CTX) for i in ids]
                ctx = [q[1:] for q in split] if contexts is not None else None
                new[ids] = text_encoder([q[0] for q in split], batch_size=batch_size, contexts=ctx).float().cpu().numpy()
        for t in todo:
            known[t] = len(known)
        vecs = np.concatenate([vecs, new])
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.stem + ".tmp.npz")
        np.savez(tmp, texts=np.array(list(known), dtype=str), vectors=vecs.astype(np.float16))
        tmp.replace(path)
    out = np.zeros((len(texts), text_encoder.hidden_size), np.float32)
    for i, t in enumerate(texts):
        if t:
            out[i] = vecs[known[t]]
    return torch.from_numpy(out)


def _load_clip(u: Utterance) -> np.ndarray:
    import soundfile as sf

    if u.span is None:
        return features.load_audio(u.audio)
    info = sf.info(u.audio)
    start, stop = int(u.span[0] * info.samplerate), int(u.span[1] * info.samplerate)
    audio, sr = sf.read(u.audio, start=start, stop=max(stop, start + 1), dtype="float32", always_2d=True)
    return features.resample(audio.mean(axis=1), sr)


def log_mels(corpus: Corpus, cache_dir: str | Path) -> list[np.ndarray | None]:
    """Per-utterance log-mel (n_mels, T) (None without audio), from cache_dir/mel/ when present."""
    with_audio = [u for u in corpus.utterances if u.audio]
    if not with_audio:
        return [None] * len(corpus)
    sig = [f"{u.uid}|{u.audio}|{u.span}|{Path(u.audio).stat().st_size}" for u in with_audio]
    consts = f"{features.SAMPLE_RATE},{features.N_FFT},{features.HOP_LENGTH},{features.N_MELS},{features.FMIN},{features.FMAX},{features.TOP_DB}"
    path = Path(cache_dir) / "mel" / f"{corpus.kind}-{_key(consts, *sig)}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            flat, offsets = z["mels"], z["offsets"]
        mels = [flat[:, offsets[k] : offsets[k + 1]].astype(np.float32) for k in range(len(with_audio))]
    else:
        mels = [features.log_mel(_load_clip(u)) for u in tqdm(with_audio, desc=f"log-mel {corpus.kind}", unit="clip", leave=False)]
        offsets = np.cumsum([0] + [m.shape[1] for m in mels])
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.stem + ".tmp.npz")
        np.savez(tmp, mels=np.concatenate(mels, axis=1).astype(np.float16), offsets=offsets)
        tmp.replace(path)
    by_uid = {u.uid: m for u, m in zip(with_audio, mels)}
    return [by_uid.get(u.uid) for u in corpus.utterances]
