"""Familiar speech: how far an utterance's pooled Whisper states are from the clips the speech
branch learned from, and the distance past which its voice counts as unfamiliar.

The speech branch learned emotion from acted clips of a dozen sentences, and on speech unlike them
(ordinary English narration, another recording chain) it can be confidently wrong
(bench/real_speech.py). Those utterances are far from the training clips in the space of the pooled
Whisper states: the Mahalanobis distance (covariance of the split's training clips, every
live-like version included, shrunk by `shrink` towards a multiple of the identity) separates them
from held-out speakers saying a held-out sentence. The threshold is a fixed percentile
(`percentile`, 99) of the distances of the split's *validation* clips (all versions), so about 1 %
of speech like the validation clips is called unfamiliar; no test set is looked at. A prediction that
leans on an unfamiliar voice (speech weight >= 0.5) is marked confidence "low"
(EmotionModel.predict); its label and scores do not change.

The recipe (training.recipe) stores this in every checkpoint it writes. For an existing checkpoint:

    python -m training.familiar --checkpoint model/checkpoints/default.pt --ravdess D/ravdess --emodb D/emodb --split ship

rewrites it in place (or to --out) with `familiar_max_distance` in its config, the mean and whitening
as buffers, and a `familiar` entry in its metadata (the share of each set called unfamiliar).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model import EmotionModel, ModelConfig

SHRINK, PERCENTILE = 0.1, 99.0


def fit(states: np.ndarray, shrink: float = SHRINK) -> tuple[np.ndarray, np.ndarray]:
    """(mean, whitening W) of (N, D) states: ||(x - mean) W|| is the Mahalanobis distance under the
    covariance shrunk towards trace/D times the identity (so W exists with N < D)."""
    x = np.asarray(states, np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"need (N >= 2, D) states, got {x.shape}")
    if not 0 < shrink <= 1:
        raise ValueError(f"shrink must be in (0, 1], got {shrink}")
    mean = x.mean(0)
    cov = np.cov(x - mean, rowvar=False)
    cov = (1 - shrink) * cov + shrink * np.trace(cov) / cov.shape[0] * np.eye(cov.shape[0])
    vals, vecs = np.linalg.eigh(cov)
    whiten = (vecs / np.sqrt(np.maximum(vals, 1e-12))) @ vecs.T  # cov^(-1/2), symmetric
    return mean.astype(np.float32), whiten.astype(np.float32)


def distances(states: np.ndarray, mean: np.ndarray, whiten: np.ndarray) -> np.ndarray:
    return np.linalg.norm((np.asarray(states, np.float32) - mean) @ whiten, axis=1)


def threshold(val_states: np.ndarray, mean: np.ndarray, whiten: np.ndarray, percentile: float = PERCENTILE) -> float:
    return float(np.percentile(distances(val_states, mean, whiten), percentile))


def attach(model: EmotionModel, mean: np.ndarray, whiten: np.ndarray, max_distance: float) -> EmotionModel:
    """Give `model` the check: its config's familiar_max_distance and the buffers (in place)."""
    dw = model.config.whisper_dim
    if not dw or np.shape(mean) != (dw,) or np.shape(whiten) != (dw, dw):
        raise ValueError(f"the model takes {dw}-d Whisper states; got mean {np.shape(mean)}, whitening {np.shape(whiten)}")
    if not max_distance > 0:
        raise ValueError(f"max_distance must be > 0, got {max_distance}")
    model.config = ModelConfig.from_dict({**model.config.to_dict(), "familiar_max_distance": float(max_distance)})
    dev = model.device
    for name, value in (("familiar_mean", mean), ("familiar_whiten", whiten)):
        t = torch.as_tensor(np.asarray(value, np.float32), device=dev)
        if hasattr(model, name):
            getattr(model, name).copy_(t)
        else:
            model.register_buffer(name, t)
    return model


def fit_split(feats: Any, parts: dict[str, dict[str, list[int]]], extra: dict[str, np.ndarray] | None = None,
              shrink: float = SHRINK, percentile: float = PERCENTILE) -> tuple[np.ndarray, np.ndarray, float, dict[str, Any]]:
    """Fit on a training.acted split: mean and whitening from the training clips (every version),
    the threshold from the validation clips (every version). Returns them and a report: the share
    of each named clip set (clean and live-like versions) called unfamiliar, and of `extra` states."""
    from training import acted

    train = feats.rows(acted.flat(parts["train"]))
    mean, whiten = fit(feats.whisper[train], shrink)
    limit = threshold(feats.whisper[feats.rows(acted.flat(parts["val"]))], mean, whiten, percentile)
    report: dict[str, Any] = {"shrink": shrink, "percentile": percentile, "max_distance": round(limit, 3),
                              "fitted_on": {"train_versions": int(len(train))}, "unfamiliar_share": {}}
    for part in ("train", "val", "test"):
        for name, clips in parts.get(part, {}).items():
            for variants in ("clean", "aug"):
                d = distances(feats.whisper[feats.rows(clips, variants)], mean, whiten)
                report["unfamiliar_share"][f"{part}/{name}/{variants}"] = round(float(np.mean(d > limit)), 4) if len(d) else None
    for name, states in (extra or {}).items():
        d = distances(states, mean, whiten)
        report["unfamiliar_share"][name] = round(float(np.mean(d > limit)), 4)
    return mean, whiten, limit, report


def real_speech_states(folder: Path) -> dict[str, np.ndarray]:
    """Pooled states of the real recordings bench/real_speech.py streams (LJ Speech's sentences,
    JFK, silero's test recording), each cut at its pauses: reported beside the acted sets."""
    import librosa

    from model.features import SAMPLE_RATE, load_audio
    from training.augment import trim_silence
    from training.speech_cache import WhisperStates

    ws = WhisperStates(threads=1)
    out: dict[str, np.ndarray] = {}
    lj = sorted(folder.glob("LJ*.wav"))
    if lj:
        out["real/lj"] = ws([trim_silence(load_audio(str(p))) for p in lj])
    for name in ("jfk.flac", "silero_test.wav"):
        if (folder / name).is_file():
            a = load_audio(str(folder / name))
            cuts = [a[max(0, s - SAMPLE_RATE // 4) : e + SAMPLE_RATE // 4]
                    for s, e in librosa.effects.split(a, top_db=30, frame_length=1024, hop_length=256) if e - s > SAMPLE_RATE]
            if cuts:
                out[f"real/{Path(name).stem}"] = np.concatenate([ws([c]) for c in cuts])
    return out


def main(argv: list[str] | None = None) -> int:
    from model.checkpoint import load_checkpoint, save_checkpoint
    from training import acted

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", default="", help="where to write the checkpoint (default: over --checkpoint)")
    p.add_argument("--ravdess", required=True)
    p.add_argument("--emodb", default="")
    p.add_argument("--split", default="ship", choices=acted.SPLITS)
    p.add_argument("--cache-dir", default="cache")
    p.add_argument("--augment", type=int, default=2, help="live-like versions of each clip, as stage 2 made them")
    p.add_argument("--real", default="", help="a folder of real recordings (../shared/data/speech) to report on")
    p.add_argument("--report", default="training/reports/familiar.json")
    a = p.parse_args(argv)
    model = load_checkpoint(a.checkpoint, device="cpu")
    if not model.config.whisper_dim:
        p.error(f"{a.checkpoint} has no Whisper-state input: nothing to check familiarity on")
    data = acted.load(a.ravdess, a.emodb or None)
    parts = acted.split(data, a.split)
    feats = acted.features(data, a.cache_dir, n_aug=a.augment)
    extra = real_speech_states(Path(a.real)) if a.real else {}
    mean, whiten, limit, report = fit_split(feats, parts, extra)
    attach(model, mean, whiten, limit)
    report |= {"checkpoint": a.checkpoint, "split": a.split}
    meta = dict(model.metadata or {})
    meta["familiar"] = report
    out = save_checkpoint(model, a.out or a.checkpoint, meta)
    Path(a.report).parent.mkdir(parents=True, exist_ok=True)
    Path(a.report).write_text(json.dumps(report, indent=1))
    print(f"familiar_max_distance {limit:.2f} (the {report['percentile']:g}th percentile of {a.split} validation); unfamiliar shares:")
    for k, v in report["unfamiliar_share"].items():
        print(f"  {k}: {v}")
    print(f"wrote {out} and {a.report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
