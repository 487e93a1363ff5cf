"""Live emotion accuracy: acted clips through the real service (VAD -> Whisper -> dialogue context
-> model), scored from the `emotion` events it publishes. Three modes, each a held-out test:

    .venv/bin/python bench/live_accuracy.py                                   # RAVDESS actors 21-24, runs both,speech,text
    .venv/bin/python bench/live_accuracy.py --sentence 2                      # held-out sentence: "Dogs are sitting ..."
    .venv/bin/python bench/live_accuracy.py --corpus emodb                    # held-out corpus: EmoDB, German, 10 speakers
    .venv/bin/python bench/live_accuracy.py --limit 2 --actors 21 --runs both  # smoke run (seconds of audio)
    .venv/bin/python bench/live_accuracy.py --checkpoint runs/x/best.pt --speed 4 --device cuda

Corpora (`--corpus`, `--data`):
- `ravdess` (default): the test actors' speech clips (`--actors`, default 21-24; 16 kHz FLAC in
  Actor_XX/, file names 03-01-EE-II-SS-RR-AA). `--sentence 1|2` keeps only the clips of one of the
  two statements (SS: 01 "Kids are talking by the door", 02 "Dogs are sitting by the door"), 30 of
  an actor's 60; default both.
- `emodb`: EmoDB (Berlin, German acted speech, never seen in training): `labels.csv`
  (file,speaker,text_id,emotion,emotion_code) and `wav/` (this copy: 2.0 s clips at 22.05 kHz,
  resampled to 16 kHz on load). `--speakers`, default all ten. The packaged ASR is Whisper tiny.en,
  so German speech gets English guesses for transcripts: the text modality has little to go on.

For each run (`--runs`, one per `--modalities` value) a fresh `python -m streamer --port 0
--checkpoint C --modalities M` is started in a child process. Each actor / speaker is one WebSocket
session, a dialogue like a call: their clips in an order that takes one clip of each emotion per
round (shuffled, seeded), each preceded by `--gap` s of low noise (`--noise-db` dBFS RMS) so the VAD
ends every utterance; one more gap after the last. Audio goes in 100 ms pcm_s16le chunks at
`--speed` x real time (the segmenter runs on audio time, so the pace changes only how far Whisper
falls behind; the service throttles beyond 20x). Sessions run one after another.

Scoring: every `utterance.ended` (start_s, end_s) is assigned to the clip it overlaps most in the
stream; a clip with several utterances is scored on its LONGEST one (the others are counted as
splits), a clip with none, or whose utterance got no `emotion` event (an error), counts as wrong
with the prediction "none". Native emotions map onto the model's MELD labels as the training
recipes do (training.datasets.TO_MELD; RAVDESS: calm -> neutral, happy -> joy, sad -> sadness,
angry -> anger, fearful -> fear, surprised -> surprise; EmoDB: boredom -> neutral, happiness -> joy,
sadness -> sadness, ...). Metrics are training.metrics.classification_report's (acc; f1 = macro F1;
wa = mean per-class recall; wf1 = support-weighted F1; classes absent from the truth, such as
"none", or "surprise" on EmoDB, are left out of the averages but predictions of them are wrong).
A second report scores `emotion.revised` where the next clip revised it (the last clip keeps its
`emotion`). Modality weights: mean/median speech weight and `frac_speech_over_text`, the share of
clips where speech > text (also under its older name `speech_gt_text`); `fallback_clips` counts
clips scored on the other modality in a single-modality run (a text run with an empty transcript
keeps the speech vector, see streamer/pipeline/context.py). `confidence`: the share of clips whose
`emotion` event says `"confidence": "low"` and the accuracy on the "ok" and "low" ones (null where
the service's events carry no `confidence`, as older servers' do not).

Writes bench/results/live_accuracy.json and live_accuracy.png (row-normalised confusion matrices of
the runs side by side) for the default mode; other modes write live_accuracy_<tag>.{json,png}, the
tag `sentence1`, `sentence2`, `emodb` or `--tag`. The JSON records the checkpoint (path relative to
the repository, sha256), the git commit and whether the tree had changes, and the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import hashlib
import json
import os
import platform
import re
import signal
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.provenance import git_state  # noqa: E402
from training.datasets import EMODB_CODES, RAVDESS_CODES, TO_MELD  # noqa: E402
from streamer.config import AsrConfig  # noqa: E402

SR = 16_000
CORPORA = ("ravdess", "emodb")
DEFAULT_DATA = {c: ROOT.parent / "shared" / "data" / c for c in CORPORA}
SESSION_PREFIX = {"ravdess": "actor", "emodb": "speaker"}  # session ids: actor21-both, speaker03-both
RAVDESS_SENTENCES = {"01": "Kids are talking by the door", "02": "Dogs are sitting by the door"}
NONE = "none"  # the prediction of a clip that got no emotion event
LOW, OK = "low", "ok"  # the `confidence` of an emotion event (streamer.protocol.LOW_CONFIDENCE / OK_CONFIDENCE)
RUNS = ("both", "speech", "text")
CLIP_NAME = re.compile(r"^(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)$")
TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
LISTENING = re.compile(r"listening on (wss?://\S+)")


# ---- pure parts (tests/test_live_accuracy.py) ------------------------------------------------------
@dataclass(frozen=True)
class Clip:
    path: Path
    corpus: str  # "ravdess" | "emodb"
    speaker: str  # two digits as in the file names: RAVDESS actor "21", EmoDB speaker "03"
    emotion: str  # the corpus's own name (calm, happy, boredom, ...)
    label: str  # the MELD label it is scored as
    sentence: str  # what is said: RAVDESS statement "01" / "02", EmoDB text id "a01" ... "b10"
    intensity: str = ""  # RAVDESS "01" normal, "02" strong; EmoDB has none


def parse_clip(path: str | Path) -> Clip:
    """A RAVDESS speech file name (03-01-EE-II-SS-RR-AA) -> its actor, emotion, statement and MELD label."""
    path = Path(path)
    m = CLIP_NAME.match(path.stem)
    if not m:
        raise ValueError(f"not a RAVDESS file name (MM-VV-EE-II-SS-RR-AA): {path.name}")
    modality, channel, emo, intensity, statement, _, actor = m.groups()
    if modality == "02" or channel != "01" or emo not in RAVDESS_CODES or statement not in RAVDESS_SENTENCES:
        raise ValueError(f"not a RAVDESS speech clip with a known emotion and statement: {path.name}")
    native = RAVDESS_CODES[emo]
    return Clip(path, "ravdess", actor, native, TO_MELD["ravdess"][native], statement, intensity)


def parse_emodb_row(row: Mapping[str, str], wav: Path) -> Clip:
    """One labels.csv row (file,speaker,text_id,emotion,emotion_code) -> a Clip under `wav`. The
    emotion must agree with its code (labels.csv is decoded from the file names)."""
    try:
        name, speaker, text, emo, code = (row[k].strip() for k in ("file", "speaker", "text_id", "emotion", "emotion_code"))
    except KeyError as e:
        raise ValueError(f"EmoDB labels.csv row without column {e}: {dict(row)}") from e
    if emo not in TO_MELD["emodb"] or EMODB_CODES.get(code) != emo:
        raise ValueError(f"EmoDB {name}: emotion {emo!r} with code {code!r} is not one of {EMODB_CODES}")
    if not speaker.isdigit() or not text:
        raise ValueError(f"EmoDB {name}: bad speaker {speaker!r} or text id {text!r}")
    return Clip(wav / name, "emodb", speaker.zfill(2), emo, TO_MELD["emodb"][emo], text)


def read_emodb(root: Path) -> list[Clip]:
    """Every clip of `root`/labels.csv, audio in `root`/wav/; a listed file that is missing is an error."""
    labels = root / "labels.csv"
    if not labels.is_file():
        raise ValueError(f"no EmoDB labels.csv in {root}")
    with open(labels, newline="", encoding="utf-8-sig") as f:
        clips = [parse_emodb_row(row, root / "wav") for row in csv.DictReader(f)]
    missing = [c.path for c in clips if not c.path.is_file()]
    if missing:
        raise ValueError(f"{len(missing)} EmoDB clips listed in {labels} but missing, e.g. {missing[0]}")
    if not clips:
        raise ValueError(f"no clips listed in {labels}")
    return clips


def read_ravdess(folder: Path) -> list[Clip]:
    """The speech clips of one Actor_XX folder (FLAC or WAV named like RAVDESS's files)."""
    files = sorted(p for p in folder.glob("*") if p.suffix.lower() in (".flac", ".wav") and CLIP_NAME.match(p.stem))
    return [parse_clip(p) for p in files]


def parse_actors(spec: str) -> list[int]:
    """'21-24' or '21,23' (or a mix) -> sorted actor numbers."""
    out: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        lo, _, hi = part.partition("-")
        a, b = int(lo), int(hi or lo)
        if not 1 <= a <= b <= 24:
            raise ValueError(f"actors must be within 1-24, got {part!r}")
        out.update(range(a, b + 1))
    if not out:
        raise ValueError("no actors given")
    return sorted(out)


def parse_speakers(spec: str, known: Iterable[str]) -> list[str]:
    """'all' or '03,08' (leading zero optional) -> sorted speaker ids, each one of `known`."""
    known = sorted(set(known))
    if spec.strip() == "all":
        return known
    out = {p.strip().zfill(2) for p in spec.split(",") if p.strip()}
    if not out:
        raise ValueError("no speakers given")
    unknown = sorted(out - set(known))
    if unknown:
        raise ValueError(f"unknown speakers {unknown}; the corpus has {known}")
    return sorted(out)


def ravdess_sentences(choice: str) -> tuple[str, ...]:
    """--sentence 1 | 2 | both -> the statement codes (file name field 5) kept."""
    if choice == "both":
        return tuple(RAVDESS_SENTENCES)
    code = choice.zfill(2)
    if code not in RAVDESS_SENTENCES:
        raise ValueError(f"--sentence takes 1, 2 or both, got {choice!r}")
    return (code,)


def keep_sentences(clips: Iterable[Clip], sentences: Sequence[str]) -> list[Clip]:
    return [c for c in clips if c.sentence in sentences]


def output_tag(corpus: str, sentence: str, tag: str | None) -> str:
    """'' for the default mode (RAVDESS, both sentences), else what the results file names carry:
    `--tag` when given, else e.g. 'sentence2', 'emodb'."""
    if tag is not None:
        if not TAG.match(tag):
            raise ValueError(f"--tag must be letters, digits, '_', '-' or '.', got {tag!r}")
        return tag
    parts = [] if corpus == "ravdess" else [corpus]
    if sentence != "both":
        parts.append(f"sentence{sentence}")
    return "_".join(parts)


def output_paths(out: Path, tag: str) -> tuple[Path, Path]:
    stem = f"live_accuracy_{tag}" if tag else "live_accuracy"
    return out / f"{stem}.json", out / f"{stem}.png"


def dialogue_order(clips: Sequence[Clip], rng: np.random.Generator) -> list[Clip]:
    """One clip of each emotion per round (emotions in a fresh random order each round, clips of an
    emotion shuffled), so the first N clips cover N different emotions and --limit stays balanced."""
    groups: dict[str, list[Clip]] = {}
    for c in sorted(clips, key=lambda c: c.path.name):
        groups.setdefault(c.emotion, []).append(c)
    for g in groups.values():
        rng.shuffle(g)  # type: ignore[arg-type]
    order: list[Clip] = []
    while any(groups.values()):
        live = sorted(e for e, g in groups.items() if g)
        for k in rng.permutation(len(live)):
            order.append(groups[live[k]].pop())
    return order


def build_stream(clips: Sequence[np.ndarray], gap_s: float, noise_db: float,
                 rng: np.random.Generator) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """gap, clip, gap, clip, ..., gap: one float32 stream at 16 kHz and each clip's (start_s, end_s) in it.
    Gaps are Gaussian noise of `noise_db` dBFS RMS (a quiet room, not digital zeros)."""
    gap = int(round(gap_s * SR))
    amp = 10 ** (noise_db / 20)

    def noise() -> np.ndarray:
        return (amp * rng.standard_normal(gap)).astype(np.float32)

    parts, spans, pos = [noise()], [], gap
    for audio in clips:
        spans.append((pos / SR, (pos + len(audio)) / SR))
        parts += [np.asarray(audio, np.float32), noise()]
        pos += len(audio) + gap
    return np.concatenate(parts), spans


@dataclass
class Matched:
    """Which utterances fell on each clip of one session."""

    per_clip: list[list[int]]  # utterance ids assigned to each clip (largest overlap), by start time
    chosen: list[int | None]  # the utterance each clip is scored on: its longest, None when it has none
    stray: list[int] = field(default_factory=list)  # utterances overlapping no clip (noise in the gaps)
    spanning: list[int] = field(default_factory=list)  # utterances overlapping two or more clips (not split)


def match_clips(spans: Sequence[tuple[float, float]], utterances: Sequence[tuple[int, float, float]]) -> Matched:
    """Assign each utterance (id, start_s, end_s) to the clip span it overlaps most."""
    per_clip: list[list[tuple[float, int]]] = [[] for _ in spans]
    stray, spanning = [], []
    for uid, s, e in sorted(utterances, key=lambda u: u[1]):
        overlaps = [max(0.0, min(e, ce) - max(s, cs)) for cs, ce in spans]
        if not overlaps or max(overlaps) <= 0:
            stray.append(uid)
            continue
        if sum(o > 0 for o in overlaps) > 1:
            spanning.append(uid)
        per_clip[int(np.argmax(overlaps))].append((e - s, uid))
    chosen = [max(us)[1] if us else None for us in per_clip]  # longest; ties: the later id
    return Matched([[uid for _, uid in us] for us in per_clip], chosen, stray, spanning)


def score(true: Sequence[str], pred: Sequence[str], labels: Sequence[str]) -> dict[str, Any]:
    """classification_report over the model's labels plus "none" (no event: always wrong)."""
    from training.metrics import classification_report

    names = [*labels, NONE]
    unknown = sorted({p for p in [*true, *pred] if p not in names})
    if unknown:
        raise ValueError(f"labels outside the model's {list(labels)}: {unknown}")
    return classification_report([names.index(t) for t in true], [names.index(p) for p in pred], names)


def weight_stats(weights: Sequence[dict[str, float]]) -> dict[str, Any]:
    """Speech weight mean/median and the share of clips where speech outweighs text (the training
    report's `frac_speech_over_text`; `speech_gt_text` is the same number under this bench's older name)."""
    speech = np.array([w["speech"] for w in weights], dtype=np.float64)
    text = np.array([w["text"] for w in weights], dtype=np.float64)
    if not len(speech):
        return {"n": 0}
    over = float((speech > text).mean())
    return {"n": int(len(speech)), "speech_mean": float(speech.mean()), "speech_median": float(np.median(speech)),
            "frac_speech_over_text": over, "speech_gt_text": over}


def confidence_stats(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Over the clips whose emotion event carries `confidence`: the share marked "low" and the
    accuracy (percent) on the "ok" and the "low" ones. All null when no event carries the field."""
    rated = [r for r in records if r.get("confidence") in (LOW, OK)]
    low = [r for r in rated if r["confidence"] == LOW]
    ok = [r for r in rated if r["confidence"] == OK]

    def acc(rs: Sequence[Mapping[str, Any]]) -> float | None:
        return 100.0 * sum(r["pred"] == r["true"] for r in rs) / len(rs) if rs else None

    known = [r for r in records if r.get("familiar_voice") in (True, False)]
    unfamiliar = [r for r in known if r["familiar_voice"] is False]
    return {"n": len(rated), "n_low": len(low), "n_ok": len(ok),
            "low_share": len(low) / len(rated) if rated else None,
            "acc_ok": acc(ok), "acc_low": acc(low),
            "unrated_events": sum(1 for r in records if r["pred"] != NONE and r.get("confidence") not in (LOW, OK)),
            # familiar_voice (a checkpoint with training.familiar's check): the share of clips whose voice
            # was called unfamiliar, and the accuracy on those and on the rest
            "familiar_known": len(known), "unfamiliar_share": len(unfamiliar) / len(known) if known else None,
            "acc_familiar": acc([r for r in known if r["familiar_voice"]]), "acc_unfamiliar": acc(unfamiliar)}


# ---- the service and the sessions ---------------------------------------------------------------------
def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Service:
    """`python -m streamer --port 0 ...` in a child process; its URL from the line it prints."""

    def __init__(self, checkpoint: Path, modalities: str, device: str, log: Path, extra: Sequence[str] = ()) -> None:
        self.cmd = [sys.executable, "-m", "streamer", "--port", "0", "--checkpoint", str(checkpoint),
                    "--modalities", modalities, "--device", device, *extra]
        self.log = log
        self.proc: asyncio.subprocess.Process | None = None
        self.url = ""
        self._drain: asyncio.Task[None] | None = None

    async def __aenter__(self) -> "Service":
        self._log = open(self.log, "wb")
        self.proc = await asyncio.create_subprocess_exec(*self.cmd, cwd=ROOT, stdout=asyncio.subprocess.PIPE,
                                                         stderr=self._log)
        assert self.proc.stdout is not None
        try:
            while not self.url:
                line = (await asyncio.wait_for(self.proc.stdout.readline(), 600)).decode(errors="replace")
                if not line:
                    await self.proc.wait()
                    raise RuntimeError(f"service exited ({self.proc.returncode}) before listening; its log:\n"
                                       f"{self.log.read_text(errors='replace')[-3000:]}")
                m = LISTENING.search(line)
                if m:
                    self.url = m.group(1)
        except BaseException:
            await self.__aexit__()
            raise
        self._drain = asyncio.create_task(self._read_rest())
        return self

    async def _read_rest(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while await self.proc.stdout.readline():
            pass

    async def __aexit__(self, *exc: object) -> None:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)  # graceful: finishes utterances in flight
            try:
                await asyncio.wait_for(self.proc.wait(), 120)
            except asyncio.TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        if self._drain is not None:
            await self._drain
        self._log.close()


async def stream_session(url: str, session_id: str, audio: np.ndarray, speed: float, bar: Any) -> list[dict[str, Any]]:
    from clients import StreamClient, run_source
    from clients.audio import paced_chunks
    from streamer import protocol as P

    def on_event(ev: Any) -> None:
        if ev.type in (P.EMOTION, P.ERROR):
            bar.update(1)

    timeout = max(600.0, 3 * len(audio) / SR)
    for attempt in range(120):  # sessions run back to back: the service may still be busy with the last one
        try:
            async with StreamClient(url, sample_rate=SR, session_id=session_id, metadata={"bench": "live_accuracy"}) as client:
                events = await asyncio.wait_for(
                    run_source(client, paced_chunks(audio, SR, realtime=True, speed=speed), on_event=on_event), timeout)
            return [ev.data for ev in events]
        except RuntimeError as e:
            if "overloaded" not in str(e) or attempt == 119:
                raise
            await asyncio.sleep(1.0)  # refused by admission ("try again later"): nothing was streamed yet
    raise AssertionError("unreachable")


def score_session(clips: Sequence[Clip], spans: Sequence[tuple[float, float]],
                  events: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], Matched, int]:
    """Per-clip records (prediction, revised prediction, confidence, weights, transcript) of one session."""
    from streamer import protocol as P

    ended = [(e["utterance_id"], float(e["start_s"]), float(e["end_s"])) for e in events if e["type"] == P.UTTERANCE_ENDED]
    emotion = {e["utterance_id"]: e for e in events if e["type"] == P.EMOTION}
    revised = {e["utterance_id"]: e for e in events if e["type"] == P.EMOTION_REVISED}
    text = {e["utterance_id"]: e.get("text", "") for e in events if e["type"] == P.TRANSCRIPT}
    errors = sum(e["type"] == P.ERROR for e in events)
    m = match_clips(spans, ended)
    records = []
    for clip, (cs, ce), uids, uid in zip(clips, spans, m.per_clip, m.chosen):
        ev = emotion.get(uid) if uid is not None else None
        rev = revised.get(uid, ev) if uid is not None else None
        records.append({
            "file": clip.path.name, "speaker": clip.speaker, "emotion": clip.emotion, "true": clip.label,
            "sentence": clip.sentence, "intensity": clip.intensity or None,
            "start_s": round(cs, 3), "end_s": round(ce, 3),
            "utterances": uids, "utterance_id": uid,
            "pred": ev["label"] if ev else NONE,
            "pred_revised": rev["label"] if rev else NONE,
            "confidence": ev.get("confidence") if ev else None,  # absent from older servers' events
            "familiar_voice": ev.get("familiar_voice") if ev else None,  # absent when not known
            "scores": {k: round(v, 4) for k, v in ev["scores"].items()} if ev else None,
            "modality_weights": {k: round(v, 4) for k, v in ev["modality_weights"].items()} if ev else None,
            "transcript": text.get(uid) if uid is not None else None,
            "latency_ms": ev.get("latency_ms") if ev else None,
        })
    return records, m, errors


Sessions = dict[str, tuple[list[Clip], np.ndarray, list[tuple[float, float]]]]  # speaker -> clips, stream, spans


async def run_one(modalities: str, sessions: Sessions, prefix: str, a: argparse.Namespace, labels: Sequence[str],
                  log_dir: Path) -> dict[str, Any]:
    from tqdm import tqdm

    from streamer import protocol as P

    t_load = time.monotonic()
    records: list[dict[str, Any]] = []
    seg = {"clips": 0, "one_utterance": 0, "no_utterance": 0, "split": 0, "utterances": 0,
           "stray_utterances": 0, "spanning_utterances": 0, "errors": 0,
           "error_codes": {}}
    extra = [] if a.asr_window is None else ["--asr-window", str(a.asr_window)]
    async with Service(a.checkpoint, modalities, a.device, log_dir / f"service-{modalities}.log", extra) as svc:
        load_s = time.monotonic() - t_load
        t0 = time.monotonic()
        n_clips = sum(len(c) for c, _, _ in sessions.values())
        with tqdm(total=n_clips, desc=f"{modalities:6s}", unit="clip") as bar:
            for speaker, (clips, audio, spans) in sessions.items():
                events = await stream_session(svc.url, f"{prefix}{speaker}-{modalities}", audio, a.speed, bar)
                recs, m, errors = score_session(clips, spans, events)
                records += recs
                seg["clips"] += len(clips)
                seg["one_utterance"] += sum(len(u) == 1 for u in m.per_clip)
                seg["no_utterance"] += sum(not u for u in m.per_clip)
                seg["split"] += sum(len(u) > 1 for u in m.per_clip)
                seg["utterances"] += sum(len(u) for u in m.per_clip) + len(m.stray)
                seg["stray_utterances"] += len(m.stray)
                seg["spanning_utterances"] += len(m.spanning)
                seg["errors"] += errors
                for code in (str(e.get("code")) for e in events if e["type"] == P.ERROR):  # "overloaded", "internal", ...
                    seg["error_codes"][code] = seg["error_codes"].get(code, 0) + 1
        wall = time.monotonic() - t0
    true = [r["true"] for r in records]
    rep = score(true, [r["pred"] for r in records], labels)
    rev = score(true, [r["pred_revised"] for r in records], labels)
    weights = [r["modality_weights"] for r in records if r["modality_weights"]]
    other = {"speech": "text", "text": "speech"}.get(modalities)
    audio_s = sum(len(audio) for _, audio, _ in sessions.values()) / SR
    return {
        "modalities": modalities,
        "clips": len(records),
        **rep,
        "revised": {k: rev[k] for k in ("acc", "f1", "wa", "wf1", "n")},
        "modality_weights": weight_stats(weights),
        "confidence": confidence_stats(records),
        "fallback_clips": sum(1 for w in weights if other and w[other] > 0) if other else 0,
        "empty_transcripts": sum(1 for r in records if r["utterance_id"] is not None and not (r["transcript"] or "").strip()),
        "segmentation": seg,
        "wall_s": round(wall, 2),
        "service_load_s": round(load_s, 2),
        "audio_s": round(audio_s, 2),
        "records": records,
    }


def describe(report: dict[str, Any]) -> str:
    """What was streamed, for titles: 'RAVDESS actors [21], sentence 02' or 'EmoDB speakers 03, 08'."""
    if report["corpus"] == "ravdess":
        sent = "" if len(report["sentences"]) > 1 else f", sentence {report['sentences'][0]['id']}"
        return f"RAVDESS actors {report['actors']}{sent}"
    return f"EmoDB speakers {', '.join(report['speakers'])}"


def plot(report: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = list(report["runs"].values())
    labels = runs[0]["labels"]
    fig, axes = plt.subplots(1, len(runs), figsize=(5.2 * len(runs), 5.0), squeeze=False)
    for ax, r in zip(axes[0], runs):
        cm = np.asarray(r["confusion"], dtype=np.int64)
        keep = [i for i, lab in enumerate(labels) if lab != NONE]  # rows: true classes ("none" is never true)
        cm_rows = cm[keep]
        rows = cm_rows.sum(axis=1, keepdims=True)
        norm = np.divide(cm_rows, rows, out=np.zeros(cm_rows.shape), where=rows > 0)
        ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(keep)), [labels[i] for i in keep], fontsize=8)
        for i in range(len(keep)):
            for j in range(len(labels)):
                if cm_rows[i, j]:
                    ax.text(j, i, f"{cm_rows[i, j]}\n{100 * norm[i, j]:.0f}%", ha="center", va="center", fontsize=6,
                            color="white" if norm[i, j] > 0.5 else "black")
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        mw = r["modality_weights"]
        sw = f", speech w {mw['speech_mean']:.2f}" if mw.get("n") else ""
        ax.set_title(f"{r['modalities']}: acc {r['acc']:.1f}  WA {r['wa']:.1f}  WF1 {r['wf1']:.1f}{sw}", fontsize=9)
    fig.suptitle(f"live accuracy, {describe(report)} ({runs[0]['clips']} clips/run), "
                 f"{Path(report['checkpoint']).name}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def print_run(r: dict[str, Any]) -> None:
    from training.metrics import format_report

    seg, mw, conf = r["segmentation"], r["modality_weights"], r["confidence"]
    print(format_report(r, title=f"--modalities {r['modalities']}: {r['clips']} clips, wall {r['wall_s']:.0f} s "
                                  f"(+{r['service_load_s']:.0f} s loading)"))
    print(f"  revised: acc {r['revised']['acc']:.1f}  WA {r['revised']['wa']:.1f}  WF1 {r['revised']['wf1']:.1f};  "
          f"segmentation: {seg['one_utterance']}/{seg['clips']} clips = exactly one utterance, "
          f"{seg['split']} split, {seg['no_utterance']} missed, {seg['stray_utterances']} stray, "
          f"{seg['spanning_utterances']} spanning, {seg['errors']} errors")
    if mw.get("n"):
        print(f"  modality weights: speech mean {mw['speech_mean']:.3f}, median {mw['speech_median']:.3f}, "
              f"speech > text in {100 * mw['frac_speech_over_text']:.0f}% of clips; fallback clips {r['fallback_clips']}, "
              f"empty transcripts {r['empty_transcripts']}")
    def pct(x: float | None) -> str:
        return "-" if x is None else f"{x:.1f}"

    if conf["low_share"] is None:
        print("  confidence: the events carry no `confidence` field")
    else:
        print(f"  confidence: low on {100 * conf['low_share']:.0f}% of clips ({conf['n_low']}/{conf['n']}); "
              f"acc on ok {pct(conf['acc_ok'])} ({conf['n_ok']}), on low {pct(conf['acc_low'])}", flush=True)
    if conf.get("unfamiliar_share") is not None:
        print(f"  voice unfamiliar on {100 * conf['unfamiliar_share']:.0f}% of clips ({conf['familiar_known']} known); "
              f"acc on familiar {pct(conf['acc_familiar'])}, on unfamiliar {pct(conf['acc_unfamiliar'])}", flush=True)


def load_sessions(ap: argparse.ArgumentParser, a: argparse.Namespace, sentences: Sequence[str] | None) -> Sessions:
    """Each speaker's clips (the kept sentences, None: all; dialogue order; --limit) as one stream
    with the clips' spans."""
    from model.features import load_audio

    by_speaker: dict[str, list[Clip]] = {}
    if a.corpus == "ravdess":
        try:
            actors = parse_actors(a.actors or "21-24")
        except ValueError as e:
            ap.error(str(e))
        for actor in actors:
            folder = a.data / f"Actor_{actor:02d}"
            by_speaker[f"{actor:02d}"] = [c for c in read_ravdess(folder) if c.speaker == f"{actor:02d}"]
            if not by_speaker[f"{actor:02d}"]:
                ap.error(f"no RAVDESS clips in {folder}")
    else:
        try:
            clips = read_emodb(a.data)
            speakers = parse_speakers(a.speakers or "all", (c.speaker for c in clips))
        except ValueError as e:
            ap.error(str(e))
        by_speaker = {s: [c for c in clips if c.speaker == s] for s in speakers}

    sessions: Sessions = {}
    for speaker, clips in by_speaker.items():
        if sentences is not None:
            clips = keep_sentences(clips, sentences)
        if not clips:
            ap.error(f"{a.corpus} speaker {speaker}: no clips of sentence(s) {list(sentences)}")
        rng = np.random.default_rng([a.seed, int(speaker)])
        clips = dialogue_order(clips, rng)
        if a.limit > 0:
            clips = clips[: a.limit]
        audio, spans = build_stream([load_audio(str(c.path), sr=SR) for c in clips], a.gap, a.noise_db, rng)
        sessions[speaker] = (clips, audio, spans)
    return sessions


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--corpus", choices=CORPORA, default="ravdess", help="ravdess: the test actors; emodb: held-out corpus")
    ap.add_argument("--data", type=Path, default=None,
                    help="RAVDESS folder with Actor_XX/, or EmoDB folder with labels.csv and wav/ "
                         "(default: ../shared/data/<corpus>)")
    ap.add_argument("--actors", default=None, help="RAVDESS: e.g. 21-24 (default, the test actors) or 21,23")
    ap.add_argument("--speakers", default=None, help="EmoDB: e.g. 03,08 or all (default)")
    ap.add_argument("--sentence", choices=["1", "2", "both"], default="both",
                    help="RAVDESS: only statement 1 (Kids are talking ...) or 2 (Dogs are sitting ...)")
    ap.add_argument("--limit", type=int, default=0, help="clips per session (0: all; RAVDESS has 60 per actor)")
    ap.add_argument("--runs", default=",".join(RUNS), help="comma-separated --modalities values, one service run each")
    ap.add_argument("--checkpoint", type=Path, default=None, help="default: the bundled checkpoint")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--asr-window", type=float, default=None, metavar="S", help="the service's --asr-window (default: its own)")
    ap.add_argument("--speed", type=float, default=8.0, help="x real time (the service throttles beyond 20)")
    ap.add_argument("--gap", type=float, default=1.2, help="seconds of low noise before each clip")
    ap.add_argument("--noise-db", type=float, default=-60.0, help="gap noise level, dBFS RMS")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", default=None, help="results file names live_accuracy_<tag>.* (default: from the mode)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    a = ap.parse_args(argv)

    runs = [r.strip() for r in a.runs.split(",") if r.strip()]
    if not runs or any(r not in RUNS for r in runs):
        ap.error(f"--runs takes a comma-separated subset of {','.join(RUNS)}")
    if not 0 < a.speed <= 20:
        ap.error("--speed must be in (0, 20]: the service throttles faster sources")
    if a.corpus == "emodb" and (a.actors is not None or a.sentence != "both"):
        ap.error("--actors and --sentence are RAVDESS's; EmoDB takes --speakers")
    if a.corpus == "ravdess" and a.speakers is not None:
        ap.error("--speakers is EmoDB's; RAVDESS takes --actors")
    try:
        tag = output_tag(a.corpus, a.sentence, a.tag)
    except ValueError as e:
        ap.error(str(e))
    a.data = Path(a.data or DEFAULT_DATA[a.corpus]).resolve()
    from model import DEFAULT_CHECKPOINT
    from model.config import MELD_LABELS

    a.checkpoint = Path(a.checkpoint or DEFAULT_CHECKPOINT).resolve()
    if not a.checkpoint.is_file():
        ap.error(f"checkpoint not found: {a.checkpoint}")

    sessions = load_sessions(ap, a, ravdess_sentences(a.sentence) if a.corpus == "ravdess" else None)
    used = sorted({c.sentence for clips, _, _ in sessions.values() for c in clips})
    labels = list(MELD_LABELS)
    report: dict[str, Any] = {
        "what": f"emotion accuracy of the live path (VAD -> Whisper -> dialogue context -> model) on "
                f"{'RAVDESS test actors' if a.corpus == 'ravdess' else 'EmoDB (held-out corpus, German)'}, "
                f"one WebSocket session per {'actor' if a.corpus == 'ravdess' else 'speaker'}, scored from `emotion` events",
        "metrics": "training.metrics.classification_report: acc, f1 = macro F1, wa = mean per-class recall, "
                   "wf1 = support-weighted F1 (percent); 'none' = no emotion event, always wrong",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor(),
                    "python": platform.python_version(), "load_avg_at_start": os.getloadavg(),
                    "note": "shared machine: other jobs may run concurrently"},
        "git": git_state(),
        "checkpoint": os.path.relpath(a.checkpoint, ROOT),
        "checkpoint_sha256": sha256(a.checkpoint),
        "corpus": a.corpus,
        "tag": tag or None,
        "data": os.path.relpath(a.data, ROOT),
        **({"actors": [int(s) for s in sessions]} if a.corpus == "ravdess" else {}),
        "speakers": list(sessions),
        "sentence": a.sentence if a.corpus == "ravdess" else None,
        "sentences": [{"id": s, "text": RAVDESS_SENTENCES.get(s) if a.corpus == "ravdess" else None} for s in used],
        "limit": a.limit,
        "speed": a.speed, "gap_s": a.gap, "noise_dbfs": a.noise_db, "seed": a.seed, "device": a.device,
        "asr_min_window_s": a.asr_window if a.asr_window is not None else AsrConfig.min_window_s,
        "clip_choice": "longest utterance of a clip; no utterance or no emotion event -> 'none'",
        "label_map": TO_MELD[a.corpus],
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "runs": {},
    }
    with tempfile.TemporaryDirectory(prefix="live_accuracy-") as tmp:
        for modalities in runs:
            r = asyncio.run(run_one(modalities, sessions, SESSION_PREFIX[a.corpus], a, labels, Path(tmp)))
            report["runs"][modalities] = r
            print_run(r)
    a.out.mkdir(parents=True, exist_ok=True)
    out_json, out_png = output_paths(a.out, tag)
    out_json.write_text(json.dumps(report, indent=1))
    plot(report, out_png)
    print(f"wrote {out_json} and {out_png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
