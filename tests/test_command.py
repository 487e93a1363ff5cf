"""The `emostream` command, and the project as a built wheel (not the source tree)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from streamer.command import COMMANDS, main
from streamer.memory import AUTO

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(sys.executable).parent / "emostream"  # installed by the set-up (pip install -e .)


def test_help_lists_every_command_and_unknown_ones_fail(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {name} " in out for name in COMMANDS)
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err
    assert main([]) == 2


@pytest.mark.slow
def test_every_command_runs_its_entry_point() -> None:
    """Through the installed console script: each command's own --help (its parser is reached)."""
    assert SCRIPT.exists(), f"{SCRIPT} missing: the set-up installs the project with its console script"
    for name, command in COMMANDS.items():
        run = subprocess.run([str(SCRIPT), name, "--help"], capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, (name, run.stderr[-2000:])
        assert "usage:" in run.stdout, (name, run.stdout[:500])
    for module in ("streamer", "streamer.worker", "streamer.export", "clients.mic", "training"):  # python -m still works
        run = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120)
        assert run.returncode == 0 and "usage:" in run.stdout, (module, run.stderr[-2000:])
    version = subprocess.run([str(SCRIPT), "--version"], capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and version.stdout.startswith("emostream")


def test_the_worker_command_line_answers_before_torch_is_imported() -> None:
    """`emostream worker --help` and a bad argument answer at once: the job loop (streamer/infer/
    consumer.py) and torch are imported only once the arguments are good."""
    code = ("import sys; from streamer.infer import worker; worker.build_parser().format_help(); "
            "rc = worker.main(['--bus', 'redis://127.0.0.1:1/0', '--max-batch', '0']); print(rc, 'torch' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert run.stdout.split() == ["2", "False"], (run.stdout, run.stderr[-2000:])
    assert "max_batch" in run.stderr


@pytest.mark.slow
def test_the_wheel_carries_everything_the_demo_needs(tmp_path: Path) -> None:
    """`pip wheel .`, installed into an empty folder (not editable), run from outside the source
    tree: `emostream demo` finds the bundled checkpoint and demo recording and prints emotions;
    the dashboard files are inside the wheel."""
    src = tmp_path / "src"  # a copy: setuptools builds in SOURCE/build, which must not go stale in the checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for pkg in ("streamer", "model", "training", "clients"):
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    wheel, = (tmp_path / "dist").glob("emostream-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("model/checkpoints/default.pt", "streamer/assets/demo.flac", "streamer/static/index.html",
                   "streamer/static/app.js", "streamer/static/style.css", "streamer/command.py", "clients/mic.py"):
        assert needed in names, needed
    assert not any(n.startswith(("tests/", "bench/")) for n in names)
    target = tmp_path / "site"
    inst = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                          capture_output=True, text=True, timeout=300)
    assert inst.returncode == 0, inst.stderr[-3000:]
    env = {**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1"}
    where = subprocess.run([sys.executable, "-c", "import streamer, model; print(streamer.__file__, model.__file__)"],
                           capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert where.stdout.split() and all(p.startswith(str(target)) for p in where.stdout.split()), where
    # --fast: this test is about what the wheel carries; the demo's real-time pace is
    # test_stream_cli's (the README's first command)
    demo = subprocess.run([sys.executable, "-m", "streamer.command", "demo", "--device", "cpu", "--fast"],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert demo.stdout.count("emotion:") >= 3, demo.stdout[-3000:]
    assert f"; allocator {AUTO})" in demo.stdout, demo.stdout[:2000]  # the command set it up (streamer/memory.py)
