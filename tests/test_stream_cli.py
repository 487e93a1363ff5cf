"""`python -m streamer` as a user runs it, in subprocesses: the demo, errors, graceful shutdown,
and the microphone path through a private PulseAudio null-sink virtual microphone."""

from __future__ import annotations

import ast
import asyncio
import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from websockets.asyncio.client import connect

from streamer import protocol as P
from streamer.client import stream_audio

from tests.stream_util import SPEECH, WAIT_S, load, recv_until, wer
from tests.virtual_mic import VirtualMic, env

ROOT = Path(__file__).resolve().parent.parent


def streamer_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "streamer", *args]


async def start_server(*args: str, ready: str | None = None, seen: list[str] | None = None,
                       **extra_env: str):  # type: ignore[no-untyped-def]
    """Start `python -m streamer ARGS`; return (process, ws url) once it prints its address (and
    then a line matching `ready`, when given); the lines read so far are appended to `seen`."""
    proc = await asyncio.create_subprocess_exec(
        *streamer_cmd(*args), cwd=ROOT, env=env(**extra_env),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    assert proc.stdout is not None
    url = None
    while True:
        line = (await asyncio.wait_for(proc.stdout.readline(), 120)).decode()
        assert line, "server exited before listening"
        if seen is not None:
            seen.append(line)
        m = re.search(r"listening on (ws://[\d.]+:\d+)", line)
        url = url or (m.group(1) if m else None)
        if url and (ready is None or re.search(ready, line)):
            return proc, url


@pytest.mark.slow
def test_demo_prints_transcripts_and_emotions(tiny_checkpoint, transcripts) -> None:
    """The README's first command (with the tiny test model in place of the bundled one)."""
    r = subprocess.run(streamer_cmd("--demo", "--checkpoint", str(tiny_checkpoint)), cwd=ROOT, env=env(),
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    texts = [ast.literal_eval(m) for m in re.findall(r"transcript: ('.*'|\".*\")$", out, flags=re.M)]
    emotions = re.findall(r"#(\d+) emotion: (\w+) .* (\d+) ms after end of speech$", out, flags=re.M)
    assert len(texts) == len(emotions) >= 3, out
    assert wer(transcripts["jfk.flac"], " ".join(texts)) <= 0.3, texts
    assert "session" in out and "ended" in out


@pytest.mark.slow
def test_file_with_interim_and_words_prints_partials_and_word_timings(tiny_checkpoint, transcripts) -> None:
    """`python -m streamer --file X --interim --words`, piped: every partial is a plain line before
    its utterance's final transcript, and each transcript has its word timings under it."""
    r = subprocess.run(streamer_cmd("--file", str(SPEECH / "LJ001-0004.wav"), "--interim", "--words",
                                    "--checkpoint", str(tiny_checkpoint)), cwd=ROOT, env=env(),
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "real time, interim results, word timings) through" in out
    assert "\r" not in out and "\x1b" not in out  # not a terminal: nothing is rewritten in place
    lines = out.splitlines()
    partial = [i for i, line in enumerate(lines) if re.match(r"^    #\d+ … interim transcript \(\d+\.\d s\): '.+'$", line)]
    final = [i for i, line in enumerate(lines) if re.search(r"#\d+ transcript: '.*'$", line)]
    assert partial and final and partial[0] < final[0], out
    texts = [ast.literal_eval(re.search(r"transcript: ('.*'|\".*\")$", lines[i]).group(1)) for i in final]
    assert wer(transcripts["LJ001-0004.wav"], " ".join(texts)) <= 0.3, texts
    for i in final:  # `        0.00–0.42 Produced · 0.42–0.61 the · ...`, the words of the transcript above
        timed = lines[i + 1].strip().split(" · ")
        assert lines[i + 1].startswith("        ") and all(re.match(r"^\d+\.\d\d–\d+\.\d\d \S", w) for w in timed)
        assert [w.split(" ", 1)[1] for w in timed] == texts[final.index(i)].split()


def test_missing_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    r = subprocess.run(streamer_cmd("--demo", "--checkpoint", str(tmp_path / "nope.pt")), cwd=ROOT, env=env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "checkpoint not found" in r.stderr and "nope.pt" in r.stderr


def test_list_devices_runs() -> None:
    r = subprocess.run(streamer_cmd("--list-devices"), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


@pytest.mark.slow
def test_sigint_finishes_utterances_in_flight_and_exits_0(tiny_checkpoint) -> None:
    """SIGINT while a client streams: no new connections, the utterance in flight and the open one
    are finished and published, the socket closes with 1001, the process exits 0."""

    async def scenario():  # type: ignore[no-untyped-def]
        proc, url = await start_server("--port", "0", "--checkpoint", str(tiny_checkpoint))
        try:
            events: list[dict] = []
            first_end = asyncio.Event()

            def on_event(ev: dict) -> None:
                events.append(ev)
                if ev["type"] == P.UTTERANCE_STARTED and ev["utterance_id"] == 1:
                    first_end.set()  # utterance 0 is ended (in flight or done), utterance 1 is open

            client = asyncio.create_task(stream_audio(url, load("jfk.flac"), realtime=True, on_event=on_event))
            await asyncio.wait_for(first_end.wait(), WAIT_S)
            proc.send_signal(signal.SIGINT)
            res = await asyncio.wait_for(client, WAIT_S)
            rc = await asyncio.wait_for(proc.wait(), WAIT_S)
            return res, rc
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()

    res, rc = asyncio.run(scenario())
    assert rc == 0
    assert res.close_code == P.CLOSE_GOING_AWAY
    types = [e["type"] for e in res.events]
    assert types[-1] == P.SESSION_ENDED
    ended = [e["utterance_id"] for e in res.events if e["type"] == P.UTTERANCE_ENDED]
    scored = [e["utterance_id"] for e in res.events if e["type"] == P.EMOTION]
    assert ended == scored and len(ended) >= 2  # the in-flight one, and the open one flushed at shutdown
    assert [e["reason"] for e in res.events if e["type"] == P.UTTERANCE_ENDED][-1] == "end_of_stream"


@pytest.mark.slow
def test_sigterm_on_an_idle_server_exits_0(tiny_checkpoint) -> None:
    async def scenario() -> int:
        proc, url = await start_server("--port", "0", "--checkpoint", str(tiny_checkpoint))
        async with connect(f"{url}{P.SUBSCRIBE_PATH}?session=*") as sub:
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(sub.wait_closed(), WAIT_S)
            assert sub.close_code == P.CLOSE_GOING_AWAY
        return await asyncio.wait_for(proc.wait(), WAIT_S)

    assert asyncio.run(scenario()) == 0


# ---- the microphone, through a PulseAudio null sink --------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("flags", [(), ("--interim", "--words")], ids=["plain", "interim-words"])
def test_microphone_session_through_a_virtual_mic(tiny_checkpoint, transcripts, tmp_path: Path, flags) -> None:
    """`python -m streamer --mic pulse`: speech played into the null sink comes out as session
    'mic' events to a `*` subscriber, and --json lines on stdout. With --interim --words the
    printed events include the partials, and the transcripts (also the subscriber's) word timings."""
    head: list[str] = []  # what the server printed up to "listening to the microphone"
    with VirtualMic(tmp_path) as mic:

        async def scenario():  # type: ignore[no-untyped-def]
            proc, url = await start_server("--port", "0", "--checkpoint", str(tiny_checkpoint), "--mic", "pulse",
                                           "--json", *flags, ready="listening to the microphone", seen=head, **mic.env)
            try:
                async with connect(f"{url}{P.SUBSCRIBE_PATH}?session=*") as sub:
                    player = mic.play(SPEECH / "LJ001-0004.wav")
                    got = await recv_until(sub, P.EMOTION, timeout=WAIT_S)
                    await asyncio.to_thread(player.wait, WAIT_S)
                    proc.send_signal(signal.SIGINT)
                    got += await recv_until(sub, P.SESSION_ENDED, timeout=WAIT_S)
                rc = await asyncio.wait_for(proc.wait(), WAIT_S)
                assert proc.stdout is not None
                printed = "".join(head) + (await proc.stdout.read()).decode()
                return got, rc, printed
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()

        got, rc, printed = asyncio.run(scenario())
    assert rc == 0
    assert {e["session_id"] for e in got} == {"mic"}
    text = " ".join(e["text"] for e in got if e["type"] == P.TRANSCRIPT)
    assert wer(transcripts["LJ001-0004.wav"], text) <= 0.3, text
    shown = [json.loads(line) for line in printed.splitlines() if line.startswith("{")]
    assert any(e["type"] == P.EMOTION for e in shown)
    assert not [e for e in got if e["type"] in P.INTERIM_TYPES]  # that subscriber did not ask for them
    if flags:
        assert "interim results, word timings" in printed
        assert any(e["type"] == P.TRANSCRIPT_PARTIAL for e in shown), shown
        assert all(e["words"] for e in got + shown if e["type"] == P.TRANSCRIPT and e["text"])
    else:
        assert not [e for e in shown if e["type"] in P.INTERIM_TYPES or "words" in e]
