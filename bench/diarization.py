"""Speakers within one channel (`"diarize": true`): who said each utterance of a conversation that
several people hold on one channel, and what it costs in latency. Two modes:

    .venv/bin/python bench/diarization.py --tune     # pick the clustering threshold on TRAINING speakers
    .venv/bin/python bench/diarization.py            # measure on TEST speakers, through the live service
    .venv/bin/python bench/diarization.py --conversations 1 --turns 6 --latency-conversations 1  # smoke run

Conversations are built from single-speaker recordings: 2, 3 or 4 speakers taking turns in a
random order (never the same speaker twice in a row, everyone within the first turns), each turn
1-8 s of one speaker's speech (their clips cut to the speech, `librosa.effects.trim` at 35 dB,
joined by 0.15 s of low noise so the VAD keeps a turn together), turns separated by 0.8-1.2 s of
low noise (-60 dBFS) so that the VAD ends each one. A speaker's clips are used without repetition
within a conversation until they run out.

--tune (offline, no service): RAVDESS actors 1-20 (60 clips each) and EmoDB's ten speakers, the
training speakers of the bundled model; the bench's test actors 21-24 are never used. The voice
space the clustering works in (streamer.pipeline.diarize.VoiceSpace, streamer/assets/voice_space.npz:
`--write-space` writes it) is fitted on every training clip: the voice model's mean embedding, and
a within-speaker whitening (WCCN) shrunk towards the identity by `shrink`. Conversations are built
within two speaker-disjoint folds (half of each corpus's speakers), cut into utterances by the
service's own segmenter (so a turn may be split, as live), and each utterance is embedded as the
service does (streamer.infer.voice) and counts its seconds of voice. The shrinkage is chosen by
2-fold cross-validation (space fitted and (cap, threshold) chosen on one fold, scored on the other);
then, with the space fitted on all clips, every (cap, threshold) of a grid replays every
conversation through streamer.pipeline.diarize online, and the pair with the best mean final
accuracy over 2, 3 and 4 speakers is reported (and is what streamer.config.DiarizeConfig ships).
Writes bench/results/diarization_tune.{json,png}.

Live (default): RAVDESS test actors 21-24 plus two real-speech voices from ../shared/data/speech
(LJ001-*.wav: LJ Speech's reader; jfk.flac: J. F. Kennedy, cut into its 4 phrases where the
service's segmenter finds the pauses). These two have only 4 recordings each, so their turns repeat
the same audio within a conversation: each repeated phrase keeps its own quirks instead of averaging
out as a real speaker's varied utterances do, so it can become a cluster of its own (the report also
gives the RAVDESS-only conversations). A fresh
`python -m streamer --port 0` runs in a child process; each conversation is one WebSocket session
with `diarize: true`, streamed at --speed x real time (the segmenter and the clustering run on
audio time, so speed changes only the wall clock). Then --latency-conversations of them are
streamed again at real time with diarize off and on, alternating (off, on, on, off, ...), for
end of speech -> emotion latency: the server's `latency_ms` and the client's own clock (the
arrival of `emotion` minus the moment the audio holding the end of speech was sent).

Scoring: every `utterance.ended` is matched to the turn it overlaps most (bench/live_accuracy.py's
match_clips); its true speaker is that turn's. Its predicted speaker is `speaker` on its
`transcript` (live: as first published) and after every `speaker.revised` (final). Accuracy is the
share of utterances right under the best one-to-one mapping of predicted labels to speakers
(Hungarian, scipy.optimize.linear_sum_assignment); an utterance without a label is wrong.
Speaker-count error: |labels used at the end - speakers|. Writes bench/results/diarization.{json,png}
with the commit and the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.live_accuracy import Service, match_clips  # noqa: E402
from bench.provenance import git_state  # noqa: E402

SR = 16_000
DATA = ROOT.parent / "shared" / "data"
TRIM_DB = 35.0
JOIN_S = 0.15  # noise between the clips of one turn (well under the VAD's 0.5 s)
PRE_S, TAIL_S = 0.4, 0.25  # what the segmenter keeps around an utterance (SegmenterConfig)
NOISE_DB = -60.0
TRAIN_ACTORS = range(1, 21)
TEST_ACTORS = range(21, 25)


# ---- pure parts (tests/test_diarization_bench.py) ------------------------------------------------------
@dataclass(frozen=True)
class Turn:
    speaker: str
    audio: np.ndarray


def noise(seconds: float, rng: np.random.Generator, db: float = NOISE_DB) -> np.ndarray:
    return (10 ** (db / 20) * rng.standard_normal(int(round(seconds * SR)))).astype(np.float32)


def speaker_order(speakers: Sequence[str], n_turns: int, rng: np.random.Generator) -> list[str]:
    """Who speaks each turn: everyone once first (random order), then at random, never twice in a row."""
    order = [speakers[i] for i in rng.permutation(len(speakers))]
    while len(order) < n_turns:
        others = [s for s in speakers if s != order[-1]] or list(speakers)
        order.append(others[int(rng.integers(len(others)))])
    return order[:n_turns]


def build_turn(pieces: list[np.ndarray], target_s: float, max_s: float, rng: np.random.Generator) -> np.ndarray:
    """Pieces taken from the front of `pieces` (consumed) joined by JOIN_S of noise until the turn
    lasts `target_s`; a piece that would pass `max_s` ends it (the first piece is always taken)."""
    parts: list[np.ndarray] = []
    dur = 0.0
    while pieces and dur < target_s:
        nxt = len(pieces[0]) / SR
        if parts and dur + JOIN_S + nxt > max_s:
            break
        if parts:
            parts.append(noise(JOIN_S, rng))
            dur += JOIN_S
        parts.append(pieces.pop(0))
        dur += nxt
    return np.concatenate(parts)


def make_conversation(voices: dict[str, list[np.ndarray]], speakers: Sequence[str], n_turns: int,
                      rng: np.random.Generator, min_s: float = 1.0, max_s: float = 8.0) -> list[Turn]:
    """`n_turns` turns of `speakers` (their pieces in `voices`), each 1-8 s (uniform target)."""
    queues: dict[str, list[np.ndarray]] = {s: [] for s in speakers}
    turns = []
    for s in speaker_order(speakers, n_turns, rng):
        target = float(rng.uniform(min_s, max_s))
        audio = np.zeros(0, np.float32)
        while len(audio) / SR < min_s:
            if not queues[s]:  # every piece used: start again, shuffled
                queues[s] = [voices[s][i] for i in rng.permutation(len(voices[s]))]
            more = build_turn(queues[s], target - len(audio) / SR, max_s - len(audio) / SR, rng)
            audio = more if not len(audio) else np.concatenate([audio, noise(JOIN_S, rng), more])
        turns.append(Turn(s, audio))
    return turns


def assemble(turns: Sequence[Turn], rng: np.random.Generator, gap_s: tuple[float, float] = (0.8, 1.2)
             ) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """gap, turn, gap, turn, ..., gap as one stream, and each turn's (start_s, end_s) in it."""
    parts, spans, pos = [noise(1.0, rng)], [], SR
    for t in turns:
        spans.append((pos / SR, (pos + len(t.audio)) / SR))
        gap = noise(float(rng.uniform(*gap_s)), rng)
        parts += [t.audio, gap]
        pos += len(t.audio) + len(gap)
    parts.append(noise(1.0, rng))
    return np.concatenate(parts), spans


def mapped_accuracy(true: Sequence[str], pred: Sequence[str | None]) -> float:
    """Share of utterances right under the best one-to-one mapping of predicted labels onto true
    speakers (Hungarian); None (no label) is always wrong."""
    from scipy.optimize import linear_sum_assignment

    if not true:
        return float("nan")
    ts = sorted(set(true))
    ps = sorted({p for p in pred if p is not None})
    if not ps:
        return 0.0
    m = np.zeros((len(ps), len(ts)))
    for p, t in zip(pred, true):
        if p is not None:
            m[ps.index(p), ts.index(t)] += 1
    rows, cols = linear_sum_assignment(-m)
    return float(m[rows, cols].sum() / len(true))


def labels_from_events(events: Sequence[dict[str, Any]]) -> tuple[dict[int, str], dict[int, str], int]:
    """(live, final, revisions): each utterance's `speaker` as its transcript carried it, and after
    every speaker.revised."""
    live, final, revisions = {}, {}, 0
    for e in events:
        if e["type"] == "transcript" and e.get("speaker"):
            live[e["utterance_id"]] = final[e["utterance_id"]] = e["speaker"]
        elif e["type"] == "speaker.revised":
            final[e["utterance_id"]] = e["speaker"]
            revisions += 1
    return live, final, revisions


def score_conversation(turns: Sequence[Turn], spans: Sequence[tuple[float, float]],
                       events: Sequence[dict[str, Any]]) -> dict[str, Any]:
    ended = [(e["utterance_id"], float(e["start_s"]), float(e["end_s"])) for e in events if e["type"] == "utterance.ended"]
    m = match_clips(spans, ended)
    uids = [(uid, turns[i].speaker) for i, us in enumerate(m.per_clip) for uid in us]
    turn_of = {uid: i for i, us in enumerate(m.per_clip) for uid in us}
    times = {uid: (s, e) for uid, s, e in ended}
    live, final, revisions = labels_from_events(events)
    true = [s for _, s in uids]
    n_true = len({t.speaker for t in turns})
    used = {final[u] for u, _ in uids if u in final}
    return {
        "speakers": n_true, "turns": len(turns), "utterances": len(uids),
        "turns_split": sum(len(us) > 1 for us in m.per_clip), "turns_missed": sum(not us for us in m.per_clip),
        "stray": len(m.stray), "spanning": len(m.spanning),
        "acc_live": mapped_accuracy(true, [live.get(u) for u, _ in uids]),
        "acc_final": mapped_accuracy(true, [final.get(u) for u, _ in uids]),
        "correct_final": round(mapped_accuracy(true, [final.get(u) for u, _ in uids]) * len(uids)),
        "correct_live": round(mapped_accuracy(true, [live.get(u) for u, _ in uids]) * len(uids)),
        "labels_used": len(used), "count_error": abs(len(used) - n_true),
        "unlabelled": sum(u not in live for u, _ in uids), "revisions": revisions,
        "errors": [e.get("code") for e in events if e["type"] == "error"],
        # per utterance: the turn it fell in, who said it, and its label as first published and at the end
        "labels": [{"utterance_id": u, "turn": turn_of[u], "start_s": times[u][0], "end_s": times[u][1],
                    "true": s, "live": live.get(u), "final": final.get(u)} for u, s in uids],
    }


def replay(embeddings: np.ndarray, seconds: Sequence[float], threshold: float, cap: float,
           space: Any) -> tuple[list[str], list[str]]:
    """Online clustering of one conversation's utterances as the service does it (each weighted by
    its seconds of voice, streamer.pipeline.speakers) in `space` (a VoiceSpace): (live labels, final labels)."""
    from streamer.pipeline.diarize import SpeakerClusters
    from streamer.pipeline.speakers import MIN_WEIGHT_S

    c = SpeakerClusters(threshold, cap=cap, space=space, window=64)
    live = [c.add(i, e, max(w, MIN_WEIGHT_S))[0] for i, (e, w) in enumerate(zip(embeddings, seconds))]
    return live, [c.labels[i] for i in range(len(embeddings))]


def speaker_folds(speakers: Sequence[str]) -> tuple[set[str], set[str]]:
    """Two speaker-disjoint halves of the training speakers for cross-validation: of each corpus
    (the name's first letter: A = RAVDESS actor, E = EmoDB speaker), the first half and the rest in
    sorted order."""
    first: set[str] = set()
    for corpus in sorted({s[0] for s in speakers}):
        names = sorted(s for s in speakers if s[0] == corpus)
        first |= set(names[: len(names) // 2])
    return first, set(speakers) - first


@dataclass(frozen=True)
class Embedded:
    """One tuning conversation as the service would see it: per utterance its true speaker, voice
    embedding and seconds of voice."""

    fold: int  # its speakers' fold (speaker_folds)
    speakers: int
    who: list[str]
    embeddings: np.ndarray
    seconds: list[float]


def grid_scores(convs: Sequence[Embedded], space: Any, caps: Sequence[float],
                thresholds: Sequence[float]) -> list[dict[str, Any]]:
    """Every (cap, threshold): final and live accuracy and speaker-count error per number of speakers,
    and their mean final accuracy."""
    grid: list[dict[str, Any]] = []
    for cap in caps:
        for th in thresholds:
            res: dict[str, list[tuple[float, float, int]]] = {}
            for c in convs:
                live, final = replay(c.embeddings, c.seconds, float(th), cap, space)
                res.setdefault(str(c.speakers), []).append((mapped_accuracy(c.who, final), mapped_accuracy(c.who, live),
                                                            abs(len(set(final)) - c.speakers)))
            per_n = {k: {"acc_final": float(np.mean([r[0] for r in v])), "acc_live": float(np.mean([r[1] for r in v])),
                         "count_error": float(np.mean([r[2] for r in v]))} for k, v in sorted(res.items())}
            grid.append({"cap": cap, "threshold": float(th), "per_speakers": per_n,
                         "mean_acc_final": float(np.mean([p["acc_final"] for p in per_n.values()]))})
    return grid


def cross_validate(clips: dict[str, np.ndarray], folds: tuple[set[str], set[str]], convs: Sequence[Embedded],
                   shrink: float, caps: Sequence[float], thresholds: Sequence[float]) -> dict[str, Any]:
    """Speaker-disjoint 2-fold: the voice space is fitted on one fold's clips and (cap, threshold)
    chosen on that fold's conversations, then scored on the other fold's conversations (each
    conversation's `fold` indexes `folds`)."""
    from streamer.pipeline.diarize import VoiceSpace

    out = []
    for held in (0, 1):
        fit = 1 - held
        space = VoiceSpace.fit([clips[s] for s in sorted(folds[fit])], shrink)
        best = max(grid_scores([c for c in convs if c.fold == fit], space, caps, thresholds), key=lambda g: g["mean_acc_final"])
        score = grid_scores([c for c in convs if c.fold == held], space, [best["cap"]], [best["threshold"]])[0]
        out.append({"held_out_fold": held, "chosen_on_the_other": {"cap": best["cap"], "threshold": best["threshold"]},
                    "per_speakers": score["per_speakers"], "mean_acc_final": score["mean_acc_final"]})
    return {"shrink": shrink, "folds": out, "mean_acc_final": float(np.mean([f["mean_acc_final"] for f in out]))}


def segment(audio: np.ndarray) -> list[Any]:
    """The utterances the service's segmenter cuts from `audio` (default SegmenterConfig, 100 ms chunks)."""
    from streamer.config import SegmenterConfig
    from streamer.pipeline.segmenter import Segmenter, SpeechEnded

    seg = Segmenter(SegmenterConfig())
    events = [e for i in range(0, len(audio), SR // 10) for e in seg.feed(audio[i : i + SR // 10])]
    return [e for e in [*events, *seg.flush()] if isinstance(e, SpeechEnded)]


# ---- voices --------------------------------------------------------------------------------------------
def trimmed(path: Path) -> np.ndarray:
    import librosa

    from model.features import load_audio

    audio = load_audio(str(path), sr=SR)
    return librosa.effects.trim(audio, top_db=TRIM_DB)[0].astype(np.float32)


def phrases(audio: np.ndarray, min_s: float = 0.8) -> list[np.ndarray]:
    """A recording cut at the pauses the service's segmenter finds (its phrases), each trimmed as the
    other voices' clips are; one shorter than `min_s` joins the next. (librosa.effects.split at
    TRIM_DB, used before, found no pause in jfk.flac, whose pauses carry the recording's hiss: every
    JFK turn was then the whole 10.8 s recording, past the turns' 8 s.)"""
    import librosa

    lead = noise(1.0, np.random.default_rng(0))  # as in a conversation: the segmenter starts on low noise
    out, cur = [], np.zeros(0, np.float32)
    for e in segment(np.concatenate([lead, audio, lead])):
        piece = librosa.effects.trim(e.audio, top_db=TRIM_DB)[0].astype(np.float32)
        cur = np.concatenate([cur, piece]) if len(cur) else piece
        if len(cur) >= min_s * SR:
            out.append(cur)
            cur = np.zeros(0, np.float32)
    if len(cur):
        out.append(cur)
    return out


def ravdess_voices(actors: Sequence[int]) -> dict[str, list[np.ndarray]]:
    return {f"A{a:02d}": [trimmed(p) for p in sorted((DATA / "ravdess" / f"Actor_{a:02d}").glob("*.flac"))]
            for a in actors}


def emodb_voices() -> dict[str, list[np.ndarray]]:
    with open(DATA / "emodb" / "labels.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return {f"E{s}": [trimmed(DATA / "emodb" / "wav" / r["file"]) for r in rows if r["speaker"] == s]
            for s in sorted({r["speaker"] for r in rows})}


def speech_voices() -> dict[str, list[np.ndarray]]:
    lj = [trimmed(p) for p in sorted((DATA / "speech").glob("LJ001-*.wav"))]
    return {"LJ": lj, "JFK": phrases(trimmed(DATA / "speech" / "jfk.flac"))}


def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor(),
            "python": platform.python_version(), "load_avg_at_start": list(os.getloadavg()),
            "note": "shared machine: other jobs may run concurrently"}


# ---- --tune ------------------------------------------------------------------------------------------
def tune(a: argparse.Namespace) -> int:
    from tqdm import tqdm

    from streamer.infer.voice import SPACE_FILE, VoiceEmbedder
    from streamer.pipeline.diarize import VoiceSpace

    import torch

    torch.set_num_threads(1)  # as in the service with two decoders
    started, t_start = machine(), time.time()
    rng = np.random.default_rng(a.seed)
    embedder = VoiceEmbedder(device=a.device)
    corpora = {"ravdess": ravdess_voices(TRAIN_ACTORS), "emodb": emodb_voices()}

    def pad(x: np.ndarray) -> np.ndarray:
        return np.concatenate([noise(PRE_S, rng), x, noise(TAIL_S, rng)])

    t0, n_clips = time.perf_counter(), sum(len(v) for voices in corpora.values() for v in voices.values())
    bar = tqdm(total=n_clips, desc="training clips", unit="clip")
    clips: dict[str, np.ndarray] = {}
    for voices in corpora.values():
        for who, audio in voices.items():
            clips[who] = np.stack([embedder.embed_now(pad(c))[0] for c in audio])
            bar.update(len(audio))
    bar.close()
    embed_s = (time.perf_counter() - t0) / n_clips
    folds = speaker_folds(sorted(clips))
    plans = []
    for voices in corpora.values():
        for fold, members in enumerate(folds):
            names = sorted(s for s in voices if s in members)
            for n in (2, 3, 4):
                for _ in range(a.conversations):
                    who = [names[i] for i in rng.choice(len(names), n, replace=False)]
                    turns = make_conversation(voices, who, a.turns, rng)
                    plans.append((fold, n, turns, *assemble(turns, rng)))
    convs: list[Embedded] = []
    n_utt, n_split = 0, 0
    for fold, n, turns, audio, spans in tqdm(plans, desc="conversations", unit="conv"):
        ends = segment(audio)  # the utterances as the live service cuts them: a turn may be split
        m = match_clips(spans, [(k, e.start_s, e.end_s) for k, e in enumerate(ends)])
        truth = {u: turns[i].speaker for i, us in enumerate(m.per_clip) for u in us}
        voices_ = [(truth[k], embedder.embed_now(e.audio)) for k, e in enumerate(ends) if k in truth]
        voices_ = [(who, v) for who, v in voices_ if v is not None]
        n_utt += len(voices_)
        n_split += sum(len(us) > 1 for us in m.per_clip)
        convs.append(Embedded(fold, n, [w for w, _ in voices_], np.stack([v[0] for _, v in voices_]),
                              [v[1] for _, v in voices_]))
    thresholds = [float(t) for t in np.round(np.arange(a.th_min, a.th_max + 1e-9, a.th_step), 3)]
    cv = [cross_validate(clips, folds, convs, shrink, a.caps, thresholds) for shrink in tqdm(a.shrinks, desc="cross-validation")]
    for r in cv:
        per_fold = " / ".join(f"{100 * f['mean_acc_final']:.1f}" for f in r["folds"])
        print(f"shrink {r['shrink']}: cross-validated mean final accuracy {100 * r['mean_acc_final']:.1f}% ({per_fold})", flush=True)
    # the best cross-validated shrinkage; a tie goes to the larger one (closer to centring only)
    shrink = max(cv, key=lambda r: (round(r["mean_acc_final"], 4), r["shrink"]))["shrink"]
    space = VoiceSpace.fit([clips[s] for s in sorted(clips)], shrink)
    grid = grid_scores(convs, space, a.caps, thresholds)
    best = max(grid, key=lambda g: g["mean_acc_final"])
    report = {
        "what": "choice of the diarization voice space (within-speaker whitening shrinkage, by speaker-disjoint "
                "2-fold cross-validation) and clustering (capped-Ward merge threshold and cap) on training speakers: "
                "RAVDESS actors 1-20 and EmoDB; never the bench's test actors 21-24",
        "machine": {**started, "load_avg_at_end": list(os.getloadavg())}, "git": git_state(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t_start)),
        "conversations": len(convs), "turns": a.turns, "seed": a.seed,
        "folds": [sorted(f) for f in folds], "utterances": n_utt, "turns_split_by_the_vad": n_split,
        "weighting": "each utterance counts its seconds of voice (streamer.pipeline.speakers)",
        "embedding_ms_per_clip": round(1000 * embed_s, 1), "training_clips": n_clips,
        "cross_validation": cv, "shrink": shrink, "best": best, "grid": grid,
        "minutes": round((time.time() - t_start) / 60, 1),
    }
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "diarization_tune.json").write_text(json.dumps(report, indent=1))
    plot_tune(report, a.out / "diarization_tune.png")
    if a.write_space:
        space.save(SPACE_FILE)
        print(f"wrote {SPACE_FILE}")
    print(f"shrink {shrink}; best: cap {best['cap']}, threshold {best['threshold']}: "
          + ", ".join(f"{k} speakers final {100 * v['acc_final']:.1f}% live {100 * v['acc_live']:.1f}% "
                      f"count error {v['count_error']:.2f}" for k, v in best["per_speakers"].items()))
    print(f"wrote {a.out / 'diarization_tune.json'} and .png")
    return 0


def plot_tune(report: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cap = report["best"]["cap"]
    rows = [g for g in report["grid"] if g["cap"] == cap]
    ths = [g["threshold"] for g in rows]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    for k in rows[0]["per_speakers"]:
        line, = ax.plot(ths, [100 * g["per_speakers"][k]["acc_final"] for g in rows], label=f"{k} speakers, final")
        ax.plot(ths, [100 * g["per_speakers"][k]["acc_live"] for g in rows], "--", color=line.get_color(), label="live")
        bx.plot(ths, [g["per_speakers"][k]["count_error"] for g in rows], color=line.get_color(), label=f"{k} speakers")
    for x in (ax, bx):
        x.axvline(report["best"]["threshold"], color="grey", lw=0.8)
        x.set_xlabel("merge threshold")
        x.legend(fontsize=7)
    ax.set_ylabel("utterances right (%)")
    bx.set_ylabel("|labels - speakers|")
    fig.suptitle(f"diarization on training speakers (RAVDESS 1-20, EmoDB), whitening shrink {report['shrink']}, "
                 f"cap {cap}: {report['conversations']} conversations", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


# ---- live ----------------------------------------------------------------------------------------------
async def stream_conversation(url: str, session_id: str, audio: np.ndarray, diarize: bool, speed: float
                              ) -> tuple[list[dict[str, Any]], dict[int, float]]:
    """One session; every event, and the client-clock latency (s) of each emotion event."""
    from clients import StreamClient, run_source
    from clients.audio import paced_chunks

    sent: list[tuple[float, float]] = []  # (stream position s, when that chunk was handed to the socket)
    arrived: dict[int, float] = {}

    async def chunks() -> AsyncIterator[np.ndarray]:
        pos = 0
        async for c in paced_chunks(audio, SR, realtime=True, speed=speed):
            pos += len(c)
            sent.append((pos / SR, time.monotonic()))
            yield c

    def on_event(ev: Any) -> None:
        if ev.type == "emotion":
            arrived[ev.get("utterance_id")] = time.monotonic()

    for attempt in range(120):
        try:
            async with StreamClient(url, sample_rate=SR, session_id=session_id, diarize=diarize,
                                    metadata={"bench": "diarization"}) as client:
                events = [ev.data for ev in await run_source(client, chunks(), on_event=on_event)]
            break
        except RuntimeError as e:  # refused by admission after the fast runs: try again shortly
            if "overloaded" not in str(e) or attempt == 119:
                raise
            await asyncio.sleep(1.0)
    ends = {e["utterance_id"]: float(e["end_s"]) for e in events if e["type"] == "utterance.ended"}
    client = {}
    for uid, t in arrived.items():
        when = next((w for p, w in sent if p >= ends.get(uid, 0.0) - 1e-6), sent[-1][1])
        client[uid] = t - when
    return events, client


def pct(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


async def live_run(a: argparse.Namespace, convs: list[dict[str, Any]], lat_convs: list[dict[str, Any]],
                   log_dir: Path) -> dict[str, Any]:
    """Every conversation with diarize at --speed; then each of `lat_convs` in real time, diarize
    off and on (the order alternating), in one service."""
    from tqdm import tqdm

    out: dict[str, Any] = {"accuracy": [], "latency": {"off": [], "on": []}}
    t_load = time.monotonic()
    async with Service(a.checkpoint, "both", a.device, log_dir / "service.log") as svc:
        out["service_load_s"] = round(time.monotonic() - t_load, 1)
        t0 = time.monotonic()
        for c in tqdm(convs, desc=f"accuracy ({a.speed:g}x)", unit="conv"):
            events, _ = await stream_conversation(svc.url, f"diar-{c['id']}", c["audio"], True, a.speed)
            out["accuracy"].append({**c["meta"], **score_conversation(c["turns"], c["spans"], events)})
        out["accuracy_wall_s"] = round(time.monotonic() - t0, 1)
        order = [("off", "on"), ("on", "off")]
        t0 = time.monotonic()
        for k, c in enumerate(tqdm(lat_convs, desc="latency (1x)", unit="conv")):
            for mode in order[k % 2]:
                events, client = await stream_conversation(svc.url, f"lat-{mode}-{c['id']}", c["audio"], mode == "on", 1.0)
                for e in events:
                    if e["type"] == "emotion":
                        out["latency"][mode].append({"conversation": c["id"], "utterance_id": e["utterance_id"],
                                                     "server_ms": e["latency_ms"],
                                                     "client_ms": round(1000 * client.get(e["utterance_id"], float("nan")), 1),
                                                     "speaker": e.get("speaker")})
        out["latency_wall_s"] = round(time.monotonic() - t0, 1)
    return out


def summarize(accuracy: list[dict[str, Any]], subset: str | None = None) -> dict[str, Any]:
    rows = [r for r in accuracy if subset is None or r["voices"] == subset]
    out = {}
    for n in sorted({r["speakers"] for r in rows}):
        rs = [r for r in rows if r["speakers"] == n]
        utt = sum(r["utterances"] for r in rs)
        out[str(n)] = {
            "conversations": len(rs), "utterances": utt,
            "acc_final": sum(r["correct_final"] for r in rs) / utt if utt else None,
            "acc_live": sum(r["correct_live"] for r in rs) / utt if utt else None,
            "count_error_mean": float(np.mean([r["count_error"] for r in rs])),
            "count_exact": sum(r["count_error"] == 0 for r in rs),
            "revisions_per_conversation": float(np.mean([r["revisions"] for r in rs])),
            "unlabelled": sum(r["unlabelled"] for r in rs),
        }
    return out


def paired_added_ms(latency: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """What diarize adds per utterance: each utterance streamed both ways (same conversation and id),
    client latency on minus off. The p50s of ~30 utterances jump between the utterances whose
    speculative decode was ready when the silence wait ended (~0.51 s) and the rest (0.55-0.85 s),
    so their difference moves far more from run to run than these paired figures do."""
    off: dict[tuple[str, int], list[float]] = {}
    for r in latency.get("off", []):
        off.setdefault((r["conversation"], r["utterance_id"]), []).append(r["client_ms"])
    diffs = [r["client_ms"] - float(np.mean(off[k])) for r in latency.get("on", [])
             if (k := (r["conversation"], r["utterance_id"])) in off and np.isfinite(r["client_ms"])]
    diffs = [d for d in diffs if np.isfinite(d)]
    return {"pairs": len(diffs), "median_ms": pct(diffs, 50), "mean_ms": float(np.mean(diffs)) if diffs else None,
            "p90_ms": pct(diffs, 90)}


def live(a: argparse.Namespace) -> int:
    from model import DEFAULT_CHECKPOINT

    started, t_start = machine(), time.time()
    rng = np.random.default_rng(a.seed)
    voices = {**ravdess_voices(TEST_ACTORS), **speech_voices()}
    names = sorted(voices)
    convs = []
    for n in (2, 3, 4):
        for k in range(a.conversations):
            pool = [s for s in names if s.startswith("A")] if k == 0 else names  # the first: RAVDESS only (no repeats)
            who = [pool[i] for i in rng.choice(len(pool), n, replace=False)]
            turns = make_conversation(voices, who, a.turns, rng)
            audio, spans = assemble(turns, rng)
            kind = "ravdess" if all(s.startswith("A") for s in who) else "mixed"
            convs.append({"id": f"{n}-{k}", "turns": turns, "spans": spans, "audio": audio,
                          "meta": {"id": f"{n}-{k}", "voices": kind, "who": who,
                                   "audio_s": round(len(audio) / SR, 1)}})
    # latency pairs: the first conversation of each size in turn (2, 3, 4, then the second of each, ...)
    by_size = sorted(convs, key=lambda c: (int(c["id"].split("-")[1]), c["id"]))
    a.checkpoint = Path(a.checkpoint or DEFAULT_CHECKPOINT).resolve()
    with tempfile.TemporaryDirectory(prefix="diarization-") as tmp:
        res = asyncio.run(live_run(a, convs, by_size[: a.latency_conversations], Path(tmp)))
    lat = {}
    for mode, rows in res["latency"].items():
        s = [r["server_ms"] for r in rows]
        c = [r["client_ms"] for r in rows if np.isfinite(r["client_ms"])]
        lat[mode] = {"n": len(s), "server_p50_ms": pct(s, 50), "server_p95_ms": pct(s, 95),
                     "client_p50_ms": pct(c, 50), "client_p95_ms": pct(c, 95)}
    added = {k: (lat["on"][k] - lat["off"][k]) if lat["on"][k] is not None and lat["off"][k] is not None else None
             for k in ("server_p50_ms", "client_p50_ms")}
    report = {
        "what": "speaker labels of diarized one-channel conversations through the live service (VAD -> voice "
                "embedding -> online clustering), and the end of speech -> emotion latency with diarize off vs on",
        "voices": {"ravdess_test_actors": [f"A{x}" for x in TEST_ACTORS], "speech": ["LJ (LJ001-*.wav)", "JFK (jfk.flac)"]},
        "note": "LJ and JFK have 4 recordings each: their turns repeat audio within a conversation; "
                "'ravdess_only' excludes them",
        "machine": started, "git": git_state(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t_start)),
        "checkpoint": os.path.relpath(a.checkpoint, ROOT), "speed": a.speed, "turns": a.turns, "seed": a.seed,
        "device": a.device,
        "targets": {"acc_2_speakers": 0.90, "acc_4_speakers": 0.80, "added_p50_ms": 50},
        "summary": summarize(res["accuracy"]), "ravdess_only": summarize(res["accuracy"], "ravdess"),
        "latency": lat, "added_latency_p50_ms": added, "added_latency_paired": paired_added_ms(res["latency"]),
        "service_load_s": res["service_load_s"], "accuracy_wall_s": res["accuracy_wall_s"],
        "latency_wall_s": res["latency_wall_s"],
        "conversations": res["accuracy"], "latency_utterances": res["latency"],
    }
    report["machine"]["load_avg_at_end"] = list(os.getloadavg())
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "diarization.json").write_text(json.dumps(report, indent=1))
    plot_live(report, a.out / "diarization.png")
    for k, v in report["summary"].items():
        print(f"{k} speakers: {v['utterances']} utterances in {v['conversations']} conversations, "
              f"right {100 * v['acc_final']:.1f}% final / {100 * v['acc_live']:.1f}% live, "
              f"count error {v['count_error_mean']:.2f} (exact {v['count_exact']}/{v['conversations']}), "
              f"{v['revisions_per_conversation']:.1f} revisions per conversation")
    for mode, v in lat.items():
        print(f"diarize {mode}: {v['n']} emotions, end of speech -> emotion p50 server {v['server_p50_ms']} ms, "
              f"client {v['client_p50_ms']} ms")
    print(f"added p50: {added}")
    print(f"wrote {a.out / 'diarization.json'} and .png")
    return 0


def plot_live(report: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    ks = list(report["summary"])
    x = np.arange(len(ks))
    ax.bar(x - 0.2, [100 * report["summary"][k]["acc_final"] for k in ks], 0.4, label="final (after speaker.revised)")
    ax.bar(x + 0.2, [100 * report["summary"][k]["acc_live"] for k in ks], 0.4, label="live (on the transcript)")
    for target, k in ((90, "2"), (80, "4")):
        if k in ks:
            i = ks.index(k)
            ax.hlines(target, i - 0.45, i + 0.45, colors="red", linestyles="dashed")
    ax.set_xticks(x, [f"{k} speakers" for k in ks])
    ax.set_ylim(0, 100)
    ax.set_ylabel("utterances right (%)")
    ax.legend(fontsize=8, loc="lower left")
    ax.set_title("speaker accuracy (RAVDESS 21-24, LJ, JFK)", fontsize=9)
    data = [[r["server_ms"] for r in report["latency_utterances"][m]] for m in ("off", "on")]
    if all(data):
        bx.boxplot(data, tick_labels=["diarize off", "diarize on"])
    lat = report["latency"]
    bx.set_ylabel("end of speech -> emotion (ms, server)")
    bx.set_title(f"p50 off {lat['off']['server_p50_ms']} ms, on {lat['on']['server_p50_ms']} ms (real time)", fontsize=9)
    fig.suptitle(f"diarization through the live service, {report['machine']['cpus']} CPU cores", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--tune", action="store_true", help="pick the clustering parameters on training speakers (offline)")
    ap.add_argument("--write-space", action="store_true", help="with --tune: write streamer/assets/voice_space.npz")
    ap.add_argument("--shrinks", type=float, nargs="+", default=[0.2, 0.5, 0.8, 1.0],
                    help="--tune: within-speaker whitening shrinkages cross-validated (1: centring only)")
    ap.add_argument("--conversations", type=int, default=None,
                    help="per number of speakers (2, 3, 4); default 4 live, 6 per corpus and fold with --tune")
    ap.add_argument("--turns", type=int, default=None, help="turns per conversation (default 12 live, 16 --tune)")
    ap.add_argument("--latency-conversations", type=int, default=2,
                    help="live: conversations streamed again in real time with diarize off and on")
    ap.add_argument("--speed", type=float, default=8.0, help="live accuracy runs: x real time (<= 20)")
    ap.add_argument("--caps", type=float, nargs="+", default=[4.0, 8.0, 16.0, 32.0], help="--tune: caps tried (s)")
    ap.add_argument("--th-min", type=float, default=1.5)
    ap.add_argument("--th-max", type=float, default=4.5)
    ap.add_argument("--th-step", type=float, default=0.1)
    ap.add_argument("--checkpoint", type=Path, default=None)
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    a = ap.parse_args(argv)
    if not 0 < a.speed <= 20:
        ap.error("--speed must be in (0, 20]")
    if a.tune:
        a.conversations = a.conversations or 6
        a.turns = a.turns or 14
        return tune(a)
    a.conversations = a.conversations or 4
    a.turns = a.turns or 12
    return live(a)


if __name__ == "__main__":
    sys.exit(main())
