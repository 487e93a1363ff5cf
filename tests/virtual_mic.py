"""A private PulseAudio daemon with a null sink as a real-time virtual microphone for tests."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path


def env(**extra: str) -> dict[str, str]:
    e = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    e.update(extra)
    return e


class VirtualMic:
    """A private PulseAudio daemon (own runtime dir and socket) with a null sink `vmic`; its
    monitor is the default source, so whatever is played into `vmic` is what the 'microphone'
    hears. Runs as root: --system=false with an explicit unix socket and anonymous auth."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.socket = root / "native"
        self.server = f"unix:{self.socket}"
        self.env = {"PULSE_SERVER": self.server, "XDG_RUNTIME_DIR": str(root), "PULSE_RUNTIME_PATH": str(root / "pulse"),
                    "HOME": str(root)}
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> "VirtualMic":
        pulseaudio = shutil.which("pulseaudio")
        assert pulseaudio, "pulseaudio is not installed (scripts/setup.sh installs it)"
        self.proc = subprocess.Popen(
            [pulseaudio, "--system=false", "--daemonize=no", "--exit-idle-time=-1", "-n", "--use-pid-file=false",
             "--disallow-exit", "--log-target=stderr",
             f"--load=module-native-protocol-unix socket={self.socket} auth-anonymous=1",
             "--load=module-null-sink sink_name=vmic rate=16000 channels=1",
             "--load=module-always-sink"],
            env=env(**self.env), stdout=subprocess.DEVNULL, stderr=open(self.root / "pulse.log", "wb"),
        )
        # wait for the daemon to answer (pactl blocks until connected or fails fast)
        for _ in range(100):
            if self.proc.poll() is not None:
                raise RuntimeError(f"pulseaudio exited: {(self.root / 'pulse.log').read_text()}")
            r = subprocess.run(["pactl", "set-default-source", "vmic.monitor"], env=env(**self.env),
                               capture_output=True, timeout=10)
            if r.returncode == 0:
                return self
            try:
                self.proc.wait(timeout=0.1)  # a bounded wait for the socket, not a fixed sleep
            except subprocess.TimeoutExpired:
                pass
        raise RuntimeError("pulseaudio did not come up")

    def play(self, path: Path) -> subprocess.Popen[bytes]:
        return subprocess.Popen(["paplay", "-d", "vmic", str(path)], env=env(**self.env))

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
