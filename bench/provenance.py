"""Where a bench result came from: the commit it ran at (every bench JSON carries it)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent


def git_state() -> dict[str, Any]:
    """The commit the bench ran at and whether the working tree had uncommitted changes."""
    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)

    try:
        head, status = git("rev-parse", "HEAD"), git("status", "--porcelain")
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"commit": None, "dirty": None, "error": str(e)}
    if head.returncode:
        return {"commit": None, "dirty": None, "error": head.stderr.strip()}
    return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip()) if status.returncode == 0 else None}


def write_report(out: Path, name: str, report: dict[str, Any], plot: Callable[[dict[str, Any], Path], None]) -> None:
    """<out>/<name>.json and <out>/<name>.png (drawn by `plot`), as every bench writes its result."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=1))
    plot(report, out / f"{name}.png")
    print(f"wrote {out / name}.json and {name}.png")
