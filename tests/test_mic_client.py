"""`python -m clients.mic` against a real service, its microphone a PulseAudio null sink that real
speech is played into at real-time pace; Ctrl-C finishes the last utterance and exits 0."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from streamer import protocol as P
from tests.conftest import SPEECH
from tests.service import running_service
from tests.stream_util import wer
from tests.virtual_mic import VirtualMic, env

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


@pytest.mark.parametrize("flags", [(), ("--interim", "--words")], ids=["plain", "interim-words"])
def test_mic_client_live_view_save_and_clean_ctrl_c(tiny_checkpoint, transcripts, tmp_path, flags):
    """With --interim --words the partials arrive before the final transcript, which has word timings."""
    saved = tmp_path / "session.jsonl"
    with VirtualMic(tmp_path) as mic, running_service(tiny_checkpoint) as app:
        proc = subprocess.Popen([sys.executable, "-m", "clients.mic", "--url", app.url, "--device", "pulse", "--jsonl",
                                 "--save", str(saved), *flags], cwd=ROOT, env=env(**mic.env, PYTHONPATH=str(ROOT)),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            first = json.loads(proc.stdout.readline())  # blocks until the session has started
            assert first["type"] == P.SESSION_STARTED
            player = mic.play(SPEECH / "LJ001-0004.wav")
            events = [first]
            while not any(e["type"] == P.EMOTION for e in events):
                line = proc.stdout.readline()
                assert line, proc.stderr.read() if proc.stderr else "mic client exited"
                events.append(json.loads(line))
            player.wait(60)
            proc.send_signal(signal.SIGINT)  # Ctrl-C: stop capturing, finish, exit
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0, err
    events += [json.loads(line) for line in out.splitlines()]
    assert events[-1]["type"] == P.SESSION_ENDED
    text = " ".join(e["text"] for e in events if e["type"] == P.TRANSCRIPT)
    assert wer(transcripts["LJ001-0004.wav"], text) <= 0.3, text
    assert [json.loads(line) for line in saved.read_text().splitlines()] == events
    assert "finishing the last utterance" in err
    partials = [i for i, e in enumerate(events) if e["type"] in P.INTERIM_TYPES]
    timed = [e for e in events if e["type"] == P.TRANSCRIPT and e.get("words")]
    if flags:
        assert "with interim results and word timings" in err
        first_final = next(i for i, e in enumerate(events) if e["type"] == P.TRANSCRIPT)
        assert partials and partials[0] < first_final and timed, events
    else:
        assert not partials and not timed
