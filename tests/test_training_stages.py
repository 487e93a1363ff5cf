"""`emostream train`: the bundled checkpoint's recipe by stages (training/stages.py): which commands
each stage runs and in what order, side-by-side steps, stopping at a failure, the reports copied,
and one real stage run end to end through the console command."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from training import stages
from training.stages import STAGES, Step, copy_reports, parse_stages, plan

ROOT = Path(__file__).resolve().parents[1]


def _modules(steps: list[Step]) -> list[tuple[str, str]]:
    return [(s.stage, s.module or "local") for s in steps]


def test_plan_runs_the_stages_in_recipe_order(tmp_path: Path) -> None:
    data, runs, ckpt, rep = Path("D"), tmp_path / "runs", Path("ck.pt"), Path("rep")
    steps = plan(data, runs, ckpt, rep, threads=3)
    assert _modules(steps) == [
        ("text", "training.text_finetune"),
        ("speech", "training.speech_branch"), ("speech", "training.speech_branch"),
        ("speech", "training.speech_branch"), ("speech", "training.speech_branch"),
        ("fusion", "training.recipe"), ("fusion", "training.recipe"),
        ("sentiment", "training.sentiment"),
        ("reports", "training.transfer_report"), ("reports", "local")]
    speech = [s for s in steps if s.stage == "speech"]
    assert [s.args[s.args.index("--split") + 1] for s in speech] == ["to-emodb", "to-ravdess", "sentence02", "ship"]
    assert [s.together for s in speech] == [1, 1, 0, 0]  # the two held-out-corpus runs side by side
    assert all(s.args[s.args.index("--threads") + 1] == "3" for s in speech)
    ship = steps[5]
    assert ship.args[ship.args.index("--checkpoint") + 1] == "ck.pt" and f"{runs}/speech/speech.pt" in ship.args
    assert steps[7].args[-2:] == ("--report", str(rep / "sentiment.json"))
    # stage 1 is skipped once its encoder is there, or taken out of a checkpoint when asked
    (runs / "text").mkdir(parents=True)
    (runs / "text" / "encoder.pt").write_bytes(b"x")
    kept = plan(data, runs, ckpt, rep, stages=("text",))
    assert _modules(kept) == [("text", "local")] and "skipped" in kept[0].show()
    back = plan(data, runs, ckpt, rep, text_from="model.pt", stages=("text",))
    assert back[0].args[:2] == ("--extract", "model.pt")


def test_stages_are_a_checked_subset_kept_in_recipe_order() -> None:
    assert parse_stages("sentiment,speech") == ("speech", "sentiment")
    assert parse_stages(",".join(STAGES)) == STAGES
    for bad in ("", "speech,bogus", ","):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_stages(bad)


PROBE = textwrap.dedent('''
    """Test step: records its start; with a FIFO, meets its partner there (opening a FIFO blocks
    until the other end is opened too: both must run at once), then exits with a code."""
    import signal, sys
    from pathlib import Path
    name, code, fifo, log = sys.argv[1], int(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
    (log / f"{name}.started").touch()
    if fifo != "-":
        signal.signal(signal.SIGALRM, lambda *_: sys.exit(99))  # the partner never ran alongside
        signal.alarm(60)
        side, mode = fifo.rsplit(":", 1)
        open(side, mode).close()
        signal.alarm(0)
    with open(log / "order", "a") as f:
        f.write(name + "\\n")
    sys.exit(code)
''')


def test_run_goes_in_order_side_by_side_and_stops_at_a_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "stage_probe.py").write_text(PROBE)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    log = tmp_path / "log"
    log.mkdir()

    meet = tmp_path / "meet"
    os.mkfifo(meet)

    def step(name: str, code: int = 0, fifo: str = "-", together: int = 0) -> Step:
        return Step("speech", "stage_probe", (name, str(code), fifo, str(log)), together=together)

    copied: list[str] = []
    steps = [step("a"), step("b", fifo=f"{meet}:r", together=1), step("c", fifo=f"{meet}:w", together=1),
             Step("reports", run=lambda: copied.append("x"), what="local"), step("d", code=3), step("e")]
    assert stages.run(steps) == 3  # d's exit status; e never ran
    order = (log / "order").read_text().split()
    assert order[0] == "a" and sorted(order[1:3]) == ["b", "c"] and order[3:] == ["d"]  # b and c waited for each other
    assert copied == ["x"] and not (log / "e.started").exists()


def test_copy_reports_takes_what_the_runs_left(tmp_path: Path) -> None:
    runs, rep = tmp_path / "runs", tmp_path / "reports"
    for name in ("speech_to-emodb/speech_report.json", "speech/speech_report.json", "speech/confusion.png",
                 "recipe/recipe_report.json", "recipe_to-emodb/recipe_report.json"):
        (runs / name).parent.mkdir(parents=True, exist_ok=True)
        (runs / name).write_text(name)
    copy_reports(runs, rep)
    assert sorted(p.name for p in rep.iterdir()) == ["confusion.png", "recipe_report.json", "recipe_report_to-emodb.json",
                                                     "speech_report.json", "speech_report_to-emodb.json"]
    assert (rep / "speech_report_to-emodb.json").read_text() == "speech_to-emodb/speech_report.json"


@pytest.mark.slow
def test_emostream_train_runs_a_stage_end_to_end(tiny_checkpoint, tmp_path: Path) -> None:
    """The console command, `--dry-run` first (nothing written), then the sentiment stage for real
    on a small MELD: the head lands in the checkpoint it was given, the report where it was told."""
    from model import load_checkpoint
    from tests.test_sentiment import _small_meld

    script = Path(sys.executable).with_name("emostream")
    data, ckpt, rep = tmp_path / "data", tmp_path / "model.pt", tmp_path / "reports"
    _small_meld(data / "meld")
    shutil.copyfile(tiny_checkpoint, ckpt)
    args = [str(script), "train", "--data", str(data), "--runs", str(tmp_path / "runs"), "--checkpoint", str(ckpt),
            "--reports", str(rep), "--stages", "sentiment"]
    dry = subprocess.run([*args, "--dry-run"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert dry.stdout.splitlines() == [f"[sentiment] python -m training.sentiment --meld {data}/meld --checkpoint {ckpt} "
                                       f"--report {rep / 'sentiment.json'}"]
    assert not rep.exists() and load_checkpoint(ckpt, device="cpu").config.sentiment_labels == ()
    spec = subprocess.run([str(script), "train", "--data", "meld:../shared/data/meld"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert spec.returncode == 2 and "emostream train-run" in spec.stderr  # the old command's data spec: pointed there
    real = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert real.returncode == 0, real.stderr[-3000:]
    assert (rep / "sentiment.json").is_file()
    assert load_checkpoint(ckpt, device="cpu").config.sentiment_labels == ("negative", "neutral", "positive")
