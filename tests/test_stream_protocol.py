"""Protocol v1 edges over real sockets: every bad-input case gets a clear `error` event (and the
session goes on where it can), oversized frames close with 1009, health and metrics over HTTP, a
slow subscriber is dropped without stalling anyone."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request

import numpy as np
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from streamer import protocol as P
from streamer.client import to_pcm16
from streamer.metrics import Metrics
from streamer.events.fanout import Hub, Subscriber

from tests.stream_util import (WAIT_S, check_session_events, emotion_model, load, recv_json, recv_until,  # noqa: F401
                               scraped, served, whisper)


async def expect_error(ws, code: str, others: list | None = None) -> dict:  # type: ignore[no-untyped-def]
    """The next error event; session events before it go to `others` (they may interleave)."""
    ev = await recv_json(ws)
    while others is not None and ev["type"] != P.ERROR:
        others.append(ev)
        ev = await recv_json(ws)
    assert ev["type"] == P.ERROR, ev
    assert ev["code"] == code, ev
    assert ev["message"], ev
    return ev


def test_bad_messages_get_errors_and_the_session_goes_on(emotion_model, whisper) -> None:  # noqa: F811
    async def scenario():  # type: ignore[no-untyped-def]
        async with served(emotion_model, whisper) as app:
            async with connect(app.url + P.STREAM_PATH) as ws:
                await ws.send(b"\x00\x01" * 100)
                await expect_error(ws, P.E_NOT_STARTED)  # audio before start
                await ws.send(P.STOP_MESSAGE)
                await expect_error(ws, P.E_NOT_STARTED)  # stop before start
                await ws.send("this is not json")
                await expect_error(ws, P.E_BAD_JSON)
                await ws.send("[1, 2]")
                await expect_error(ws, P.E_BAD_JSON)
                await ws.send(json.dumps({"type": "hello"}))
                await expect_error(ws, P.E_UNKNOWN_TYPE)
                await ws.send(json.dumps({"type": "start", "sample_rate": "fast"}))
                await expect_error(ws, P.E_BAD_START)
                await ws.send(json.dumps({"type": "start", "sample_rate": 16000, "encoding": "opus"}))
                await expect_error(ws, P.E_UNSUPPORTED_FORMAT)
                await ws.send(json.dumps({"type": "start", "sample_rate": 96000}))
                await expect_error(ws, P.E_UNSUPPORTED_FORMAT)
                await ws.send(json.dumps({"type": "start", "sample_rate": 4000}))
                await expect_error(ws, P.E_UNSUPPORTED_FORMAT)
                await ws.send(json.dumps({"type": "start", "sample_rate": 16000, "channels": 6}))
                await expect_error(ws, P.E_UNSUPPORTED_FORMAT)
                # now a good start: the same socket works
                await ws.send(P.StartMessage(session_id="bad-input").to_json())
                started = await recv_json(ws)
                assert started["type"] == P.SESSION_STARTED and started["session_id"] == "bad-input"
                others: list[dict] = []
                await ws.send(P.StartMessage().to_json())
                await expect_error(ws, P.E_ALREADY_STARTED, others)
                speech = to_pcm16(load("LJ001-0002.wav"))
                await ws.send(speech[:1001])  # odd byte count: the half sample is dropped, audio goes on
                err = await expect_error(ws, P.E_ODD_BYTES, others)
                await ws.send(speech[1001 + 1 :])  # re-aligned
                await ws.send(json.dumps({"type": "pause"}))
                await expect_error(ws, P.E_UNKNOWN_TYPE, others)
                await ws.send(P.STOP_MESSAGE)
                rest = await recv_until(ws, P.SESSION_ENDED)
                await asyncio.wait_for(ws.wait_closed(), WAIT_S)
                return started, err, others + rest, ws.close_code

    started, err, rest, code = asyncio.run(scenario())
    # pre-start errors and the session's events share one strictly increasing seq
    assert err["session_id"] == "bad-input"
    events = [started] + [e for e in rest if e["type"] != P.ERROR]
    check_session_events(events)
    assert any(e["type"] == P.EMOTION for e in rest)
    assert code == P.CLOSE_NORMAL


def test_start_conflicts(emotion_model, whisper) -> None:  # noqa: F811
    async def scenario():  # type: ignore[no-untyped-def]
        async with served(emotion_model, whisper, max_sessions=1) as app:
            async with connect(app.url + P.STREAM_PATH) as a, connect(app.url + P.STREAM_PATH) as b:
                await a.send(P.StartMessage(session_id="one").to_json())
                assert (await recv_json(a))["type"] == P.SESSION_STARTED
                await b.send(P.StartMessage(session_id="one").to_json())
                await expect_error(b, P.E_SESSION_EXISTS)
                await b.send(P.StartMessage(session_id="two").to_json())
                await expect_error(b, P.E_OVERLOADED)  # max_sessions=1
                await asyncio.wait_for(b.wait_closed(), WAIT_S)
                assert b.close_code == P.CLOSE_TRY_AGAIN
                await a.send(P.STOP_MESSAGE)
                ended = await recv_until(a, P.SESSION_ENDED)
                assert ended[-1]["utterances"] == 0  # no audio, no utterance
                return True

    assert asyncio.run(scenario())


def test_oversized_frame_closes_with_1009(emotion_model, whisper) -> None:  # noqa: F811
    async def scenario():  # type: ignore[no-untyped-def]
        async with served(emotion_model, whisper) as app:
            limit = app.config.limits.max_message_bytes
            async with connect(app.url + P.STREAM_PATH, max_size=None) as ws:
                await ws.send(P.StartMessage().to_json())
                await recv_json(ws)
                await ws.send(b"\x00" * (limit + 2))
                with pytest.raises(ConnectionClosed):
                    while True:
                        await recv_json(ws)
                return ws.close_code

    assert asyncio.run(scenario()) == P.CLOSE_TOO_BIG


def test_health_metrics_and_unknown_paths(emotion_model, whisper) -> None:  # noqa: F811
    def get(url: str) -> tuple[int, str, str]:
        try:
            with urllib.request.urlopen(url, timeout=WAIT_S) as r:
                return r.status, r.headers["Content-Type"], r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.headers["Content-Type"], e.read().decode()

    async def scenario():  # type: ignore[no-untyped-def]
        async with served(emotion_model, whisper) as app:
            base = f"http://127.0.0.1:{app.port}"
            health = await asyncio.to_thread(get, base + P.HEALTH_PATH)
            metrics = await asyncio.to_thread(get, base + P.METRICS_PATH)
            missing = await asyncio.to_thread(get, base + "/v2/stream")
            with pytest.raises(InvalidStatus):
                async with connect(app.url + "/nope"):
                    pass
            return health, metrics, missing

    health, metrics, missing = asyncio.run(scenario())
    assert health[0] == 200 and health[1].startswith("application/json")
    body = json.loads(health[2])
    assert body["status"] == "ok" and body["protocol"] == P.VERSION and body["sessions"] == 0
    assert metrics[0] == 200 and metrics[1] == Metrics.content_type
    samples = scraped(metrics[2])  # prometheus_client's parser reads the exposition
    for name in ("emostream_sessions_active", "emostream_utterances_total", "emostream_inference_queue_depth",
                 "emostream_subscriber_queue_max", "emostream_utterances_pending", 'emostream_asr_seconds_bucket{le="+Inf"}',
                 "emostream_model_seconds_count", "emostream_emotion_latency_seconds_sum"):
        assert samples[name] == 0, name  # nothing streamed yet
    assert samples["emostream_subscribers"] == 0 and samples["emostream_sessions_total"] == 0
    assert missing[0] == 404


class _StuckSocket:
    """A WebSocket whose peer never reads: send() never completes."""

    def __init__(self) -> None:
        self.closed_with: tuple[int, str] | None = None
        self.sent = 0

    async def send(self, text: str) -> None:
        self.sent += 1
        await asyncio.Event().wait()

    async def close(self, code: int = 1000, reason: str = "") -> None:
        self.closed_with = (code, reason)


class _ListSocket(_StuckSocket):
    def __init__(self) -> None:
        super().__init__()
        self.got: list[str] = []

    async def send(self, text: str) -> None:
        self.got.append(text)


def test_slow_subscriber_is_dropped_and_never_stalls_the_source() -> None:
    async def scenario():  # type: ignore[no-untyped-def]
        metrics = Metrics()
        hub = Hub(metrics)
        stuck, fine = _StuckSocket(), _ListSocket()
        slow = Subscriber(stuck, 4, metrics)  # type: ignore[arg-type]
        fast = Subscriber(fine, 1000, metrics)  # type: ignore[arg-type]
        hub.add("s", slow)
        hub.add(P.ALL_SESSIONS, fast)
        for i in range(50):  # publish never awaits a socket
            hub.publish(P.event(P.TRANSCRIPT, "s", i, utterance_id=i, text="x"))
        for _ in range(100):  # let the writer tasks run (bounded, no sleeps)
            await asyncio.sleep(0)
        fast.finish()
        await asyncio.wait_for(fast.task, WAIT_S)
        return slow, stuck, fine, metrics

    slow, stuck, fine, metrics = asyncio.run(scenario())
    assert slow.dropped and stuck.closed_with is not None and stuck.closed_with[0] == P.CLOSE_POLICY
    assert "too slow" in stuck.closed_with[1]
    assert len(fine.got) == 50 and [json.loads(t)["seq"] for t in fine.got] == list(range(50))
    assert metrics.value("emostream_subscribers_dropped_total") == 1


def test_start_message_round_trip() -> None:
    msg = P.StartMessage(sample_rate=8000, session_id="x", metadata={"who": "me"})
    d = json.loads(msg.to_json())
    assert d["type"] == P.START and P.StartMessage.from_dict(d) == msg
    for bad in ({"sample_rate": True}, {"sample_rate": 16000, "channels": "2"}, {"sample_rate": 16000, "session_id": "*"},
                {"sample_rate": 16000, "metadata": []}, {"sample_rate": 16000, "colour": "red"}):
        with pytest.raises(ValueError):
            P.StartMessage.from_dict({"type": "start", **bad})
    with pytest.raises(ValueError):
        P.event("nonsense", "s", 0)
