#!/usr/bin/env bash
# Set up everything emostream needs on Debian/Ubuntu, as root: Debian packages, .venv, pinned
# Python packages, the project itself (editable). Idempotent: a second run checks and exits fast.
#   TORCH_INDEX_URL=...  extra pip index for torch (e.g. https://download.pytorch.org/whl/cu128)
#   PYTHON=python3.11    interpreter to build .venv from (default: python3 on PATH)
set -euo pipefail
cd "$(dirname "$0")/.."

DEBS=(python3 python3-venv python3-dev make git libportaudio2 pulseaudio pulseaudio-utils chromium libasound2-plugins openssl redis-server libjemalloc2)

missing=()
for p in "${DEBS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "[setup] installing Debian packages: ${missing[*]}"
    if [ "$(id -u)" != 0 ]; then SUDO=sudo; else SUDO=; fi
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -q
    $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
else
    echo "[setup] Debian packages: ok"
fi

PY=${PYTHON:-python3}
"$PY" -c 'import sys; assert sys.version_info >= (3, 10), sys.version' \
    || { echo "[setup] need Python >= 3.10 (set PYTHON=...)" >&2; exit 1; }
if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv with $("$PY" --version)"
    "$PY" -m venv .venv
fi

stamp=.venv/.emostream-installed
want=$(cat requirements.lock requirements-nodeps.lock pyproject.toml | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    echo "[setup] Python packages: ok"
else
    echo "[setup] installing pinned Python packages into .venv"
    extra=()
    [ -n "${TORCH_INDEX_URL:-}" ] && extra+=(--extra-index-url "$TORCH_INDEX_URL")
    .venv/bin/python -m pip install -q --disable-pip-version-check "${extra[@]}" -r requirements.lock
    # without their declared dependencies (see the file): resemblyzer would pull webrtcvad, which does not build
    .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -r requirements-nodeps.lock
    .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
    echo "$want" > "$stamp"
fi
echo "[setup] done: .venv ready ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
