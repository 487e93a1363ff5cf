"""Two service instances sharing events through a real Redis (Debian's redis-server on a private unix
socket): a subscriber on A sees sessions streamed to B, replay after_seq on A of B's session comes
from Redis exactly once (the race with the live reader forced both ways), and killing Redis mid-
session leaves the local service whole, then the bus reconnects and the other instance catches up."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from websockets.asyncio.client import connect

from streamer import protocol as P
from streamer.client import stream_audio, to_pcm16
from streamer.config import BusConfig
from tests.stream_util import (WAIT_S, app_config, check_session_events, emotion_model, load, recv_json,  # noqa: F401
                               recv_until, whisper)

pytestmark = pytest.mark.slow


@dataclass
class RedisServer:
    socket: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(self) -> None:
        """Start redis-server on the socket and wait (bounded) until it answers PING."""
        self.proc = subprocess.Popen(
            ["redis-server", "--port", "0", "--unixsocket", str(self.socket), "--unixsocketperm", "700",
             "--save", "", "--appendonly", "no", "--dir", str(self.socket.parent)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            ping = subprocess.run(["redis-cli", "-s", str(self.socket), "ping"], capture_output=True, text=True)
            if ping.stdout.strip() == "PONG":
                return
            time.sleep(0.02)  # poll interval, not a wait for readiness
        raise RuntimeError("redis-server did not answer PING within 15 s")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)


@pytest.fixture()
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed: run scripts/setup.sh (Debian package redis-server)")
    server = RedisServer(tmp_path / "redis.sock")
    server.start()
    try:
        yield server
    finally:
        server.kill()


@asynccontextmanager
async def instance(model: Any, asr: Any, url: str, **bus: Any) -> AsyncIterator[Any]:
    """One service instance on port 0 with the Redis bus; returns once its bus reader is following."""
    from streamer.server import create_app

    cfg = replace(app_config(), bus=BusConfig(url=url, **bus))
    app = create_app(cfg, model=model, asr=asr)
    await app.start()
    try:
        await asyncio.wait_for(app.bus.reading.wait(), WAIT_S)
        yield app
    finally:
        await asyncio.wait_for(app.shutdown(), WAIT_S)


def silence(s: float) -> bytes:
    return to_pcm16(np.zeros(int(16_000 * s), dtype=np.float32))


async def until(ws: Any, pred: Any, out: list[dict[str, Any]]) -> None:
    """Receive into `out` until an event satisfies `pred`."""
    while True:
        ev = await recv_json(ws)
        out.append(ev)
        if pred(ev):
            return


def test_subscriber_on_a_sees_a_session_streamed_to_b(redis_server, emotion_model, whisper):  # noqa: F811
    async def go() -> dict[str, Any]:
        async with instance(emotion_model, whisper, redis_server.url) as a, \
                instance(emotion_model, whisper, redis_server.url) as b:
            async with connect(a.url + P.SUBSCRIBE_PATH + "?session=x1") as one, \
                    connect(a.url + P.SUBSCRIBE_PATH + "?session=*") as every:
                result = await stream_audio(b.url, load("LJ001-0008.wav"), realtime=False, session_id="x1")
                got_one = await recv_until(one, P.SESSION_ENDED)
                with pytest.raises(Exception):
                    await recv_json(one)  # the remote session.ended closed A's own subscriber of x1
                got_all = [e for e in await recv_until(every, P.SESSION_ENDED)]
                return {"source": result.events, "one": got_one, "one_close": one.close_code, "all": got_all,
                        "a_sessions": len(a.sessions), "b_sessions_total": b.metrics.value("emostream_sessions_total"),
                        "errors": a.metrics.value("emostream_bus_errors_total") + b.metrics.value("emostream_bus_errors_total"),
                        "health": a.health()["bus"]}

    out = asyncio.run(go())
    check_session_events(out["source"])
    assert any(e["type"] == P.EMOTION for e in out["source"])
    assert out["one"] == out["source"]  # exactly the events the source got, same order, nothing twice
    assert out["one_close"] == P.CLOSE_NORMAL
    assert [e for e in out["all"] if e["session_id"] == "x1"] == out["source"]
    assert out["a_sessions"] == 0 and out["b_sessions_total"] == 1  # the audio really went to B only
    assert out["errors"] == 0 and out["health"]["connected"] is True


def test_replay_on_a_of_a_session_on_b_is_exactly_once(redis_server, emotion_model, whisper):  # noqa: F811
    """A starts after B's session began, so `after_seq` is answered from Redis. The live reader is
    parked while the replay is read; half of what it read arrives during the replay (held), half
    after it (the reader lagging behind the replay): every event must arrive exactly once."""

    async def go() -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, int]]:
        source: list[dict[str, Any]] = []
        async with instance(emotion_model, whisper, redis_server.url) as b, \
                connect(b.url + P.STREAM_PATH) as src:
            await src.send(P.StartMessage(sample_rate=16_000, session_id="x2").to_json())
            await src.send(to_pcm16(load("LJ001-0002.wav")) + silence(1.0))
            await until(src, lambda e: e["type"] == P.EMOTION, source)
            async with instance(emotion_model, whisper, redis_server.url) as a:
                parked: list[dict[bytes, bytes]] = []
                parking, enough = [True], asyncio.Event()
                deliver, history = a.bus._incoming, a.bus.history
                counts = {"history_calls": 0, "held_half": 0}
                target: list[int] = []

                def incoming(fields: dict[bytes, bytes]) -> None:
                    if not parking[0]:
                        return deliver(fields)
                    parked.append(fields)
                    if target and int(fields[b"q"]) >= target[0]:
                        enough.set()

                async def slow_history(sid: str, after: int) -> Any:
                    counts["history_calls"] += 1
                    await asyncio.wait_for(enough.wait(), WAIT_S)  # Redis has the 2nd utterance, A read it
                    half = len(parked) // 2
                    counts["held_half"] = half
                    for f in parked[:half]:
                        deliver(f)  # live events while the replay is pending
                    return await history(sid, after)

                a.bus._incoming, a.bus.history = incoming, slow_history
                async with connect(a.url + P.SUBSCRIBE_PATH + "?session=x2&after_seq=1") as sub:
                    await src.send(to_pcm16(load("LJ001-0008.wav")) + silence(1.0))
                    n = len(source)
                    await until(src, lambda e: e["type"] == P.EMOTION and e["utterance_id"] == 1, source)
                    target.append(source[-1]["seq"])
                    if any(int(f[b"q"]) >= target[0] for f in parked):
                        enough.set()
                    got = [await recv_json(sub) for _ in source if _["seq"] > 1]  # replay + held, no more
                    for f in parked[counts["held_half"]:]:
                        deliver(f)  # the reader behind the replay: all of these were replayed already
                    parking[0] = False
                    assert n < len(source)
                    await src.send(json.dumps({"type": "stop"}))
                    await until(src, lambda e: e["type"] == P.SESSION_ENDED, source)
                    got += await recv_until(sub, P.SESSION_ENDED)
                    counts["parked"] = len(parked)
                    return source, got, counts

    source, got, counts = asyncio.run(go())
    check_session_events(source)
    assert counts["history_calls"] == 1 and counts["held_half"] >= 1 and counts["parked"] > counts["held_half"]
    assert [e["seq"] for e in got] == [e["seq"] for e in source if e["seq"] > 1]
    assert got == [e for e in source if e["seq"] > 1]


def test_redis_killed_mid_session(redis_server, emotion_model, whisper):  # noqa: F811
    """The source on B completes with Redis gone; B stays healthy and counts bus errors; Redis back
    on the same socket, both buses reconnect and A's subscriber gets the rest of the session."""

    async def go() -> dict[str, Any]:
        fast = {"backoff_max_s": 0.3, "drain_s": 5.0}
        async with instance(emotion_model, whisper, redis_server.url, **fast) as a, \
                instance(emotion_model, whisper, redis_server.url, **fast) as b, \
                connect(a.url + P.SUBSCRIBE_PATH + "?session=*") as watcher, \
                connect(b.url + P.SUBSCRIBE_PATH + "?session=x3") as local, \
                connect(b.url + P.STREAM_PATH) as src:
            source: list[dict[str, Any]] = []
            seen: list[dict[str, Any]] = []
            await src.send(P.StartMessage(sample_rate=16_000, session_id="x3").to_json())
            await until(watcher, lambda e: e["type"] == P.SESSION_STARTED, seen)  # crossed while Redis was up
            await asyncio.to_thread(redis_server.kill)
            await src.send(to_pcm16(load("LJ001-0002.wav")) + silence(1.0) + to_pcm16(load("LJ001-0008.wav")))
            await src.send(json.dumps({"type": "stop"}))
            await until(src, lambda e: e["type"] == P.SESSION_ENDED, source)
            watched = await recv_until(local, P.SESSION_ENDED)
            for _ in range(200):  # bounded: the writer has met the dead socket by now, or soon
                if b.metrics.value("emostream_bus_errors_total") > 0:
                    break
                await asyncio.sleep(0.05)
            out = {"source": source, "local": watched, "errors": b.metrics.value("emostream_bus_errors_total"),
                   "health": b.health(), "metrics": b.metrics.render()}
            await asyncio.to_thread(redis_server.start)  # same socket: both buses reconnect (back-off)
            await until(watcher, lambda e: e["type"] == P.SESSION_ENDED, seen)
            out["seen"] = seen
            out["reconnected"] = b.bus.status()["connected"]
            return out

    out = asyncio.run(go())
    check_session_events(out["source"])
    assert sum(e["type"] == P.EMOTION for e in out["source"]) == 2
    assert out["local"] == out["source"]  # B's own subscriber: complete while Redis was down
    assert out["errors"] > 0 and "emostream_bus_errors_total" in out["metrics"]
    assert out["health"]["status"] == "ok" and out["health"]["bus"]["connected"] is False
    assert out["seen"] == out["source"]  # queued while Redis was down, delivered once it was back
    assert out["reconnected"] is True


def test_bus_flag_and_config():
    from streamer.__main__ import build_parser, config_from_args

    assert config_from_args(build_parser().parse_args([])).bus == BusConfig()  # in-process by default
    for url in ("redis://127.0.0.1:6379/0", "unix:///run/redis.sock"):
        assert config_from_args(build_parser().parse_args(["--bus", url])).bus.url == url
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--bus", "http://example.com"])
    with pytest.raises(ValueError, match="redis://"):
        BusConfig(url="localhost:6379")


def test_reconnect_back_off_is_redis_pys_doubling_with_jitter_and_capped() -> None:
    """Between failed attempts the bus (and the remote engine) wait redis-py's EqualJitterBackoff:
    half to all of backoff_min_s at first, doubling per failure, never over backoff_max_s."""
    from streamer.events.bus import RedisBus
    from streamer.metrics import Metrics

    bus = RedisBus(BusConfig(url="redis://127.0.0.1:1/0", backoff_min_s=0.1, backoff_max_s=5.0), Metrics())  # never connects
    first = [bus.backoff.compute(1) for _ in range(200)]
    assert 0.05 <= min(first) and max(first) <= 0.1 and max(first) - min(first) > 0.02  # jittered
    assert all(0.2 <= bus.backoff.compute(3) <= 0.4 for _ in range(50))
    assert all(2.5 <= bus.backoff.compute(30) <= 5.0 for _ in range(50))  # capped
