"""Where a burst's time goes: Whisper decode time by decoder layout and batch shape.

    .venv/bin/python bench/decoder_bench.py            # ~2 min on 2 CPU cores

When N sessions stop speaking at once, N utterances need Whisper at once. This measures, with the
service's own Transcriber (packaged tiny.en, int8, the service's window policy), how long it takes to
decode N = 1, 2, 4, 8 utterances of 3 s of real noisy speech:
- one decoder with 1 or 2 CTranslate2 threads, the N utterances in batches of 1, 2 or 4;
- two decoders in parallel (CTranslate2 replicas, `num_workers=2`, one Python thread each), 1 thread
  each, the N utterances split between them in batches of 1 or 2 (AsrConfig.workers / cpu_batch);
plus the encoder/decoder split of one utterance. Wall time of the whole burst, median of 5 runs.
`--windows 15 10` runs the whole grid once per minimum encoder window (AsrConfig.min_window_s,
default: the service's), one after the other. Writes bench/results/decoder_bench.json and
decoder_bench.png (one panel per window).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.provenance import git_state  # noqa: E402
from streamer.config import AsrConfig  # noqa: E402

AUDIO = ROOT / "tests" / "fixtures" / "speech" / "noisy_pauses.flac"
STARTS_S = (1, 6, 12, 20, 1.5, 6.5, 12.5, 20.5)  # 3 s of speech from each (the file is 30 s)


def burst(tr: Any, clips: list[np.ndarray], workers: int, batch: int) -> float:
    """Wall seconds to decode `clips` on `workers` threads, each taking batches of `batch`."""
    parts = [clips[i::workers] for i in range(workers)]

    def run(part: list[np.ndarray]) -> None:
        for s in range(0, len(part), batch):
            tr.transcribe(part[s : s + batch])

    t0 = time.perf_counter()
    threads = [threading.Thread(target=run, args=(p,)) for p in parts if p]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def median_of(fn: Any, reps: int) -> float:
    fn()  # warm
    return float(np.median([fn() for _ in range(reps)]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--windows", type=float, nargs="+", default=[AsrConfig().min_window_s],
                    help="minimum encoder windows, seconds (default: the service's)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    a = ap.parse_args()
    git = git_state()

    from faster_whisper.audio import pad_or_trim

    from streamer.sources import load_file
    from streamer.infer.transcriber import Transcriber

    audio = load_file(AUDIO)
    clips = [audio[int(s * 16_000) : int((s + 3.0) * 16_000)] for s in STARTS_S]
    layouts = [("1 decoder x 2 threads", 1, 2), ("1 decoder x 1 thread", 1, 1), ("2 decoders x 1 thread", 2, 1)]
    rows: list[dict[str, Any]] = []
    split: dict[str, Any] = {}
    for window, (name, workers, threads) in [(w, lay) for w in a.windows for lay in layouts]:
        tr = Transcriber(replace(AsrConfig(device="cpu"), workers=workers, cpu_threads=threads, min_window_s=window))
        for batch in (1, 2, 4):
            if workers == 2 and batch == 4:
                continue
            for n in (1, 2, 4, 8):
                s = median_of(lambda: burst(tr, clips[:n], workers, batch), a.reps)
                rows.append({"min_window_s": window, "layout": name, "workers": workers, "threads": threads, "batch": batch,
                             "utterances": n, "wall_s": round(s, 4)})
                print(f"window {window:g} s  {name:22s} batch {batch}  {n} utterances: {s:.3f} s", flush=True)
        if workers == 1:  # one utterance: where its time goes
            feats = np.stack([pad_or_trim(tr.model.feature_extractor(clips[0]), tr.window_frames(len(clips[0])))])
            enc_s = median_of(lambda: _t(lambda: tr.model.encode(feats)), a.reps)
            enc = tr.model.encode(feats)
            gen_s = median_of(lambda: _t(lambda: tr.model.model.generate(
                enc, [list(tr.prompt)], beam_size=1, max_length=len(tr.prompt) + 128)), a.reps)
            split[f"{name}, window {window:g} s"] = {"min_window_s": window, "window_frames": int(feats.shape[-1]),
                                                      "encoder_s": round(enc_s, 4), "decoder_s": round(gen_s, 4)}
            print(f"window {window:g} s  {name:22s} one utterance: encoder {enc_s * 1000:.0f} ms, decoder {gen_s * 1000:.0f} ms",
                  flush=True)

    report = {
        "what": "Whisper tiny.en int8 decode wall time for a burst of N 3 s utterances, by decoder layout and batch",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg_at_end": os.getloadavg()},
        "git": git, "windows_s": a.windows,
        "audio": {"name": AUDIO.name, "clip_s": 3.0, "starts_s": list(STARTS_S)},
        "reps": a.reps,
        "results": rows,
        "one_utterance": split,
    }
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "decoder_bench.json").write_text(json.dumps(report, indent=1))
    plot(report, a.out / "decoder_bench.png")
    print(f"wrote {a.out / 'decoder_bench.json'} and decoder_bench.png")
    return 0


def _t(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def plot(report: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    windows = sorted({r.get("min_window_s", 15.0) for r in report["results"]}, reverse=True)
    fig, axes = plt.subplots(1, len(windows), figsize=(7 * len(windows), 4), sharey=True, squeeze=False)
    for ax, window in zip(axes[0], windows):
        results = [r for r in report["results"] if r.get("min_window_s", 15.0) == window]
        for layout, batch in sorted({(r["layout"], r["batch"]) for r in results}):
            rs = [r for r in results if r["layout"] == layout and r["batch"] == batch]
            ax.plot([r["utterances"] for r in rs], [r["wall_s"] for r in rs], "o-" if "2 decoders" in layout else "s--",
                    label=f"{layout}, batch {batch}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("utterances ending at once")
        ax.set_ylabel("wall time to decode all (s)")
        ax.set_title(f"Whisper tiny.en int8, 3 s utterances, {window:g} s minimum window, "
                     f"{report['machine']['cpus']} CPU cores", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
