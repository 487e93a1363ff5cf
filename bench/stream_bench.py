"""Streaming benchmark: N concurrent real-time streams of real noisy speech through the real
WebSocket path; end-of-speech -> `emotion` latency, its spread across repeats, ASR real-time
factor, CPU use, backlog and overload errors.

    .venv/bin/python bench/stream_bench.py                        # 1, 4, 8, 16 streams; sync + staggered
    .venv/bin/python bench/stream_bench.py --interim              # ... and each again with interim results on
    .venv/bin/python bench/stream_bench.py --streams 1 4 --audio my.wav --checkpoint x.pt --variants emostream naive
    .venv/bin/python bench/stream_bench.py --dry-run              # print the plan and its wall-time estimate

Method. Each configuration (variant x start pattern x stream count x interim on/off) starts a fresh
service on port 0 in this process (the bundled checkpoint and Whisper are loaded once and shared)
and N clients that send the recording, repeated R times back to back, in 100 ms pcm_s16le chunks at
real-time pace (as shared/PEERS.md measured the peers). Start patterns:
- `sync`: all N streams start at the same moment, so every utterance's speech ends at the same
  instant on all N streams: the burst case, worst for a shared decoder;
- `staggered`: stream i starts i*D/N s later (D = --stagger-s, default 6 s, about one sentence
  period of the default recording), so ends do not coincide;
- `single`: 1 stream, where the two are the same (run once; the plot draws it on both lines).
Latency = when the client received an utterance's final `emotion` - when it had sent the audio up
to that utterance's end of speech (`utterance.ended` end_s), both on the client's clock, so it
includes the silence wait. Interim events (`transcript.partial`, `emotion.partial`) are counted,
never timed. p50/p95 are numpy's linearly interpolated percentiles over every final of a
configuration; the spread across repeats is the same p50/p95 over each copy of the recording
separately (an utterance belongs to the copy its end of speech falls in), given as lists and as
min-max. With few utterances per copy a per-copy p95 is close to that copy's max.

Repeats: with --repeat R every level plays R copies. Without it, each level plays the fewest copies
R >= --min-repeats (default 2, so there is a spread) with N * utterances(R) >= --min-utterances
(default 50). utterances(R) is counted offline before the run with the service's own Segmenter
(default config) on the tiled recording: utterances(1) + (R - 1) * (utterances(2) - utterances(1)),
since an utterance can run across the seam between copies. Each result records the offline
expectation next to the `utterance.ended` and `emotion` counts the service actually produced.

`by_reason` gives the same figures for the utterances of each `utterance.ended` reason: `silence`
(the speaker stopped: what a listener waits for), `pause` (a long turn split at a short pause while
the speaker goes on), `max_length`, `end_of_stream`.

CPU = process CPU seconds (resource.getrusage: client, server and model threads all live in this
process) / wall, in cores, plus one sample per second. ASR RTF = Whisper decode seconds / seconds
of audio streamed. Backlog slope = linear fit of latency against end-of-speech time (0 = keeping
up). Queue depth = inference queue + ended utterances waiting per session, sampled every 100 ms.
Errors are counted by `code` from the `error` events the clients received (`overloaded` separately).
The naive baseline (--variants naive) decodes one utterance at a time after the silence wait, with
Whisper's full 30 s window and no batching. `window15` is the service with the 15 s minimum encoder
window it had before the 10 s one (AsrConfig.min_window_s), to measure that change side by side:
levels run in order of stream count, each level's variants one after another. `diarize` is the
service with every session started with `diarize: true` (a voice embedding per utterance on the
voice thread, then the clustering), `diarize_nice19` the same with that thread at nice 19 instead
of DiarizeConfig.voice_nice's default: what speakers within a channel cost under load, and what the
voice thread's priority changes. `nosplit` is the service without pause splits of long utterances
(SegmenterConfig.split_after_s = 0), as before they existed; its expected utterance count is the
default segmenter's, so it ends one fewer per split the default makes.
Writes <out>/stream_bench.json and <out>/stream_bench.png (default out: bench/results).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import platform
import re
import resource
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.provenance import git_state  # noqa: E402
from streamer import protocol as P  # noqa: E402
from streamer.client import stream_audio  # noqa: E402
from streamer.config import SAMPLE_RATE, AppConfig, AsrConfig, InferenceConfig, SegmenterConfig, ServerConfig  # noqa: E402

DEFAULT_AUDIO = ROOT / "tests" / "fixtures" / "speech" / "noisy_pauses.flac"
PATTERNS = ("sync", "staggered")
VARIANTS = ("emostream", "naive", "window15", "diarize", "diarize_nice19", "nosplit")  # see variants()
SINGLE = "single"  # the pattern label of a 1-stream level (sync and staggered coincide)
OVERHEAD_S = 6.0  # per configuration, for the estimate: service start + model warm-up + drain
TRANSCRIPT_PARTIAL = getattr(P, "TRANSCRIPT_PARTIAL", "transcript.partial")
EMOTION_PARTIAL = getattr(P, "EMOTION_PARTIAL", "emotion.partial")
E_OVERLOADED = getattr(P, "E_OVERLOADED", "overloaded")


def variants(checkpoint: Path | None) -> dict[str, AppConfig]:
    inf = InferenceConfig(device="cpu") if checkpoint is None else InferenceConfig(checkpoint=checkpoint, device="cpu")
    ours = AppConfig(server=ServerConfig(port=0, max_sessions=64), inference=inf)
    naive = replace(
        ours,
        segmenter=replace(SegmenterConfig(), early_decode=False),
        asr=replace(AsrConfig(device="cpu"), max_batch=1, min_window_s=30.0),
        inference=replace(inf, max_batch=1, max_wait_ms=0.0),
    )
    # the service as it was before the 10 s encoder window: the side-by-side measurement of that change
    window15 = replace(ours, asr=replace(ours.asr, min_window_s=15.0))
    # every session diarized (start flag diarize: voice embedding + clustering per utterance), the voice
    # thread at the default nice value, and at the lowest priority
    diarize = ours
    diarize_nice19 = replace(ours, diarize=replace(ours.diarize, voice_nice=19))
    # the service as it was before long utterances were split at short pauses (SegmenterConfig.split_after_s)
    nosplit = replace(ours, segmenter=replace(ours.segmenter, split_after_s=0.0))
    return {"emostream": ours, "naive": naive, "window15": window15, "diarize": diarize, "diarize_nice19": diarize_nice19,
            "nosplit": nosplit}


def diarized(variant: str) -> bool:
    """Whether a variant's sessions start with `diarize: true`."""
    return variant.startswith("diarize")


def jsonable(x: Any) -> Any:
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {f.name: jsonable(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, (Path, str)) and Path(x).is_absolute() and ROOT in Path(x).parents:
        return os.path.relpath(x, ROOT)  # a path inside the repository (the packaged model under .venv too)
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


def latency_knobs(cfg: AppConfig) -> dict[str, Any]:
    """The settings that move latency; getattr throughout, since the engine's config is changing."""
    seg, asr, inf, srv = (getattr(cfg, k, None) for k in ("segmenter", "asr", "inference", "server"))
    pick = {
        "segmenter": (seg, ("vad", "early_decode", "early_decode_s", "trailing_silence_s", "tail_pad_s", "max_utterance_s",
                                "split_after_s", "split_pause_s")),
        "asr": (asr, ("device", "compute_type", "cpu_threads", "max_batch", "cpu_batch", "workers", "num_workers",
                      "min_window_s", "beam_size")),
        "inference": (inf, ("max_batch", "max_wait_ms", "queue_size", "torch_threads", "workers", "remote")),
        "server": (srv, ("max_sessions",)),
    }
    out = {}
    for section, (obj, names) in pick.items():
        out[section] = {n: jsonable(getattr(obj, n, None)) for n in names if obj is not None and hasattr(obj, n)}
    return out


def count_utterances(audio: np.ndarray, copies: int) -> int:
    """Utterances the service's segmenter (default config) finds in `copies` copies back to back."""
    from streamer.pipeline.segmenter import Segmenter, SpeechEnded

    seg = Segmenter(SegmenterConfig())
    events = seg.feed(np.tile(audio, copies)) + seg.flush()
    return sum(isinstance(e, SpeechEnded) for e in events)


def plan(a: argparse.Namespace, per_copy: tuple[int, int], copy_s: float) -> list[dict[str, Any]]:
    first, more = per_copy
    expected = lambda r: first + (r - 1) * more  # noqa: E731
    jobs = []
    interim_patterns = set(a.interim_patterns or a.patterns)
    for n in a.streams:
        if a.repeat is not None:
            r = a.repeat
        else:
            r = a.min_repeats
            while n * expected(r) < a.min_utterances and r < 1000:
                r += 1
        for variant in a.variants:
            for pattern in ([SINGLE] if n == 1 else a.patterns):
                on = [False] + ([True] if a.interim and (pattern == SINGLE or pattern in interim_patterns) else [])
                for interim in on:
                    stagger = a.stagger_s if pattern == "staggered" else 0.0
                    jobs.append({"variant": variant, "pattern": pattern, "streams": n, "interim": interim, "repeats": r,
                                 "stagger_s": stagger, "expected_utterances": n * expected(r),
                                 "estimated_s": r * copy_s + stagger * (n - 1) / n + OVERHEAD_S})
    return jobs


def dumps(report: dict[str, Any]) -> str:
    """Indented JSON with lists of plain numbers (and [stream, end, latency] samples) on one line each."""
    text = json.dumps(jsonable(report), indent=1)
    flat = re.compile(r"\[\s*(?:-?[\d.eE+-]+|null)(?:,\s*(?:-?[\d.eE+-]+|null))*\s*\]")
    return flat.sub(lambda m: re.sub(r"\s+", "", m.group(0)).replace(",", ", "), text)


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def pct(xs: list[float] | np.ndarray, q: float) -> float | None:
    return float(np.percentile(xs, q)) if len(xs) else None


def queue_depth(app: Any) -> int:
    d = 0
    try:
        d += int(app.engine.depth)
    except Exception:
        pass
    for r in list(getattr(app, "sessions", {}).values()):
        q = getattr(r, "_finish", None)
        if q is not None:
            d += q.qsize()
    return d


def counter(app: Any, name: str) -> int | None:
    try:
        return int(app.metrics.value(name))
    except Exception:
        return None


async def run_config(config: AppConfig, model: Any, asr: Any, copy: np.ndarray, job: dict[str, Any]) -> dict[str, Any]:
    from streamer.server import create_app

    n, r, interim, stagger = job["streams"], job["repeats"], job["interim"], job["stagger_s"]
    audio = np.tile(copy, r)
    copy_s, audio_s = len(copy) / SAMPLE_RATE, len(audio) / SAMPLE_RATE
    offsets = [i * stagger / n for i in range(n)]
    load0 = os.getloadavg()
    app = create_app(config, model=model, asr=asr)
    await app.start()
    depth: list[int] = []
    cpu_per_s: list[float] = []
    lag: list[float] = []  # event-loop lag: how late a 50 ms timer fires
    stop = asyncio.Event()
    vad_s = [0.0]  # time the event loop spent in the segmenters (the frame VADs run there)
    from streamer.pipeline.segmenter import Segmenter

    real_feed = Segmenter.feed

    def timed_feed(self: Any, audio: np.ndarray) -> Any:  # bench instrumentation, restored below
        t = time.perf_counter()
        try:
            return real_feed(self, audio)
        finally:
            vad_s[0] += time.perf_counter() - t

    Segmenter.feed = timed_feed  # type: ignore[method-assign]

    async def loop_lag() -> None:
        while not stop.is_set():
            t = time.perf_counter()
            await asyncio.sleep(0.05)
            lag.append(time.perf_counter() - t - 0.05)

    async def sample() -> None:
        t_last, c_last = time.monotonic(), cpu_seconds()
        while not stop.is_set():
            depth.append(queue_depth(app))
            now = time.monotonic()
            if now - t_last >= 1.0:
                c = cpu_seconds()
                cpu_per_s.append((c - c_last) / (now - t_last))
                t_last, c_last = now, c
            try:
                await asyncio.wait_for(stop.wait(), 0.1)
            except asyncio.TimeoutError:
                pass

    async def one(i: int) -> Any:
        if offsets[i]:
            await asyncio.sleep(offsets[i])
        return await stream_audio(app.url, audio, realtime=True, session_id=f"bench-{i}", timeout_s=600, interim=interim,
                                  diarize=diarized(job["variant"]))

    sampler, lagger = asyncio.create_task(sample()), asyncio.create_task(loop_lag())
    c0, w0 = cpu_seconds(), time.monotonic()
    try:
        results = await asyncio.gather(*[one(i) for i in range(n)], return_exceptions=True)
    finally:
        Segmenter.feed = real_feed  # type: ignore[method-assign]
    wall, cpu = time.monotonic() - w0, cpu_seconds() - c0
    stop.set()
    await asyncio.gather(sampler, lagger)
    from streamer.metrics import COUNTERS

    asr_s = app.metrics.value("emostream_asr_seconds_sum")  # the service's own Whisper time (prometheus_client)
    counters = {name: int(app.metrics.value(name)) for name, _ in COUNTERS if app.metrics.value(name)}
    await app.shutdown()

    samples, server_lat, errors, close_codes, failures = [], [], Counter(), Counter(), []
    reasons: list[str] = []  # per sample: why its utterance ended (utterance.ended reason)
    unlabelled = 0  # diarized: final emotions without a speaker (the voice embedding failed or was refused)
    n_types: Counter[str] = Counter()
    for i, res in enumerate(results):
        if isinstance(res, BaseException):
            failures.append(f"stream {i}: {res!r}")
            continue
        close_codes[str(res.close_code)] += 1
        ends = {e.get("utterance_id"): e for e in res.of_type(P.UTTERANCE_ENDED)}
        for ev, t in zip(res.events, res.received_at):
            n_types[ev["type"]] += 1
            if ev["type"] == P.ERROR:
                errors[str(ev.get("code"))] += 1
            if ev["type"] != P.EMOTION or ev.get("utterance_id") not in ends:
                continue
            unlabelled += diarized(job["variant"]) and not ev.get("speaker")
            end_s = float(ends[ev["utterance_id"]]["end_s"])
            samples.append((i, end_s, t - res.sent_time(end_s)))
            reasons.append(str(ends[ev["utterance_id"]].get("reason")))
            if ev.get("latency_ms") is not None:
                server_lat.append(ev["latency_ms"] / 1000)
    lat = [s[2] for s in samples]
    last_sent = max((res.sent[-1][1] for res in results if not isinstance(res, BaseException) and res.sent), default=w0)
    by_copy: list[list[float]] = [[] for _ in range(r)]
    for _, end_s, x in samples:
        by_copy[min(r - 1, int(end_s // copy_s))].append(x)
    c50 = [pct(c, 50) for c in by_copy]
    c95 = [pct(c, 95) for c in by_copy]
    f50, f95 = [x for x in c50 if x is not None], [x for x in c95 if x is not None]
    pts = np.array([(s[1], s[2]) for s in samples]) if samples else np.zeros((0, 2))
    slope = float(np.polyfit(pts[:, 0], pts[:, 1], 1)[0]) if len(pts) >= 3 and np.ptp(pts[:, 0]) > 0 else None
    return {
        "variant": job["variant"], "pattern": job["pattern"], "streams": n, "interim": interim,
        "diarize": diarized(job["variant"]), "emotions_without_speaker": unlabelled if diarized(job["variant"]) else None,
        "repeats": r, "stagger_s": stagger, "start_offsets_s": [round(o, 3) for o in offsets],
        "expected_utterances": job["expected_utterances"],  # offline segmenter count, see the docstring
        "utterances_ended": n_types[P.UTTERANCE_ENDED],
        "finals": len(lat),  # final `emotion` events timed (the latency sample size)
        "p50_s": pct(lat, 50), "p95_s": pct(lat, 95), "max_s": max(lat) if lat else None,
        # the same by why the utterance ended: "silence" (the speaker stopped), "pause" (a long turn split while
        # the speaker goes on), "max_length", "end_of_stream"
        "by_reason": {k: {"n": len(v), "p50_s": pct(v, 50), "p95_s": pct(v, 95), "max_s": max(v)}
                      for k in sorted(set(reasons)) for v in [[x for x, why in zip(lat, reasons) if why == k]]},
        "mean_s": float(np.mean(lat)) if lat else None,
        "per_copy_n": [len(c) for c in by_copy],
        "per_copy_p50_s": c50, "per_copy_p95_s": c95,
        "p50_range_s": [min(f50), max(f50)] if f50 else None,
        "p95_range_s": [min(f95), max(f95)] if f95 else None,
        "server_latency_p50_s": pct(server_lat, 50),
        "asr_rtf": asr_s / (audio_s * n),  # Whisper decode seconds per second of audio streamed
        "asr_seconds": asr_s,
        "cpu_cores_used": cpu / wall,
        "cpu_cores_per_s": [round(x, 3) for x in cpu_per_s],
        "cpu_cores_max_1s": max(cpu_per_s) if cpu_per_s else None,
        "wall_s": wall,
        "audio_s_per_stream": audio_s,
        "drain_s": w0 + wall - last_sent,  # after the last chunk any stream sent until every session ended
        "backlog_slope_s_per_s": slope,  # latency growth per second of stream (0 = keeping up)
        "max_queue_depth": max(depth, default=0),
        # the frame VADs run on the event loop: its share of one core, and how late a 50 ms timer fired
        "vad_on_loop_core_share": vad_s[0] / wall,
        "loop_lag_ms": {"p50": pct([x * 1000 for x in lag], 50), "p99": pct([x * 1000 for x in lag], 99),
                        "max": max(lag, default=0.0) * 1000},
        "speculative_decodes": counter(app, "emostream_speculative_decodes_total"),
        "speculative_wasted": counter(app, "emostream_speculative_wasted_total"),
        "overloaded_errors": errors.get(E_OVERLOADED, 0),
        "errors_by_code": dict(errors),
        "transcript_partials": n_types[TRANSCRIPT_PARTIAL],
        "emotion_partials": n_types[EMOTION_PARTIAL],
        "events_by_type": dict(n_types),
        "close_codes": dict(close_codes),
        "client_failures": failures,
        "server_counters": counters,
        "load_avg_at_start": list(load0), "load_avg_at_end": list(os.getloadavg()),
        "samples": [[i, round(e, 3), round(x, 4)] for i, e, x in samples],  # [stream, end of speech s, latency s]
    }


def summary(r: dict[str, Any]) -> str:
    f = lambda x: "  -  " if x is None else f"{x:5.2f}"  # noqa: E731
    rng = lambda x: "-" if not x else f"{x[0]:.2f}-{x[1]:.2f}"  # noqa: E731
    errs = ",".join(f"{k}:{v}" for k, v in r["errors_by_code"].items()) or "0"
    return (f"{r['variant']:9s} {r['pattern']:9s} {r['streams']:2d} streams interim {'on ' if r['interim'] else 'off'} "
            f"R={r['repeats']:<2d} {r['finals']:3d}/{r['expected_utterances']} finals  p50 {f(r['p50_s'])} s "
            f"(copies {rng(r['p50_range_s'])})  p95 {f(r['p95_s'])} s (copies {rng(r['p95_range_s'])})  "
            f"max {f(r['max_s'])} s  CPU {r['cpu_cores_used']:.2f} cores  RTF {r['asr_rtf']:.3f}  "
            f"queue {r['max_queue_depth']}  errors {errs}  partials {r['transcript_partials']}/{r['emotion_partials']}  "
            f"VAD {r['vad_on_loop_core_share']:.1%} of a core, loop lag p99 {f(r['loop_lag_ms']['p99'])} ms")


def plot(report: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    colors = {("emostream", "sync"): "tab:red", ("emostream", "staggered"): "tab:blue",
              ("naive", "sync"): "tab:orange", ("naive", "staggered"): "tab:cyan",
              ("window15", "sync"): "tab:purple", ("window15", "staggered"): "tab:green",
              ("diarize", "sync"): "tab:brown", ("diarize", "staggered"): "tab:olive",
              ("diarize_nice19", "sync"): "tab:pink", ("diarize_nice19", "staggered"): "tab:gray",
              ("nosplit", "sync"): "black", ("nosplit", "staggered"): "dimgray"}
    keys = sorted({(r["variant"], r["pattern"], r["interim"]) for r in results if r["pattern"] != SINGLE})
    if not keys:  # only 1-stream levels
        keys = sorted({(r["variant"], SINGLE, r["interim"]) for r in results})

    def series(variant: str, pattern: str, interim: bool) -> list[dict[str, Any]]:
        rs = [r for r in results if r["variant"] == variant and r["interim"] == interim
              and r["pattern"] in (pattern, SINGLE) and r["p50_s"] is not None]
        return sorted(rs, key=lambda r: r["streams"])

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4), gridspec_kw={"width_ratios": [1, 1, 0.7]})
    dodge = {k: 2 ** (0.03 * (i - (len(keys) - 1) / 2)) for i, k in enumerate(keys)}  # keep the bars apart
    top = 0.0
    for ax, q in zip(axes[:2], ("p50", "p95")):
        for variant, pattern, interim in keys:
            rs = series(variant, pattern, interim)
            if not rs:
                continue
            x = [r["streams"] * dodge[(variant, pattern, interim)] for r in rs]
            y = [r[f"{q}_s"] for r in rs]
            lo = [(r[f"{q}_range_s"] or [v, v])[0] for r, v in zip(rs, y)]
            hi = [(r[f"{q}_range_s"] or [v, v])[1] for r, v in zip(rs, y)]
            c = colors.get((variant, pattern), "tab:gray")
            ls = "--" if interim else "-"
            label = f"{variant} {pattern}" + (" interim" if interim else "")
            ax.plot(x, y, marker="o" if variant == "emostream" else "s", ls=ls, color=c, label=label)
            ax.fill_between(x, lo, hi, color=c, alpha=0.12 if not interim else 0.07, lw=0)
            ax.errorbar(x, y, yerr=[np.maximum(0, np.subtract(y, lo)), np.maximum(0, np.subtract(hi, y))],
                        fmt="none", ecolor=c, elinewidth=0.8, capsize=3)
            top = max(top, *hi, *y)
        ax.axhline(1.0, color="k", ls=":", lw=1, label="1.0 s")
        ax.axhline(1.5, color="k", ls="--", lw=0.8, label="1.5 s")
        ax.set_xscale("log", base=2)
        ax.set_xticks(report["plan"]["streams"], [str(s) for s in report["plan"]["streams"]])
        ax.minorticks_off()
        if top > 8:
            ax.set_yscale("log")
        else:
            ax.set_ylim(0, max(2.0, top * 1.1))
        ax.set_xlabel("concurrent real-time streams")
        ax.set_ylabel(f"{q} end of speech -> emotion (s)")
        ax.set_title(f"{q} latency (band / bars: min-max of per-copy {q})", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax = axes[2]
    for variant, pattern, interim in keys:
        rs = series(variant, pattern, interim)
        if rs:
            ax.plot([r["streams"] for r in rs], [r["cpu_cores_used"] for r in rs], marker="o", ls="--" if interim else "-",
                    color=colors.get((variant, pattern), "tab:gray"),
                    label=f"{variant} {pattern}" + (" interim" if interim else ""))
    ax.axhline(report["machine"]["cpus"], color="k", ls=":", lw=1, label="cores on the machine")
    ax.set_xscale("log", base=2)
    ax.set_xticks(report["plan"]["streams"], [str(s) for s in report["plan"]["streams"]])
    ax.minorticks_off()
    ax.set_ylim(bottom=0)
    ax.set_xlabel("concurrent real-time streams")
    ax.set_ylabel("CPU (cores, mean over the run)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    m = report["machine"]
    fig.suptitle(f"emostream streaming latency - {m['cpus']} CPU cores (load {m['load_avg_at_start'][0]:.1f} at start), "
                 f"{report['audio']['name']} x repeats, stagger {report['plan']['stagger_s']:g} s", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Method: see the module docstring (bench/stream_bench.py).")
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 4, 8, 16], help="stream counts (default 1 4 8 16)")
    ap.add_argument("--patterns", nargs="+", default=list(PATTERNS), choices=PATTERNS,
                    help="start patterns for N > 1 (1 stream is run once, as 'single')")
    ap.add_argument("--stagger-s", type=float, default=6.0, help="staggered: stream i starts i*D/N s later (D, default 6)")
    ap.add_argument("--audio", type=Path, default=DEFAULT_AUDIO)
    ap.add_argument("--repeat", type=int, default=None,
                    help="copies of the recording per stream, for every level (default: per level, see --min-utterances)")
    ap.add_argument("--min-utterances", type=int, default=50, help="finals wanted per configuration (default 50)")
    ap.add_argument("--min-repeats", type=int, default=2, help="at least this many copies per level without --repeat (default 2)")
    ap.add_argument("--interim", action="store_true", help="also run each configuration with interim results on")
    ap.add_argument("--interim-patterns", nargs="+", default=None, choices=PATTERNS,
                    help="with --interim: only these patterns get the interim run (default: all; 'single' always)")
    ap.add_argument("--checkpoint", type=Path, default=None, help="default: the bundled checkpoint")
    ap.add_argument("--variants", nargs="+", default=["emostream"], choices=VARIANTS)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and the wall-time estimate, run nothing")
    a = ap.parse_args()
    if any(n < 1 for n in a.streams) or (a.repeat is not None and a.repeat < 1) or a.min_repeats < 1:
        ap.error("stream counts and repeats must be >= 1")
    a.streams = sorted(set(a.streams))

    from streamer.sources import load_file

    copy = load_file(a.audio)
    copy_s = len(copy) / SAMPLE_RATE
    u1 = count_utterances(copy, 1)
    u2 = count_utterances(copy, 2)
    jobs = plan(a, (u1, u2 - u1), copy_s)
    est = sum(j["estimated_s"] for j in jobs)
    print(f"{a.audio.name}: {copy_s:.1f} s, {u1} utterances alone, +{u2 - u1} per further copy (offline segmenter)")
    for j in jobs:
        print(f"  {j['variant']:9s} {j['pattern']:9s} {j['streams']:2d} streams interim {'on ' if j['interim'] else 'off'} "
              f"R={j['repeats']:<2d} ~{j['expected_utterances']} utterances  ~{j['estimated_s']:.0f} s")
    print(f"{len(jobs)} configurations, estimated wall time {est / 60:.1f} min (+ model loading)", flush=True)
    if a.dry_run:
        return 0

    from tqdm import tqdm

    from model import load_checkpoint
    from streamer.infer.transcriber import Transcriber

    from streamer.memory import tune_allocator

    allocator = tune_allocator()  # what each App would set up, before the models allocate
    configs = variants(a.checkpoint)
    model = load_checkpoint(configs["emostream"].inference.checkpoint, device="cpu")
    asrs = {name: Transcriber(cfg.asr) for name, cfg in configs.items() if name in a.variants}
    t_start = time.monotonic()
    report: dict[str, Any] = {
        "what": "end-of-speech -> final emotion latency, N concurrent real-time streams over /v1/stream (client-measured)",
        "method": "see the docstring of bench/stream_bench.py",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor(),
                    "load_avg_at_start": list(os.getloadavg()), "load_avg_at_end": None,
                    "note": "shared machine: other jobs may run concurrently"},
        "git": git_state(), "allocator": allocator,
        "audio": {"name": a.audio.name, "seconds_per_copy": copy_s, "utterances_alone": u1,
                  "utterances_per_further_copy": u2 - u1, "counted_by": "offline Segmenter(SegmenterConfig())"},
        "checkpoint": jsonable(configs["emostream"].inference.checkpoint),
        "asr_model": jsonable(configs["emostream"].asr.model),
        "plan": {"streams": a.streams, "patterns": a.patterns, "stagger_s": a.stagger_s, "repeat": a.repeat,
                 "min_utterances": a.min_utterances, "min_repeats": a.min_repeats, "interim": a.interim,
                 "interim_patterns": a.interim_patterns or (a.patterns if a.interim else []), "variants": a.variants,
                 "configurations": len(jobs), "estimated_wall_s": est},
        "configs": {name: {"latency_knobs": latency_knobs(cfg),
                           **{k: jsonable(getattr(cfg, k)) for k in ("segmenter", "asr", "inference", "server") if hasattr(cfg, k)}}
                    for name, cfg in configs.items() if name in a.variants},
        "results": [],
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    for name, asr in asrs.items():  # what "auto" (0) settings resolved to on this machine, where exposed
        report["configs"][name]["asr_resolved"] = {k: jsonable(getattr(asr, k)) for k in ("device", "workers", "threads", "cpu_threads")
                                                   if isinstance(getattr(asr, k, None), (int, str))}
    a.out.mkdir(parents=True, exist_ok=True)
    for job in tqdm(jobs, desc="configurations"):
        r = asyncio.run(run_config(configs[job["variant"]], model, asrs[job["variant"]], copy, job))
        report["results"].append(r)
        tqdm.write(summary(r))
        report["machine"]["load_avg_at_end"] = list(os.getloadavg())
        report["wall_s"] = time.monotonic() - t_start
        (a.out / "stream_bench.json").write_text(dumps(report))  # partial results survive a crash
    report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    (a.out / "stream_bench.json").write_text(dumps(report))
    plot(report, a.out / "stream_bench.png")
    print(f"wrote {a.out / 'stream_bench.json'} and stream_bench.png in {report['wall_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    from streamer.memory import relaunch_with_allocator

    relaunch_with_allocator()  # as the service's own commands do (EMOSTREAM_ALLOCATOR)
    sys.exit(main())
