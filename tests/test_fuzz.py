"""Protocol fuzzing against one real service (hypothesis): random JSON, near-valid `start`
messages, random text, random and truncated binary frames, garbage query strings, Twilio-shaped
garbage, frames over the size limit, and clients that vanish mid-utterance.

Every fuzz connection may only get well-formed events back (JSON objects with `type`,
`session_id`, `seq`) and a clean close; the server must stay up; and a healthy session streaming
real speech at real-time pace on the same service during each test must get exactly its normal
events (no error, gap-free seq, one transcript + emotion per utterance, WER <= 0.3).

The service and all clients run on one event loop in a background thread; hypothesis drives it
from the test thread, one connection per example. Examples are derandomized (CI-stable).
"""

from __future__ import annotations

import asyncio
import base64
import json
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from typing import Any
from urllib.parse import quote, urlencode

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from streamer import protocol as P
from streamer.client import to_pcm16

from tests.stream_util import (  # noqa: F401
    HEALTHY, HEALTHY_FILE, NO_LOAD_ADMISSION, WAIT_S, ServiceThread, app_config, check_session_events, emotion_model, healthy_session, load,
    whisper,
)

pytestmark = pytest.mark.slow

GRACE_S = 0.3  # resume grace of a dropped source: short, so vanished sessions end within the test
LIVE = "@live"  # in fuzzed ids and queries: replaced by the live healthy session's id when sent
FUZZ = settings(deadline=None, derandomize=True, database=None, print_blob=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
CLEAN_CLOSES = {P.CLOSE_NORMAL, P.CLOSE_POLICY, P.CLOSE_TOO_BIG, P.CLOSE_TRY_AGAIN}
INVALID_UTF8 = 1007  # websockets' own close for a text frame that is not UTF-8


# ---- the service on a background loop ---------------------------------------------------------
class Harness(ServiceThread):
    """One real App on port 0, its event loop in a thread; tests submit coroutines to that loop."""

    def __init__(self, model: Any, asr: Any) -> None:
        from streamer.server import create_app

        super().__init__("fuzz-service")
        config = app_config(resume_grace_s=GRACE_S, **NO_LOAD_ADMISSION)
        # 20 dropped sessions finish at once: the decoders' queue limit (load shedding, tested in
        # test_faults) is the tests' own wait here, or a busy machine turns a burst into skips
        config = replace(config, inference=replace(config.inference, max_queue_s=WAIT_S))
        self.serve(create_app(config, model=model, asr=asr))
        self.url = self.app.url
        self.limit = self.app.config.limits.max_message_bytes
        self.connections = 0  # fuzz connections made (so a test can show it really ran concurrently)
        self.healthy_runs = 0
        self.live = ""  # the healthy session running now

    def healthz(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.app.port}{P.HEALTH_PATH}", timeout=10) as r:
            assert r.status == 200
            return json.loads(r.read())



@pytest.fixture(scope="module")
def harness(emotion_model, whisper) -> Iterator[Harness]:  # noqa: F811
    h = Harness(emotion_model, whisper)
    try:
        yield h
    finally:
        h.close()


# ---- the healthy session ----------------------------------------------------------------------
def server_is_fine(h: Harness) -> None:
    """Up, nothing left behind, and no handler crashed."""
    health = h.healthz()
    assert health["status"] == "ok" and health["sessions"] == 0, health
    assert not h.app.sessions, list(h.app.sessions)
    assert not h.errors.records, h.errors.report()


# ---- checking what a fuzz connection got -------------------------------------------------------
async def handler_done(h: Harness, ws: ClientConnection, timeout: float = WAIT_S) -> None:
    """Wait until the server's handler for this client's connection has returned (websockets logs
    a crashed handler just before it forgets the connection), then fail on any ERROR logged."""
    me = ws.local_address
    before = len(h.errors.records)
    async with asyncio.timeout(timeout):
        while any(c.remote_address == me for c in h.app.server.all_connections):
            await asyncio.sleep(0.005)  # no event for this; a bounded wait on the server's own set
    new = h.errors.records[before:]
    assert not new, "\n".join(h.errors.format(r) for r in new)


async def drain(ws: ClientConnection, into: list[Any]) -> None:
    """Everything the server sends until the socket is closed."""
    try:
        async for msg in ws:
            into.append(msg)
    except ConnectionClosed:
        pass


def well_formed(messages: list[Any]) -> list[dict[str, Any]]:
    """Every message a JSON event object with type/session_id/seq; returns them parsed."""
    out = []
    for msg in messages:
        assert isinstance(msg, str), msg
        ev = json.loads(msg)
        assert isinstance(ev, dict), ev
        assert ev.get("type") in P.EVENT_TYPES, ev
        assert ev["session_id"] is None or isinstance(ev["session_id"], str), ev
        assert isinstance(ev["seq"], int) and not isinstance(ev["seq"], bool), ev
        if ev["type"] == P.ERROR:
            assert isinstance(ev["code"], str) and isinstance(ev["message"], str) and ev["message"], ev
        out.append(ev)
    return out


def gap_free_per_session(events: list[dict[str, Any]]) -> None:
    """What a subscriber sees of each session is a contiguous run of that session's seq."""
    by: dict[str, list[int]] = {}
    for e in events:
        if e["seq"] >= 0 and e["session_id"] is not None:  # seq -1: the subscription's own error
            by.setdefault(e["session_id"], []).append(e["seq"])
    for sid, seqs in by.items():
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), (sid, seqs)


# ---- strategies ---------------------------------------------------------------------------------
SPEECH = to_pcm16(load("LJ001-0002.wav"))  # 1.9 s: truncated frames come from real speech
json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=16)
json_values = st.recursive(
    json_scalars, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=10,
)
session_ids = st.sampled_from([LIVE, "*", "", "fuzz", "x" * 129]) | st.text(max_size=130) | json_values
near_start = st.fixed_dictionaries({"type": st.just(P.START)}, optional={
    "sample_rate": st.sampled_from([8_000, 16_000, 22_050, 48_000, 7_999, 48_001, 0, -16_000, 2**63]) | json_values,
    "encoding": st.sampled_from(["pcm_s16le", "PCM_S16LE", "opus", ""]) | json_values,
    "channels": st.integers(-1, 4) | json_values,
    "session_id": session_ids,
    "language": st.sampled_from(["en", ""]) | json_values,
    "metadata": st.dictionaries(st.text(max_size=8), json_values, max_size=3) | json_values,
    "speakers": st.lists(st.sampled_from(["a", "b", "", "a" * 65]), max_size=3) | json_values,
    "after_seq": st.integers(-3, 40) | json_values,
    "bogus": json_values,
})
valid_start = st.builds(
    lambda rate, ch, named, sid: P.StartMessage(sample_rate=rate, channels=ch, speakers=["a", "b"][:ch] if named else None,
                                                session_id=sid),
    st.sampled_from([8_000, 11_025, 16_000, 22_050, 44_100, 48_000]), st.sampled_from([1, 2]), st.booleans(),
    st.sampled_from([None, None, None, LIVE]),  # sometimes the live healthy session's id: session_exists
).map(lambda s: s.to_json())
truncated_speech = st.tuples(
    st.sampled_from([0, 4_000, 16_000, 32_001]) | st.integers(0, len(SPEECH)),  # where (bytes; odd: misaligned)
    st.sampled_from([32_000, 48_001, len(SPEECH)]) | st.integers(0, 40_000),  # how much (32 000 B = 1 s at 16 kHz)
).map(lambda t: SPEECH[t[0] : t[0] + t[1]])
stream_frames = st.one_of(
    json_values.map(lambda v: ("text", json.dumps(v))),
    st.text(max_size=64).map(lambda t: ("text", t)),
    near_start.map(lambda d: ("text", json.dumps(d))),
    valid_start.map(lambda t: ("text", t)),
    st.fixed_dictionaries({"type": st.sampled_from([P.STOP, "Stop", "pause"])},
                          optional={"x": json_values}).map(lambda d: ("text", json.dumps(d))),
    st.binary(max_size=3_000).map(lambda b: ("binary", b)),
    truncated_speech.map(lambda b: ("binary", b)),
    st.integers(0, 9).flatmap(lambda k: st.binary(min_size=1, max_size=16) if k == 0 else st.text(max_size=32).map(str.encode))
    .map(lambda b: ("raw_text", b)),  # text frames sent as bytes; 1 in 10 random, so probably not UTF-8 (close 1007)
)
audio_frames = st.one_of(truncated_speech, truncated_speech, st.binary(max_size=3_000)).map(lambda b: ("binary", b))
stream_examples = st.tuples(
    st.lists(stream_frames, max_size=4),  # before a start
    st.one_of(valid_start, valid_start, near_start.map(json.dumps), st.none()),
    st.sampled_from([None, 0, 1, 3_201, 16_000]).map(lambda a: None if a is None else ("binary", SPEECH[a:])),  # speech
    st.lists(audio_frames | stream_frames, max_size=6),  # after it: mostly audio
).map(lambda t: [*t[0], *([("text", t[1])] if t[1] else []), *([t[2]] if t[2] else []), *t[3]]).filter(bool)


def utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


async def send_frames(ws: ClientConnection, frames: list[tuple[str, Any]], live: str = "") -> bool:
    """Send until the server closes; False if it did. LIVE in a text frame becomes `live`."""
    try:
        for kind, payload in frames:
            if kind == "text" and live:
                payload = payload.replace(LIVE, live)
            if kind == "raw_text":
                await ws.send(payload, text=True)  # bytes sent as a text frame, unchecked
            else:
                await ws.send(payload)
    except ConnectionClosed:
        return False
    return True


# ---- /v1/stream ---------------------------------------------------------------------------------
async def fuzz_stream(h: Harness, frames: list[tuple[str, Any]], n: int) -> tuple[list[dict[str, Any]], int | None]:
    """The frames, then a valid start (unique id) and a stop, so the server always ends the
    connection itself; returns every event and the close code."""
    h.connections += 1
    got: list[Any] = []
    async with connect(h.url + P.STREAM_PATH, max_size=None) as ws:
        reader = asyncio.create_task(drain(ws, got))
        if await send_frames(ws, frames, h.live):
            await send_frames(ws, [("text", P.StartMessage(session_id=f"fuzz-{n}").to_json()), ("text", P.STOP_MESSAGE)])
        await asyncio.wait_for(reader, WAIT_S)
        await handler_done(h, ws)
        return well_formed(got), ws.close_code


def check_stream(frames: list[tuple[str, Any]], events: list[dict[str, Any]], code: int | None) -> None:
    bad_utf8 = any(kind == "raw_text" and not utf8(p) for kind, p in frames)
    assert code in CLEAN_CLOSES | ({INVALID_UTF8} if bad_utf8 else set()), code
    if code == P.CLOSE_NORMAL:  # the server closed after a stop: it ended a session, nothing was cut short
        assert events and events[-1]["type"] == P.SESSION_ENDED, events[-3:]
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(set(seqs)), seqs  # one numbering per socket, errors before start included
    started = [e for e in events if e["type"] == P.SESSION_STARTED]
    assert len(started) <= 1
    if started and code == P.CLOSE_NORMAL:
        sid = started[0]["session_id"]
        assert all(e["session_id"] in (sid, None) for e in events)
        session = [e for e in events if e["session_id"] == sid and e["type"] != P.ERROR]
        check_session_events(session)  # every ended utterance got its transcript and emotion
        assert not any(e["session_id"] is None for e in events[events.index(started[0]):])


def test_stream_fuzz(harness: Harness, transcripts: dict[str, str]) -> None:
    """Random frames before and after a start on /v1/stream, while a real session streams."""
    counter = iter(range(10**6))

    @settings(FUZZ, max_examples=150)
    @given(frames=stream_examples)
    def fuzz(frames: list[tuple[str, Any]]) -> None:
        events, code = harness.call(fuzz_stream(harness, frames, next(counter)))
        check_stream(frames, events, code)

    with healthy_session(harness, transcripts[HEALTHY_FILE]):
        fuzz()
    server_is_fine(harness)


# ---- /v1/subscribe ------------------------------------------------------------------------------
query_values = st.sampled_from(["*", LIVE, "", "nope", "-1", "0", "5", "-2", "1e3", "٣", "9" * 5000]) | st.text(max_size=12)
queries = st.one_of(
    st.lists(st.tuples(st.sampled_from(["session", "after_seq", "token", "x", ""]), query_values), max_size=4)
    .map(lambda kv: urlencode(kv)),
    st.text(max_size=40).map(lambda t: quote(t, safe="=&;/?%+")),  # raw garbage, percent-encoded where it must be
)


async def fuzz_subscribe(h: Harness, query: str, frames: list[tuple[str, Any]]) -> tuple[list[dict[str, Any]], int | None]:
    """Subscribe with `query`, send frames (ignored), then close; returns events and the close
    code, or the HTTP status when the handshake was refused."""
    h.connections += 1
    got: list[Any] = []
    try:
        async with connect(f"{h.url}{P.SUBSCRIBE_PATH}?{query.replace(quote(LIVE), h.live).replace(LIVE, h.live)}",
                           max_size=None) as ws:
            reader = asyncio.create_task(drain(ws, got))
            await send_frames(ws, frames, h.live)
            await ws.close()
            await asyncio.wait_for(reader, WAIT_S)
            await handler_done(h, ws)  # whoever closed first, the server forgets the subscriber
            return well_formed(got), ws.close_code
    except InvalidStatus as e:
        return [], e.response.status_code


def test_subscribe_fuzz(harness: Harness, transcripts: dict[str, str]) -> None:
    """Garbage query strings (session, after_seq) and frames on /v1/subscribe: only well-formed
    events, gap-free per session (a replay of the live session included), clean closes."""

    @settings(FUZZ, max_examples=80)
    @given(query=queries, frames=st.lists(stream_frames, max_size=3))
    def fuzz(query: str, frames: list[tuple[str, Any]]) -> None:
        events, code = harness.call(fuzz_subscribe(harness, query, frames))
        bad_utf8 = any(kind == "raw_text" and not utf8(p) for kind, p in frames)
        too_long = len(f"GET {P.SUBSCRIBE_PATH}?{query} HTTP/1.1") > 8_192  # websockets' request-line limit
        assert code in CLEAN_CLOSES | ({INVALID_UTF8} if bad_utf8 else set()) | ({414} if too_long else set()), (query, code)
        gap_free_per_session(events)
        for e in events:
            if e["type"] == P.ERROR:
                assert e["code"] in (P.E_BAD_REQUEST, P.E_REPLAY_GAP), e

    with healthy_session(harness, transcripts[HEALTHY_FILE]) as healthy:
        fuzz()
        # a replayed subscription to the live session: everything after seq 2, exactly once
        events, code = harness.call(fuzz_subscribe(harness, f"session={harness.live}&after_seq=2", []))
        assert code in CLEAN_CLOSES
    assert [e["seq"] for e in events] == [e["seq"] for e in healthy[3 : 3 + len(events)]]
    assert events == healthy[3 : 3 + len(events)]
    server_is_fine(harness)


# ---- /v1/twilio ---------------------------------------------------------------------------------
def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


media_format = st.fixed_dictionaries({}, optional={
    "encoding": st.sampled_from(["audio/x-mulaw", "audio/l16"]) | json_scalars,
    "sampleRate": st.sampled_from([8_000, 16_000]) | json_scalars,
    "channels": st.sampled_from([1, 2]) | json_scalars,
}) | json_values
twilio_start = st.fixed_dictionaries({}, optional={
    "callSid": st.sampled_from(["CA1", LIVE, ""]) | json_values,
    "streamSid": st.sampled_from(["MZ1", ""]) | json_values,
    "tracks": st.lists(st.sampled_from(["inbound", "outbound", "both_tracks"]), max_size=3) | json_values,
    "mediaFormat": media_format,
    "customParameters": st.dictionaries(st.text(max_size=6), json_values, max_size=2),
})
twilio_media = st.fixed_dictionaries({}, optional={
    "track": st.sampled_from(["inbound", "outbound", "x"]) | json_values,
    "payload": st.binary(max_size=1_600).map(b64) | st.text(max_size=20) | json_values,
    "timestamp": st.integers(-5, 10**6) | st.text(max_size=6) | st.floats() | json_values,
    "chunk": st.integers(-5, 10**6) | st.text(max_size=6) | st.floats() | json_values,
})
twilio_messages = st.fixed_dictionaries(
    {"event": st.sampled_from(["connected", "start", "media", "mark", "dtmf"]) | json_values},
    optional={"start": twilio_start | json_values, "media": twilio_media | json_values, "streamSid": json_values,
              "sequenceNumber": json_values},
)
twilio_frames = st.one_of(
    twilio_messages.map(lambda d: ("text", json.dumps(d))),
    twilio_messages.map(lambda d: ("binary", json.dumps(d).encode())),  # JSON in a binary frame
    json_values.map(lambda v: ("text", json.dumps(v))),
    st.text(max_size=40).map(lambda t: ("text", t)),
    st.binary(max_size=200).map(lambda b: ("binary", b)),
    st.binary(min_size=1, max_size=64).map(lambda b: ("raw_text", b)),
)


async def fuzz_twilio(h: Harness, frames: list[tuple[str, Any]]) -> tuple[list[Any], int | None]:
    """Frames, then Twilio's `stop`; Twilio gets no events back, only the close."""
    h.connections += 1
    got: list[Any] = []
    async with connect(h.url + P.TWILIO_PATH, max_size=None) as ws:
        reader = asyncio.create_task(drain(ws, got))
        if await send_frames(ws, frames, h.live):
            await send_frames(ws, [("text", json.dumps({"event": "stop"}))])
        await asyncio.wait_for(reader, WAIT_S)
        await handler_done(h, ws)
        return got, ws.close_code


def test_twilio_fuzz(harness: Harness, transcripts: dict[str, str]) -> None:
    """Twilio-shaped garbage on /v1/twilio: no crash (close 1000), nothing sent back."""

    @settings(FUZZ, max_examples=120)
    @given(frames=st.lists(twilio_frames, min_size=1, max_size=6))
    def fuzz(frames: list[tuple[str, Any]]) -> None:
        got, code = harness.call(fuzz_twilio(harness, frames))
        bad_utf8 = any(kind == "raw_text" and not utf8(p) for kind, p in frames)
        assert code in {P.CLOSE_NORMAL} | ({INVALID_UTF8} if bad_utf8 else set()), code
        assert got == []

    with healthy_session(harness, transcripts[HEALTHY_FILE]):
        fuzz()
    server_is_fine(harness)


# ---- frames over the size limit -----------------------------------------------------------------
async def huge_frame(h: Harness, path: str, opening: list[tuple[str, Any]], kind: str) -> tuple[list[dict[str, Any]], int | None]:
    h.connections += 1
    got: list[Any] = []
    payload = b"\x01" * (h.limit + 1) if kind == "binary" else "a" * (h.limit + 1)
    async with connect(h.url + path, max_size=None) as ws:
        reader = asyncio.create_task(drain(ws, got))
        await send_frames(ws, [*opening, (kind, payload)])
        await asyncio.wait_for(reader, WAIT_S)
        await handler_done(h, ws)
        return well_formed(got), ws.close_code


def test_huge_frames_close_with_1009(harness: Harness, transcripts: dict[str, str]) -> None:
    """A frame one byte over `max_message_bytes`, text or binary, on every route, before and after
    a start (and after half a second of speech): close 1009, concurrently, healthy session intact."""
    start = ("text", P.StartMessage(session_id="huge-{}").to_json())
    speech = ("binary", SPEECH[: 16_000])
    cases = [(path, [], kind) for path in (P.STREAM_PATH, f"{P.SUBSCRIBE_PATH}?session=*", P.TWILIO_PATH)
             for kind in ("binary", "text")]
    cases += [(P.STREAM_PATH, [(start[0], start[1].replace("{}", f"{kind}-{i}")), *([speech] if i else [])], kind)
              for kind in ("binary", "text") for i in range(2)]

    async def all_at_once() -> list[tuple[list[dict[str, Any]], int | None]]:
        return list(await asyncio.gather(*[huge_frame(harness, *c) for c in cases]))

    with healthy_session(harness, transcripts[HEALTHY_FILE]):
        results = harness.call(all_at_once())
    for case, (events, code) in zip(cases, results):
        assert code == P.CLOSE_TOO_BIG, (case[0], case[2], code)
        assert not [e for e in events if e["type"] == P.ERROR], events
    server_is_fine(harness)


# ---- clients vanishing ----------------------------------------------------------------------------
VANISH_AUDIO = to_pcm16(load("LJ001-0006.wav"))  # 5.7 s of speech: still speaking when the connection drops


async def vanish(h: Harness, sid: str, how: str, stage: str) -> None:
    """Start a session, stream until the server says speech started, then drop the TCP connection
    (abort: RST; close: FIN without a WebSocket close) without `stop`."""
    h.connections += 1
    ws = await connect(h.url + P.STREAM_PATH)
    speaking = asyncio.Event()

    async def receive() -> None:
        async for msg in ws:
            if json.loads(msg)["type"] == P.UTTERANCE_STARTED:
                speaking.set()

    reader = asyncio.create_task(receive())
    if stage == "before_start":
        await ws.send(b"\x00\x01" * 100)
    else:
        await ws.send(P.StartMessage(session_id=sid).to_json())
    if stage == "mid_utterance":
        await ws.send(VANISH_AUDIO[: 2 * 32_000])  # 2 s
        await asyncio.wait_for(speaking.wait(), WAIT_S)
        await ws.send(VANISH_AUDIO[2 * 32_000 : 3 * 32_000])  # and the next second: the utterance is open
    assert ws.transport is not None
    if how == "abort":
        ws.transport.abort()
    else:
        ws.transport.close()
    reader.cancel()


async def watch(url: str, wanted: set[str], into: list[dict[str, Any]], ready: asyncio.Event) -> None:
    """A `*` subscriber collecting every event until each session in `wanted` has ended."""
    async with connect(f"{url}{P.SUBSCRIBE_PATH}?session=*", max_size=None) as star:
        ready.set()
        ended: set[str] = set()
        async for msg in star:
            ev = json.loads(msg)
            into.append(ev)
            if ev["type"] == P.SESSION_ENDED:
                ended.add(ev["session_id"])
                if ended >= wanted:
                    return


def test_clients_vanishing_mid_utterance(harness: Harness, transcripts: dict[str, str]) -> None:
    """Twice, 14 clients at once drop their connections without `stop` (10 mid-utterance): each
    dropped session is finished after the grace (its open utterance transcribed and scored), a
    `*` subscriber sees exactly the events the healthy source saw, the healthy session is untouched."""
    stages = ["mid_utterance"] * 10 + ["after_start"] * 2 + ["before_start"] * 2
    rounds = [[(f"vanish-{r}-{i}", ("abort", "close")[i % 2], stage) for i, stage in enumerate(stages)] for r in range(2)]
    started = {sid for plan in rounds for sid, _, stage in plan if stage != "before_start"}
    monitor: list[dict[str, Any]] = []
    ready = asyncio.Event()
    healthy_id = f"{HEALTHY}-{harness.healthy_runs}"
    watcher = asyncio.run_coroutine_threadsafe(watch(harness.url, started | {healthy_id}, monitor, ready), harness.loop)
    harness.call(asyncio.wait_for(ready.wait(), WAIT_S))

    async def round_(plan: list[tuple[str, str, str]]) -> None:
        await asyncio.gather(*[vanish(harness, *p) for p in plan])

    with healthy_session(harness, transcripts[HEALTHY_FILE]) as healthy:
        for plan in rounds:
            harness.call(round_(plan))
    watcher.result(WAIT_S)
    for plan in rounds:
        for sid, _, stage in plan:
            events = [e for e in monitor if e["session_id"] == sid]
            if stage == "before_start":
                assert events == []
                continue
            check_session_events(events)
            reasons = [e["reason"] for e in events if e["type"] == P.UTTERANCE_ENDED]
            if stage == "mid_utterance":
                assert reasons and reasons[-1] == "end_of_stream", (sid, reasons)
            else:
                assert reasons == [], (sid, reasons)
    seen = [e for e in monitor if e["session_id"] == healthy_id]
    assert seen == healthy  # the `*` subscriber joined first: it saw exactly what the source saw
    server_is_fine(harness)


# ---- bugs the fuzzing found, fixed: their minimal examples stay as regression tests ---------------
def test_deeply_nested_json_gets_bad_json(harness: Harness) -> None:
    events, code = harness.call(fuzz_stream(harness, [("text", "[" * 100_000)], 10**6))
    assert events and events[0]["type"] == P.ERROR and events[0]["code"] == P.E_BAD_JSON, events
    assert code == P.CLOSE_NORMAL and events[-1]["type"] == P.SESSION_ENDED  # the start + stop after it were served


TWILIO_CRASHES = {
    "nested_json": ("text", "[" * 100_000),  # RecursionError
    "binary_not_utf8": ("binary", b"\xff"),  # UnicodeDecodeError from json.loads(bytes)
    "media_format_not_object": ("text", json.dumps({"event": "start", "start": {"callSid": "c", "streamSid": "s",
                                                                                 "mediaFormat": "x"}})),  # AttributeError
    "timestamp_infinity": ("text", '{"event": "media", "media": {"payload": "", "timestamp": Infinity}}'),  # OverflowError
}


@pytest.mark.parametrize("name", list(TWILIO_CRASHES))
def test_twilio_garbage_does_not_crash_the_handler(harness: Harness, name: str) -> None:
    got, code = harness.call(fuzz_twilio(harness, [TWILIO_CRASHES[name]]))  # handler_done() fails on a crash
    assert got == [] and code == P.CLOSE_NORMAL


def test_reused_session_id_replays_only_its_own_events(harness: Harness) -> None:
    async def scenario() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        async with connect(harness.url + P.STREAM_PATH) as first:
            await send_frames(first, [("text", P.StartMessage(session_id="reused").to_json()), ("text", P.STOP_MESSAGE)])
            await drain(first, [])
        async with connect(harness.url + P.STREAM_PATH) as second:
            got: list[Any] = []
            reader = asyncio.create_task(drain(second, got))
            await second.send(P.StartMessage(session_id="reused").to_json())
            async with connect(f"{harness.url}{P.SUBSCRIBE_PATH}?session=reused&after_seq=0") as sub:
                replayed: list[Any] = []
                sub_reader = asyncio.create_task(drain(sub, replayed))
                await second.send(P.STOP_MESSAGE)
                await asyncio.wait_for(reader, WAIT_S)
                await asyncio.wait_for(sub_reader, WAIT_S)
        return well_formed(got), well_formed(replayed)

    source, subscriber = harness.call(scenario())
    assert subscriber == source[1:]  # exactly the new session's events after seq 0, once


def test_a_subscriber_that_leaves_is_forgotten(harness: Harness) -> None:
    async def scenario() -> None:
        async with connect(f"{harness.url}{P.SUBSCRIBE_PATH}?session=*") as sub:
            pass  # the client closes (1000) first
        await handler_done(harness, sub, timeout=5)

    harness.call(scenario())
