"""What the live service says about real, unacted English speech: the recordings of
`../shared/data/speech` (LJ Speech's narrator reading four consecutive sentences, JFK's inaugural
phrase, silero-vad's 60 s test recording), each streamed through `python -m streamer --file F
--fast --json` with `--modalities both` and `speech`, every `emotion` event kept.

No emotion labels exist for these recordings; the one thing known is that LJ Speech is calm,
neutral narration (an audiobook reader), so `lj_neutral_share` is the one accuracy figure here. The
rest is the distribution of labels, top scores and `confidence`, which shows whether the model
calls ordinary speech emotional, and how sure it is. A model that learned emotion from acted speech
of a few sentences (bench/live_accuracy.py measures those) can still hear every other sentence as
one emotion: this bench is the check for that.

`--parts` also scores the LJ sentences through the speech branch alone, split into its two inputs
(the CNN on log-mels, the pooled Whisper states), with the model's own API: which input drives the
label.

    .venv/bin/python bench/real_speech.py [--checkpoint C] [--data ../shared/data/speech] [--parts]

Writes bench/results/real_speech.{json,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.provenance import git_state  # noqa: E402

LJ = ("LJ001-0002.wav", "LJ001-0004.wav", "LJ001-0006.wav", "LJ001-0008.wav")
RECORDINGS = {"lj": LJ, "jfk": ("jfk.flac",), "silero": ("silero_test.wav",)}
GAP_S = 1.0  # silence after each recording of a set (the LJ sentences are four files)


def join(paths: Sequence[Path], gap_s: float) -> np.ndarray:
    """The recordings one after another at 16 kHz, each followed by `gap_s` of silence."""
    from model.features import SAMPLE_RATE, load_audio

    gap = np.zeros(int(gap_s * SAMPLE_RATE), np.float32)
    return np.concatenate([x for p in paths for x in (load_audio(str(p)), gap)])


def service_events(wav: Path, checkpoint: str, flags: Sequence[str], kept: Sequence[str] = ("transcript", "emotion"),
                   timeout_s: float = 600) -> list[dict[str, Any]]:
    """The events of types `kept` of one recording through a fresh service (`python -m streamer
    --file --fast --json` with `flags`), in order."""
    cmd = [sys.executable, "-m", "streamer", "--port", "0", "--file", str(wav), "--fast", "--json",
           "--checkpoint", checkpoint, *flags]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}: {done.stderr[-2000:]}")
    events = []
    for line in done.stdout.splitlines():
        if line.startswith("{"):
            ev = json.loads(line)
            if ev.get("type") in kept:
                events.append(ev)
    return events


def stream(wav: Path, checkpoint: str, modalities: str, timeout_s: float = 600) -> list[dict[str, Any]]:
    """The `transcript` and `emotion` events of one recording through a fresh service, in order."""
    return service_events(wav, checkpoint, ["--modalities", modalities], timeout_s=timeout_s)


def utterances(events: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per utterance that got an `emotion`: its transcript, label, top score, confidence, weights."""
    text = {ev["utterance_id"]: ev.get("text", "") for ev in events if ev["type"] == "transcript"}
    rows = []
    for ev in events:
        if ev["type"] != "emotion":
            continue
        rows.append({"utterance_id": ev["utterance_id"], "text": text.get(ev["utterance_id"], ""), "label": ev["label"],
                     "top_score": round(max(ev["scores"].values()), 3), "confidence": ev.get("confidence"),
                     "speech_weight": round(ev["modality_weights"]["speech"], 3), "familiar_voice": ev.get("familiar_voice")})
    return rows


def summarise(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    n = len(rows)
    counts = Counter(r["label"] for r in rows)
    return {"utterances": n, "labels": dict(counts.most_common()),
            "share": {k: round(v / n, 3) for k, v in counts.items()} if n else {},
            "mean_top_score": round(float(np.mean([r["top_score"] for r in rows])), 3) if n else None,
            "ok_confidence_share": round(sum(r["confidence"] == "ok" for r in rows) / n, 3) if n else None,
            "anger_ok_share": round(sum(r["label"] == "anger" and r["confidence"] == "ok" for r in rows) / n, 3) if n else None,
            "mean_speech_weight": round(float(np.mean([r["speech_weight"] for r in rows])), 3) if n else None,
            # of the utterances whose familiar_voice is known (a checkpoint with the check): the share called unfamiliar
            "unfamiliar_share": round(sum(r.get("familiar_voice") is False for r in rows) / known, 3)
            if (known := sum(r.get("familiar_voice") is not None for r in rows)) else None}


def branch_parts(paths: Sequence[Path], checkpoint: str) -> list[dict[str, Any]]:
    """Each clip through the speech branch alone (no words), with CNN + Whisper states, the CNN
    alone and the Whisper states alone (the other input zeroed, as when it is missing): label and score."""
    import torch

    from model import features, load_checkpoint
    from training.augment import trim_silence
    from training.speech_cache import WhisperStates

    model = load_checkpoint(checkpoint, device="cpu")
    if not model.config.whisper_dim:
        return []
    ws = WhisperStates(threads=1)
    labels, cfg = model.config.labels, model.config
    out = []
    with torch.inference_mode():
        for p in paths:
            audio = trim_silence(features.load_audio(str(p)))
            mel, states = features.log_mel(audio), ws([audio])[0]
            mels, lengths = (torch.from_numpy(x) for x in features.pad_batch([mel]))
            cnn = model.speech(mels, lengths)
            vectors = {"cnn+whisper": model.speech_vector(cnn, torch.from_numpy(states[None]), torch.tensor([True])),
                       "cnn": model.speech_vector(cnn, None),
                       "whisper": model.speech_vector(torch.zeros_like(cnn), torch.from_numpy(states[None]), torch.tensor([True]))}
            row: dict[str, Any] = {"clip": p.name, "seconds": round(len(audio) / features.SAMPLE_RATE, 2)}
            for name, v in vectors.items():
                o = model.forward_features(v, torch.zeros(1, 1, cfg.encoder_dim), torch.ones(1, dtype=torch.long),
                                           torch.zeros(1, dtype=torch.long), torch.tensor([[True, False]]))
                probs = torch.softmax(o.logits.float() / cfg.temperature, -1)[0]
                k = int(probs.argmax())
                row[name] = {"label": labels[k], "score": round(float(probs[k]), 3)}
            out.append(row)
    return out


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear"]
    colours = ["#9e9e9e", "#f4c20d", "#ff9800", "#d32f2f", "#1976d2", "#388e3c", "#7b1fa2"]
    bars = [(f"{rec}\n{mod}", run["summary"]) for rec, runs in report["recordings"].items() for mod, run in runs.items()]
    fig, ax = plt.subplots(figsize=(8, 3.8))
    for i, (name, s) in enumerate(bars):
        left = 0.0
        for lab, col in zip(labels, colours):
            w = s["share"].get(lab, 0.0)
            ax.barh(i, w, left=left, color=col, label=lab if i == 0 else None)
            left += w
    ax.set_yticks(range(len(bars)), [b[0] for b in bars])
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of utterances")
    ax.set_title("labels the live service gives unacted English speech")
    ax.legend(ncol=7, fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.08))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "speech")
    ap.add_argument("--checkpoint", default="model/checkpoints/default.pt")
    ap.add_argument("--runs", default="both,speech", help="--modalities values, one service run each")
    ap.add_argument("--recordings", default=",".join(RECORDINGS), help=f"any of {', '.join(RECORDINGS)}")
    ap.add_argument("--parts", action="store_true", help="also score the LJ clips through the speech branch's two inputs")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "real_speech")
    a = ap.parse_args(argv)
    names = [r for r in a.recordings.split(",") if r]
    if not names or set(names) - set(RECORDINGS):
        ap.error(f"--recordings: any of {', '.join(RECORDINGS)}")
    import soundfile as sf

    t0 = time.time()
    report: dict[str, Any] = {
        "what": "labels the live service gives real unacted English speech; LJ Speech is neutral narration",
        "git": git_state(), "checkpoint": a.checkpoint, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg_at_start": os.getloadavg()},
        "recordings": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            paths = [a.data / f for f in RECORDINGS[name]]
            wav = Path(tmp) / f"{name}.wav"
            sf.write(wav, join(paths, GAP_S), 16000)
            report["recordings"][name] = {}
            for mod in [m for m in a.runs.split(",") if m]:
                rows = utterances(stream(wav, a.checkpoint, mod))
                report["recordings"][name][mod] = {"summary": summarise(rows), "utterances": rows}
                s = report["recordings"][name][mod]["summary"]
                print(f"{name:7s} {mod:6s}: {s['utterances']} utterances, labels {s['labels']}, mean top score "
                      f"{s['mean_top_score']}, anger with confidence ok {s['anger_ok_share']}, "
                      f"voice unfamiliar {s['unfamiliar_share']}", flush=True)
    if "lj" in report["recordings"]:
        report["lj_neutral_share"] = {m: r["summary"]["share"].get("neutral", 0.0) for m, r in report["recordings"]["lj"].items()}
    if a.parts:
        report["speech_branch_parts"] = branch_parts([a.data / f for f in LJ], a.checkpoint)
        for row in report["speech_branch_parts"]:
            print(row["clip"], {k: v for k, v in row.items() if isinstance(v, dict)}, flush=True)
    report["minutes"] = round((time.time() - t0) / 60, 1)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    plot(report, a.out.with_suffix(".png"))
    print(f"wrote {a.out.with_suffix('.json')} and .png", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
