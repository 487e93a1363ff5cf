"""Whisper's window margin on long utterances: word errors, decode time and pooled-state drift.

The service gives an utterance an encoder window of its length + `AsrConfig.window_margin_s`
(2 s), rounded up to 5 s, at least 10 s (bench/asr_window.py chose the minimum). The margin is
what sends an utterance of 8-10 s to a 15 s window, and the first part of a long turn split at a
short pause is 8.5-9 s long. This bench decodes long utterances with known words under several
margins:
- composites of RAVDESS validation actors 17-20 (the clips of one actor, silence trimmed to 0.1 s
  each side, back to back in a random order until the composite lands in a band): band 8-9 s
  (margin 2 s: a 15 s window; 1 s: 10 s) and band 13-14 s (20 s vs 15 s), 15 composites per actor
  and band; reference = the clips' sentences in order;
- the first parts of the long turns of the real recordings that the service's segmenter splits at
  a pause (silero's test recording and the stream_bench input), compared with the 2 s margin's
  transcript (no reference exists).
Per margin and band: word error rate, composites off by 3+ words, encoder and decoder ms (median,
1 thread), and the pooled Whisper states' cosine to the 2 s margin's (what the emotion model reads).

    .venv/bin/python bench/asr_margin.py [--margins 2 1 0.5] [--steps 5 1] [--seed 0]

`--steps`: the rounding step of the window too (5 s: the service's); every margin is run with
every step, and the 2 s margin with the 5 s step is the reference.

Writes bench/results/asr_margin/asr_margin.{json,png}.
"""

from __future__ import annotations

import argparse
import glob
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.asr_window import DATA, REAL, SENTENCES  # noqa: E402
from bench.provenance import git_state, write_report  # noqa: E402
from tests.stream_util import word_edits as edits, words  # noqa: E402

SR = 16_000
BANDS = {"8-9 s": (8.0, 9.0), "13-14 s": (13.0, 14.0)}
PER_ACTOR = 15


def composites(rng: np.random.Generator, actors: range = range(17, 21),
               per_actor: int = PER_ACTOR) -> dict[str, list[tuple[np.ndarray, str]]]:
    """band -> [(audio, reference)]: one actor's trimmed clips back to back until the length lands in the band."""
    from model.features import load_audio
    from training.augment import trim_silence

    out: dict[str, list[tuple[np.ndarray, str]]] = {b: [] for b in BANDS}
    for actor in actors:
        clips = [(trim_silence(load_audio(p), margin_s=0.1), SENTENCES[Path(p).name.split("-")[4]])
                 for p in sorted(glob.glob(str(DATA / "ravdess" / f"Actor_{actor:02d}" / "*.flac")))]
        for band, (lo, hi) in BANDS.items():
            made = 0
            while made < per_actor:
                audio, ref = np.zeros(0, np.float32), []
                for i in rng.permutation(len(clips)):
                    audio = np.concatenate([audio, clips[i][0]])
                    ref.append(clips[i][1])
                    if len(audio) >= lo * SR:
                        break
                if len(audio) <= hi * SR:
                    out[band].append((audio, " ".join(ref)))
                    made += 1
    return out


def split_parts() -> list[np.ndarray]:
    """The first parts (reason "pause") of the real recordings' long turns, as the service cuts them."""
    from bench.diarization import segment
    from model.features import load_audio

    return [e.audio for path in REAL for e in segment(np.concatenate([load_audio(str(path)), np.zeros(SR, np.float32)]))
            if e.reason == "pause"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--margins", type=float, nargs="+", default=[2.0, 1.0, 0.5])
    ap.add_argument("--steps", type=float, nargs="+", default=[5.0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "asr_margin")
    a = ap.parse_args(argv)
    git = git_state()
    from faster_whisper.audio import pad_or_trim

    from model.features import pool_whisper_states, whisper_decode, whisper_tokenizer, whisper_window_frames
    from streamer.config import AsrConfig
    from streamer.infer.transcriber import Transcriber

    base = (2.0, 5.0)  # (margin, step): the service's
    configs = [(mg, st) for st in sorted({*a.steps, base[1]}, reverse=True) for mg in sorted({*a.margins, base[0]}, reverse=True)]
    asr = Transcriber(replace(AsrConfig(device="cpu"), workers=1, cpu_threads=1))
    m = asr.model
    tok, prompt = whisper_tokenizer(m)
    sets = composites(np.random.default_rng(a.seed))
    real = split_parts()

    def decode(audio: np.ndarray, margin: float, step: float) -> tuple[str, float, float, np.ndarray, int]:
        frames = whisper_window_frames(len(audio), 10.0, margin, step)
        feats = pad_or_trim(m.feature_extractor(audio[: 30 * SR]), frames)[None]
        t0 = time.perf_counter()
        enc = m.encode(feats)
        t1 = time.perf_counter()
        text = whisper_decode(m, tok, prompt, enc, 1)[0][0]
        t2 = time.perf_counter()
        return text, t1 - t0, t2 - t1, pool_whisper_states(np.array(enc, dtype=np.float32)[0], len(audio)), frames // 100

    decoded: dict[tuple[float, float], dict[str, list[tuple[str, float, float, np.ndarray, int]]]] = {}
    for mg, st in configs:
        decoded[mg, st] = {band: [decode(x, mg, st) for x, _ in items] for band, items in sets.items()}
        decoded[mg, st]["real split parts"] = [decode(x, mg, st) for x in real]
        print(f"margin {mg:g} s, step {st:g} s decoded", flush=True)
    results = []
    for mg, st in configs:
        got_all = decoded[mg, st]
        row: dict[str, Any] = {"margin_s": mg, "step_s": st, "bands": {}}
        for band in [*sets, "real split parts"]:
            got = got_all[band]
            ref_texts = [r for _, r in sets[band]] if band in sets else [t[0] for t in decoded[base][band]]
            each = [edits(words(r), words(t[0])) for r, t in zip(ref_texts, got)]
            e, n = sum(each), sum(len(words(r)) for r in ref_texts)
            seconds = [len(x) / SR for x, _ in sets[band]] if band in sets else [len(x) / SR for x in real]
            cos = [float(x @ y / np.linalg.norm(x) / np.linalg.norm(y)) for x, y in
                   zip((t[3] for t in got), (t[3] for t in decoded[base][band]))]
            row["bands"][band] = {
                "utterances": len(got),
                "seconds": [round(min(seconds), 2), round(max(seconds), 2)] if band in sets else [round(x, 2) for x in seconds],
                "windows_s": sorted({t[4] for t in got}),
                "reference": "the clips' sentences" if band in sets else f"the {base[0]:g} s margin's transcript (step {base[1]:g} s)",
                "wer": e / n if n else None, "word_edits": e, "words": n,
                "off_by_3_words_or_more": sum(d >= 3 for d in each),
                "encoder_ms_median": 1000 * float(np.median([t[1] for t in got])) if got else None,
                "decoder_ms_median": 1000 * float(np.median([t[2] for t in got])) if got else None,
                "state_cosine_to_2s": {"median": float(np.median(cos)), "min": float(np.min(cos))} if cos else None,
                "texts": [t[0] for t in got] if band not in sets else [t[0] for d, t in zip(each, got) if d >= 3][:6],
            }
            b = row["bands"][band]
            print(f"margin {mg:g} s, step {st:g} s, {band}: windows {b['windows_s']} s, WER {100 * (b['wer'] or 0):.1f} % "
                  f"({b['off_by_3_words_or_more']} off by 3+), encoder {b['encoder_ms_median']:.0f} ms + decoder "
                  f"{b['decoder_ms_median']:.0f} ms, states cosine to 2 s median {b['state_cosine_to_2s']['median']:.4f} "
                  f"min {b['state_cosine_to_2s']['min']:.4f}", flush=True)
        results.append(row)
    report = {"what": "Whisper window margin on long utterances: word errors, decode time, pooled-state drift",
              "method": "see the docstring of bench/asr_margin.py",
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg_at_start": os.getloadavg()},
              "git": git, "asr_model": asr.name, "threads": 1, "seed": a.seed, "results": results}
    write_report(a.out, "asr_margin", report, plot)
    return 0


def plot(report: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rs = report["results"]
    bands = list(rs[0]["bands"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    w = 0.8 / len(rs)
    for k, r in enumerate(rs):
        x = np.arange(len(bands)) + (k - (len(rs) - 1) / 2) * w
        ms = [r["bands"][b]["encoder_ms_median"] + r["bands"][b]["decoder_ms_median"] for b in bands]
        ax1.bar(x, ms, w, label=f"margin {r['margin_s']:g} s, step {r.get('step_s', 5):g} s")
        ax2.bar(x, [100 * (r["bands"][b]["wer"] or 0) for b in bands], w, label=f"margin {r['margin_s']:g} s, step {r.get('step_s', 5):g} s")
    for ax, label in ((ax1, "encoder + decoder ms (median, 1 thread)"), (ax2, "word error rate % (real parts: vs 2 s)")):
        ax.set_xticks(np.arange(len(bands)), bands)
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.suptitle(f"Whisper tiny.en window margin on long utterances ({report['git'].get('commit', '')[:7]})", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
