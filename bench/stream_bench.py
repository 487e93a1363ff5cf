"""Streaming benchmark: N concurrent real-time streams of real noisy speech through the real
WebSocket path; end-of-speech -> `emotion` latency, ASR real-time factor, CPU use and backlog.

    .venv/bin/python bench/stream_bench.py                  # 1, 2, 4, 8 streams, ours + naive baseline
    .venv/bin/python bench/stream_bench.py --streams 1 4 --audio my.wav --checkpoint x.pt

Each level starts a fresh service on port 0 and N clients that send the same recording at the same
moment in 100 ms chunks at real-time pace (as shared/PEERS.md measured the peers). Latency = when
the client received the utterance's `emotion` - when it had sent the audio up to the utterance's
end of speech (so it includes the silence wait). The naive baseline decodes one utterance at a
time after the silence wait, with Whisper's full 30 s window and no batching.
Writes bench/results/stream_bench.json and stream_bench.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from streamer import protocol as P  # noqa: E402
from streamer.client import stream_audio  # noqa: E402
from streamer.config import AppConfig, AsrConfig, InferenceConfig, SegmenterConfig, ServerConfig  # noqa: E402

DEFAULT_AUDIO = ROOT / "tests" / "fixtures" / "speech" / "noisy_pauses.flac"


def variants(checkpoint: Path | None) -> dict[str, AppConfig]:
    inf = InferenceConfig(device="cpu") if checkpoint is None else InferenceConfig(checkpoint=checkpoint, device="cpu")
    ours = AppConfig(server=ServerConfig(port=0, max_sessions=64), inference=inf)
    naive = replace(
        ours,
        segmenter=replace(SegmenterConfig(), early_decode=False),
        asr=replace(AsrConfig(device="cpu"), max_batch=1, min_window_s=30.0),
        inference=replace(inf, max_batch=1, max_wait_ms=0.0),
    )
    return {"emostream": ours, "naive": naive}


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def run_level(config: AppConfig, model: Any, asr: Any, audio: np.ndarray, n: int) -> dict[str, Any]:
    from streamer.server import create_app

    app = create_app(config, model=model, asr=asr)
    await app.start()
    depth: list[tuple[float, int]] = []
    stop = asyncio.Event()

    async def sample_depth() -> None:
        t0 = time.monotonic()
        while not stop.is_set():
            depth.append((time.monotonic() - t0, app.engine.depth + sum(r._finish.qsize() for r in app.sessions.values())))
            try:
                await asyncio.wait_for(stop.wait(), 0.1)
            except asyncio.TimeoutError:
                pass

    sampler = asyncio.create_task(sample_depth())
    c0, w0 = cpu_seconds(), time.monotonic()
    results = await asyncio.gather(*[
        stream_audio(app.url, audio, realtime=True, session_id=f"bench-{i}", timeout_s=600) for i in range(n)
    ])
    wall, cpu = time.monotonic() - w0, cpu_seconds() - c0
    stop.set()
    await sampler
    asr_s = app.metrics.asr_seconds.sum
    await app.shutdown()

    lat, server_lat, points = [], [], []
    for res in results:
        ends = {e["utterance_id"]: e for e in res.of_type(P.UTTERANCE_ENDED)}
        for ev, t in zip(res.events, res.received_at):
            if ev["type"] != P.EMOTION:
                continue
            end = ends[ev["utterance_id"]]
            sent = res.sent_time(end["end_s"])
            lat.append(t - sent)
            server_lat.append(ev["latency_ms"] / 1000)
            points.append((end["end_s"], t - sent))
    audio_s = len(audio) / 16_000
    pts = np.array(points) if points else np.zeros((0, 2))
    slope = float(np.polyfit(pts[:, 0], pts[:, 1], 1)[0]) if len(pts) >= 3 else float("nan")
    arr = np.array(lat) if lat else np.array([np.nan])
    return {
        "streams": n,
        "utterances": len(lat),
        "latency_s": {"p50": float(np.percentile(arr, 50)), "p95": float(np.percentile(arr, 95)), "max": float(arr.max()),
                      "mean": float(arr.mean())},
        "server_latency_s_p50": float(np.median(server_lat)) if server_lat else None,
        "latencies_s": [round(x, 4) for x in lat],
        "asr_rtf": asr_s / (audio_s * n),  # ASR compute seconds per second of audio streamed
        "asr_seconds": asr_s,
        "cpu_cores_used": cpu / wall,
        "wall_s": wall,
        "audio_s_per_stream": audio_s,
        "drain_s": wall - audio_s,  # time after the last audio chunk until every session ended
        "backlog_slope_s_per_s": slope,  # latency growth over the recording (0 = keeping up)
        "max_queue_depth": max((d for _, d in depth), default=0),
        "speculative_decodes": app.metrics.value("emostream_speculative_decodes_total"),
        "speculative_wasted": app.metrics.value("emostream_speculative_wasted_total"),
    }


def plot(report: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = report["streams"]
    fig, axes = plt.subplots(1, len(levels) + 1, figsize=(4 * (len(levels) + 1), 3.6))
    hi = max(3.0, max(max(r["latencies_s"] or [0]) for v in report["results"].values() for r in v))
    bins = np.geomspace(0.1, hi * 1.1, 40)  # log scale: the naive baseline's tail is 10x ours
    for ax, n in zip(axes, levels):
        for name, color in (("emostream", "tab:blue"), ("naive", "tab:orange")):
            r = next(x for x in report["results"][name] if x["streams"] == n)
            ax.hist(r["latencies_s"], bins=bins, alpha=0.6, color=color,
                    label=f"{name}: p50 {r['latency_s']['p50']:.2f} s, p95 {r['latency_s']['p95']:.2f} s")
        ax.axvline(0.8, color="k", ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_title(f"{n} stream{'s' if n > 1 else ''}")
        ax.set_xlabel("end of speech -> emotion (s)")
        ax.legend(fontsize=7)
    ax = axes[-1]
    for name, color in (("emostream", "tab:blue"), ("naive", "tab:orange")):
        rs = report["results"][name]
        ax.plot([r["streams"] for r in rs], [r["latency_s"]["p50"] for r in rs], "o-", color=color, label=f"{name} p50")
        ax.plot([r["streams"] for r in rs], [r["latency_s"]["p95"] for r in rs], "s--", color=color, label=f"{name} p95")
    ax.axhline(0.8, color="k", ls=":", lw=1)
    ax.axhline(1.5, color="k", ls="--", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("concurrent real-time streams")
    ax.set_ylabel("latency (s)")
    ax.legend(fontsize=7)
    fig.suptitle(f"emostream streaming latency - {report['machine']['cpus']} CPU cores, {report['audio']['name']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--audio", type=Path, default=DEFAULT_AUDIO)
    ap.add_argument("--repeat", type=int, default=2, help="play the recording this many times back to back")
    ap.add_argument("--checkpoint", type=Path, default=None, help="default: the bundled checkpoint")
    ap.add_argument("--variants", nargs="+", default=["emostream", "naive"], choices=["emostream", "naive"])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    a = ap.parse_args()

    from tqdm import tqdm

    from model import load_checkpoint
    from streamer.sources import load_file
    from streamer.transcriber import Transcriber

    configs = variants(a.checkpoint)
    audio = np.tile(load_file(a.audio), a.repeat)
    model = load_checkpoint(configs["emostream"].inference.checkpoint, device="cpu")
    asrs = {name: Transcriber(cfg.asr) for name, cfg in configs.items() if name in a.variants}
    report: dict[str, Any] = {
        "what": "end-of-speech -> emotion latency, N concurrent real-time streams over /v1/stream (client-measured)",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor(),
                    "load_avg_at_start": os.getloadavg(), "note": "shared machine: other jobs may run concurrently"},
        "audio": {"name": a.audio.name, "seconds": len(audio) / 16_000, "repeat": a.repeat},
        "checkpoint": os.path.relpath(configs["emostream"].inference.checkpoint, ROOT),
        "streams": a.streams,
        "configs": {name: {"early_decode": cfg.segmenter.early_decode, "asr_max_batch": cfg.asr.max_batch,
                           "asr_min_window_s": cfg.asr.min_window_s, "model_max_batch": cfg.inference.max_batch,
                           "trailing_silence_s": cfg.segmenter.trailing_silence_s}
                    for name, cfg in configs.items() if name in a.variants},
        "results": {name: [] for name in a.variants},
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    jobs = [(name, n) for n in a.streams for name in a.variants]
    for name, n in tqdm(jobs, desc="levels"):
        r = asyncio.run(run_level(configs[name], model, asrs[name], audio, n))
        report["results"][name].append(r)
        tqdm.write(f"{name:9s} {n} streams: p50 {r['latency_s']['p50']:.2f} s  p95 {r['latency_s']['p95']:.2f} s  "
                   f"max {r['latency_s']['max']:.2f} s  ASR RTF {r['asr_rtf']:.3f}  CPU {r['cpu_cores_used']:.2f} cores  "
                   f"drain {r['drain_s']:.1f} s  slope {r['backlog_slope_s_per_s']:+.3f}")
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "stream_bench.json").write_text(json.dumps(report, indent=1))
    if set(a.variants) == {"emostream", "naive"}:
        plot(report, a.out / "stream_bench.png")
    print(f"wrote {a.out / 'stream_bench.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
