"""Scale-out benchmark: sessions per instance vs instances (1, 2) sharing events through Redis, and
the bus's overhead per event (publish on A -> delivered to a subscriber on B, vs. in-process).

    .venv/bin/python bench/scale_bench.py                 # ~2-3 min on 2 CPU cores
    .venv/bin/python bench/scale_bench.py --sessions 16 --events 3000

ASR is an instant stub (a fixed transcript, no Whisper): on this 2-core machine Whisper alone caps
the service at a few real-time streams, which would hide what this measures (VAD, emotion model,
fan-out, bus). Everything else is the real service: real speech, the real default checkpoint, the
WebSocket path, one instance per process (`--serve`), a real redis-server on loopback TCP.

Capacity: N sessions (the same ~30 s of real speech, sent as fast as allowed) spread round-robin over
the instances, each instance also feeding one `session=*` watcher (so every event crosses the bus
once per other instance). Throughput = audio seconds / wall seconds = real-time sessions sustained.
Writes bench/results/scale_bench.json and scale_bench.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time

from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from streamer.memory import tune_allocator  # noqa: E402
from streamer import protocol as P  # noqa: E402
from streamer.config import AppConfig, BusConfig, InferenceConfig, ServerConfig  # noqa: E402
from streamer.infer.transcriber import Transcript  # noqa: E402

SPEECH = ROOT / "tests" / "fixtures" / "speech"
CLIPS = ["jfk.flac", "LJ001-0002.wav", "LJ001-0004.wav", "LJ001-0006.wav", "LJ001-0008.wav"]
RESULTS = ROOT / "bench" / "results"


class InstantASR:
    """The SpeechToText protocol with no model: a fixed transcript at once (see the module doc)."""

    name, workers, batch_size = None, 1, 16

    def transcribe(self, audios: list[np.ndarray], words: object = None, redecode: object = None) -> list[Transcript]:
        return [Transcript("and so my fellow americans ask not what your country can do for you", 0.01, -0.2)
                for _ in audios]


def server_config(bus_url: str | None, torch_threads: int) -> AppConfig:
    return AppConfig(
        server=ServerConfig(port=0, max_sessions=256, max_subscribers=256, subscriber_queue=100_000,
                            max_realtime_factor=10_000.0),  # capacity, not the per-client throttle
        inference=InferenceConfig(device="cpu", torch_threads=torch_threads, queue_size=4096),
        bus=BusConfig(url=bus_url),
    )


# ---- one instance (a subprocess) --------------------------------------------------------------
async def serve(bus_url: str | None, torch_threads: int) -> None:
    from streamer.server import create_app

    app = create_app(server_config(bus_url, torch_threads), asr=InstantASR())
    await app.start()
    if bus_url:
        await asyncio.wait_for(app.bus.reading.wait(), 30)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, app.shutdown)
    print(json.dumps({"port": app.port}), flush=True)
    await app.wait_closed()
    await app.shutdown()


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_instances(n: int, bus_url: str | None, torch_threads: int) -> list[tuple[subprocess.Popen[str], int]]:
    procs = []
    for _ in range(n):
        cmd = [sys.executable, __file__, "--serve", "--torch-threads", str(torch_threads)]
        if bus_url:
            cmd += ["--bus", bus_url]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT))
    out = []
    for p in procs:
        line = p.stdout.readline() if p.stdout else ""
        if not line:
            raise RuntimeError(f"instance {p.pid} did not start (rc {p.poll()})")
        out.append((p, json.loads(line)["port"]))
    return out


def stop_instances(procs: list[tuple[subprocess.Popen[str], int]]) -> None:
    for p, _ in procs:
        p.send_signal(signal.SIGTERM)
    for p, _ in procs:
        p.wait(60)


def speech() -> np.ndarray:
    from model.features import load_audio

    gap = np.zeros(int(0.8 * 16_000), dtype=np.float32)
    parts = []
    for name in CLIPS:
        parts += [load_audio(str(SPEECH / name), sr=16_000), gap]
    return np.concatenate(parts)


async def drive(ports: list[int], audio: np.ndarray, n: int) -> dict[str, Any]:
    """N sessions over the instances, a `*` watcher on each; wall time until every watcher saw
    every session end."""
    from websockets.asyncio.client import connect

    from streamer.client import stream_audio

    urls = [f"ws://127.0.0.1:{p}" for p in ports]
    watchers = [await connect(u + P.SUBSCRIBE_PATH + "?session=*", max_size=None) for u in urls]
    seen = [0] * len(urls)

    async def watch(i: int) -> None:
        ended = 0
        async for msg in watchers[i]:
            seen[i] += 1
            if json.loads(msg)["type"] == P.SESSION_ENDED:
                ended += 1
                if ended == n:
                    return

    watching = [asyncio.create_task(watch(i)) for i in range(len(urls))]
    t0 = time.perf_counter()
    results = await asyncio.gather(*[
        stream_audio(urls[k % len(urls)], audio, realtime=False, chunk_s=0.2, session_id=f"s{k}", timeout_s=600)
        for k in range(n)])
    sources_done = time.perf_counter() - t0
    await asyncio.wait_for(asyncio.gather(*watching), 120)
    wall = time.perf_counter() - t0
    for w in watchers:
        await w.close()
    events = sum(len(r.events) for r in results)
    emotions = sum(len(r.of_type(P.EMOTION)) for r in results)
    return {"wall_s": wall, "sources_done_s": sources_done, "events_per_source_total": events,
            "emotions": emotions, "events_seen_per_watcher": seen, "every_watcher_saw_everything": all(s == events for s in seen)}


def capacity(label: str, instances: int, bus_url: str | None, audio: np.ndarray, n: int, cores: int,
             repeat: int, redis_pid: int) -> dict[str, Any]:
    """The median of `repeat` runs on the same warm instances (the machine is shared: noisy)."""
    threads = max(1, cores // instances)
    procs = start_instances(instances, bus_url, threads)
    runs = []
    try:
        for _ in range(repeat):
            cpu0, redis0 = [cpu_s(p.pid) for p, _ in procs], cpu_s(redis_pid)
            res = asyncio.run(drive([port for _, port in procs], audio, n))
            res["cpu_s"] = [cpu_s(p.pid) - c for (p, _), c in zip(procs, cpu0)]
            res["redis_cpu_s"] = round(cpu_s(redis_pid) - redis0, 2)
            runs.append(res)
    finally:
        stop_instances(procs)
    runs.sort(key=lambda r: r["wall_s"])
    res = runs[len(runs) // 2]
    cpu = res.pop("cpu_s")
    audio_s = n * len(audio) / 16_000
    rt = audio_s / res["wall_s"]
    row = {"config": label, "instances": instances, "bus": "redis" if bus_url else "in-process", "sessions": n,
           "torch_threads_per_instance": threads, "audio_s_total": round(audio_s, 1), "runs": repeat,
           "wall_s_all_runs": [round(r["wall_s"], 2) for r in runs], **res,
           "realtime_sessions_total": round(rt, 2), "realtime_sessions_per_instance": round(rt / instances, 2),
           "cpu_s_per_instance": [round(c, 1) for c in cpu],
           "cpu_s_per_audio_s": round(sum(cpu) / audio_s, 4),
           # CPU time is robust to other load on a shared machine; wall time is not
           "realtime_sessions_per_core": round(audio_s / (sum(cpu) + res["redis_cpu_s"]), 1)}
    print(f"  {label}: {n} sessions x {len(audio) / 16_000:.1f} s in {res['wall_s']:.1f} s -> "
          f"{rt:.1f} real-time sessions ({rt / instances:.1f} per instance), cpu {row['cpu_s_per_instance']} s "
          f"+ redis {res['redis_cpu_s']} s -> {row['realtime_sessions_per_core']} per core",
          flush=True)
    return row


# ---- bus overhead per event ------------------------------------------------------------------
async def overhead(bus_url: str, events: int, rate: float) -> dict[str, Any]:
    """Two Apps in this process, events published straight into A's hub (no audio, no inference);
    latency from Hub.publish on A to a WebSocket subscriber on A (in-process) and on B (via Redis)."""
    from websockets.asyncio.client import connect

    from model import load_checkpoint
    from streamer.server import create_app

    model = load_checkpoint(InferenceConfig().checkpoint, device="cpu")  # shared, idle
    apps = [create_app(server_config(bus_url, 1), model=model, asr=InstantASR()) for _ in range(2)]
    for app in apps:
        await app.start()
        await app.bus.reading.wait()
    a, b = apps
    lat: dict[str, list[float]] = {"in_process": [], "bus": []}

    async def listen(app: Any, key: str, ready: asyncio.Event) -> None:
        async with connect(app.url + P.SUBSCRIBE_PATH + "?session=*", max_size=None) as ws:
            ready.set()
            async for msg in ws:
                now = time.perf_counter()
                ev = json.loads(msg)
                lat[key].append((now - ev["t"]) * 1000)
                if ev["seq"] == events - 1:
                    return

    ready = [asyncio.Event(), asyncio.Event()]
    tasks = [asyncio.create_task(listen(a, "in_process", ready[0])), asyncio.create_task(listen(b, "bus", ready[1]))]
    await asyncio.gather(*(r.wait() for r in ready))
    scores = {"neutral": 0.41, "happy": 0.22, "sad": 0.12, "angry": 0.1, "fear": 0.06, "disgust": 0.05, "surprise": 0.04}
    t0 = time.perf_counter()
    for i in range(events):
        ev = P.event(P.EMOTION, "bench", i, utterance_id=i // 6, label="neutral", scores=scores,
                     modality_weights={"speech": 0.6, "text": 0.4}, latency_ms=812.5, asr_ms=150.1, text_masked=False)
        ev["t"] = time.perf_counter()
        a.hub.publish(ev)
        await asyncio.sleep(max(0.0, t0 + (i + 1) / rate - time.perf_counter()))
    await asyncio.wait_for(asyncio.gather(*tasks), 60)
    burst_n = events
    t1 = time.perf_counter()
    done = asyncio.Event()

    async def count() -> None:
        got = 0
        async with connect(b.url + P.SUBSCRIBE_PATH + "?session=burst", max_size=None) as ws:
            started.set()
            async for _ in ws:
                got += 1
                if got == burst_n:
                    done.set()
                    return

    started = asyncio.Event()
    counter = asyncio.create_task(count())
    await started.wait()
    t1 = time.perf_counter()
    for i in range(burst_n):
        a.hub.publish(P.event(P.EMOTION, "burst", i, label="neutral", scores=scores))
        if i % 200 == 199:
            await asyncio.sleep(0)
    await asyncio.wait_for(done.wait(), 60)
    burst_s = time.perf_counter() - t1
    await counter
    errors = sum(app.metrics.value("emostream_bus_errors_total") for app in apps)
    for app in apps:
        await app.shutdown()

    def pct(xs: list[float]) -> dict[str, float]:
        arr = np.asarray(xs)
        return {"p50_ms": round(float(np.percentile(arr, 50)), 3), "p99_ms": round(float(np.percentile(arr, 99)), 3),
                "max_ms": round(float(arr.max()), 3), "n": len(xs)}

    diff = np.asarray(lat["bus"]) - np.asarray(lat["in_process"])
    return {"events": events, "rate_per_s": rate, "in_process": pct(lat["in_process"]), "bus": pct(lat["bus"]),
            "overhead": pct(list(diff)), "burst_events": burst_n, "burst_events_per_s": round(burst_n / burst_s),
            "bus_errors": errors, "latencies_ms": {k: [round(x, 3) for x in v] for k, v in lat.items()}}


# ---- redis, report ---------------------------------------------------------------------------
def start_redis(tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp)], stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        r = subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True, text=True)
        if r.stdout.strip() == "PONG":
            return proc, f"redis://127.0.0.1:{port}/0"
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("redis-server did not start")


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    rows = report["capacity"]
    names = [r["config"] for r in rows]
    x = np.arange(len(rows))
    ax1.bar(x - 0.27, [r["realtime_sessions_total"] for r in rows], 0.27, label="total (wall clock)")
    ax1.bar(x, [r["realtime_sessions_per_instance"] for r in rows], 0.27, label="per instance (wall clock)")
    ax1.bar(x + 0.27, [r["realtime_sessions_per_core"] for r in rows], 0.27, label="per CPU core (CPU time)")
    ax1.set_xticks(x, names, fontsize=8)
    ax1.set_ylabel("real-time sessions sustained")
    ax1.set_title(f"capacity, {report['machine']['cpus']} CPU cores, instant ASR stub")
    ax1.legend(loc="lower left", fontsize=8)
    o = report["overhead"]
    for key, label in (("in_process", "in-process"), ("bus", "via Redis (A -> B)")):
        xs = np.sort(o["latencies_ms"][key])
        ax2.plot(xs, np.linspace(0, 1, len(xs)), label=f"{label}: p50 {o[key]['p50_ms']:.2f} ms, p99 {o[key]['p99_ms']:.2f} ms")
    ax2.set_xscale("log")
    ax2.set_xlabel("Hub.publish -> subscriber received (ms)")
    ax2.set_ylabel("fraction of events")
    ax2.set_title(f"per-event latency, {o['events']} events at {o['rate_per_s']:.0f}/s")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sessions", type=int, default=12, help="concurrent sessions per capacity run")
    p.add_argument("--repeat", type=int, default=3, help="capacity runs per configuration (median kept)")
    p.add_argument("--events", type=int, default=2000, help="events for the overhead measurement")
    p.add_argument("--rate", type=float, default=500.0, help="events per second for the overhead measurement")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--bus", default=None, help=argparse.SUPPRESS)
    p.add_argument("--torch-threads", type=int, default=1, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.serve:
        asyncio.run(serve(a.bus, a.torch_threads))
        return 0
    import tempfile

    cores = os.cpu_count() or 1
    audio = speech()
    with tempfile.TemporaryDirectory() as tmp:
        redis, url = start_redis(Path(tmp))
        try:
            print(f"capacity ({a.sessions} sessions of {len(audio) / 16_000:.1f} s real speech, {cores} cores):", flush=True)
            rows = [capacity("1 instance, in-process bus", 1, None, audio, a.sessions, cores, a.repeat, redis.pid),
                    capacity("1 instance, Redis bus", 1, url, audio, a.sessions, cores, a.repeat, redis.pid),
                    capacity("2 instances, Redis bus", 2, url, audio, a.sessions, cores, a.repeat, redis.pid)]
            print("bus overhead per event:", flush=True)
            over = asyncio.run(overhead(url, a.events, a.rate))
            print(f"  in-process p50 {over['in_process']['p50_ms']} ms p99 {over['in_process']['p99_ms']} ms; "
                  f"via Redis p50 {over['bus']['p50_ms']} ms p99 {over['bus']['p99_ms']} ms; "
                  f"burst {over['burst_events_per_s']} events/s", flush=True)
            redis_version = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.strip()
        finally:
            redis.kill()
            redis.wait()
    import redis as redis_py

    report = {
        "machine": {"cpus": cores, "allocator": tune_allocator(), "load_average_at_end": [round(x, 2) for x in os.getloadavg()], "platform": platform.platform(), "python": platform.python_version(),
                    "redis_server": redis_version, "redis_py": redis_py.__version__},
        "asr": "instant stub (fixed transcript, no Whisper): capacity excludes ASR; see bench/stream_bench.py for Whisper",
        "model": "default checkpoint, CPU, torch threads = cores // instances",
        "audio": {"clips": CLIPS, "seconds": round(len(audio) / 16_000, 2)},
        "capacity": rows,
        "overhead": over,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "scale_bench.json").write_text(json.dumps(report, indent=1) + "\n")
    plot(report, RESULTS / "scale_bench.png")
    print(f"wrote {RESULTS / 'scale_bench.json'} and .png")
    return 0


if __name__ == "__main__":
    from streamer.memory import relaunch_with_allocator

    relaunch_with_allocator()  # as the service's own commands do (EMOSTREAM_ALLOCATOR): the allocator users get
    sys.exit(main())
