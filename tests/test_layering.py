"""The module map's arrows (README): model imports no project package; training imports model;
streamer imports model (inference only); clients import only streamer.protocol and streamer.pcm."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("model", "training", "streamer", "clients")
ALLOWED = {
    "model": {"model"},
    "training": {"training", "model"},
    "streamer": {"streamer", "model"},
    "clients": {"clients", "streamer.protocol", "streamer.pcm"},
}


def project_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if name.split(".")[0] in PACKAGES:
                found.add(name)
    return found


def allowed(name: str, rules: set[str]) -> bool:
    return any(name == r or name.startswith(r + ".") for r in rules) or (
        name == "streamer" and "streamer.protocol" in rules)  # `from streamer import protocol`


def test_imports_follow_the_module_map():
    violations = []
    for pkg, rules in ALLOWED.items():
        for f in sorted((ROOT / pkg).rglob("*.py")):
            for name in project_imports(f):
                if not allowed(name, rules):
                    violations.append(f"{f.relative_to(ROOT)} imports {name}")
    assert not violations, "\n".join(violations)


def test_the_checker_sees_a_violation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from streamer.server import App\nimport training.loop\n")
    assert project_imports(bad) == {"streamer.server", "streamer.server.App", "training.loop"}
    assert not allowed("streamer.server", ALLOWED["clients"]) and not allowed("training.loop", ALLOWED["model"])
