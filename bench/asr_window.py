"""The Whisper encoder window: what a shorter minimum window saves, and what it costs in words.

    .venv/bin/python bench/asr_window.py                  # ~6 min on 2 CPU cores
    .venv/bin/python bench/asr_window.py --windows 15 10  # only these minimum windows

The service pads each utterance to an encoder window of its length + 2 s, rounded up to 5 s, at
least AsrConfig.min_window_s (model.features.whisper_window_frames); Whisper itself always uses
30 s. For each minimum window (default 30, 15, 10 and 7.5 s; steps of 2.5 s below 10) this decodes,
with the packaged tiny.en (int8, 1 thread, greedy, the service's prompt and no-speech rule):
- RAVDESS actors 17-20 (240 clips, silence trimmed): word error rate against the two known
  sentences, the clips whose transcript is off by more than 2 words (repeats, hallucinations), the
  median encoder and decoder time per clip, and the cosine of each clip's pooled encoder states
  (the emotion model's Whisper input) to the same clip's states with the 15 s window that trained
  the bundled checkpoint;
- the real recordings in ../shared/data/speech and tests/fixtures/speech, cut into utterances by the
  service's own segmenter: word edits against the 30 s window's transcript of the same utterance
  (there is no per-utterance reference), and the jfk/LJ recordings' word error rate against their
  reference transcripts (transcripts.csv), all their utterances joined.
Then the same clips and utterances once more through the service's own Transcriber (its default
AsrConfig, 1 thread), where a decode that repeats itself (gzip compression ratio above
AsrConfig.compression_ratio_threshold) is decoded again in the 30 s window: how many were, the
same word error figures, and the time per utterance with and without that second decode.
Nothing here is a test set of the emotion model: actors 17-20 are its validation actors.
Writes bench/results/asr_window.{json,png}.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
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

from bench.provenance import git_state  # noqa: E402
from tests.stream_util import word_edits as edits, words  # noqa: E402  (the suite's WER scoring, as bench/soak.py)

DATA = ROOT.parent / "shared" / "data"
SENTENCES = {"01": "kids are talking by the door", "02": "dogs are sitting by the door"}
REAL = [DATA / "speech" / "silero_test.wav", ROOT / "tests" / "fixtures" / "speech" / "noisy_pauses.flac"]
REFERENCED = ["jfk.flac", "LJ001-0002.wav", "LJ001-0004.wav", "LJ001-0006.wav", "LJ001-0008.wav"]
BASE = 15.0  # the window the bundled checkpoint's Whisper states were computed with


def step_for(window: float) -> float:
    return 5.0 if window >= 10 else 2.5


def utterances(path: Path) -> list[np.ndarray]:
    """The utterances the service's segmenter cuts from a recording (1 s of silence appended)."""
    from bench.diarization import segment
    from model.features import load_audio

    audio = load_audio(str(path))
    return [e.audio for e in segment(np.concatenate([audio, np.zeros(16_000, np.float32)]))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--windows", type=float, nargs="+", default=[30.0, 15.0, 10.0, 7.5])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    a = ap.parse_args(argv)
    git = git_state()  # before anything runs
    from faster_whisper.audio import pad_or_trim

    from model.features import load_audio, pool_whisper_states, whisper_decode, whisper_tokenizer, whisper_window_frames
    from streamer.config import AsrConfig
    from streamer.infer.transcriber import Transcriber
    from training.augment import trim_silence

    asr = Transcriber(replace(AsrConfig(device="cpu"), workers=1, cpu_threads=1))
    m = asr.model
    tok, prompt = whisper_tokenizer(m)
    rav = [(trim_silence(load_audio(p)), SENTENCES[Path(p).name.split("-")[4]])
           for actor in range(17, 21) for p in sorted(glob.glob(str(DATA / "ravdess" / f"Actor_{actor:02d}" / "*.flac")))]
    refs = {r["file"]: r["text"] for r in csv.DictReader(open(DATA / "speech" / "transcripts.csv"))}
    real = {p.name: utterances(p) for p in REAL}
    referenced = {name: utterances(DATA / "speech" / name) for name in REFERENCED}
    windows = sorted({*a.windows, BASE}, reverse=True)

    def decode(audio: np.ndarray, window: float) -> tuple[str, float, float, np.ndarray]:
        frames = whisper_window_frames(len(audio), window, 2.0, step_for(window))
        feats = pad_or_trim(m.feature_extractor(audio[: 30 * 16_000]), frames)[None]
        t0 = time.perf_counter()
        enc = m.encode(feats)
        t1 = time.perf_counter()
        text = whisper_decode(m, tok, prompt, enc, 1)[0][0]
        t2 = time.perf_counter()
        return text, t1 - t0, t2 - t1, pool_whisper_states(np.array(enc, dtype=np.float32)[0], len(audio))

    results: dict[float, dict[str, Any]] = {}
    states: dict[float, list[np.ndarray]] = {}
    texts: dict[float, dict[str, list[str]]] = {}
    for w in windows:
        e = n = 0
        enc_s, dec_s, st, off = [], [], [], []
        for audio, ref in rav:
            text, t_enc, t_dec, s = decode(audio, w)
            enc_s.append(t_enc); dec_s.append(t_dec); st.append(s)
            d = edits(words(ref), words(text))
            e += d; n += len(words(ref))
            if d > 2:
                off.append(text)
        states[w] = st
        texts[w] = {name: [decode(u, w)[0] for u in us] for name, us in real.items()}
        ref_e = ref_n = 0
        for name, us in referenced.items():
            hyp = " ".join(decode(u, w)[0] for u in us)
            ref_e += edits(words(refs[name]), words(hyp)); ref_n += len(words(refs[name]))
        results[w] = {"min_window_s": w, "step_s": step_for(w),
                      "ravdess": {"clips": len(rav), "wer": e / n, "clips_off_by_3_words_or_more": len(off), "off": off[:8],
                                  "encoder_ms_median": 1000 * float(np.median(enc_s)), "decoder_ms_median": 1000 * float(np.median(dec_s))},
                      "referenced_wer": ref_e / ref_n, "referenced_words": ref_n}
        print(f"window {w:4.1f} s: RAVDESS WER {100 * e / n:.1f} % ({len(off)} clips off by 3+ words), encoder "
              f"{results[w]['ravdess']['encoder_ms_median']:.0f} ms + decoder {results[w]['ravdess']['decoder_ms_median']:.0f} ms; "
              f"jfk/LJ WER {100 * ref_e / ref_n:.1f} %", flush=True)
    for w in windows:
        cos = [float(x @ y / np.linalg.norm(x) / np.linalg.norm(y)) for x, y in zip(states[w], states[BASE])]
        results[w]["ravdess"]["state_cosine_to_15s"] = {"median": float(np.median(cos)), "min": float(np.min(cos))}
        top = max(windows)
        diffs, e, n = [], 0, 0
        for name in real:
            for i, (x, y) in enumerate(zip(texts[top][name], texts[w][name])):
                e += edits(words(x), words(y)); n += len(words(x))
                if words(x) != words(y):
                    diffs.append({"recording": name, "utterance": i, f"{top:g}s": x, f"{w:g}s": y})
        results[w]["real"] = {"utterances": sum(len(v) for v in real.values()), "reference": f"the {top:g} s window's transcript",
                              "word_edits": e, "words": n, "utterances_differing": len(diffs), "differing": diffs}
        print(f"window {w:4.1f} s: states cosine to 15 s median {np.median(cos):.4f} min {np.min(cos):.4f}; real utterances "
              f"differing from {top:g} s: {len(diffs)} of {results[w]['real']['utterances']} ({e} word edits of {n})")
    service = service_path(asr, rav, real, referenced, refs, texts[max(windows)])
    report = {"what": "Whisper minimum encoder window: decode time, word errors, pooled-state drift",
              "method": "see the docstring of bench/asr_window.py",
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg_at_start": os.getloadavg()},
              "git": git, "asr_model": asr.name, "threads": 1,
              "results": [results[w] for w in windows], "service_path": service}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "asr_window.json").write_text(json.dumps(report, indent=1))
    plot(report, a.out / "asr_window.png")
    print(f"wrote {a.out / 'asr_window.json'} and asr_window.png")
    return 0


def service_path(asr: Any, rav: list[tuple[np.ndarray, str]], real: dict[str, list[np.ndarray]],
                 referenced: dict[str, list[np.ndarray]], refs: dict[str, str], top: dict[str, list[str]]) -> dict[str, Any]:
    """Every clip and utterance decoded alone through `asr.transcribe` (the service's window and its
    second decode of repeats): redecoded counts, word errors as above, ms per utterance."""
    def run(audio: np.ndarray) -> tuple[str, bool, float]:
        t0 = time.perf_counter()
        tr = asr.transcribe([audio])[0]
        return tr.text, tr.redecoded, time.perf_counter() - t0

    got_rav = [run(x) for x, _ in rav]
    each = [edits(words(ref), words(t)) for (_, ref), (t, _, _) in zip(rav, got_rav)]
    got_real = {name: [run(u) for u in us] for name, us in real.items()}
    diffs = [{"recording": name, "utterance": i, "30s": x, "service": y[0], "redecoded": y[1]}
             for name in real for i, (x, y) in enumerate(zip(top[name], got_real[name])) if words(x) != words(y[0])]
    got_ref = {name: [run(u) for u in us] for name, us in referenced.items()}
    ref_e = sum(edits(words(refs[n]), words(" ".join(t for t, _, _ in got_ref[n]))) for n in referenced)
    everything = got_rav + [r for v in got_real.values() for r in v] + [r for v in got_ref.values() for r in v]
    again = [s for _, r, s in everything if r]
    out = {"config": {"min_window_s": asr.config.min_window_s, "compression_ratio_threshold": asr.config.compression_ratio_threshold},
           "ravdess": {"clips": len(rav), "redecoded": sum(r for _, r, _ in got_rav), "wer": sum(each) / sum(len(words(r)) for _, r in rav),
                       "clips_off_by_3_words_or_more": sum(d > 2 for d in each)},
           "real": {"utterances": sum(len(v) for v in real.values()), "redecoded": sum(r for v in got_real.values() for _, r, _ in v),
                    "utterances_differing_from_30s": len(diffs), "word_edits_vs_30s": sum(edits(words(d["30s"]), words(d["service"])) for d in diffs),
                    "differing": diffs},
           "referenced": {"utterances": sum(len(v) for v in got_ref.values()), "redecoded": sum(r for v in got_ref.values() for _, r, _ in v),
                          "wer": ref_e / sum(len(words(refs[n])) for n in referenced)},
           "ms_per_utterance": {"redecoded": [round(1000 * s) for s in again],
                                "others_median": round(1000 * float(np.median([s for _, r, s in everything if not r])), 1)}}
    print(f"service path (window {asr.config.min_window_s:g} s, threshold {asr.config.compression_ratio_threshold}): redecoded "
          f"{out['ravdess']['redecoded']} of {len(rav)} RAVDESS clips (WER {100 * out['ravdess']['wer']:.1f} %, "
          f"{out['ravdess']['clips_off_by_3_words_or_more']} off by 3+), {out['real']['redecoded']} of {out['real']['utterances']} real "
          f"utterances ({len(diffs)} differ from 30 s), {out['referenced']['redecoded']} jfk/LJ (WER {100 * out['referenced']['wer']:.1f} %); "
          f"ms: redecoded {out['ms_per_utterance']['redecoded']}, others median {out['ms_per_utterance']['others_median']}", flush=True)
    return out


def plot(report: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rs = report["results"]
    x = np.arange(len(rs))
    names = [f"{r['min_window_s']:g} s" for r in rs]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    enc = [r["ravdess"]["encoder_ms_median"] for r in rs]
    dec = [r["ravdess"]["decoder_ms_median"] for r in rs]
    ax1.bar(x, enc, color="tab:blue", label="encoder")
    ax1.bar(x, dec, bottom=enc, color="tab:orange", label="decoder")
    ax1.set_xticks(x, names)
    ax1.set_xlabel("minimum encoder window")
    ax1.set_ylabel("ms per RAVDESS clip (median, 1 thread)")
    ax1.legend(fontsize=8)
    ax2.bar(x - 0.2, [100 * r["ravdess"]["wer"] for r in rs], 0.4, color="tab:red", label="RAVDESS 17-20 WER %")
    ax2.bar(x + 0.2, [100 * r["referenced_wer"] for r in rs], 0.4, color="tab:gray", label="jfk + LJ WER %")
    ax2.set_xticks(x, names)
    ax2.set_xlabel("minimum encoder window")
    ax2.set_ylabel("word error rate (%)")
    ax2.legend(fontsize=8)
    fig.suptitle(f"Whisper tiny.en int8 encoder window ({report['machine']['cpus']} CPU cores, "
                 f"{report['git'].get('commit', '')[:7]})", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
