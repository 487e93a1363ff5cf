"""Clients against a real service on port 0 with real speech: file and subscribe CLIs, the Python
library (typed events, reconnect without duplicates)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from clients import Event, StreamClient, Subscriber, run_source
from clients.audio import decode, paced_chunks
from clients.render import Renderer
from streamer import protocol as P
from tests.conftest import SPEECH
from tests.service import running_service
from tests.stream_util import WAIT_S, emotion_model, load, served, wer, whisper  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def service(tiny_checkpoint):
    with running_service(tiny_checkpoint) as app:
        yield app


def run_cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def health(app) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{app.port}/healthz", timeout=10) as r:
        return json.loads(r.read())


def test_file_cli_jsonl_transcribes_and_predicts(service, transcripts, tmp_path):
    saved = tmp_path / "events.jsonl"
    res = run_cli("clients.file", str(SPEECH / "LJ001-0004.wav"), "--url", service.url, "--fast", "--jsonl", "--save", str(saved))
    assert res.returncode == 0, res.stderr
    events = [json.loads(line) for line in res.stdout.splitlines()]
    types = [e["type"] for e in events]
    assert types[0] == P.SESSION_STARTED and types[-1] == P.SESSION_ENDED
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(set(seqs)), "seq strictly increasing"
    text = " ".join(e["text"] for e in events if e["type"] == P.TRANSCRIPT)
    assert wer(transcripts["LJ001-0004.wav"], text) <= 0.3, text
    utterances = {e["utterance_id"] for e in events if e["type"] == P.UTTERANCE_ENDED}
    emotions = [e for e in events if e["type"] == P.EMOTION]
    assert len(emotions) == len(utterances) >= 1
    for e in emotions:
        assert abs(sum(e["scores"].values()) - 1) < 1e-4 and e["label"] in e["scores"]
        assert abs(sum(e["modality_weights"].values()) - 1) < 1e-4
    assert [json.loads(line) for line in saved.read_text().splitlines()] == events


def test_file_cli_human_readable(service):
    res = run_cli("clients.file", str(SPEECH / "LJ001-0008.wav"), "--url", service.url, "--fast", "--no-colour")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "session" in out and "started" in out and "timeline" in out
    assert "surpassed" in out.lower(), out  # the transcript is shown with its emotion line
    assert "speech" in out and "text" in out and ("█" in out or "░" in out)


def test_subscribe_cli_sees_the_same_events_as_the_source(service):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    before = health(service)["subscribers"]
    sub = subprocess.Popen([sys.executable, "-m", "clients.subscribe", "--url", service.url, "--session", "cli-sub-1",
                            "--exit-on-end", "--jsonl"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        async def wait_subscribed() -> None:
            while health(service)["subscribers"] <= before:
                await asyncio.sleep(0.05)  # polling the health endpoint until the subscriber is in

        asyncio.run(asyncio.wait_for(wait_subscribed(), 60))
        res = run_cli("clients.file", str(SPEECH / "LJ001-0002.wav"), "--url", service.url, "--fast", "--jsonl",
                      "--session-id", "cli-sub-1")
        assert res.returncode == 0, res.stderr
        out, err = sub.communicate(timeout=120)
    finally:
        sub.kill()
    assert sub.returncode == 0, err
    source = [json.loads(x) for x in res.stdout.splitlines()]
    watched = [json.loads(x) for x in out.splitlines()]
    key = lambda e: (e["type"], e["seq"], e.get("utterance_id"))  # noqa: E731
    assert [key(e) for e in watched] == [key(e) for e in source if e["type"] != P.SESSION_STARTED] or \
        [key(e) for e in watched] == [key(e) for e in source]


def test_python_library_streams_and_iterates_typed_events(service, transcripts):
    audio = decode(str(SPEECH / "LJ001-0006.wav"))

    async def go() -> list[Event]:
        async with StreamClient(service.url, metadata={"test": "library"}) as client:
            assert client.session_id
            return await run_source(client, paced_chunks(audio, realtime=False))

    events = asyncio.run(go())
    assert all(isinstance(e, Event) for e in events)
    assert events[-1].type == P.SESSION_ENDED
    text = " ".join(e["text"] for e in events if e.type == P.TRANSCRIPT)
    assert wer(transcripts["LJ001-0006.wav"], text) <= 0.3, text
    lines = [line for e in events for line in Renderer(colour=False).render(e)]
    assert any(line.startswith("● session") for line in lines)


def test_stream_client_reports_a_refused_start(service):
    async def go() -> None:
        async with StreamClient(service.url, sample_rate=1234):
            pass

    with pytest.raises(RuntimeError, match="refused"):
        asyncio.run(go())


def test_subscriber_reconnects_and_never_repeats_an_event():
    """A server that drops the connection after two events and replays them on reconnect."""
    from websockets.asyncio.server import serve

    def ev(seq: int) -> str:
        return json.dumps(P.event(P.TRANSCRIPT, "s1", seq, utterance_id=seq, text=f"u{seq}"))

    connections = 0

    async def handler(ws) -> None:
        nonlocal connections
        connections += 1
        for seq in range(2 if connections == 1 else 4):
            await ws.send(ev(seq))
        if connections == 1:
            await ws.close(1011, "simulated crash")
        else:
            await ws.wait_closed()

    async def go() -> list[int]:
        async with serve(handler, "127.0.0.1", 0) as server:
            port = server.sockets[0].getsockname()[1]
            got = []
            sub = Subscriber(f"ws://127.0.0.1:{port}", session="s1", backoff_s=0.01)
            async for e in sub:
                got.append(e.seq)
                if len(got) == 4:
                    break
            return got

    assert asyncio.run(asyncio.wait_for(go(), 30)) == [0, 1, 2, 3]
    assert connections == 2


def test_file_cli_words_shows_word_timings(service):
    res = run_cli("clients.file", str(SPEECH / "LJ001-0008.wav"), "--url", service.url, "--fast", "--no-colour",
                  "--words", "--interim")
    assert res.returncode == 0, res.stderr
    timed = [line for line in res.stdout.splitlines() if re.match(r"^    \d+\.\d\d–\d+\.\d\d \S", line)]
    assert timed, res.stdout  # under the emotion line: `    0.31–0.62 has · ...`
    words = [w.split(" ", 1)[1] for line in timed for w in line.strip().split(" · ")]
    assert "surpassed" in " ".join(words).lower(), words
    assert "\r" not in res.stdout  # not a terminal: partials, if any, are plain lines


def test_interim_results_and_word_timings_through_the_clients_api(emotion_model, whisper):  # noqa: F811
    """jfk.flac in real time from a StreamClient asking for interim results and word timings, with a
    Subscriber that asks for the partials and one that does not."""
    from tests.test_interim_clients import Terminal, printer_args
    from clients.cli import Printer

    async def go():  # type: ignore[no-untyped-def]
        async with served(emotion_model, whisper, interim_emotion_every_s=1.0) as app:  # JFK's utterances: 1.5-2.6 s
            watchers = {"interim": Subscriber(app.url, "jfk", interim=True, reconnect=False),
                        "finals": Subscriber(app.url, "jfk", reconnect=False)}
            seen: dict[str, list[Event]] = {k: [] for k in watchers}

            async def watch(name: str) -> None:
                async for e in watchers[name]:
                    seen[name].append(e)

            tasks = [asyncio.create_task(watch(k)) for k in watchers]
            while app.hub.subscriber_count() < 2:  # both registered before the session starts
                await asyncio.sleep(0.01)
            async with StreamClient(app.url, session_id="jfk", interim=True, word_timestamps=True) as client:
                events = await run_source(client, paced_chunks(load("jfk.flac"), realtime=True))
            await asyncio.wait_for(asyncio.gather(*tasks), WAIT_S)
            return events, seen

    events, seen = asyncio.run(go())
    assert events[-1].type == P.SESSION_ENDED
    partials = [e for e in events if e.type == P.TRANSCRIPT_PARTIAL]
    assert partials and all(e["text"] and e["audio_s"] > 0 for e in partials)
    assert any(e.type == P.EMOTION_PARTIAL and e["label"] in e["scores"] for e in events)
    started, finished = set(), set()
    for e in events:  # every partial after its utterance.started and before its final transcript
        if e.type == P.UTTERANCE_STARTED:
            started.add(e.utterance_id)
        elif e.type == P.TRANSCRIPT:
            finished.add(e.utterance_id)
            assert e["words"] and " ".join(w["word"] for w in e["words"]).split() == e["text"].split()
        elif e.type in P.INTERIM_TYPES:
            assert e.utterance_id in started and e.utterance_id not in finished, e
    assert [e.seq for e in seen["interim"]] == [e.seq for e in events]
    assert [e.seq for e in seen["finals"]] == [e.seq for e in events if e.type not in P.INTERIM_TYPES]
    # a terminal ends up with only the final lines: every interim line was replaced
    term = Terminal()
    printer = Printer(printer_args(colour=False), term)
    for e in events:
        printer(e)
    lines, current = term.screen()
    assert current == "" and not any("interim" in line for line in lines)
    assert sum(line.startswith("[00:") for line in lines) == len(finished) >= 3
    assert any(re.match(r"^    \d+\.\d\d–\d+\.\d\d ", line) for line in lines)
