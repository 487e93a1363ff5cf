"""Faults, each a clear error or a documented degradation and never a hang (issue 15):
- a subscriber whose TCP window is full (a raw socket that never reads) is dropped with 1008 and
  counted, while the source and another subscriber get every event;
- the event store's disk fills up (a real EFBIG from RLIMIT_FSIZE on the service process): events
  still go out live, /healthz says "degraded" with the store's error, the failures are counted and
  logged, and storing resumes by itself once the disk has room;
- Redis disappears (killed, or hung: SIGSTOP) mid-session under --bus and under --inference: the
  session goes on (utterances get `error` events where inference is remote), and shutdown is
  prompt (it took 30 s and more with remote inference: jobs in flight waited out remote_timeout_s,
  then each Redis call in RemoteInferenceEngine.aclose its socket timeout)."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import struct
import threading
import time
import urllib.request
from dataclasses import replace
from typing import Any

from collections.abc import Sequence

import numpy as np
import pytest
from websockets.asyncio.client import connect

from streamer import protocol as P
from streamer.client import stream_audio, to_pcm16
from streamer.infer.transcriber import Transcript
from tests.stream_util import (StubAsr, WAIT_S, app_config, check_session_events, emotion_model, load, recv_json,  # noqa: F401
                               recv_until, scraped, served, whisper)
from tests.test_bus import instance, redis_server, silence  # noqa: F401
from tests.test_remote_inference import fake_worker, front_end
from tests.test_stream_cli import start_server

SHUTDOWN_BOUND_S = 15.0


async def until_true(pred: Any, what: str, timeout: float = WAIT_S) -> None:
    """Poll `pred` (state of the service or of Redis) until true, bounded."""
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


# ---- past capacity -----------------------------------------------------------------------------
class JammedAsr(StubAsr):
    """One decoder that blocks in transcribe until released: the decoders are saturated."""

    workers, batch_size = 1, 1

    def __init__(self) -> None:
        self.release = threading.Event()

    def transcribe(self, audios: list[np.ndarray], words: Sequence[bool] | None = None,
                   redecode: Sequence[bool] | None = None) -> list[Transcript]:
        assert self.release.wait(WAIT_S)
        return [Transcript("hello there", 0.0, -0.1) for _ in audios]


def test_past_capacity_new_sessions_are_refused_and_admitted_ones_skip_with_a_named_error(emotion_model) -> None:  # noqa: F811
    """bench/overload.py's contract with a decoder jammed on purpose: an utterance that would wait
    more than max_queue_s is skipped with `overloaded` naming it (the session goes on), a new
    session is refused on the wait estimate (error `overloaded`, close 1013) while the decoder is
    behind and admitted once it caught up, and the admitted session ends properly."""
    from streamer.server import create_app

    asr = JammedAsr()
    base = app_config()
    cfg = replace(base, server=replace(base.server, admit_max_wait_s=0.3),
                  inference=replace(base.inference, warmup=False, max_wait_ms=0.0, max_queue_s=0.5))
    speech = [to_pcm16(load(name)) for name in ("LJ001-0002.wav", "LJ001-0008.wav", "LJ001-0002.wav")]

    async def scenario() -> dict[str, Any]:
        app = create_app(cfg, model=emotion_model, asr=asr)
        await app.start()
        try:
            async with connect(app.url + P.STREAM_PATH) as src:
                await src.send(P.StartMessage(sample_rate=16_000, session_id="live").to_json())
                events = [await recv_json(src)]
                for pcm in speech:  # utterance 0 jams the decoder, 1 waits (~0.3 s estimated), 2 would wait ~0.6 s
                    await src.send(pcm + silence(1.0))
                while not any(e["type"] == P.ERROR for e in events):
                    events.append(await recv_json(src))
                estimate = app.engine.wait_estimate_s()
                async with connect(app.url + P.STREAM_PATH) as late:
                    await late.send(P.StartMessage(sample_rate=16_000, session_id="late").to_json())
                    refused = await recv_json(late)
                    await late.wait_closed()
                asr.release.set()  # the decoder catches up
                while sum(e["type"] == P.EMOTION for e in events) < 2:
                    events.append(await recv_json(src))
                await until_true(lambda: app.engine.wait_estimate_s() == 0.0, "an idle decoder")
                async with connect(app.url + P.STREAM_PATH) as again:
                    await again.send(P.StartMessage(sample_rate=16_000, session_id="late").to_json())
                    admitted = await recv_json(again)
                    await again.send(P.STOP_MESSAGE)
                    await recv_until(again, P.SESSION_ENDED)
                await src.send(P.STOP_MESSAGE)
                async for msg in src:
                    events.append(json.loads(msg))
                return {"events": events, "estimate": estimate, "refused": refused, "late_close": late.close_code,
                        "admitted": admitted, "close": src.close_code,
                        "overloaded": app.metrics.value("emostream_overloaded_total")}
        finally:
            asr.release.set()
            await asyncio.wait_for(app.shutdown(), WAIT_S)

    out = asyncio.run(scenario())
    events = out["events"]
    ended = [e["utterance_id"] for e in events if e["type"] == P.UTTERANCE_ENDED]
    emotions = [e["utterance_id"] for e in events if e["type"] == P.EMOTION]
    errors = [e for e in events if e["type"] == P.ERROR]
    assert ended == [0, 1, 2] and emotions == [0, 1], events
    assert len(errors) == 1 and errors[0]["code"] == P.E_OVERLOADED, errors
    assert errors[0]["message"].startswith("utterance 2 skipped: decoders are") and "limit 0.5 s" in errors[0]["message"]
    assert out["estimate"] > 0.3
    r = out["refused"]
    assert r["type"] == P.ERROR and r["code"] == P.E_OVERLOADED and "would wait" in r["message"], r
    assert out["late_close"] == P.CLOSE_TRY_AGAIN and out["overloaded"] == 2  # the utterance and the session
    assert out["admitted"]["type"] == P.SESSION_STARTED
    assert events[-1]["type"] == P.SESSION_ENDED and events[-1]["utterances"] == 3 and out["close"] == P.CLOSE_NORMAL
    assert [e["seq"] for e in events] == list(range(len(events)))


# ---- a subscriber that never reads ------------------------------------------------------------
def raw_subscriber(port: int) -> tuple[socket.socket, bytes]:
    """A WebSocket subscriber to every session on a raw socket with a small receive buffer that
    never reads after the handshake; returns it and any bytes that came with the 101."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
    s.settimeout(WAIT_S)
    s.connect(("127.0.0.1", port))
    s.sendall((f"GET {P.SUBSCRIBE_PATH}?session=* HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
               "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
              .encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(4096)
        assert chunk, "connection closed during the handshake"
        data += chunk
    head, rest = data.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 101"), head
    return s, rest


def read_frames(s: socket.socket, data: bytes) -> tuple[int, int | None, str]:
    """Read server frames until a close frame or EOF: (text frames, close code, close reason)."""
    texts = 0
    while True:
        while len(data) >= 2:
            n, i = data[1] & 0x7F, 2
            if n == 126:
                if len(data) < 4:
                    break
                n, i = struct.unpack("!H", data[2:4])[0], 4
            elif n == 127:
                if len(data) < 10:
                    break
                n, i = struct.unpack("!Q", data[2:10])[0], 10
            if len(data) < i + n:
                break
            opcode, payload, data = data[0] & 0x0F, data[i : i + n], data[i + n :]
            if opcode == 0x8:
                return texts, struct.unpack("!H", payload[:2])[0], payload[2:].decode()
            texts += opcode == 0x1
        chunk = s.recv(65536)
        if not chunk:
            return texts, None, ""
        data += chunk


BAD = json.dumps({"type": "x" * 4000})


def test_a_subscriber_that_never_reads_is_dropped_and_stalls_nobody(emotion_model, whisper) -> None:  # noqa: F811
    """Its TCP window fills, its queue overflows: closed with 1008 and counted; the source and a
    subscriber that reads get every event, in order, while it is stuck and after."""

    async def scenario() -> dict[str, Any]:
        async with served(emotion_model, whisper, subscriber_queue=32) as app:
            stuck, early = await asyncio.to_thread(raw_subscriber, app.port)
            try:
                async with connect(app.url + P.SUBSCRIBE_PATH + "?session=*") as good, \
                        connect(app.url + P.STREAM_PATH) as src:
                    watched: list[dict[str, Any]] = []

                    async def watch() -> None:
                        async for msg in good:
                            watched.append(json.loads(msg))

                    watcher = asyncio.create_task(watch())
                    await src.send(P.StartMessage(sample_rate=16_000, session_id="flood").to_json())
                    source = [await recv_json(src)]
                    sent = 0
                    # unknown message types, 20 at a time: each gets a 4 kB `error` event (naming the
                    # type) for everyone; the kernel buffers a few MB for the stuck socket first
                    while app.metrics.value("emostream_subscribers_dropped_total") == 0:
                        assert sent < 20_000, "the stuck subscriber was never dropped"
                        for _ in range(20):
                            await src.send(BAD)
                        sent += 20
                        for _ in range(20):
                            source.append(await recv_json(src))
                    dropped_at = source[-1]["seq"]
                    for _ in range(5):  # the source goes on after the drop
                        await src.send(BAD)
                        source.append(await recv_json(src))
                    await src.send(P.STOP_MESSAGE)
                    while source[-1]["type"] != P.SESSION_ENDED:
                        source.append(await recv_json(src))
                    await until_true(lambda: watched and watched[-1]["type"] == P.SESSION_ENDED, "the good subscriber")
                    watcher.cancel()
                texts, code, reason = await asyncio.to_thread(read_frames, stuck, early)
            finally:
                stuck.close()
            return {"source": source, "watched": watched, "dropped_at": dropped_at, "sent": sent, "texts": texts, "code": code,
                    "reason": reason, "metrics": app.metrics.render()}

    out = asyncio.run(scenario())
    source = out["source"]
    assert [e["seq"] for e in source] == list(range(len(source)))  # nothing missing, nothing repeated
    assert source[-1]["type"] == P.SESSION_ENDED and sum(e["type"] == P.ERROR for e in source) == out["sent"] + 5
    assert out["watched"] == source  # the other subscriber: every event, in order
    assert out["code"] == P.CLOSE_POLICY and "too slow" in out["reason"], out
    assert 0 < out["texts"] <= out["dropped_at"] + 1  # what it got before the drop, nothing after
    assert scraped(out["metrics"])["emostream_subscribers_dropped_total"] == 1


# ---- disk full under --store ------------------------------------------------------------------
def http_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=WAIT_S) as r:
        return json.loads(r.read())


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(__import__("resource"), "prlimit"), reason="needs resource.prlimit (Linux)")
def test_disk_full_under_store_degrades_visibly_and_recovers(tiny_checkpoint, tmp_path) -> None:
    """RLIMIT_FSIZE of 1 byte on the running service: every SQLite write fails with EFBIG, as on a
    full disk (Python ignores SIGXFSZ). The session still gets every event live; /healthz reports
    "degraded" with the store's error; the failures are counted and logged once; with the limit
    lifted the next session is stored whole and health is "ok" again."""
    import resource

    db = tmp_path / "events.db"
    speech = load("LJ001-0008.wav")

    async def scenario() -> dict[str, Any]:
        proc, url = await start_server("--port", "0", "--store", str(db), "--checkpoint", str(tiny_checkpoint),
                                       "--device", "cpu")
        lines: list[str] = []

        async def drain() -> None:  # the service's log (a full pipe would block it)
            assert proc.stdout is not None
            while line := await proc.stdout.readline():
                lines.append(line.decode(errors="replace"))

        reader = asyncio.create_task(drain())
        http = url.replace("ws://", "http://")
        try:
            before = await stream_audio(url, speech, realtime=False, session_id="before", timeout_s=WAIT_S)
            _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
            resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (1, hard))  # the disk is full from now on
            full = await stream_audio(url, speech, realtime=False, session_id="full", timeout_s=WAIT_S)
            health_full = await asyncio.to_thread(http_json, http + P.HEALTH_PATH)
            resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (hard, hard))  # room again
            after = await stream_audio(url, speech, realtime=False, session_id="after", timeout_s=WAIT_S)
            health_after = await asyncio.to_thread(http_json, http + P.HEALTH_PATH)
            with urllib.request.urlopen(http + P.METRICS_PATH, timeout=WAIT_S) as r:
                metrics = r.read().decode()
            stored = {s["id"]: s for s in await asyncio.to_thread(http_json, http + "/v1/sessions")}
            after_stored = await asyncio.to_thread(http_json, http + "/v1/sessions/after/events")
            proc.send_signal(signal.SIGTERM)
            code = await asyncio.wait_for(proc.wait(), WAIT_S)
            await asyncio.wait_for(reader, WAIT_S)
            return {"before": before.events, "full": full.events, "after": after.events, "health_full": health_full,
                    "health_after": health_after, "metrics": metrics, "stored": stored, "after_stored": after_stored,
                    "code": code, "log": "".join(lines)}
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            reader.cancel()

    out = asyncio.run(scenario())
    for name in ("before", "full", "after"):  # every client got its whole session, disk full or not
        check_session_events(out[name])
        assert sum(e["type"] == P.EMOTION for e in out[name]) == 1, name
    h = out["health_full"]
    assert h["status"] == "degraded" and h["store"]["ok"] is False and h["store"]["errors"] >= len(out["full"])
    assert "database or disk is full" in h["store"]["last_error"] or "disk I/O error" in h["store"]["last_error"], h
    assert out["health_after"]["status"] == "ok" and out["health_after"]["store"]["ok"] is True
    assert scraped(out["metrics"])["emostream_store_errors_total"] == h["store"]["errors"]  # nothing failed once the disk had room again
    assert out["log"].count("could not store") == 1, out["log"]  # one line per streak, not one per event
    assert "storing events again" in out["log"]
    assert out["stored"]["before"]["ended"] and out["stored"]["after"]["ended"]
    assert out["after_stored"] == out["after"]  # stored whole, exactly as sent
    assert "full" not in out["stored"] or out["stored"]["full"]["events"] < len(out["full"])
    assert out["code"] == 0  # and a clean shutdown


# ---- Redis gone mid-session -------------------------------------------------------------------
def fault_redis(server: Any, fault: str) -> None:
    assert server.proc is not None
    if fault == "kill":
        server.kill()
    else:  # hung: connections open, nothing answers (the fixture's SIGKILL ends it)
        server.proc.send_signal(signal.SIGSTOP)


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["kill", "hang"])
def test_bus_redis_lost_mid_session_the_session_goes_on_and_shutdown_is_prompt(redis_server, emotion_model,  # noqa: F811
                                                                                 whisper, fault) -> None:  # noqa: F811
    async def scenario() -> dict[str, Any]:
        async with instance(emotion_model, whisper, redis_server.url) as app, \
                connect(app.url + P.SUBSCRIBE_PATH + "?session=bus1") as local, \
                connect(app.url + P.STREAM_PATH) as src:
            await src.send(P.StartMessage(sample_rate=16_000, session_id="bus1").to_json())
            source = [await recv_json(src)]
            fault_redis(redis_server, fault)
            await src.send(to_pcm16(load("LJ001-0002.wav")) + silence(1.0) + to_pcm16(load("LJ001-0008.wav")))
            await src.send(P.STOP_MESSAGE)
            while source[-1]["type"] != P.SESSION_ENDED:
                source.append(await recv_json(src))
            watched = [await recv_json(local)]
            while watched[-1]["type"] != P.SESSION_ENDED:
                watched.append(await recv_json(local))
            await until_true(lambda: app.metrics.value("emostream_bus_errors_total") > 0, "a bus error")
            health = app.health()
            t0 = time.monotonic()
            await asyncio.wait_for(app.shutdown(), WAIT_S)
            return {"source": source, "watched": watched, "health": health, "shutdown_s": time.monotonic() - t0}

    out = asyncio.run(scenario())
    check_session_events(out["source"])
    assert sum(e["type"] == P.EMOTION for e in out["source"]) == 2 and out["watched"] == out["source"]
    assert out["health"]["status"] == "ok" and out["health"]["bus"]["connected"] is False
    assert out["shutdown_s"] < SHUTDOWN_BOUND_S, out["shutdown_s"]


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["kill", "hang"])
def test_remote_inference_redis_lost_mid_session_errors_and_prompt_shutdown(redis_server, tiny_checkpoint,  # noqa: F811
                                                                             fault) -> None:
    """No worker takes jobs (a heartbeat alone admits the session), so the first utterance's job
    stays outstanding; then Redis goes. The next utterance gets its `error` at once (killed) or
    after the socket timeout (hung); shutting down with the session live fails the outstanding job
    at once instead of after remote_timeout_s (30 s) and bounds the Redis clean-up: prompt, every
    utterance with its error, session.ended."""
    fake_worker(redis_server.url)

    async def scenario() -> dict[str, Any]:
        async with front_end(tiny_checkpoint, redis_server.url) as app:
            engine = app.engine
            async with connect(app.url + P.STREAM_PATH) as src:
                await src.send(P.StartMessage(sample_rate=16_000, session_id="remote1").to_json())
                events = [await recv_json(src)]
                await src.send(to_pcm16(load("LJ001-0008.wav")) + silence(1.0))
                await until_true(lambda: any(j.entry_id for j in engine._jobs.values()), "a job written to Redis")
                (first,) = engine._jobs
                fault_redis(redis_server, fault)
                await src.send(to_pcm16(load("LJ001-0002.wav")) + silence(1.0))
                while sum(e["type"] == P.UTTERANCE_ENDED for e in events) < 2:
                    events.append(await recv_json(src))
                # the second utterance's job fails (Redis unreachable); the first is still outstanding
                await until_true(lambda: list(engine._jobs) == [first], "the second job to fail")
                t0 = time.monotonic()
                await asyncio.wait_for(app.shutdown(), WAIT_S)
                shutdown_s = time.monotonic() - t0
                async for msg in src:
                    events.append(json.loads(msg))
                return {"events": events, "shutdown_s": shutdown_s, "close": src.close_code,
                        "outstanding": len(engine._jobs)}

    out = asyncio.run(scenario())
    assert out["shutdown_s"] < SHUTDOWN_BOUND_S and out["outstanding"] == 0, out["shutdown_s"]
    events = out["events"]
    errors = [e for e in events if e["type"] == P.ERROR]
    assert [e["type"] for e in events if e["type"] == P.UTTERANCE_ENDED] == [P.UTTERANCE_ENDED] * 2
    assert len(errors) == 2 and all(e["code"] == P.E_INTERNAL for e in errors), errors
    # in utterance order: the outstanding one failed at shutdown, the next one when it could not be sent
    assert "utterance 0 failed" in errors[0]["message"] and "shutting down" in errors[0]["message"], errors
    assert "utterance 1 failed" in errors[1]["message"] and "inference queue unavailable" in errors[1]["message"]
    assert events[-1]["type"] == P.SESSION_ENDED and out["close"] == P.CLOSE_GOING_AWAY
