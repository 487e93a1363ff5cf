"""What splitting long utterances at short pauses changes in what the live service says about real
speech: `SegmenterConfig.split_after_s` (default 8 s; `--split-after 0` turns it off) ends an
utterance that is already that long at its next pause of 0.1 s (`reason: pause`), so a long turn is
decoded while the speaker goes on and only its last part is left when they stop.

Each recording is streamed through `python -m streamer --file F --fast --json` twice, with the
split on (the default) and off (`--split-after 0`), and every `utterance.ended`, `transcript` and
`emotion` event is kept. Recordings: the real speech of `../shared/data/speech` (LJ Speech's four
sentences, JFK, silero-vad's 60 s test recording) and the stream_bench input (the fixture
noisy_pauses.flac, three copies back to back as stream_bench plays it). Per recording:
- utterances with and without the split, the pause splits and their parts' lengths;
- word edits between the two runs' transcripts of the whole recording, and the word error rate
  against the reference transcript where one exists (`transcripts.csv`: JFK and LJ);
- for every turn the split cut (an utterance of the run without it that overlaps a pause split): its
  transcript and emotion label whole, and the transcripts and labels of the utterances overlapping it.
No emotion labels exist for these recordings: the labels are reported, not scored. Cost and
latency under load are measured by bench/stream_bench.py (`--variants emostream nosplit`).

    .venv/bin/python bench/pause_split.py [--checkpoint C] [--data ../shared/data/speech]

Writes bench/results/pause_split/pause_split.{json,png}.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.provenance import git_state, write_report  # noqa: E402
from bench.real_speech import GAP_S, LJ, join, service_events  # noqa: E402
from tests.stream_util import word_edits, words  # noqa: E402  (the suite's WER scoring)

FIXTURE = ROOT / "tests" / "fixtures" / "speech" / "noisy_pauses.flac"
KEPT = ("utterance.ended", "transcript", "emotion")


def recordings(data: Path) -> dict[str, tuple[np.ndarray, str | None]]:
    """name -> (16 kHz audio, reference transcript or None)."""
    from model.features import load_audio

    refs = {r["file"]: r["text"] for r in csv.DictReader(open(data / "transcripts.csv"))}
    return {"lj": (join([data / n for n in LJ], GAP_S), " ".join(refs[n] for n in LJ)),
            "jfk": (join([data / "jfk.flac"], GAP_S), refs["jfk.flac"]),
            "silero": (join([data / "silero_test.wav"], GAP_S), None),
            "noisy_pauses_x3": (np.concatenate([np.tile(load_audio(str(FIXTURE)), 3), np.zeros(16_000, np.float32)]), None)}


def stream(wav: Path, checkpoint: str, split_after: float) -> list[dict[str, Any]]:
    """The utterance.ended, transcript and emotion events of one run of a fresh service, in order."""
    return service_events(wav, checkpoint, ["--split-after", str(split_after)], KEPT)


def rows(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per utterance: span, why it ended, transcript, label."""
    out: dict[int, dict[str, Any]] = {}
    for ev in events:
        r = out.setdefault(ev["utterance_id"], {"utterance_id": ev["utterance_id"]})
        if ev["type"] == "utterance.ended":
            r.update(start_s=ev["start_s"], end_s=ev["end_s"], reason=ev["reason"])
        elif ev["type"] == "transcript":
            r["text"] = ev.get("text", "").strip()
        else:
            r.update(label=ev["label"], top_score=round(max(ev["scores"].values()), 3), confidence=ev.get("confidence"))
    return [out[k] for k in sorted(out)]


def compare(on: list[dict[str, Any]], off: list[dict[str, Any]], reference: str | None) -> dict[str, Any]:
    text_on = " ".join(r.get("text", "") for r in on)
    text_off = " ".join(r.get("text", "") for r in off)
    splits = [r for r in on if r.get("reason") == "pause"]
    turns = []
    for whole in off:
        # the utterances of the split run that overlap it (a part may run past a whole cut at max_length)
        parts = [r for r in on if r["start_s"] < whole["end_s"] - 1e-3 and r["end_s"] > whole["start_s"] + 1e-3]
        if any(p.get("reason") == "pause" for p in parts):
            turns.append({"whole": whole, "parts": parts,
                          "word_edits": word_edits(words(whole.get("text", "")), words(" ".join(p.get("text", "") for p in parts))),
                          "label_whole": whole.get("label"), "labels_parts": [p.get("label") for p in parts]})
    out: dict[str, Any] = {
        "utterances": {"split_on": len(on), "split_off": len(off)},
        "pause_splits": len(splits),
        "split_part_seconds": [round(r["end_s"] - r["start_s"], 2) for r in splits],
        "word_edits_on_vs_off": word_edits(words(text_off), words(text_on)), "words_off": len(words(text_off)),
        "turns_cut": turns,
        "labels": {"split_on": [r.get("label") for r in on], "split_off": [r.get("label") for r in off]},
    }
    if reference is not None:
        n = len(words(reference))
        out["wer"] = {"split_on": round(word_edits(words(reference), words(text_on)) / n, 4),
                      "split_off": round(word_edits(words(reference), words(text_off)) / n, 4), "reference_words": n}
    return out


def plot(report: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["recordings"])
    fig, ax = plt.subplots(figsize=(7, 3.2))
    for k, (name, res) in enumerate(report["recordings"].items()):
        for row, (run, colour) in enumerate((("split_off", "tab:gray"), ("split_on", "tab:red"))):
            for r in res["rows"][run]:
                ax.plot([r["start_s"], r["end_s"]], [k + 0.15 * (1 - 2 * row)] * 2, color=colour, lw=5,
                        solid_capstyle="butt", label=run if k == 0 and r is res["rows"][run][0] else None)
                ax.plot([r["end_s"]], [k + 0.15 * (1 - 2 * row)], "k|", ms=9)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("seconds into the recording (one bar per utterance; | = its end)")
    ax.set_title("utterances with the pause split on (red) and off (gray)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "speech")
    ap.add_argument("--checkpoint", default="model/checkpoints/default.pt")
    ap.add_argument("--split-after", type=float, default=None, help="the split setting of the 'on' run (default: the service's)")
    ap.add_argument("--recordings", nargs="+", default=None, help="a subset of lj jfk silero noisy_pauses_x3")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "pause_split")
    a = ap.parse_args(argv)
    git = git_state()  # before anything runs
    import soundfile as sf

    from streamer.config import SegmenterConfig

    split_after = a.split_after if a.split_after is not None else SegmenterConfig().split_after_s
    recs = recordings(a.data)
    if a.recordings:
        recs = {k: v for k, v in recs.items() if k in a.recordings}
    t0 = time.monotonic()
    report: dict[str, Any] = {
        "what": "long utterances split at short pauses: utterances, transcripts and labels of real speech with the split on and off",
        "method": "see the docstring of bench/pause_split.py",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg_at_start": os.getloadavg()},
        "git": git, "checkpoint": a.checkpoint, "split_after_s": split_after,
        "split_pause_s": SegmenterConfig().split_pause_s, "recordings": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (audio, ref) in recs.items():
            wav = Path(tmp) / f"{name}.wav"
            sf.write(wav, audio, 16_000)
            on, off = rows(stream(wav, a.checkpoint, split_after)), rows(stream(wav, a.checkpoint, 0.0))
            res = compare(on, off, ref)
            res["seconds"] = round(len(audio) / 16_000, 2)
            res["rows"] = {"split_on": on, "split_off": off}
            report["recordings"][name] = res
            print(f"{name}: {len(off)} -> {len(on)} utterances, {res['pause_splits']} pause splits "
                  f"(parts {res['split_part_seconds']} s), word edits on vs off {res['word_edits_on_vs_off']} of "
                  f"{res['words_off']}" + (f", WER {res['wer']['split_off']:.3f} -> {res['wer']['split_on']:.3f}" if ref else ""),
                  flush=True)
            for t in res["turns_cut"]:
                print(f"   whole [{t['label_whole']}] {t['whole'].get('text', '')!r}")
                for p in t["parts"]:
                    print(f"    part [{p.get('label')}] {p.get('reason')} {p.get('text', '')!r}")
    report["wall_s"] = round(time.monotonic() - t0, 1)
    write_report(a.out, "pause_split", report, plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
