"""The durable event log (`--store`): EventStore itself, GET /v1/sessions[/ID/events] over a real
service streaming real speech, `python -m streamer.events.export`, and kill -9 of the service mid-session
with every event a client saw still in the database afterwards."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sqlite3
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed

from streamer import protocol as P
from streamer.client import stream_audio
from streamer.config import StoreConfig
from streamer.metrics import Metrics
from streamer.events.store import EventStore, StoreError

from tests.stream_util import WAIT_S, app_config, emotion_model, load, scraped, whisper  # noqa: F401
from tests.test_stream_cli import ROOT, env, start_server


def publish(store: EventStore, type_: str, sid: str, seq: int, **fields: Any) -> dict[str, Any]:
    ev = P.event(type_, sid, seq, **fields)
    store.append(ev, json.dumps(ev))
    return ev


def a_session(store: EventStore, sid: str, utterances: int = 2, end: bool = True, **meta: Any) -> list[dict[str, Any]]:
    """The events of a plausible session (started, per utterance ended/transcript/emotion, ended)."""
    evs = [publish(store, P.SESSION_STARTED, sid, 0, sample_rate=16000, metadata=meta, protocol=P.VERSION)]
    for u in range(utterances):
        for type_, extra in [(P.UTTERANCE_ENDED, {"reason": "silence"}), (P.TRANSCRIPT, {"text": f"hello {u}"}),
                             (P.EMOTION, {"label": "joy", "scores": {"joy": 0.75, "neutral": 0.25}})]:
            evs.append(publish(store, type_, sid, len(evs), utterance_id=u, **extra))
    if end:
        evs.append(publish(store, P.SESSION_ENDED, sid, len(evs), utterances=utterances))
    return evs


# ---- the store --------------------------------------------------------------------------------
def test_append_and_query(tmp_path: Path) -> None:
    store = EventStore(tmp_path / "e.db", clock=iter(range(1000, 2000)).__next__)
    a = a_session(store, "desk-3", utterances=2, user="ana")
    b = a_session(store, "b", utterances=1, end=False)
    assert store.events("desk-3") == a and store.events("b") == b
    assert store.event_texts("desk-3") == [json.dumps(e) for e in a]  # byte-exact wire text
    assert store.events("desk-3", after_seq=3) == a[4:]
    assert store.events("desk-3", after_seq=3, limit=2) == a[4:6]
    assert store.events("desk-3", after_seq=a[-1]["seq"]) == []
    assert store.events("nobody") == [] and store.session("nobody") is None

    newest, oldest = store.sessions()
    assert newest["id"] == "b" and oldest["id"] == "desk-3"  # newest first
    assert oldest == {"id": "desk-3", "run": 1, "first_at": 1000, "last_at": 1000 + len(a) - 1, "last_seq": len(a) - 1,
                      "events": len(a), "utterances": 2, "ended": True, "interrupted": False, "metadata": {"user": "ana"}}
    assert (newest["ended"], newest["utterances"], newest["events"], newest["metadata"]) == (False, 1, len(b), {})
    assert [s["id"] for s in store.sessions(limit=1, offset=1)] == ["desk-3"]
    assert store.sessions(limit=5, offset=2) == []
    db = store._db
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL: no fsync per commit
    store.close()


def test_a_reused_session_id_is_a_new_run(tmp_path: Path) -> None:
    """Ids may be used again once ended (the microphone's "mic" after a restart); seq restarts."""
    store = EventStore(tmp_path / "e.db")
    first = a_session(store, "mic", utterances=1)
    second = a_session(store, "mic", utterances=3, end=False)
    runs = store.sessions()
    assert [(s["id"], s["run"], s["utterances"]) for s in runs] == [("mic", 2, 3), ("mic", 1, 1)]
    assert store.events("mic") == second  # the newest run by default
    assert store.events("mic", run=1) == first
    assert store.session("mic", run=7) is None
    store.close()


def test_a_reopened_store_has_everything(tmp_path: Path) -> None:
    store = EventStore(tmp_path / "e.db")
    done = a_session(store, "done", utterances=1)
    cut = a_session(store, "cut", utterances=1, end=False)
    store.close()
    again = EventStore(tmp_path / "e.db")
    assert again.events("done") == done and again.events("cut") == cut
    flags = {s["id"]: (s["ended"], s["interrupted"]) for s in again.sessions()}
    assert flags == {"done": (True, False), "cut": (False, True)}  # its service is gone: it never ends
    # events of the old run can no longer be continued by a new session of the same id
    new = a_session(again, "cut", utterances=0, end=False)
    assert again.events("cut") == new and again.events("cut", run=2) == cut
    again.close()
    with pytest.raises(StoreError, match="no event store"):
        EventStore(tmp_path / "missing.db", readonly=True)


def test_a_failed_append_is_logged_counted_and_not_raised(tmp_path: Path, caplog) -> None:
    metrics = Metrics()
    store = EventStore(tmp_path / "e.db", metrics=metrics)
    publish(store, P.SESSION_STARTED, "s", 0)
    with caplog.at_level(logging.ERROR, logger="streamer.events.store"):
        publish(store, P.ERROR, "s", 0, code="x", message="a duplicate seq: the UNIQUE constraint refuses it")
    assert store.errors == 1 and metrics.value("emostream_store_errors_total") == 1
    assert "could not store error seq 0 of session s" in caplog.text and "IntegrityError" in caplog.text
    assert scraped(metrics.render())["emostream_store_errors_total"] == 1
    publish(store, P.SESSION_ENDED, "s", 1, utterances=0)  # the store goes on
    assert [e["seq"] for e in store.events("s")] == [0, 1] and store.sessions()[0]["ended"]
    store.close()
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="streamer.events.store"):
        publish(store, P.SESSION_STARTED, "late", 0)  # after close (shutdown): logged, counted, never raised
    assert store.errors == 2 and "session late" in caplog.text


def test_files_that_are_not_stores_are_clear_errors(tmp_path: Path) -> None:
    junk = tmp_path / "notes.txt"
    junk.write_text("not a database " * 100)
    with pytest.raises(StoreError, match="notes.txt"):
        EventStore(junk)
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE t (x)")
    db.close()
    with pytest.raises(StoreError, match="not an emostream event store"):
        EventStore(other)
    newer = tmp_path / "newer.db"
    EventStore(newer).close()
    with sqlite3.connect(newer) as db:
        db.execute("PRAGMA user_version = 99")
    db.close()
    with pytest.raises(StoreError, match="schema 99"):
        EventStore(newer)


# ---- over a real service ----------------------------------------------------------------------
@asynccontextmanager
async def served_with_store(model: Any, asr: Any, path: Path | None) -> AsyncIterator[Any]:
    from streamer.server import create_app

    app = create_app(replace(app_config(), store=StoreConfig(path=path)), model=model, asr=asr)
    await app.start()
    try:
        yield app
    finally:
        await asyncio.wait_for(app.shutdown(), WAIT_S)


def http_get(url: str) -> tuple[int, str, Any]:
    """(status, content type, JSON body) of a GET, errors included."""
    try:
        with urllib.request.urlopen(url, timeout=WAIT_S) as r:
            return r.status, r.headers.get_all("Content-Type"), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get_all("Content-Type"), json.loads(e.read())


async def get(app: Any, path: str) -> tuple[int, str, Any]:
    return await asyncio.to_thread(http_get, f"http://127.0.0.1:{app.port}{path}")


def export(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "streamer.events.export", *args], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=120)


def test_http_endpoints_and_export_return_exactly_what_the_source_received(emotion_model, whisper, tmp_path) -> None:  # noqa: F811
    db = tmp_path / "events.db"

    async def scenario() -> None:
        async with served_with_store(emotion_model, whisper, db) as app:
            res = await stream_audio(app.url, load("LJ001-0002.wav"), realtime=False, session_id="desk/3 ü")
            seen = res.events
            assert seen[0]["type"] == P.SESSION_STARTED and seen[-1]["type"] == P.SESSION_ENDED
            assert any(e["type"] == P.EMOTION for e in seen)
            quoted = urllib.request.quote("desk/3 ü", safe="")

            status, ctype, sessions = await get(app, "/v1/sessions")
            assert status == 200 and ctype == ["application/json"]
            (s,) = sessions
            assert (s["id"], s["events"], s["last_seq"], s["ended"], s["interrupted"]) == \
                   ("desk/3 ü", len(seen), seen[-1]["seq"], True, False)
            assert s["utterances"] == seen[-1]["utterances"] >= 1 and s["first_at"] <= s["last_at"]

            status, ctype, events = await get(app, f"/v1/sessions/{quoted}/events")
            assert status == 200 and ctype == ["application/json"]
            assert events == seen
            status, _, page = await get(app, f"/v1/sessions/{quoted}/events?after_seq=2&limit=3")
            assert status == 200 and page == [e for e in seen if e["seq"] > 2][:3]

            status, _, body = await get(app, "/v1/sessions/nobody/events")
            assert status == 404 and body["error"] == "unknown_session" and "nobody" in body["message"]
            status, _, body = await get(app, f"/v1/sessions/{quoted}/events?after_seq=two")
            assert status == 400 and "after_seq" in body["message"]
            status, _, body = await get(app, "/v1/sessions?limit=0")
            assert status == 400 and "limit" in body["message"]
            status, _, body = await get(app, f"/v1/sessions/{quoted}/bogus")
            assert status == 404 and body["error"] == "no_route"

            # the export reads the database the running service is writing to
            r = await asyncio.to_thread(export, "--store", str(db))
            assert r.returncode == 0, r.stderr
            assert [json.loads(line) for line in r.stdout.splitlines()] == seen
            out = tmp_path / "out.jsonl"
            r = await asyncio.to_thread(export, "--store", str(db), "--session", "desk/3 ü", "--after-seq", "3", "-o", str(out))
            later = [e for e in seen if e["seq"] > 3]
            assert r.returncode == 0 and f"exported {len(later)} events" in r.stderr, r.stderr
            assert [json.loads(line) for line in out.read_text().splitlines()] == later
            r = await asyncio.to_thread(export, "--store", str(db), "--session", "nobody")
            assert r.returncode == 1 and "nobody" in r.stderr

            url = f"http://127.0.0.1:{app.port}/metrics"
            metrics = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=WAIT_S).read().decode())
            assert scraped(metrics)["emostream_store_errors_total"] == 0

    asyncio.run(scenario())
    assert not Path(f"{db}-wal").exists()  # shutdown closed the store: the WAL is folded in and removed
    reader = EventStore(db, readonly=True)
    assert len(reader.events("desk/3 ü")) > 3
    reader.close()


def test_without_a_store_the_endpoints_say_how_to_get_one(emotion_model, whisper) -> None:  # noqa: F811
    async def scenario() -> None:
        async with served_with_store(emotion_model, whisper, None) as app:
            for path in ("/v1/sessions", "/v1/sessions/x/events"):
                status, ctype, body = await get(app, path)
                assert status == 404 and ctype == ["application/json"] and "--store PATH" in body["message"]

    asyncio.run(scenario())


@pytest.mark.slow
def test_kill_9_mid_session_loses_no_event_the_client_saw(tiny_checkpoint, emotion_model, whisper, tmp_path) -> None:  # noqa: F811
    """SIGKILL the service after the first emotion: every event a client received is in the
    database, and a new service on the same database serves them."""
    db = tmp_path / "events.db"
    sid = "doomed"

    async def scenario() -> list[dict[str, Any]]:
        proc, url = await start_server("--port", "0", "--store", str(db), "--checkpoint", str(tiny_checkpoint),
                                       "--device", "cpu")
        try:
            seen: list[dict[str, Any]] = []
            first_emotion = asyncio.Event()

            def on_event(ev: dict[str, Any]) -> None:
                seen.append(ev)
                if ev["type"] == P.EMOTION:
                    first_emotion.set()

            client = asyncio.create_task(stream_audio(url, load("jfk.flac"), realtime=True, session_id=sid,
                                                      on_event=on_event))
            await asyncio.wait_for(first_emotion.wait(), WAIT_S)
            proc.send_signal(signal.SIGKILL)
            assert await asyncio.wait_for(proc.wait(), WAIT_S) == -signal.SIGKILL
            with pytest.raises(ConnectionClosed):  # no close frame: the process is gone
                await asyncio.wait_for(client, WAIT_S)
            return seen
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()

    seen = asyncio.run(scenario())
    assert seen[0]["type"] == P.SESSION_STARTED and P.SESSION_ENDED not in [e["type"] for e in seen]
    with sqlite3.connect(db) as raw:  # the database as the killed process left it
        stored = [json.loads(t) for (t,) in raw.execute("SELECT json FROM events WHERE session_id = ? ORDER BY seq", (sid,))]
    raw.close()
    assert stored[: len(seen)] == seen  # the store may hold a few more: stored, then killed before sent

    async def restarted() -> None:
        async with served_with_store(emotion_model, whisper, db) as app:
            status, _, events = await get(app, f"/v1/sessions/{sid}/events")
            assert status == 200 and events == stored
            _, _, (s,) = await get(app, "/v1/sessions")
            assert (s["id"], s["ended"], s["interrupted"], s["events"]) == (sid, False, True, len(stored))

    asyncio.run(restarted())
