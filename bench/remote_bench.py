"""Remote inference benchmark: end-of-speech -> `emotion` latency with the models in the service
process (default) vs in one `python -m streamer.infer.worker` fed through Redis (--inference), for N
concurrent real-time streams of real noisy speech, in the same run on the same machine.

    .venv/bin/python bench/remote_bench.py                      # 1 and 4 streams, both placements
    .venv/bin/python bench/remote_bench.py --streams 1 2 4 --repeat 2

Latency is measured at the client as in bench/stream_bench.py (emotion received - audio up to the
utterance's end of speech sent, so it includes the 0.5 s silence wait). A fresh redis-server runs
on a private unix socket; the worker is restarted per level so its jobs/batches count (dynamic
batching) is per level. Writes bench/results/remote_bench.json and remote_bench.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.provenance import git_state  # noqa: E402

from streamer.memory import tune_allocator  # noqa: E402
from streamer import protocol as P  # noqa: E402
from streamer.client import stream_audio  # noqa: E402
from streamer.config import AppConfig, InferenceConfig, ServerConfig  # noqa: E402

DEFAULT_AUDIO = ROOT / "tests" / "fixtures" / "speech" / "noisy_pauses.flac"


def start_redis(folder: Path) -> tuple[subprocess.Popen[bytes], str]:
    sock = folder / "redis.sock"
    proc = subprocess.Popen(["redis-server", "--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700",
                             "--save", "", "--appendonly", "no", "--dir", str(folder)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if subprocess.run(["redis-cli", "-s", str(sock), "ping"], capture_output=True, text=True).stdout.strip() == "PONG":
            return proc, f"unix://{sock}"
        time.sleep(0.05)  # poll interval for readiness, bounded by the deadline
    proc.kill()
    raise RuntimeError("redis-server did not start")


class WorkerProc:
    """`python -m streamer.infer.worker` as a subprocess: started, waited for (bounded), stopped."""

    def __init__(self, url: str, checkpoint: Path, max_batch: int, max_wait_ms: float) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "streamer.infer.worker", "--bus", url, "--checkpoint", str(checkpoint), "--device", "cpu",
             "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms)],
            cwd=ROOT, stdout=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [self.lines.put(x) for x in self.proc.stdout or ()], daemon=True).start()
        line = self.lines.get(timeout=120)
        if "ready" not in line:
            raise RuntimeError(f"worker did not start: {line}")

    def stop(self) -> str:
        """SIGTERM; returns its last line ('... N jobs in M batches ...')."""
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)
        out = ""
        while not self.lines.empty():
            out = self.lines.get_nowait().strip()
        return out


async def run_level(config: AppConfig, model: Any, asr: Any, audio: np.ndarray, n: int) -> dict[str, Any]:
    from streamer.server import create_app

    app = create_app(config, model=model, asr=asr)
    await app.start()
    c0 = os.times()
    w0 = time.monotonic()
    results = await asyncio.gather(*[
        stream_audio(app.url, audio, realtime=True, session_id=f"bench-{i}", timeout_s=600) for i in range(n)])
    wall = time.monotonic() - w0
    c1 = os.times()
    m = app.metrics
    jobs = int(m.value("emostream_remote_job_seconds_count"))
    remote = {"jobs": jobs, "job_mean_s": m.value("emostream_remote_job_seconds_sum") / max(1, jobs),
              "timeouts": m.value("emostream_remote_timeouts_total"), "errors": m.value("emostream_remote_errors_total")}
    await app.shutdown()
    lat = []
    errors = 0
    for res in results:
        ends = {e["utterance_id"]: e for e in res.of_type(P.UTTERANCE_ENDED)}
        errors += len(res.of_type(P.ERROR))
        for ev, t in zip(res.events, res.received_at):
            if ev["type"] == P.EMOTION:
                lat.append(t - res.sent_time(ends[ev["utterance_id"]]["end_s"]))
    arr = np.array(lat) if lat else np.array([np.nan])
    return {
        "streams": n, "utterances": len(lat), "error_events": errors,
        "latency_s": {"p50": float(np.percentile(arr, 50)), "p95": float(np.percentile(arr, 95)),
                      "max": float(arr.max()), "mean": float(arr.mean())},
        "latencies_s": [round(x, 4) for x in lat],
        "service_cpu_cores": ((c1.user - c0.user) + (c1.system - c0.system)) / wall,  # this process only
        "wall_s": wall,
        "remote": remote if config.inference.remote else None,
    }


def plot(report: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = report["streams"]
    fig, axes = plt.subplots(1, len(levels), figsize=(4.5 * len(levels), 3.6), squeeze=False)
    hi = max(2.0, max(max(r["latencies_s"] or [0]) for v in report["results"].values() for r in v))
    bins = np.linspace(0, hi * 1.05, 40)
    for ax, n in zip(axes[0], levels):
        for name, color in (("in_process", "tab:blue"), ("remote_1_worker", "tab:green")):
            r = next(x for x in report["results"][name] if x["streams"] == n)
            ax.hist(r["latencies_s"], bins=bins, alpha=0.6, color=color,
                    label=f"{name}: p50 {r['latency_s']['p50']:.2f} s, p95 {r['latency_s']['p95']:.2f} s")
        ax.set_title(f"{n} real-time stream{'s' if n > 1 else ''}")
        ax.set_xlabel("end of speech -> emotion (s)")
        ax.legend(fontsize=7)
    m = report["machine"]
    fig.suptitle(f"in-process vs remote inference (Redis + 1 worker) - {m['cpus']} CPU cores, load "
                 f"{m['load_avg_at_start'][0]:.1f} at start, {report['audio']['name']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--audio", type=Path, default=DEFAULT_AUDIO)
    ap.add_argument("--seconds", type=float, default=30.0, help="first S seconds of the recording (per stream)")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--checkpoint", type=Path, default=None, help="default: the bundled checkpoint")
    ap.add_argument("--max-batch", type=int, default=8, help="worker: jobs per batch")
    ap.add_argument("--max-wait-ms", type=float, default=10.0, help="worker: wait for company per batch")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    a = ap.parse_args()

    from tqdm import tqdm

    from model import load_checkpoint
    from streamer.sources import load_file
    from streamer.infer.transcriber import Transcriber

    git = git_state()  # before anything runs
    inf = InferenceConfig(device="cpu") if a.checkpoint is None else InferenceConfig(checkpoint=a.checkpoint, device="cpu")
    base = AppConfig(server=ServerConfig(port=0, max_sessions=64), inference=inf)
    audio = np.tile(load_file(a.audio)[: int(a.seconds * 16_000)], a.repeat)
    report: dict[str, Any] = {
        "what": "end-of-speech -> emotion latency, N concurrent real-time streams over /v1/stream (client-measured): "
                "models in the service process vs in one remote worker (python -m streamer.infer.worker) through Redis",
        "machine": {"cpus": os.cpu_count(), "allocator": tune_allocator(), "platform": platform.platform(), "load_avg_at_start": os.getloadavg(),
                    "note": "shared machine, other engineers' jobs may run concurrently; service, worker and "
                            "redis-server all run on these cores"},
        "audio": {"name": a.audio.name, "seconds": len(audio) / 16_000},
        "checkpoint": os.path.relpath(inf.checkpoint, ROOT),
        "worker": {"max_batch": a.max_batch, "max_wait_ms": a.max_wait_ms, "device": "cpu"},
        "streams": a.streams,
        "results": {"in_process": [], "remote_1_worker": []},
        "git": git,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    full = load_checkpoint(inf.checkpoint, device="cpu")
    head = load_checkpoint(inf.checkpoint, device="cpu", load_encoder=False)
    whisper = Transcriber(base.asr)
    with tempfile.TemporaryDirectory(prefix="remote-bench-") as tmp:
        redis_proc, url = start_redis(Path(tmp))
        try:
            remote_cfg = replace(base, inference=replace(inf, remote=url))
            for n in tqdm(a.streams, desc="levels"):
                r = asyncio.run(run_level(base, full, whisper, audio, n))
                report["results"]["in_process"].append(r)
                tqdm.write(f"in-process {n} streams: p50 {r['latency_s']['p50']:.2f} s p95 {r['latency_s']['p95']:.2f} s "
                           f"({r['utterances']} utterances, {r['error_events']} errors)")
                worker = WorkerProc(url, inf.checkpoint, a.max_batch, a.max_wait_ms)
                try:
                    r = asyncio.run(run_level(remote_cfg, head, None, audio, n))
                finally:
                    r["worker_summary"] = worker.stop()
                report["results"]["remote_1_worker"].append(r)
                tqdm.write(f"remote     {n} streams: p50 {r['latency_s']['p50']:.2f} s p95 {r['latency_s']['p95']:.2f} s "
                           f"({r['utterances']} utterances, {r['error_events']} errors; job mean "
                           f"{r['remote']['job_mean_s']:.2f} s; worker: {r['worker_summary']})")
        finally:
            redis_proc.kill()
            redis_proc.wait(10)
    report["machine"]["load_avg_at_end"] = os.getloadavg()
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "remote_bench.json").write_text(json.dumps(report, indent=1))
    plot(report, a.out / "remote_bench.png")
    print(f"wrote {a.out / 'remote_bench.json'} and remote_bench.png")
    return 0


if __name__ == "__main__":
    from streamer.memory import relaunch_with_allocator

    relaunch_with_allocator()  # as the service's own commands do (EMOSTREAM_ALLOCATOR): the allocator users get
    sys.exit(main())
