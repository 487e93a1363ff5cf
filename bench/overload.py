"""Past capacity: more real-time sessions than the CPU can serve, with the real Whisper. Does the
admission policy refuse new sessions (error `overloaded`, close 1013) once the decoders are saturated,
do admitted sessions' utterances stay within a bounded wait (or get an `overloaded` error naming
them), and does every admitted session end properly?

    .venv/bin/python bench/overload.py                    # 60 clients, one every 1.5 s, 60 s each (~3 min)
    .venv/bin/python bench/overload.py --clients 32 --arrive-every-s 2.5 --session-s 75
    .venv/bin/python bench/overload.py --split-after 0 --out /tmp/x   # without pause splits, side by side

Method. One service on port 0 in this process with the default configuration (admission:
ServerConfig.admit_max_load / admit_max_wait_s; InferenceConfig.max_queue_s, speculate_max_wait_s;
the values are recorded in the JSON; two 1-thread decoders on 2 cores), the bundled checkpoint and
Whisper tiny.en. Client i arrives at i * --arrive-every-s and streams --session-s seconds of the recording
(tiled) in 100 ms pcm_s16le chunks at real-time pace (streamer.client.stream_audio), then `stop`.
A refused client (error `overloaded` + close 1013) tries again after --retry-s, until --retry-until-s.
The clients live in the same process and event loop as the service (as in bench/stream_bench.py),
so their cost is part of the CPU figures.

Measured: every attempt (time, admitted or refused, the refusal message); live sessions, the
decoders' load (InferenceEngine.load), the wait a new utterance would have (wait_estimate_s), the
inference queue depth and the ended utterances waiting for their results, sampled every 0.5 s;
for admitted sessions, latency = when the client received an utterance's `emotion` - when it had
sent the audio up to that utterance's end of speech (client clock, includes the silence wait),
errors by code, and per session whether each ended utterance got its emotion or an `overloaded`
error naming it ("lost": neither), whether `session.ended` arrived and the close code. The
decoding threads are instrumented (bench only, restored after): per decoded job its queue wait,
the wait the engine estimated when it was queued (what admission and max_queue_s go by), and its
batch's decode time; plus the event loop's lag (a 100 ms timer).
Writes <out>/overload.json and <out>/overload.png (default out: bench/results).
"""

from __future__ import annotations

import argparse
import asyncio
import json
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

from websockets.exceptions import ConnectionClosed  # noqa: E402

from bench.provenance import git_state  # noqa: E402
from streamer.memory import tune_allocator  # noqa: E402
from streamer import protocol as P  # noqa: E402
from streamer.client import stream_audio  # noqa: E402
from streamer.config import SAMPLE_RATE, AppConfig, AsrConfig, InferenceConfig, ServerConfig  # noqa: E402
from streamer.metrics import COUNTERS  # noqa: E402

DEFAULT_AUDIO = ROOT / "tests" / "fixtures" / "speech" / "noisy_pauses.flac"
SKIPPED = re.compile(r"utterance (\d+) skipped")


def dumps(report: dict[str, Any]) -> str:
    """Indented JSON with lists of plain numbers on one line each."""
    text = json.dumps(report, indent=1)
    flat = re.compile(r"\[\s*(?:-?[\d.eE+-]+|null|true|false)(?:,\s*(?:-?[\d.eE+-]+|null|true|false))*\s*\]")
    return flat.sub(lambda m: re.sub(r"\s+", "", m.group(0)).replace(",", ", "), text)


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def pct(xs: list[float], q: float) -> float | None:
    return float(np.percentile(xs, q)) if xs else None


async def run(a: argparse.Namespace, model: Any, asr: Any, audio: np.ndarray, config: AppConfig) -> dict[str, Any]:
    from streamer.server import create_app

    from streamer.infer.engine import InferenceEngine

    app = create_app(config, model=model, asr=asr)
    await app.start()
    t0 = time.monotonic()
    # per decoded job: [start of its batch (s), queue wait s, batch decode s, batch size, the wait estimated when queued s]
    jobs: list[list[float]] = []
    lag: list[list[float]] = []  # [t, how late a 100 ms timer fired (s)]: the event loop's lag
    real_analyze, real_process = InferenceEngine.analyze, InferenceEngine._process

    def analyze(self: Any, *args: Any, **kw: Any) -> Any:  # bench instrumentation, restored below
        estimate = self.wait_estimate_s()
        job = real_analyze(self, *args, **kw)
        job.queued_at, job.estimate = time.monotonic(), estimate
        return job

    def process(self: Any, batch: list[Any]) -> None:
        start = time.monotonic()
        try:
            real_process(self, batch)
        finally:
            end = time.monotonic()
            live = [j for j in batch if not j.abandoned]
            for j in live:
                jobs.append([round(start - t0, 3), round(start - getattr(j, "queued_at", start), 4),
                             round(end - start, 4), len(live), round(getattr(j, "estimate", 0.0), 4)])

    InferenceEngine.analyze, InferenceEngine._process = analyze, process  # type: ignore[method-assign]
    attempts: list[dict[str, Any]] = []
    sessions: list[dict[str, Any]] = []
    timeline: list[dict[str, Any]] = []
    stop = asyncio.Event()

    async def loop_lag() -> None:
        while not stop.is_set():
            t = time.monotonic()
            await asyncio.sleep(0.1)
            lag.append([round(t - t0, 2), round(time.monotonic() - t - 0.1, 4)])

    async def sample() -> None:
        c_last, t_last = cpu_seconds(), time.monotonic()
        while not stop.is_set():
            now = time.monotonic()
            c = cpu_seconds()
            timeline.append({
                "t": round(now - t0, 2), "live": len(app.sessions), "load": round(app.engine.load(), 3),
                "wait_s": round(app.engine.wait_estimate_s(), 3), "queue": app.engine.depth,
                "pending_finals": sum(r.pending for r in list(app.sessions.values())),
                "cpu_cores": round((c - c_last) / max(1e-6, now - t_last), 2),
            })
            c_last, t_last = c, now
            try:
                await asyncio.wait_for(stop.wait(), 0.5)
            except asyncio.TimeoutError:
                pass

    async def client(i: int) -> None:
        await asyncio.sleep(i * a.arrive_every_s)
        attempt = 0
        while True:
            t_try = time.monotonic() - t0
            got: list[dict[str, Any]] = []
            try:
                res = await stream_audio(app.url, audio, realtime=True, session_id=f"c{i}", timeout_s=600,
                                         on_event=got.append)
                code = res.close_code
            except ConnectionClosed as e:  # a close other than 1000/1001 (a refusal: 1013) raises in the client
                res, code = None, e.rcvd.code if e.rcvd is not None else None
            first = got[0] if got else {}
            refused = first.get("type") == P.ERROR and first.get("code") == P.E_OVERLOADED
            attempts.append({"client": i, "attempt": attempt, "t": round(t_try, 2), "admitted": not refused,
                             "close_code": code, **({"reason": first.get("message")} if refused else {})})
            if res is None and not refused:  # must not happen: counted as not ended properly
                sessions.append({"client": i, "t_start": round(t_try, 2), "failure": f"closed with {code}",
                                 "last_events": got[-3:], "utterances_ended": 0, "emotions": 0, "skipped_overloaded": [],
                                 "lost": [], "errors_by_code": {}, "session_ended": False, "ended_last": False,
                                 "close_code": code, "latency": []})
                return
            if not refused:
                sessions.append(session_record(i, t_try, res))
                return
            attempt += 1
            if time.monotonic() - t0 + a.retry_s > a.retry_until_s:
                return
            await asyncio.sleep(a.retry_s)

    def session_record(i: int, t_start: float, res: Any) -> dict[str, Any]:
        ended = {e["utterance_id"]: e for e in res.of_type(P.UTTERANCE_ENDED)}
        emotions, skipped, latencies, errors = set(), set(), [], Counter()
        for ev, t in zip(res.events, res.received_at):
            if ev["type"] == P.EMOTION:
                emotions.add(ev["utterance_id"])
                if ev["utterance_id"] in ended:
                    end_s = float(ended[ev["utterance_id"]]["end_s"])
                    latencies.append([round(t - t0, 3), round(t - res.sent_time(end_s), 4),
                                      round(ev.get("latency_ms", float("nan")) / 1000, 4)])
            elif ev["type"] == P.ERROR:
                errors[str(ev.get("code"))] += 1
                m = SKIPPED.search(ev.get("message", ""))
                if ev.get("code") == P.E_OVERLOADED and m:
                    skipped.add(int(m.group(1)))
        types = [e["type"] for e in res.events]
        return {
            "client": i, "t_start": round(t_start, 2), "utterances_ended": len(ended), "emotions": len(emotions),
            "skipped_overloaded": sorted(skipped), "lost": sorted(set(ended) - emotions - skipped),
            "errors_by_code": dict(errors), "session_ended": P.SESSION_ENDED in types,
            "ended_last": bool(types) and types[-1] == P.SESSION_ENDED, "close_code": res.close_code,
            # [time the emotion arrived (s since start), latency at the client s, latency_ms the service measured / 1000]
            "latency": latencies,
        }

    sampler, lagger = asyncio.create_task(sample()), asyncio.create_task(loop_lag())
    c0 = cpu_seconds()
    try:
        await asyncio.gather(*(client(i) for i in range(a.clients)))
    finally:
        InferenceEngine.analyze, InferenceEngine._process = real_analyze, real_process  # type: ignore[method-assign]
    wall, cpu = time.monotonic() - t0, cpu_seconds() - c0
    stop.set()
    await asyncio.gather(sampler, lagger)
    counts = {name: int(app.metrics.value(name)) for name, _ in COUNTERS}  # each value() collects the registry
    counters = {name: n for name, n in counts.items() if n}
    asr_count, asr_sum = app.metrics.value("emostream_asr_seconds_count"), app.metrics.value("emostream_asr_seconds_sum")
    t_sd = time.monotonic()
    await app.shutdown()
    shutdown_s = time.monotonic() - t_sd

    lat = [x[1] for s in sessions for x in s["latency"]]
    server_lat = [x[2] for s in sessions for x in s["latency"]]
    waits = [j[1] for j in jobs]
    lags = [x[1] for x in lag]
    errors = Counter()
    for s in sessions:
        errors.update(s["errors_by_code"])
    refused = [x for x in attempts if not x["admitted"]]
    cfg_i, cfg_s = config.inference, config.server
    return {
        "wall_s": wall, "cpu_cores_used": cpu / wall, "shutdown_s": shutdown_s,
        "attempts": len(attempts), "admitted": len(sessions), "refused": len(refused),
        "clients_never_admitted": sorted({x["client"] for x in attempts} - {s["client"] for s in sessions}),
        "refused_close_codes": dict(Counter(str(x["close_code"]) for x in refused)),
        "first_refusal_t": min((x["t"] for x in refused), default=None),
        "peak_live_sessions": max((x["live"] for x in timeline), default=0),
        "live_sessions_when_refused": sorted(Counter(
            next((s["live"] for s in reversed(timeline) if s["t"] <= x["t"]), 0) for x in refused).items()),
        "max_queue": max((x["queue"] for x in timeline), default=0),
        "max_wait_estimate_s": max((x["wait_s"] for x in timeline), default=0.0),
        "finals": len(lat), "latency_p50_s": pct(lat, 50), "latency_p95_s": pct(lat, 95),
        "latency_p99_s": pct(lat, 99), "latency_max_s": max(lat, default=None),
        "latency_bound_s": config.segmenter.trailing_silence_s + cfg_i.max_queue_s,
        "server_latency_p50_s": pct(server_lat, 50), "server_latency_p95_s": pct(server_lat, 95),
        "server_latency_max_s": max(server_lat, default=None),
        "decoded_jobs": len(jobs), "queue_wait_p50_s": pct(waits, 50), "queue_wait_p95_s": pct(waits, 95),
        "queue_wait_max_s": max(waits, default=None),
        "queue_wait_minus_estimate_p95_s": pct([j[1] - j[4] for j in jobs], 95),
        "queue_wait_minus_estimate_max_s": max((j[1] - j[4] for j in jobs), default=None),
        "batch_decode_p50_s": pct([j[2] for j in jobs], 50), "batch_decode_max_s": max((j[2] for j in jobs), default=None),
        "loop_lag_p50_s": pct(lags, 50), "loop_lag_p99_s": pct(lags, 99), "loop_lag_max_s": max(lags, default=None),
        "asr_batch_s_mean": asr_sum / max(1, asr_count),
        "utterances_ended": sum(s["utterances_ended"] for s in sessions),
        "utterances_skipped_overloaded": sum(len(s["skipped_overloaded"]) for s in sessions),
        "utterances_lost": sum(len(s["lost"]) for s in sessions),
        "sessions_not_ended_properly": [s["client"] for s in sessions
                                        if not (s["ended_last"] and s["close_code"] == P.CLOSE_NORMAL)],
        "errors_by_code": dict(errors),
        "server_counters": counters,
        "admission": {"admit_max_load": cfg_s.admit_max_load, "admit_max_wait_s": cfg_s.admit_max_wait_s,
                      "max_sessions": cfg_s.max_sessions, "max_queue_s": cfg_i.max_queue_s,
                      "speculate_max_wait_s": cfg_i.speculate_max_wait_s},
        "attempt_log": attempts, "sessions": sessions, "timeline": timeline, "jobs": jobs, "loop_lag": lag,
    }


def plot(report: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = report["result"]
    tl = r["timeline"]
    t = [x["t"] for x in tl]
    fig, axes = plt.subplots(2, 2, figsize=(14, 8.5))
    ax = axes[0][0]
    ax.plot(t, [x["live"] for x in tl], color="tab:blue", label="live sessions")
    adm = [x["t"] for x in r["attempt_log"] if x["admitted"]]
    ref = [x["t"] for x in r["attempt_log"] if not x["admitted"]]
    ax.step(sorted(adm), range(1, len(adm) + 1), where="post", color="tab:green", label=f"admitted (cumulative, {len(adm)})")
    ax.step(sorted(ref), range(1, len(ref) + 1), where="post", color="tab:red", label=f"refused 1013 (cumulative, {len(ref)})")
    ax.plot(ref, [0.5] * len(ref), "|", color="tab:red", ms=10)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("sessions")
    ax.set_title("admission: live sessions, admitted and refused starts")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax = axes[0][1]
    pts = np.array([x for s in r["sessions"] for x in s["latency"]]) if r["finals"] else np.zeros((0, 2))
    ax.scatter(pts[:, 0], pts[:, 1], s=6, alpha=0.5, color="tab:blue", label=f"emotion latency at the client ({r['finals']} finals)")
    jb = np.array(r["jobs"]) if r["jobs"] else np.zeros((0, 4))
    ax.scatter(jb[:, 0], jb[:, 1], s=4, alpha=0.4, color="tab:orange", marker="x", label="queue wait of each decoded job")
    lg = np.array(r["loop_lag"]) if r["loop_lag"] else np.zeros((0, 2))
    ax.plot(lg[:, 0], lg[:, 1], color="tab:gray", lw=0.6, label="event-loop lag")
    ax.axhline(r["latency_bound_s"], color="tab:red", ls="--", lw=1,
               label=f"silence wait + max_queue_s = {r['latency_bound_s']:g} s")
    ax.axhline(report["config"]["max_queue_s"], color="tab:orange", ls=":", lw=1, label="max_queue_s")
    ax.set_xlabel("time (s): the emotion arrived / the job's batch started")
    ax.set_ylabel("end of speech -> emotion (s)")
    ax.set_title(f"admitted sessions: p50 {r['latency_p50_s'] or 0:.2f} s, p95 {r['latency_p95_s'] or 0:.2f} s, "
                 f"max {r['latency_max_s'] or 0:.2f} s; skipped {r['utterances_skipped_overloaded']}, lost {r['utterances_lost']}",
                 fontsize=9)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax = axes[1][0]
    ax.plot(t, [x["load"] for x in tl], color="tab:orange", label="decoder load (last 10 s)")
    ax.plot(t, [x["wait_s"] for x in tl], color="tab:purple", label="wait of a new utterance (s)")
    ax.axhline(report["config"]["admit_max_load"], color="tab:orange", ls=":", lw=1, label="admit_max_load")
    ax.axhline(report["config"]["admit_max_wait_s"], color="tab:purple", ls=":", lw=1, label="admit_max_wait_s")
    ax2 = ax.twinx()
    ax2.plot(t, [x["queue"] for x in tl], color="tab:gray", lw=0.8, label="inference queue depth")
    ax2.plot(t, [x["pending_finals"] for x in tl], color="k", lw=0.8, ls="--", label="ended utterances waiting")
    ax2.set_ylabel("jobs")
    ax.set_xlabel("time (s)")
    ax.set_title("decoders: load, wait estimate, queue depth")
    ax.grid(alpha=0.3)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper left")
    ax = axes[1][1]
    codes = dict(r["errors_by_code"])
    codes["refused (start)"] = r["refused"]
    ax.bar(list(codes), list(codes.values()), color=["tab:red" if "overloaded" in k or "refused" in k else "tab:gray" for k in codes])
    for i, v in enumerate(codes.values()):
        ax.text(i, v, str(v), ha="center", va="bottom", fontsize=9)
    ax.set_ylabel("count")
    ax.set_title(f"errors by code (admitted sessions) and refused starts; {len(r['sessions_not_ended_properly'])} "
                 f"admitted sessions did not end properly", fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    m = report["machine"]
    fig.suptitle(f"emostream past capacity: {report['plan']['clients']} clients, one every {report['plan']['arrive_every_s']:g} s, "
                 f"{report['plan']['session_s']:g} s each, real-time, Whisper tiny.en on {m['cpus']} CPU cores", fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=60)
    ap.add_argument("--arrive-every-s", type=float, default=1.5)
    ap.add_argument("--session-s", type=float, default=60.0, help="audio per session (the recording, tiled)")
    ap.add_argument("--retry-s", type=float, default=10.0, help="a refused client tries again after this")
    ap.add_argument("--retry-until-s", type=float, default=110.0, help="... until this time")
    ap.add_argument("--audio", type=Path, default=DEFAULT_AUDIO)
    ap.add_argument("--split-after", type=float, default=None,
                    help="SegmenterConfig.split_after_s (default: the service's; 0: no pause splits, as before them)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    a = ap.parse_args()

    from model import load_checkpoint
    from streamer.sources import load_file
    from streamer.infer.transcriber import Transcriber

    copy = load_file(a.audio)
    n = int(a.session_s * SAMPLE_RATE)
    audio = np.tile(copy, int(np.ceil(n / len(copy))))[:n]
    config = AppConfig(server=ServerConfig(port=0), inference=InferenceConfig(device="cpu"))
    if a.split_after is not None:
        config = replace(config, segmenter=replace(config.segmenter, split_after_s=a.split_after))
    model = load_checkpoint(config.inference.checkpoint, device="cpu")
    asr = Transcriber(AsrConfig(device="cpu"))
    est = (a.clients - 1) * a.arrive_every_s + a.session_s
    print(f"{a.clients} clients, one every {a.arrive_every_s:g} s, {a.session_s:g} s each: ~{est:.0f} s", flush=True)
    report: dict[str, Any] = {
        "what": "admission and bounded latency past capacity, real Whisper, real-time streams over /v1/stream",
        "git": git_state(),
        "method": "see the docstring of bench/overload.py",
        "machine": {"cpus": os.cpu_count(), "allocator": tune_allocator(), "platform": platform.platform(), "load_avg_at_start": list(os.getloadavg()),
                    "note": "clients run in the service's process and event loop"},
        "audio": {"name": a.audio.name, "seconds_per_copy": len(copy) / SAMPLE_RATE},
        "plan": {"clients": a.clients, "arrive_every_s": a.arrive_every_s, "session_s": a.session_s,
                 "retry_s": a.retry_s, "retry_until_s": a.retry_until_s},
        "config": {"split_after_s": config.segmenter.split_after_s, "admit_max_load": config.server.admit_max_load, "admit_max_wait_s": config.server.admit_max_wait_s,
                   "max_queue_s": config.inference.max_queue_s, "speculate_max_wait_s": config.inference.speculate_max_wait_s,
                   "decoders": getattr(asr, "workers", None), "cpu_batch": config.asr.cpu_batch},
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    report["result"] = asyncio.run(run(a, model, asr, audio, config))
    report["machine"]["load_avg_at_end"] = list(os.getloadavg())
    r = report["result"]
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "overload.json").write_text(dumps(report))
    plot(report, a.out / "overload.png")
    print(json.dumps({k: v for k, v in r.items() if k not in ("attempt_log", "sessions", "timeline", "jobs", "loop_lag")}))
    print(f"wrote {a.out / 'overload.json'} and overload.png")
    return 0


if __name__ == "__main__":
    from streamer.memory import relaunch_with_allocator

    relaunch_with_allocator()  # as the service's own commands do (EMOSTREAM_ALLOCATOR): the allocator users get
    sys.exit(main())
