"""The allocator's cost and memory, side by side in one run: glibc untouched, glibc with its free
pages trimmed every 30 s (`trim`), glibc with the mmap threshold pinned (what the service did
before) and jemalloc; see streamer/memory.py.

    .venv/bin/python bench/allocator.py                          # ~20 min of latency runs + a 30 min soak
    .venv/bin/python bench/allocator.py --soak-minutes 5 --streams 4   # a quicker look
    .venv/bin/python bench/allocator.py --skip-soak              # cost and latency only

Method. Each variant is chosen the way a user would choose it: `EMOSTREAM_ALLOCATOR=<variant>` in
the environment of the bench's own process, which re-executes itself under jemalloc exactly as
`emostream serve` does (streamer/memory.py); the JSON records the allocator each run really had.
1. Cost and latency, one variant after another (never two at once, so they do not share the 2
   cores): bench/stream_bench.py with --patterns sync at each --streams count, the real service,
   Whisper and the bundled checkpoint, held-out noisy speech at real-time pace. CPU-s per 100
   utterances = process CPU seconds (client, server and model threads all in that process) x 100 /
   final `emotion` events; p50/p95 = end of speech -> `emotion` as the client sees it.
2. Memory: bench/soak.py with real Whisper and the bundled checkpoint (--soak-sessions sessions at
   real-time pace for --soak-minutes), one service process per variant, all variants at the same
   time so they see the same machine. RSS of each service process sampled through the run; the
   soak's own CPU-s per 100 utterances is given too (measured while sharing the cores, so compare
   it across variants, not with part 1).
The choice (`"choice"` in the JSON): among the variants whose soak RSS grew at most FLAT (1 MiB a
minute, the soak's steady-state linear fit), the one with the fewest CPU-s per 100 utterances summed
over part 1's stream counts. (The first rule, at most 3 % from the soak's first sample to its last,
held for none: every variant's first sample precedes the models' warm-up, +10-30 %.) streamer/memory.py's AUTO is set to it by hand, with the run's commit.
Writes <out>/allocator.json and <out>/allocator.png (default out: bench/results); the runs' own
JSON files go under <out>/allocator/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.provenance import git_state  # noqa: E402
from streamer.memory import fresh_environment  # noqa: E402

VARIANTS = ("glibc", "trim", "pinned", "jemalloc")
FLAT = 1.0  # the rule: a steady RSS slope of at most 1 MiB a minute over the soak (bench/soak.py's fit)


def latency_run(variant: str, streams: list[int], out: Path) -> dict[str, Any]:
    """bench/stream_bench.py under one allocator; its per-configuration cost and latency."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(ROOT / "bench" / "stream_bench.py"), "--patterns", "sync",
           "--streams", *map(str, streams), "--out", str(out)]
    t0 = time.monotonic()
    with open(out / "stream_bench.log", "w") as log:
        rc = subprocess.run(cmd, cwd=ROOT, env=fresh_environment(variant), stdout=log, stderr=subprocess.STDOUT).returncode
    if rc:
        raise RuntimeError(f"stream_bench under {variant} exited {rc}: see {out / 'stream_bench.log'}")
    report = json.loads((out / "stream_bench.json").read_text())
    rows = []
    for r in report["results"]:
        cpu_s = r["cpu_cores_used"] * r["wall_s"]
        rows.append({"streams": r["streams"], "pattern": r["pattern"], "finals": r["finals"],
                     "expected_utterances": r["expected_utterances"], "p50_s": r["p50_s"], "p95_s": r["p95_s"],
                     "cpu_s": round(cpu_s, 2), "cpu_s_per_100_utterances": round(100 * cpu_s / max(1, r["finals"]), 2),
                     "cpu_cores_used": round(r["cpu_cores_used"], 3), "asr_rtf": round(r["asr_rtf"], 4),
                     "errors": r["errors_by_code"]})
    return {"variant": variant, "allocator": report.get("allocator"), "wall_s": round(time.monotonic() - t0, 1),
            "results": rows}


def soak_runs(variants: list[str], a: argparse.Namespace, out: Path) -> dict[str, Any]:
    """bench/soak.py with real models, one service per variant, all at once."""
    procs = {}
    for v in variants:
        d = out / f"soak-{v}"
        d.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, str(ROOT / "bench" / "soak.py"), "--asr", "whisper", "--model", "bundled",
               "--sessions", str(a.soak_sessions), "--minutes", str(a.soak_minutes), "--speed", "1", "--out", str(d)]
        log = open(d / "soak.log", "w")
        procs[v] = (subprocess.Popen(cmd, cwd=ROOT, env=fresh_environment(v), stdout=log, stderr=subprocess.STDOUT), log, d)
    results = {}
    for v, (p, log, d) in procs.items():
        rc = p.wait()
        log.close()
        if not (d / "soak.json").exists():
            raise RuntimeError(f"soak under {v} exited {rc} without a report: see {d / 'soak.log'}")
        s = json.loads((d / "soak.json").read_text())
        samples = s["samples"]
        cpu = samples[-1]["cpu_s"] if samples else None
        lat = s["latency"]["client_s"] or {}
        results[v] = {"allocator": s.get("allocator"), "exit_code": rc, "utterances": s["utterances"],
                      "wall_s": s["wall_s"], "rss_idle_mb": s["memory"]["rss_idle_mb"],
                      "rss_first_mb": s["memory"]["rss_first_mb"], "rss_last_mb": s["memory"]["rss_last_mb"],
                      "rss_max_mb": s["memory"]["rss_max_mb"],
                      "rss_slope_mb_per_min_steady": s["memory"]["rss_slope_mb_per_wall_min_steady"],
                      "cpu_s": cpu, "cpu_s_per_100_utterances": round(100 * cpu / max(1, s["utterances"]), 2) if cpu else None,
                      "latency_p50_s": lat.get("p50"), "latency_p95_s": lat.get("p95"),
                      "events_lost": s["events_lost"], "error_events": s["errors"]["error_events"],
                      "rss_curve": [[x["t"], x["rss_mb"]] for x in samples]}
    return results


def choose(report: dict[str, Any]) -> dict[str, Any]:
    """The rule in the module doc, with what it saw."""
    cost = {run["variant"]: sum(r["cpu_s_per_100_utterances"] for r in run["results"]) for run in report["latency"]}
    slope = {v: s["rss_slope_mb_per_min_steady"] for v, s in report["soak"].items()
             if s["rss_slope_mb_per_min_steady"] is not None}
    flat = [v for v, m in slope.items() if m <= FLAT and v in cost]
    growth = {v: round((s["rss_last_mb"] - s["rss_first_mb"]) / s["rss_first_mb"], 4) for v, s in report["soak"].items()
              if s["rss_first_mb"]}
    return {"variant": min(flat, key=cost.__getitem__) if flat else None, "flat": flat, "rule": f"steady slope <= {FLAT} MiB/min",
            "rss_slope_mb_per_min_steady": slope, "rss_growth_first_to_last": growth, "cpu_s_per_100_summed": cost}


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    colors = {"glibc": "tab:gray", "trim": "tab:blue", "pinned": "tab:red", "jemalloc": "tab:green"}
    lat = report.get("latency", [])
    if lat:
        streams = sorted({r["streams"] for run in lat for r in run["results"]})
        width = 0.8 / len(lat)
        for i, run in enumerate(lat):
            by_n = {r["streams"]: r for r in run["results"]}
            xs = [k + (i - (len(lat) - 1) / 2) * width for k in range(len(streams))]
            c = colors.get(run["variant"])
            axes[0].bar(xs, [by_n[n]["cpu_s_per_100_utterances"] if n in by_n else 0 for n in streams], width,
                        color=c, label=f"{run['variant']} ({run['allocator']})")
            axes[1].bar(xs, [by_n[n]["p95_s"] or 0 if n in by_n else 0 for n in streams], width, color=c, label=run["variant"])
            axes[1].scatter(xs, [by_n[n]["p50_s"] or 0 if n in by_n else 0 for n in streams], color="k", s=12, zorder=3)
        for ax in axes[:2]:
            ax.set_xticks(range(len(streams)), [f"{n} sync" for n in streams])
        axes[0].set_ylabel("CPU-s per 100 utterances")
        axes[0].set_title("cost (one variant at a time)")
        axes[1].set_ylabel("end of speech -> emotion (s): bar p95, dot p50")
        axes[1].set_title("latency, streams ending together")
        axes[0].legend(fontsize=8)
    for v, s in report.get("soak", {}).items():
        curve = s["rss_curve"]
        axes[2].plot([t / 60 for t, _ in curve], [m for _, m in curve], color=colors.get(v),
                     label=f"{v}: {s['rss_first_mb']:.0f} -> {s['rss_last_mb']:.0f} MiB, "
                           f"{s['cpu_s_per_100_utterances']} CPU-s/100 utt")
    axes[2].set_xlabel("soak wall time (min)")
    axes[2].set_ylabel("service RSS (MiB)")
    axes[2].set_title("memory, real models, variants side by side")
    axes[2].legend(fontsize=8)
    git = report["git"]
    fig.suptitle(f"allocator bench at {(git.get('commit') or '?')[:10]}{' (dirty)' if git.get('dirty') else ''}, "
                 f"{report['machine']['cpus']} CPUs")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--streams", type=int, nargs="+", default=[4, 8], help="sync stream counts (default 4 8)")
    ap.add_argument("--soak-minutes", type=float, default=30.0)
    ap.add_argument("--soak-sessions", type=int, default=2, help="real-time sessions per soaked service (default 2)")
    ap.add_argument("--skip-soak", action="store_true")
    ap.add_argument("--skip-latency", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    a = ap.parse_args(argv)
    runs = a.out / "allocator"
    report: dict[str, Any] = {
        "what": "allocator cost (CPU-s per 100 utterances), latency and RSS, variants side by side",
        "method": "see the docstring of bench/allocator.py",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg_at_start": list(os.getloadavg()),
                    "note": "shared machine: other jobs may run concurrently"},
        "git": git_state(), "variants": a.variants, "streams": a.streams,
        "soak": {}, "latency": [], "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    a.out.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        report["machine"]["load_avg_at_end"] = list(os.getloadavg())
        (a.out / "allocator.json").write_text(json.dumps(report, indent=1))

    if not a.skip_latency:
        for v in a.variants:
            run = latency_run(v, a.streams, runs / f"latency-{v}")
            report["latency"].append(run)
            for r in run["results"]:
                print(f"{v:9s} ({run['allocator']}) {r['streams']:2d} sync: {r['cpu_s_per_100_utterances']:7.1f} CPU-s/100 utt  "
                      f"p50 {r['p50_s']:.2f} s  p95 {r['p95_s']:.2f} s  ({r['finals']} finals)", flush=True)
            save()
    if not a.skip_soak:
        report["soak"] = soak_runs(a.variants, a, runs)
        for v, s in report["soak"].items():
            print(f"soak {v:9s} ({s['allocator']}): RSS {s['rss_first_mb']} -> {s['rss_last_mb']} MiB (max {s['rss_max_mb']}, "
                  f"steady slope {s['rss_slope_mb_per_min_steady']} MiB/min), {s['cpu_s_per_100_utterances']} CPU-s/100 utt, "
                  f"p50 {s['latency_p50_s']} p95 {s['latency_p95_s']} s", flush=True)
    report["choice"] = choose(report)
    print(f"choice: {report['choice']}")
    report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    save()
    plot(report, a.out / "allocator.png")
    print(f"wrote {a.out / 'allocator.json'} and allocator.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
