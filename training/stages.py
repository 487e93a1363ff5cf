"""The recipe that built the bundled checkpoint (model/checkpoints/default.pt, MODEL_CARD.md) and
every report in training/reports/, as stages that can be run one at a time:

    emostream train [--data ../shared/data] [--runs runs] [--stages text,speech,...] [--dry-run]
    python -m training recipe ...          (the same; training/recipe.sh calls it too)

  text       all-MiniLM-L6-v2 fine-tuned on MELD train, each utterance with its 3 earlier ones as a
             sentence pair (embeddings frozen), best epoch on MELD dev WF1   -> RUNS/text/encoder.pt
             (skipped when that file exists; --text-from CHECKPOINT takes it back out of a checkpoint)
  speech     training.acted splits, nothing ever chosen on a test set: held-out corpus both ways
             (RAVDESS statement 01 -> EmoDB, EmoDB -> RAVDESS; run side by side), the reverse
             held-out sentence (statement 02 -> 01), then the shipped branch on RAVDESS statement 01
             (actors 1-16) + EmoDB (speakers other than 11-13); CNN alone or CNN + Whisper chosen on
             its validation sets                                               -> RUNS/speech/speech.pt
  fusion     dialogue GRU + fusion + classifier on the shipped split, temperature fitted on
             validation, test scored once -> RUNS/recipe/model.pt and the CHECKPOINT; and the same on
             the RAVDESS-only split, whose checkpoint is the one tested on EmoDB (held-out corpus)
  sentiment  a linear head on the checkpoint's sentence vectors, fitted on MELD's sentiment labels,
             chosen on dev, written into the CHECKPOINT                     -> REPORTS/sentiment.json
  reports    the held-out transfer summary, and each run's report copied to REPORTS

A stage reads what the earlier ones wrote under RUNS, so `--stages fusion,sentiment` re-runs the
last two on the runs already there. The check behind stage 1's settings (training/text_transfer.py,
about 25 CPU minutes per run) and the paper-split score are not stages: training/README.md.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

STAGES = ("text", "speech", "fusion", "sentiment", "reports")
HELD_OUT = ("to-emodb", "to-ravdess", "sentence02")  # speech runs whose reports are kept


@dataclass(frozen=True)
class Step:
    """One command of the recipe: `python -m MODULE ARGS`, or a local action (`run`, for copying
    reports). Steps of one stage with the same `together` number run side by side."""

    stage: str
    module: str = ""
    args: tuple[str, ...] = ()
    together: int = 0
    run: Callable[[], None] | None = field(default=None, compare=False)
    what: str = ""  # how a local action is shown

    def show(self) -> str:
        return self.what if self.run is not None else " ".join(["python", "-m", self.module, *self.args])


def plan(data: Path, runs: Path, checkpoint: Path, reports: Path, threads: int = 1,
         text_from: str | None = None, stages: tuple[str, ...] = STAGES) -> list[Step]:
    """The recipe's steps for `stages`, in order (what recipe.sh ran before it called this)."""
    d, r = str(data), str(runs)
    speech = ("--ravdess", f"{d}/ravdess", "--emodb", f"{d}/emodb", "--threads", str(threads))
    fusion = ("--meld", f"{d}/meld", "--ravdess", f"{d}/ravdess", "--emodb", f"{d}/emodb", "--text", f"{r}/text/encoder.pt")
    steps: list[Step] = []
    if "text" in stages:
        if text_from:
            steps.append(Step("text", "training.text_finetune", ("--extract", text_from, "--out", f"{r}/text")))
        elif not (runs / "text" / "encoder.pt").is_file():
            steps.append(Step("text", "training.text_finetune", ("--meld", f"{d}/meld", "--out", f"{r}/text", "--epochs", "3",
                                                                  "--context", "3", "--max-tokens", "128")))
        else:
            steps.append(Step("text", run=lambda: None, what=f"skipped: {r}/text/encoder.pt is there (delete it to fine-tune again)"))
    if "speech" in stages:
        for split in ("to-emodb", "to-ravdess"):
            steps.append(Step("speech", "training.speech_branch", (*speech, "--split", split, "--epochs", "25", "--patience", "6",
                                                                   "--out", f"{r}/speech_{split}"), together=1))
        steps.append(Step("speech", "training.speech_branch", (*speech, "--split", "sentence02", "--no-cnn", "--out", f"{r}/speech_sentence02")))
        steps.append(Step("speech", "training.speech_branch", (*speech, "--split", "ship", "--epochs", "20", "--patience", "5",
                                                               "--out", f"{r}/speech")))
    if "fusion" in stages:
        steps.append(Step("fusion", "training.recipe", (*fusion, "--split", "ship", "--speech", f"{r}/speech/speech.pt",
                                                        "--out", f"{r}/recipe", "--checkpoint", str(checkpoint))))
        steps.append(Step("fusion", "training.recipe", (*fusion, "--split", "to-emodb", "--speech", f"{r}/speech_to-emodb/speech.pt",
                                                        "--out", f"{r}/recipe_to-emodb")))
    if "sentiment" in stages:
        steps.append(Step("sentiment", "training.sentiment", ("--meld", f"{d}/meld", "--checkpoint", str(checkpoint),
                                                              "--report", str(reports / "sentiment.json"))))
    if "reports" in stages:
        steps.append(Step("reports", "training.transfer_report", ("--runs", r, "--out", str(reports / "transfer.json"))))
        steps.append(Step("reports", run=lambda: copy_reports(runs, reports), what=f"copy each run's report from {r} to {reports}"))
    return steps


def copy_reports(runs: Path, reports: Path) -> None:
    """Each run's report (JSON, and the shipped runs' PNGs) into `reports`; a run not there is skipped."""
    reports.mkdir(parents=True, exist_ok=True)
    pairs = [(runs / f"speech_{s}" / "speech_report.json", reports / f"speech_report_{s}.json") for s in HELD_OUT]
    pairs.append((runs / "recipe_to-emodb" / "recipe_report.json", reports / "recipe_report_to-emodb.json"))
    for name in ("speech/speech_report.json", "recipe/recipe_report.json", "text/text_finetune.json"):
        pairs.append((runs / name, reports / Path(name).name))
    pairs += [(png, reports / png.name) for part in ("speech", "recipe") for png in sorted((runs / part).glob("*.png"))]
    for src, dst in pairs:
        if src.is_file():
            shutil.copyfile(src, dst)


def run(steps: list[Step], python: str = sys.executable) -> int:
    """Each step in order (a `together` group side by side); the first failure stops the recipe
    and is its exit status (a group's other steps are stopped too)."""
    i = 0
    while i < len(steps):
        group = [steps[i]]
        while steps[i].together and i + len(group) < len(steps) and steps[i + len(group)].together == steps[i].together:
            group.append(steps[i + len(group)])
        i += len(group)
        for s in group:
            print(f"[{s.stage}] {s.show()}", flush=True)
        if group[0].run is not None:
            group[0].run()
            continue
        procs = [subprocess.Popen([python, "-m", s.module, *s.args]) for s in group]
        try:
            codes = [p.wait() for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.terminate()
                    p.wait()
        bad = next((c for c in codes if c != 0), 0)
        if bad:
            print(f"recipe stopped: a {group[0].stage} step exited {bad}", file=sys.stderr)
            return bad
    return 0


def parse_stages(spec: str) -> tuple[str, ...]:
    wanted = tuple(s.strip() for s in spec.split(",") if s.strip())
    unknown = [s for s in wanted if s not in STAGES]
    if unknown or not wanted:
        raise argparse.ArgumentTypeError(f"stages are a comma-separated subset of {','.join(STAGES)}; got {spec!r}")
    return tuple(s for s in STAGES if s in wanted)  # always in recipe order


def add_arguments(p: argparse.ArgumentParser) -> None:
    from model import DEFAULT_CHECKPOINT

    p.add_argument("--data", type=Path, default=Path("../shared/data"), help="holds meld/, ravdess/, emodb/ (default ../shared/data)")
    p.add_argument("--runs", type=Path, default=Path("runs"), help="run folders (default runs)")
    p.add_argument("--stages", type=parse_stages, default=STAGES, help=f"comma-separated, any of {','.join(STAGES)} (default all)")
    p.add_argument("--checkpoint", type=Path, default=Path(DEFAULT_CHECKPOINT), help="the checkpoint fusion writes and sentiment extends")
    p.add_argument("--reports", type=Path, default=Path("training/reports"), help="where sentiment and reports write")
    p.add_argument("--threads", type=int, default=1, help="torch threads per speech run (two run side by side)")
    p.add_argument("--text-from", default=None, metavar="CHECKPOINT", help="stage 1: take the encoder out of this checkpoint")
    p.add_argument("--dry-run", action="store_true", help="print the steps, run nothing")


def main(a: argparse.Namespace) -> int:
    if ":" in str(a.data) and not a.data.exists():  # a dataset spec of the single-run trainer
        print(f"error: --data is the folder that holds meld/, ravdess/ and emodb/, not {str(a.data)!r}; the "
              f"single-run trainer that takes KIND:PATH specs is `emostream train-run` (python -m training train)", file=sys.stderr)
        return 2
    steps = plan(a.data, a.runs, a.checkpoint, a.reports, a.threads, a.text_from, a.stages)
    if a.dry_run:
        for s in steps:
            print(f"[{s.stage}] {s.show()}")
        return 0
    return run(steps)
