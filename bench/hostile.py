"""Hostile traffic at volume: 10^5 hostile frames and connections against the real service.

Meanwhile one healthy session streams real speech, and must get exactly its normal events.

    .venv/bin/python bench/hostile.py                    # 10^5 frames + connections, fake ASR, tiny model (~3 min)
    .venv/bin/python bench/hostile.py --smoke            # 2000, a short healthy session, short settles (~20 s)
    .venv/bin/python bench/hostile.py --frames 50000 --reps 2 --repeat 3   # 4 attacks in a row: memory plateaus?
    .venv/bin/python bench/hostile.py --asr whisper --model bundled --frames 30000

The service runs in a child process (`create_app`, port 0; emotion model `--model tiny`, a
2-layer/32-wide random BERT + the speech CNN as in bench/soak.py, or `--model bundled`; ASR
`--asr fake`, an instant stub, or `--asr whisper`), with its default limits, its log to a file.

First the healthy session runs alone (the baseline): `--reps` x (LJ001-0002, 1 s pause, jfk, 1.5 s
pause) on /v1/stream in 100 ms pcm_s16le chunks at `--speed` x real time, with a `*` subscriber.
Then, once memory has settled (RSS polled until stable), the same session runs again while an
attacker process (raw sockets: it writes WebSocket frames itself, so it can send what no client
library would, and is cheap enough to reach volume) sends `--frames` units (one unit = one
WebSocket frame or one connection) from `--concurrency` concurrent connection loops, rate-capped
so the attack spans the healthy session (`--rate auto`), mixing:

  bad_json            text frames that are not JSON, or JSON that is not an object (NaN, deep nesting)
  wrong_shape         JSON objects without a usable type (missing, null, 5, a list, duplicate keys)
  unknown_type        other message types (pause, Start, STOP, ...) and stop before start
  bad_start           start messages with bad fields (types, ids, speakers, after_seq, flags) and
                      unsupported formats (opus, 7999 Hz, 3 channels, ...)
  audio_before_start  binary frames before any start (0 .. 6401 bytes)
  after_start         a start, then odd-length/tiny binary frames, bad JSON, a second start, unknown
                      types, then stop (or refused: overloaded + 1013 when 64 sessions are live)
  wrong_format        valid starts at 8-48 kHz / stereo fed float32 bytes and full-scale noise (< 0.25 s)
  huge                one frame over the 1 MiB limit (header + 64 KiB, or all of it), text or binary,
                      on every route, before and after a start: close 1009
  bad_utf8            a text frame that is not UTF-8: close 1007
  fragmented          a message in 20 fragments (bad JSON), or fragments adding up past 1 MiB (1009)
  ping_flood          20-40 pings (each must be ponged)
  bad_close           close frames with invalid codes (999, 1005, 1-byte payload: 1002) or 4000 (echo)
  connect_close       connect and close at once: close frame, FIN without one, or RST
  start_close         connect + start + immediate close/FIN/RST: a dropped source (resume grace)
  half_open_short     TCP connect, part of an HTTP upgrade, stall 0.2-2 s, go away
  twilio_bad          /v1/twilio: bad JSON, binary non-UTF-8, media before start, bad start fields,
                      unknown events, a valid start then bad media (payload, track, Infinity), stop
  slow_reader         (pool, held all attack) subscribers (* and the healthy session) that never read
  idle_open           (pool) WebSocket handshakes never followed by anything, never closed
  half_open           (pool) TCP connects with nothing / a request line / headers without the blank line
and, for the last `--token-share` of the units, the service's API tokens are switched on (the
same App: `--token`, admin, plus a subscriber-only token; the healthy session stays connected)
and the mix becomes:
  bad_token           missing/wrong/Basic/empty/huge/duplicated tokens, subscriber token on
                      /v1/stream, wrong tokens on /v1/subscribe, /metrics, /v1/sessions: 401/403/400/431
  twilio_no_token     /v1/twilio whose start carries no or a wrong token: close 1008
  ... and every scenario above again, with the valid token.

Every connection's replies are counted (HTTP statuses, error codes, close codes and who closed),
and each hostile frame's expected error (one per frame, in order) is checked: `reply_mismatches`.
Checked at the end: the child is alive, /healthz ok, no ERROR in its log (a crashed handler), and
the healthy session's events are exactly the baseline's (same utterances, one transcript + one
emotion each, seq gap-free, session.ended last, the `*` subscriber saw the same, transcripts
identical, scores within 1e-4; only latency_ms / asr_ms may differ), its latency compared with the
baseline's. Memory: RSS before (settled after the baseline), peak, and after (settled: no session,
no socket left, RSS stable for `--stable-s`) must be within `--rss-tolerance-pct`; what the service
holds is counted (Python objects after a gc, sessions, sockets, tasks, replay buffers, fds), and
RSS after glibc's malloc_trim(0), before and after, tells memory in use from memory the allocator
keeps for reuse; `--repeat N` runs the attack N more times to tell a leak (growing each time) from
a high-water mark (flat after the first). Writes bench/results/hostile.json and hostile.png.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import random
import signal
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.soak import FAKE_TEXT, FakeAsr, cpu_s, metric, rss_mb, tiny_checkpoint  # noqa: E402
from streamer import protocol as P  # noqa: E402

SPEECH = ROOT / "tests" / "fixtures" / "speech"
CLIPS = ["LJ001-0002.wav", "jfk.flac"]
PAUSES_S = [1.0, 1.5]  # after each clip
SR = 16_000
CHUNK_S = 0.1
HOST = "127.0.0.1"
SUB_TOKEN_SUFFIX = "-subscriber-only"
LIMIT = 1 << 20  # ProtocolLimits.max_message_bytes
HEALTHY_BASELINE, HEALTHY_ATTACKED = "healthy-baseline", "healthy-attacked"
VOLATILE = {"session_id", "latency_ms", "asr_ms"}  # event fields that may differ between two runs


# ---- the service (child process) ------------------------------------------------------------------
def serve(args: argparse.Namespace) -> int:
    """Child: the real service on port 0; prints `PORT n`; SIGUSR1 switches API tokens on; SIGTERM
    shuts it down gracefully."""
    import logging
    from dataclasses import replace

    from streamer.routes.auth import ADMIN, SUBSCRIBER, AuthConfig
    from streamer.config import AppConfig, AsrConfig, InferenceConfig, ServerConfig
    from streamer.server import create_app

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    inf = InferenceConfig(device="cpu") if args.checkpoint is None else InferenceConfig(checkpoint=args.checkpoint, device="cpu")
    config = AppConfig(server=replace(ServerConfig(port=0), resume_grace_s=args.resume_grace), inference=inf,
                       asr=AsrConfig(device="cpu"))

    async def main() -> None:
        app = create_app(config, asr=FakeAsr() if args.asr == "fake" else None)
        await app.start()
        print(f"PORT {app.port}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)

        def tokens_on() -> None:  # the same App from here on refuses requests without a valid token
            app.config = replace(app.config, auth=AuthConfig(tokens=((args.token, (ADMIN,)),
                                                                     (args.token + SUB_TOKEN_SUFFIX, (SUBSCRIBER,)))))
            logging.getLogger("hostile").warning("API tokens switched on")

        loop.add_signal_handler(signal.SIGUSR1, tokens_on)
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        commands = asyncio.create_task(_commands(app, reader))
        await stop.wait()
        commands.cancel()
        await app.shutdown()

    asyncio.run(main())
    return 0


async def _commands(app: Any, reader: asyncio.StreamReader) -> None:
    """The parent's diagnostics, one per stdin line, answered with a `DIAG {json}` line:
    `count` (after a gc.collect(): Python objects by type, what the service holds), `trim`
    (glibc malloc_trim(0): is memory the allocator keeps, or memory in use?), `tokens_off`, and
    `forget` (the last one: drop the ended sessions' replay buffers, then trim)."""
    import ctypes
    import gc
    from dataclasses import replace

    from streamer.routes.auth import AuthConfig

    while line := await reader.readline():
        cmd = line.decode().strip()
        out: dict[str, Any] = {"cmd": cmd}
        if cmd == "count":
            gc.collect()
            objs = gc.get_objects()
            out.update(objects=len(objs), types=dict(Counter(type(o).__name__ for o in objs).most_common(60)),
                       sessions=len(app.sessions), handler_connections=len(app.connections),
                       ws_connections=len(app.server.connections), ws_handler_tasks=len(app.server.handler_tasks), hub_buffers=len(app.hub.buffers),
                       hub_buffered_events=sum(len(b) for b in app.hub.buffers.values()),
                       hub_buffered_bytes=sum(len(t) for b in app.hub.buffers.values() for _, t in b),
                       hub_subscribers=sum(len(g) for g in app.hub.subs.values()), tasks=len(asyncio.all_tasks()),
                       pymalloc_blocks=sys.getallocatedblocks())
            del objs
        elif cmd == "trim":
            out["trimmed"] = ctypes.CDLL("libc.so.6").malloc_trim(0)
        elif cmd == "tokens_off":
            app.config = replace(app.config, auth=AuthConfig())
        elif cmd == "forget":  # the last diagnostic: drop the ended sessions' replay buffers (kept by design)
            for sid in app.hub._ended:
                app.hub.buffers.pop(sid, None)
            app.hub._ended.clear()
            gc.collect()
            out["trimmed"] = ctypes.CDLL("libc.so.6").malloc_trim(0)
        print("DIAG " + json.dumps(out), flush=True)


# ---- the attacker (its own process): raw WebSocket frames -----------------------------------------
OP_CONT, OP_TEXT, OP_BIN, OP_CLOSE, OP_PING, OP_PONG = 0, 1, 2, 8, 9, 10


def frame(op: int, payload: bytes = b"", fin: bool = True, length: int | None = None) -> bytes:
    """A client frame. The mask key is zero (the server only checks the mask bit), so the payload
    goes as is; `length` may claim more than is sent."""
    n = len(payload) if length is None else length
    b0 = (0x80 if fin else 0) | op
    if n < 126:
        head = bytes([b0, 0x80 | n])
    elif n < 1 << 16:
        head = bytes([b0, 0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([b0, 0x80 | 127]) + n.to_bytes(8, "big")
    return head + b"\0\0\0\0" + payload


def text(s: str) -> bytes:
    return frame(OP_TEXT, s.encode())


def close_frame(code: int | None = 1000, raw: bytes | None = None) -> bytes:
    return frame(OP_CLOSE, raw if raw is not None else (b"" if code is None else code.to_bytes(2, "big")))


def start(sid: str | None = None, **fields: Any) -> str:
    return json.dumps({"type": "start", "sample_rate": 16_000, **({"session_id": sid} if sid else {}), **fields})


# (text frame, the error it must get) -- sent before any start
BAD_JSON = ["", "{", "}", "{'type': 'start'}", '{"type": "start"', "start", '{"type":"start",}', "\u0000", "💥" * 10,
            "[" * 3000, '{"a":' * 2000, "nul", "[]", "42", '"start"', "null", "true", "NaN", "1e999999",
            '[{"type": "start"}]', '{"type": "start"} {"type": "stop"}', "\ud800".encode("utf-8", "surrogatepass").decode("utf-8", "replace")]
WRONG_SHAPE = ["{}", '{"type": null}', '{"type": 5}', '{"type": ["start"]}', '{"type": {"a": 1}}', '{"Type": "start"}',
               '{"type": "start", "type": "x"}', '{"type": true}', '{"type": 1.5e300}']
UNKNOWN = [(s, P.E_UNKNOWN_TYPE) for s in ('{"type": "pause"}', '{"type": "Start"}', '{"type": "STOP"}', '{"type": "start "}',
                                           '{"type": "ping"}', '{"type": ""}', '{"type": "\\u0000"}')] + [
    (P.STOP_MESSAGE, P.E_NOT_STARTED), ('{"type": "stop", "x": [1, 2]}', P.E_NOT_STARTED)]
BAD_START = [start(sample_rate="16000"), start(sample_rate=16000.0), start(sample_rate=True), start(sample_rate=None),
             json.dumps({"type": "start"}), start(channels="1"), start(channels=1.5), start(encoding=5), start(sid="*"),
             start(session_id=""), start(session_id="x" * 129), start(session_id=5), start(language=5), start(metadata=[]),
             start(metadata="x"), start(channels=2, speakers=["a"]), start(channels=2, speakers=["a", "a"]),
             start(speakers=["a" * 65]), start(after_seq=3), start(sid="s", after_seq=-2), start(sid="s", after_seq="1"),
             start(interim="yes"), start(word_timestamps=1), start(bogus=1)]
UNSUPPORTED = [start(encoding=e) for e in ("opus", "pcm_f32le", "PCM_S16LE", "")] + [
    start(sample_rate=r) for r in (7_999, 48_001, 0, -16_000, 2**63)] + [start(channels=c) for c in (0, 3, -1)]
BEFORE_START = ([(s, P.E_BAD_JSON) for s in BAD_JSON], [(s, P.E_UNKNOWN_TYPE) for s in WRONG_SHAPE], UNKNOWN,
                [(s, P.E_BAD_START) for s in BAD_START] + [(s, P.E_UNSUPPORTED_FORMAT) for s in UNSUPPORTED])
TWILIO_BAD = [b"{", b"[]", b'{"event": 5}', b'{"event": "dtmf"}', b'{"event": "mark"}', b'{"event": "connected"}',
              b'{"event": "media", "media": {"payload": ""}}', b'{"event": "start"}', b'{"event": "start", "start": 5}',
              b'{"event": "start", "start": {"callSid": "c", "streamSid": "s", "mediaFormat": "x"}}',
              b'{"event": "start", "start": {"callSid": "", "streamSid": "s"}}',
              b'{"event": "start", "start": {"callSid": "c", "streamSid": "s", "tracks": ["both"]}}',
              b'{"event": "start", "start": {"callSid": "c", "streamSid": "s", "mediaFormat": {"sampleRate": 16000}}}',
              b"[" * 3000]
TWILIO_BAD_MEDIA = ['{"event": "media", "media": {"payload": "!!!"}}', '{"event": "media", "media": {"payload": 5}}',
                    '{"event": "media", "media": {"track": "x", "payload": ""}}',
                    '{"event": "media", "media": {"payload": "", "timestamp": Infinity}}',
                    '{"event": "media", "media": {"payload": "", "chunk": "x"}}', '{"event": "media"}']
SILENCE_MULAW = base64.b64encode(b"\xff" * 160).decode()  # 20 ms of mu-law silence


class Reply:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.close: int | None = None
        self.reason = ""  # the close frame's reason
        self.how = "open"  # close (the server closed first) | echo (our close echoed) | eof | reset | timeout
        self.pongs = 0
        self.malformed = 0


class Raw:
    """One client connection after a successful handshake."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    def abort(self) -> None:
        self.writer.transport.abort()

    async def read_frame(self) -> tuple[int, bytes]:
        head = await self.reader.readexactly(2)
        n = head[1] & 0x7F
        if n == 126:
            n = int.from_bytes(await self.reader.readexactly(2), "big")
        elif n == 127:
            n = int.from_bytes(await self.reader.readexactly(8), "big")
        return head[0] & 0x0F, (await self.reader.readexactly(n) if n else b"")

    async def collect(self, sent_close: bool, timeout: float = 20.0, pong: bool = True, idle: float | None = None) -> Reply:
        """Everything the server sends until it closes; answers its close (and pings). With `idle`:
        until nothing came for that long either ("still_open")."""
        r = Reply()
        try:
            async with asyncio.timeout(timeout):
                while True:
                    try:
                        op, data = await (self.read_frame() if idle is None else asyncio.wait_for(self.read_frame(), idle))
                    except TimeoutError:
                        if idle is None:
                            raise
                        r.how = "still_open"
                        break
                    if op == OP_TEXT:
                        try:
                            ev = json.loads(data)
                            assert isinstance(ev, dict) and ev.get("type") in P.EVENT_TYPES and isinstance(ev.get("seq"), int)
                            r.events.append(ev)
                        except (ValueError, AssertionError):
                            r.malformed += 1
                    elif op == OP_PONG:
                        r.pongs += 1
                    elif op == OP_PING and pong:
                        self.writer.write(frame(OP_PONG, data))
                    elif op == OP_CLOSE:
                        r.close = int.from_bytes(data[:2], "big") if len(data) >= 2 else 1005
                        r.reason = data[2:].decode("utf-8", "replace")
                        r.how = "echo" if sent_close else "close"
                        if not sent_close:
                            self.writer.write(close_frame(r.close if r.close != 1005 else None))
                        break
                    elif op != OP_PING:
                        r.malformed += 1
        except asyncio.IncompleteReadError:
            r.how = "eof"
        except TimeoutError:  # (an OSError too: first)
            r.how = "timeout"
        except (ConnectionError, OSError):
            r.how = "reset"
        self.abort()
        return r


class Attack:
    """The attacker: scenarios run by `concurrency` loops until the unit budget is spent."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.port = args.port
        self.token = args.token
        self.healthy = args.healthy_id
        self.service_pid = args.service_pid
        self.rng = random.Random(args.seed)
        self.total = args.frames
        self.open_units = round(args.frames * (1 - args.token_share))
        self.used = 0
        self.rate = args.rate
        self.concurrency = args.concurrency
        self.pool_sizes = {"slow_reader": args.slow_readers, "idle_open": args.idle_open, "half_open": args.half_open}
        self.phase = "open"
        self.stats: dict[str, dict[str, dict[str, Any]]] = {"open": {}, "token": {}}
        self.mismatches = 0
        self.mismatch_examples: list[dict[str, Any]] = []
        self.ids = iter(range(10**9))
        self.t_token: float | None = None
        self.status: int | None = None
        self.t_rate0 = 0.0

    # ---- bookkeeping ----
    def kind(self, name: str) -> dict[str, Any]:
        return self.stats[self.phase].setdefault(name, {"connections": 0, "frames": 0, "bytes": 0, "replies": Counter()})

    def sent(self, name: str, frames: int = 0, conns: int = 0, nbytes: int = 0) -> None:
        k = self.kind(name)
        k["frames"] += frames
        k["connections"] += conns
        k["bytes"] += nbytes
        self.used += frames + conns

    def reply(self, name: str, label: str, n: int = 1) -> None:
        self.kind(name)["replies"][label] += n

    def record(self, name: str, r: Reply) -> None:
        for ev in r.events:
            self.reply(name, f"error:{ev['code']}" if ev["type"] == P.ERROR else f"event:{ev['type']}")
        if r.pongs:
            self.reply(name, "pong", r.pongs)
        if r.malformed:
            self.reply(name, "MALFORMED", r.malformed)
        self.reply(name, f"{r.how}:{r.close}" if r.close is not None else r.how)

    def mismatch(self, name: str, why: str, **detail: Any) -> None:
        self.mismatches += 1
        self.reply(name, "MISMATCH")
        if len(self.mismatch_examples) < 30:
            self.mismatch_examples.append({"kind": name, "phase": self.phase, "why": why, **detail})

    def auth(self) -> list[str]:
        return [f"Authorization: Bearer {self.token}"] if self.phase == "token" else []

    async def pace(self) -> None:
        """Hold back while more units went out than `rate` x the time since the attack began."""
        if self.rate > 0:
            ahead = self.used / self.rate - (asyncio.get_running_loop().time() - self.t_rate0)
            if ahead > 0:
                await asyncio.sleep(ahead)

    # ---- connections ----
    async def connect(self, name: str, path: str, headers: list[str] | None = None, request: bytes | None = None) -> Raw | None:
        """A WebSocket handshake (or `request` as is); None when refused (the HTTP status is recorded
        and left in self.status until the caller's next await)."""
        self.sent(name, conns=1)
        self.status = None
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        try:
            async with asyncio.timeout(20):
                reader, writer = await asyncio.open_connection(HOST, self.port, limit=1 << 22)
                self.kind(name)["tcp_connect_s"] = self.kind(name).get("tcp_connect_s", 0.0) + loop.time() - t0
                if request is None:
                    key = base64.b64encode(os.urandom(16)).decode()
                    lines = [f"GET {path} HTTP/1.1", f"Host: {HOST}:{self.port}", "Upgrade: websocket", "Connection: Upgrade",
                             f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13", *(headers or [])]
                    request = ("\r\n".join(lines) + "\r\n\r\n").encode()
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                self.kind(name)["handshake_s"] = self.kind(name).get("handshake_s", 0.0) + loop.time() - t0
                status = int(head.split(b" ", 2)[1])
                if status == 101:
                    return Raw(reader, writer)
                self.reply(name, f"http:{status}")
                self.status = status
                writer.transport.abort()
                return None
        except TimeoutError:
            self.reply(name, "handshake_timeout")
        except (ConnectionError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as e:
            self.reply(name, f"handshake_failed:{type(e).__name__}")
        return None

    async def exchange(self, name: str, path: str, frames: list[bytes], expect: list[str], end: str = "start_stop",
                       closes: tuple[str, ...] = ("close:1000",), session: bool = False) -> Reply | None:
        """Connect, send `frames` and an ending, read every reply, and check that the error events
        are exactly `expect` (in order; a prefix where the server closed on its own) and the close.

        end: "start_stop" appends a valid start (unique id) and a stop, so the server itself ends
        the connection once it has answered every frame (close 1000 after session.ended; a client
        close frame would be echoed at once, and error events still queued behind it could not be
        sent any more); "stop" appends a stop; "close" a close frame; "none" nothing."""
        ws = await self.connect(name, path, self.auth())
        if ws is None:
            return None
        tail = {"start_stop": [text(start(f"atk-{next(self.ids)}")), text(P.STOP_MESSAGE)], "stop": [text(P.STOP_MESSAGE)],
                "close": [close_frame()], "none": []}[end]
        session = session or end == "start_stop"
        data = b"".join(frames + tail)
        self.sent(name, frames=len(frames) + len(tail), nbytes=len(data))
        try:
            ws.writer.write(data)
            async with asyncio.timeout(20):
                await ws.writer.drain()
        except (ConnectionError, OSError, TimeoutError):
            pass  # the server closed first (e.g. 1009); what it sent is still read below
        r = await ws.collect(sent_close=end == "close")
        self.record(name, r)
        got = [e["code"] for e in r.events if e["type"] == P.ERROR]
        label = f"{r.how}:{r.close}"
        if session and got and got[-1] == P.E_OVERLOADED and label == f"close:{P.CLOSE_TRY_AGAIN}":
            # refused at the start: too many sessions (the start-and-drop flood keeps the service at its
            # limit). Every frame before that start was answered.
            if got[:-1] != (expect if end == "start_stop" else []):
                self.mismatch(name, "errors before the overload refusal", got=got[:12], expect=expect[:12])
            return r
        early = r.how == "close" and r.close in (P.CLOSE_TOO_BIG, 1007, 1002)
        if (got != expect[: len(got)]) if early else (got != expect):
            self.mismatch(name, "error events", got=got[:12], expect=expect[:12], n_got=len(got), n_expect=len(expect), close=label)
        if label not in closes:
            self.mismatch(name, "close", got=label, expect=list(closes), events=[e["type"] for e in r.events][-4:])
        if session and label == "close:1000":
            if not r.events or r.events[-1]["type"] != P.SESSION_ENDED:
                self.mismatch(name, "session.ended not last", events=[e["type"] for e in r.events][-4:])
        return r

    # ---- scenarios ----
    async def s_before_start(self, which: int) -> None:
        name = ("bad_json", "wrong_shape", "unknown_type", "bad_start")[which]
        corpus = BEFORE_START[which]
        picks = [self.rng.choice(corpus) for _ in range(self.rng.randint(5, 40))]
        await self.exchange(name, P.STREAM_PATH, [text(s) for s, _ in picks], [code for _, code in picks])

    async def s_audio_before_start(self) -> None:
        sizes = [self.rng.choice([0, 1, 2, 3, 320, 3200, 6401]) for _ in range(self.rng.randint(5, 40))]
        await self.exchange("audio_before_start", P.STREAM_PATH, [frame(OP_BIN, os.urandom(n)) for n in sizes],
                            [P.E_NOT_STARTED] * len(sizes))

    async def s_after_start(self) -> None:
        sid = f"atk-{next(self.ids)}"
        frames, expect = [text(start(sid))], []
        audio_bytes = 0
        for _ in range(self.rng.randint(5, 40)):
            r = self.rng.random()
            if r < 0.55:
                n = self.rng.choice([0, 1, 2, 3, 4, 5, 7, 64, 321])
                n = min(n, 7000 - audio_bytes)  # < 0.22 s of audio in all: never an utterance
                audio_bytes += n
                frames.append(frame(OP_BIN, bytes(n)))
                if n % 2:
                    expect.append(P.E_ODD_BYTES)
            elif r < 0.75:
                frames.append(text(self.rng.choice(BAD_JSON)))
                expect.append(P.E_BAD_JSON)
            elif r < 0.85:
                frames.append(text(start(self.rng.choice([sid, None]))))
                expect.append(P.E_ALREADY_STARTED)
            else:
                frames.append(text(self.rng.choice(UNKNOWN[:7])[0]))
                expect.append(P.E_UNKNOWN_TYPE)
        await self.exchange("after_start", P.STREAM_PATH, frames, expect, end="stop", closes=("close:1000",), session=True)

    async def s_wrong_format(self) -> None:
        rate = self.rng.choice([8_000, 22_050, 44_100, 48_000])
        ch = self.rng.choice([1, 2])
        frames = [text(start(f"atk-{next(self.ids)}", sample_rate=rate, channels=ch))]
        budget = int(0.22 * rate) * 2 * ch  # bytes: < 0.25 s of audio at the declared format
        while budget > 0:
            n = min(budget, self.rng.choice([320, 640, 1280, 2560])) // (4 * ch) * (4 * ch)
            if n <= 0:
                break
            if self.rng.random() < 0.5:  # float32 samples where int16 is expected
                payload = np.sin(np.arange(n // 4, dtype=np.float32) / 7).astype("<f4").tobytes()
            else:  # full-scale int16 noise
                payload = os.urandom(n)
            frames.append(frame(OP_BIN, payload))
            budget -= n
        await self.exchange("wrong_format", P.STREAM_PATH, frames, [], end="stop", closes=("close:1000",), session=True)

    async def s_huge(self) -> None:
        # (a subscriber of a session nobody streams: a `*` one would also get other sessions' error events)
        path = self.rng.choice([P.STREAM_PATH, P.STREAM_PATH, f"{P.SUBSCRIBE_PATH}?session=none-{next(self.ids)}", P.TWILIO_PATH])
        frames = [text(start(f"atk-{next(self.ids)}"))] if path == P.STREAM_PATH and self.rng.random() < 0.5 else []
        op = self.rng.choice([OP_BIN, OP_TEXT])
        full = self.rng.random() < 0.1
        body = b"a" * (LIMIT + 1 if full else 65_536)
        frames.append(frame(op, body, length=LIMIT + 1))
        await self.exchange("huge", path, frames, [], end="none", closes=("close:1009",), session=bool(frames[:-1]))

    async def s_bad_utf8(self) -> None:
        await self.exchange("bad_utf8", P.STREAM_PATH, [frame(OP_TEXT, self.rng.choice([b"\xff", b"\xc3\x28", b'{"type": "\xed\xa0\x80"}']))],
                            [], end="none", closes=("close:1007",))

    async def s_fragmented(self) -> None:
        if self.rng.random() < 0.25:  # fragments adding up past the limit
            part = b"a" * 65_536
            frames = [frame(OP_TEXT, part, fin=False)] + [frame(OP_CONT, part, fin=False) for _ in range(LIMIT // 65_536)]
            await self.exchange("fragmented", P.STREAM_PATH, frames, [], end="none", closes=("close:1009",))
            return
        body = self.rng.choice(BAD_JSON[:9]).encode() or b"x"
        parts = [body[i : i + max(1, len(body) // 20)] for i in range(0, len(body), max(1, len(body) // 20))]
        frames = [frame(OP_TEXT if i == 0 else OP_CONT, p, fin=i == len(parts) - 1) for i, p in enumerate(parts)]
        await self.exchange("fragmented", P.STREAM_PATH, frames, [P.E_BAD_JSON])

    async def s_ping_flood(self) -> None:
        n = self.rng.randint(20, 40)
        r = await self.exchange("ping_flood", P.STREAM_PATH, [frame(OP_PING, os.urandom(self.rng.randint(0, 125))) for _ in range(n)], [])
        if r is not None and r.pongs != n:
            self.mismatch("ping_flood", "pongs", got=r.pongs, expect=n)

    async def s_bad_close(self) -> None:
        raw, want = self.rng.choice([(b"\x03\xe7", "close:1002"), (b"\x03\xed", "close:1002"), (b"\x03", "close:1002"),
                                     (b"\x0f\xa0bye", "echo:4000"), (b"\x03\xe8" + b"\xff\xfe", "close:1007")])
        ws = await self.connect("bad_close", P.STREAM_PATH, self.auth())
        if ws is None:
            return
        self.sent("bad_close", frames=1, nbytes=len(raw) + 6)
        ws.writer.write(close_frame(raw=raw))
        r = await ws.collect(sent_close=want.startswith("echo"))
        self.record("bad_close", r)
        if f"{r.how}:{r.close}" != want:
            self.mismatch("bad_close", "close", got=f"{r.how}:{r.close}", expect=want, payload=raw.hex())

    async def s_connect_close(self) -> None:
        path = self.rng.choice([P.STREAM_PATH, P.STREAM_PATH, f"{P.SUBSCRIBE_PATH}?session=*", P.TWILIO_PATH])
        ws = await self.connect("connect_close", path, self.auth())
        if ws is None:
            return
        how = self.rng.choice(["close", "fin", "rst"])
        if how == "rst":
            ws.abort()
        elif how == "fin":
            ws.writer.close()
        else:
            self.sent("connect_close", frames=1, nbytes=8)
            ws.writer.write(close_frame())
            r = await ws.collect(sent_close=True)
            self.record("connect_close", r)
            if f"{r.how}:{r.close}" != "echo:1000":
                self.mismatch("connect_close", "close", got=f"{r.how}:{r.close}")

    async def s_start_close(self) -> None:
        ws = await self.connect("start_close", P.STREAM_PATH, self.auth())
        if ws is None:
            return
        data = text(start(f"atk-{next(self.ids)}"))
        how = self.rng.choice(["close", "fin", "rst"])
        self.sent("start_close", frames=1 + (how == "close"), nbytes=len(data))
        ws.writer.write(data + (close_frame() if how == "close" else b""))
        if how == "rst":
            ws.abort()
        elif how == "fin":
            ws.writer.close()
        else:
            self.record("start_close", await ws.collect(sent_close=True))

    async def s_half_open_short(self) -> None:
        request = self.rng.choice([b"", b"GET /v1/stream HTTP/1.1\r\n", b"GET /v1/stream HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n",
                                   b"GET /v1/subscribe?session=* HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"])
        self.sent("half_open_short", conns=1, nbytes=len(request))
        try:
            reader, writer = await asyncio.open_connection(HOST, self.port)
            writer.write(request)
            try:
                await asyncio.wait_for(reader.read(1), self.rng.uniform(0.2, 2.0))
                self.reply("half_open_short", "server_closed_early")
            except TimeoutError:
                self.reply("half_open_short", "stalled")
            writer.transport.abort()
        except (ConnectionError, OSError) as e:
            self.reply("half_open_short", f"failed:{type(e).__name__}")

    async def s_twilio(self) -> None:
        frames = [frame(OP_TEXT if self.rng.random() < 0.7 else OP_BIN, self.rng.choice(TWILIO_BAD)) for _ in range(self.rng.randint(3, 12))]
        frames.append(frame(OP_BIN, b"\xff\xfe{"))  # binary, not UTF-8
        call = None
        if self.rng.random() < 0.5:  # a real call, then bad media (and 100 ms of silence at most)
            call = f"atk-call-{next(self.ids)}"
            frames.append(text(json.dumps({"event": "start", "start": {
                "callSid": call, "streamSid": "MZ" + call, "tracks": ["inbound", "outbound"],
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}})))
            for _ in range(self.rng.randint(2, 8)):
                if self.rng.random() < 0.4:
                    frames.append(text(json.dumps({"event": "media", "media": {"track": self.rng.choice(["inbound", "outbound"]),
                                                                               "payload": SILENCE_MULAW}})))
                else:
                    frames.append(text(self.rng.choice(TWILIO_BAD_MEDIA)))
        frames.append(text('{"event": "stop"}'))
        path = P.TWILIO_PATH + (f"?token={self.token}" if self.phase == "token" else "")
        # a call's start goes through admission: at the session limit (the start-and-drop flood keeps
        # the service there) it is refused with 1013 "too many sessions", Twilio's only way to be told
        closes = ("close:1000", f"close:{P.CLOSE_TRY_AGAIN}") if call else ("close:1000",)
        r = await self.exchange("twilio_bad", path, frames, [], end="none", closes=closes)
        if r is not None and r.close == P.CLOSE_TRY_AGAIN and r.reason not in ("too many sessions", "overloaded"):
            self.mismatch("twilio_bad", "1013 without an admission reason", got=r.reason)
        if r is not None and r.events:
            self.mismatch("twilio_bad", "events sent back to Twilio", events=[e["type"] for e in r.events][:5])

    def twilio_no_token_variants(self) -> list[tuple[dict[str, Any], str]]:
        return [({}, ""), ({"token": "wrong-token-123"}, ""), ({"token": 5}, ""), ({"token": ["x"]}, ""), ({"token": "\ud800"}, ""),
                ({"token": self.token + SUB_TOKEN_SUFFIX}, ""), ({}, "?token=wrong-token-123")]

    async def s_twilio_no_token(self, i: int | None = None) -> None:
        variants = self.twilio_no_token_variants()
        params, query = variants[i] if i is not None else self.rng.choice(variants)
        call = f"atk-call-{next(self.ids)}"
        msg = {"event": "start", "start": {"callSid": call, "streamSid": "MZ" + call, "customParameters": params}}
        path = P.TWILIO_PATH + query
        if path != P.TWILIO_PATH:
            ws = await self.connect("twilio_no_token", path)  # a wrong token in the URL: refused at the handshake
            if ws is not None:
                self.mismatch("twilio_no_token", "handshake with a wrong token accepted")
                ws.abort()
            return
        ws = await self.connect("twilio_no_token", path)
        if ws is None:
            self.mismatch("twilio_no_token", "handshake without a token refused (Twilio cannot send one)")
            return
        data = text('{"event": "connected"}') + text(json.dumps(msg)) + text(json.dumps({"event": "media", "media": {"payload": SILENCE_MULAW}}))
        self.sent("twilio_no_token", frames=3, nbytes=len(data))
        ws.writer.write(data)
        r = await ws.collect(sent_close=False)
        self.record("twilio_no_token", r)
        if f"{r.how}:{r.close}" != f"close:{P.CLOSE_POLICY}":
            self.mismatch("twilio_no_token", "close", got=f"{r.how}:{r.close}", params=str(params))

    def bad_token_variants(self) -> list[tuple[str, list[str], int]]:
        t, sub = self.token, self.token + SUB_TOKEN_SUFFIX
        return [
            (P.STREAM_PATH, [], 401), (P.STREAM_PATH, ["Authorization: Bearer wrong-token-123"], 401),
            (P.STREAM_PATH + "?token=wrong-token-123", [], 401), (P.STREAM_PATH, ["Authorization: Basic dXNlcjpwYXNz"], 401),
            (P.STREAM_PATH, ["Authorization: Bearer "], 401), (P.STREAM_PATH, [f"Authorization: Bearer {t[:-1]}"], 401),
            (P.STREAM_PATH, [f"Authorization: Bearer {t}x"], 401), (P.STREAM_PATH, [f"Authorization: Bearer {sub}"], 403),
            (P.STREAM_PATH + f"?token={sub}", [], 403), (P.STREAM_PATH, ["Authorization: Bearer " + "A" * 9000], 431),
            (P.STREAM_PATH, [f"Authorization: Bearer {t}", "Authorization: Bearer wrong-token-123"], 400),
            (f"{P.SUBSCRIBE_PATH}?session=*", [], 401), (f"{P.SUBSCRIBE_PATH}?session=*&token=wrong-token-123", [], 401),
            (f"{P.SUBSCRIBE_PATH}?session={self.healthy}&token=", [], 401), (P.METRICS_PATH, [], 401),
            (P.METRICS_PATH, [f"Authorization: Bearer {sub}"], 403), ("/v1/sessions", ["Authorization: Bearer nope-nope-nope"], 401),
        ]

    async def s_bad_token(self, i: int | None = None) -> None:
        variants = self.bad_token_variants()
        path, headers, want = variants[i] if i is not None else self.rng.choice(variants)
        ws = await self.connect("bad_token", path, headers)
        if ws is not None:
            self.mismatch("bad_token", "accepted", path=path, headers=[h[:40] for h in headers])
            ws.abort()
        elif self.status != want:
            self.mismatch("bad_token", "status", path=path, headers=[h[:40] for h in headers], want=want, got=self.status)

    # ---- pools: connections held for the whole attack ----
    async def pool_slow_reader(self, i: int, done: asyncio.Event) -> None:
        key = self.healthy if i % 6 == 0 else "*"
        ws = await self.connect("slow_reader", f"{P.SUBSCRIBE_PATH}?session={key}", self.auth())
        if ws is None:
            return
        sock = ws.writer.get_extra_info("socket")
        if sock is not None:  # a small receive window: the server's writes back up quickly
            import socket

            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        ws.writer.transport.pause_reading()  # never read
        await done.wait()
        ws.writer.transport.resume_reading()
        # what it was sent, and how it ended (dropped, keepalive timeout, or still open: its session is live)
        r = await ws.collect(sent_close=False, pong=False, idle=3.0 if self.total >= 10_000 else 1.0)
        self.record("slow_reader", r)

    async def pool_idle_open(self, i: int, done: asyncio.Event) -> None:
        ws = await self.connect("idle_open", P.STREAM_PATH if i % 2 else P.TWILIO_PATH, self.auth())
        if ws is None:
            return
        ws.writer.transport.pause_reading()  # never answers the server's pings either
        await done.wait()
        ws.writer.transport.resume_reading()
        r = await ws.collect(sent_close=False, pong=False, idle=0.5)
        self.record("idle_open", r)

    async def pool_half_open(self, i: int, done: asyncio.Event) -> None:
        request = [b"", b"GET /v1/stream HTTP/1.1\r\n", b"GET /v1/stream HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"][i % 3]
        self.sent("half_open", conns=1, nbytes=len(request))
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        try:
            reader, writer = await asyncio.open_connection(HOST, self.port)
            writer.write(request)
            eof = asyncio.create_task(reader.read(1))
            await asyncio.wait([eof, asyncio.create_task(done.wait())], return_when=asyncio.FIRST_COMPLETED)
            if eof.done():
                self.reply("half_open", f"server_closed_after_{round(loop.time() - t0):d}s")
            else:
                eof.cancel()
                self.reply("half_open", "still_open_at_end")
            writer.transport.abort()
        except (ConnectionError, OSError) as e:
            self.reply("half_open", f"failed:{type(e).__name__}")

    # ---- the run ----
    def table(self) -> list[tuple[float, str, Any]]:
        return [  # weights: about 1 unit in 8 is a connection
            (6, "bad_json", lambda: self.s_before_start(0)), (4, "wrong_shape", lambda: self.s_before_start(1)),
            (4, "unknown_type", lambda: self.s_before_start(2)), (5, "bad_start", lambda: self.s_before_start(3)),
            (5, "audio_before_start", self.s_audio_before_start), (5, "after_start", self.s_after_start),
            (2, "wrong_format", self.s_wrong_format), (3, "huge", self.s_huge), (3, "bad_utf8", self.s_bad_utf8),
            (2, "fragmented", self.s_fragmented), (2, "ping_flood", self.s_ping_flood), (4, "bad_close", self.s_bad_close),
            (30, "connect_close", self.s_connect_close), (6, "start_close", self.s_start_close),
            (4, "half_open_short", self.s_half_open_short), (6, "twilio_bad", self.s_twilio),
        ]

    def pick(self) -> tuple[str, Any]:
        if self.phase == "token" and self.rng.random() < 0.45:
            return ("bad_token", self.s_bad_token) if self.rng.random() < 0.75 else ("twilio_no_token", self.s_twilio_no_token)
        table = self.table()
        x = self.rng.uniform(0, sum(w for w, _, _ in table))
        for w, name, fn in table:
            x -= w
            if x <= 0:
                return name, fn
        return table[-1][1:]

    async def coverage(self) -> None:
        """Each scenario once (in the token phase also each bad-token variant), so that even a short
        run covers them all."""
        runs = [fn() for _, _, fn in self.table()]
        if self.phase == "token":
            runs += [self.s_bad_token(i) for i in range(len(self.bad_token_variants()))]
            runs += [self.s_twilio_no_token(i) for i in range(len(self.twilio_no_token_variants()))]
        await asyncio.gather(*runs)

    async def worker(self, limit: int) -> None:
        loop = asyncio.get_running_loop()
        while self.used < limit:
            await self.pace()
            name, fn = self.pick()
            t = loop.time()
            await fn()
            k = self.kind(name)
            k["runs"] = k.get("runs", 0) + 1
            k["seconds"] = k.get("seconds", 0.0) + loop.time() - t

    async def run(self) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        t0 = self.t_rate0 = loop.time()
        done = asyncio.Event()
        pools = [asyncio.create_task(getattr(self, f"pool_{name}")(i, done))
                 for name, n in self.pool_sizes.items() for i in range(n)]
        await asyncio.sleep(0)
        if self.open_units > 0:
            await self.coverage()
            await asyncio.gather(*[self.worker(self.open_units) for _ in range(self.concurrency)])
        if self.open_units < self.total:
            await self.tokens_on()
            await self.coverage()
            await asyncio.gather(*[self.worker(self.total) for _ in range(self.concurrency)])
        t_end = loop.time()
        done.set()
        await asyncio.gather(*pools)
        return {"t_start": t0, "t_token": self.t_token, "t_end": t_end, "t_closed": loop.time(), "units": self.used,
                "stats": {ph: {k: {**v, "replies": dict(v["replies"])} for k, v in kinds.items()} for ph, kinds in self.stats.items()},
                "mismatches": self.mismatches, "mismatch_examples": self.mismatch_examples}

    async def tokens_on(self) -> None:
        """Switch the service's tokens on (SIGUSR1), and wait until a request without one is refused."""
        os.kill(self.service_pid, signal.SIGUSR1)
        self.phase = "token"
        async with asyncio.timeout(30):
            while True:
                ws = await self.connect("bad_token", P.STREAM_PATH)
                if ws is None:
                    break
                self.reply("bad_token", "accepted_while_switching")  # before the signal was handled
                ws.abort()
                await asyncio.sleep(0.05)
        self.t_token = asyncio.get_running_loop().time()


def attack_main(args: argparse.Namespace) -> int:
    result = asyncio.run(Attack(args).run())
    print(json.dumps(result), flush=True)
    return 0


# ---- the healthy session (parent) -----------------------------------------------------------------
def healthy_audio(reps: int, clips: list[str]) -> np.ndarray:
    from model.features import load_audio

    parts = []
    for _ in range(reps):
        for name, pause in zip(clips, PAUSES_S * len(clips)):
            parts += [load_audio(str(SPEECH / name), sr=SR), np.zeros(int(pause * SR), np.float32)]
    return np.concatenate(parts)


async def healthy_run(url: str, sid: str, audio: np.ndarray, speed: float, started: asyncio.Event | None = None) -> dict[str, Any]:
    """A `*` subscriber, then the source: `audio` in 100 ms chunks at `speed` x real time, stop, all events."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    from streamer.client import to_pcm16

    loop = asyncio.get_running_loop()
    out: dict[str, Any] = {"events": [], "received_at": [], "sent": [], "star": [], "close_code": None, "failure": None,
                           "star_close_code": None}
    n = int(CHUNK_S * SR)
    try:
        async with connect(f"{url}{P.SUBSCRIBE_PATH}?session=*", max_size=None, ping_interval=None) as star:

            async def watch() -> None:  # this session's events, as the `*` subscriber sees them
                try:
                    async for msg in star:
                        ev = json.loads(msg)
                        if ev["session_id"] == sid:
                            out["star"].append(ev)
                            if ev["type"] == P.SESSION_ENDED:
                                return
                except ConnectionClosed:
                    pass

            watcher = asyncio.create_task(watch())
            async with connect(url + P.STREAM_PATH, max_size=None, ping_interval=None) as ws:

                async def receive() -> None:
                    async for msg in ws:
                        ev = json.loads(msg)
                        out["events"].append(ev)
                        out["received_at"].append(loop.time())
                        if ev["type"] == P.SESSION_STARTED and started is not None:
                            started.set()

                reader = asyncio.create_task(receive())
                await ws.send(P.StartMessage(session_id=sid).to_json())
                t0 = out["t0"] = loop.time()
                for k, i in enumerate(range(0, len(audio), n)):
                    delay = t0 + k * CHUNK_S / speed - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    await ws.send(to_pcm16(audio[i : i + n]))
                    out["sent"].append((min(len(audio), i + n) / SR, loop.time()))
                await ws.send(P.STOP_MESSAGE)
                await asyncio.wait_for(reader, 120)
                out["close_code"] = ws.close_code
                out["t1"] = loop.time()
            await asyncio.wait_for(watcher, 30)
            await star.close()
            out["star_close_code"] = star.close_code
    except Exception as e:  # recorded, never hidden
        out["failure"] = f"{type(e).__name__}: {e}"
    if started is not None:
        started.set()
    return out


def close_enough(a: Any, b: Any, tol: float, diff: list[float]) -> bool:
    """Equal, floats within `tol` (the largest difference goes into `diff`)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(close_enough(a[k], b[k], tol, diff) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(close_enough(x, y, tol, diff) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, (int, float)) and not isinstance(b, bool):
        diff.append(abs(a - b))
        return abs(a - b) <= tol
    return a == b


def latencies(run: dict[str, Any]) -> list[tuple[float, float]]:
    """(client s, server s) per emotion: received - when the audio holding the end of speech was sent."""
    ends = {e["utterance_id"]: e["end_s"] for e in run["events"] if e["type"] == P.UTTERANCE_ENDED}
    pos = [s for s, _ in run["sent"]]
    out = []
    for ev, t in zip(run["events"], run["received_at"]):
        if ev["type"] == P.EMOTION:
            i = min(int(np.searchsorted(pos, ends[ev["utterance_id"]] - 1e-6)), len(pos) - 1)
            out.append((round(t - run["sent"][i][1], 4), ev["latency_ms"] / 1000))
    return out


def check_healthy(run: dict[str, Any], baseline: dict[str, Any] | None = None) -> dict[str, Any]:
    ev = run["events"]
    ended = [e["utterance_id"] for e in ev if e["type"] == P.UTTERANCE_ENDED]
    transcripts = [e["utterance_id"] for e in ev if e["type"] == P.TRANSCRIPT]
    emotions = [e["utterance_id"] for e in ev if e["type"] == P.EMOTION]
    checks = {
        "no_failure": run["failure"] is None,
        "closed_1000": run["close_code"] == P.CLOSE_NORMAL,
        "no_error_events": not any(e["type"] == P.ERROR for e in ev),
        "started_first": bool(ev) and ev[0]["type"] == P.SESSION_STARTED,
        "session_ended_last": bool(ev) and ev[-1]["type"] == P.SESSION_ENDED and ev[-1]["utterances"] == len(ended),
        "seq_gap_free": [e["seq"] for e in ev] == list(range(len(ev))),
        "one_transcript_one_emotion_per_utterance": ended == transcripts == emotions == sorted(set(ended)) and bool(ended),
        "one_revision_per_utterance_but_last": sum(e["type"] == P.EMOTION_REVISED for e in ev) == max(0, len(ended) - 1),
        "star_subscriber_saw_exactly_these_events": run["star"] == ev,
    }
    out: dict[str, Any] = {"utterances": len(ended), "events": len(ev),
                           "transcripts": [e["text"] for e in ev if e["type"] == P.TRANSCRIPT], "checks": checks}
    if baseline is not None:
        strip = [{k: v for k, v in e.items() if k not in VOLATILE} for e in ev]
        base = [{k: v for k, v in e.items() if k not in VOLATILE} for e in baseline["events"]]
        diff: list[float] = [0.0]
        checks["same_utterances_as_baseline"] = len(ended) == sum(e["type"] == P.UTTERANCE_ENDED for e in baseline["events"])
        checks["same_event_types_as_baseline"] = [e["type"] for e in ev] == [e["type"] for e in baseline["events"]]
        checks["transcripts_identical_to_baseline"] = out["transcripts"] == [e["text"] for e in baseline["events"] if e["type"] == P.TRANSCRIPT]
        checks["events_equal_to_baseline_within_1e-4"] = close_enough(strip, base, 1e-4, diff)
        out["events_bitwise_equal_to_baseline"] = strip == base
        out["max_float_difference_vs_baseline"] = max(diff)
    out["exact"] = all(checks.values())
    lat = latencies(run)
    out["latency"] = _lat_summary(lat)
    return out


def _lat_summary(lat: list[tuple[float, float]]) -> dict[str, Any] | None:
    if not lat:
        return None
    a = np.array(lat)
    return {"client_s": {"p50": _r(np.median(a[:, 0])), "p95": _r(np.percentile(a[:, 0], 95)), "max": _r(a[:, 0].max())},
            "server_s": {"p50": _r(np.median(a[:, 1])), "p95": _r(np.percentile(a[:, 1], 95)), "max": _r(a[:, 1].max())},
            "per_utterance_client_s": [x for x, _ in lat]}


def _r(x: float) -> float:
    return round(float(x), 4)


# ---- orchestration (parent) -------------------------------------------------------------------------
def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return 0


def http_get(url: str, token: str | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, ""


class Monitor:
    """The child's RSS, CPU, fds, threads and /healthz, sampled every `period` s, with marks."""

    def __init__(self, pid: int, http: str, t0: float, period: float = 0.25) -> None:
        self.pid, self.http, self.t0, self.period = pid, http, t0, period
        self.samples: list[dict[str, Any]] = []
        self.attacker_pid: int | None = None
        self._stop = asyncio.Event()
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        k = 0
        while not self._stop.is_set():
            try:
                rss, hwm = rss_mb(self.pid)
                s = {"t": round(loop.time() - self.t0, 2), "rss_mb": round(rss, 2), "hwm_mb": round(hwm, 1),
                     "cpu_s": round(cpu_s(self.pid), 2), "fds": fd_count(self.pid), "threads": threads(self.pid)}
                if self.attacker_pid is not None:
                    try:
                        s["attacker_cpu_s"] = round(cpu_s(self.attacker_pid), 2)
                    except OSError:
                        pass
                if k % 2 == 0:
                    status, body = await asyncio.to_thread(http_get, self.http + P.HEALTH_PATH)
                    h = json.loads(body) if status == 200 else {}
                    s.update(health=h.get("status", status), sessions=h.get("sessions"), subscribers=h.get("subscribers"))
                self.samples.append(s)
            except (OSError, ValueError) as e:
                self.samples.append({"t": round(loop.time() - self.t0, 2), "error": f"{type(e).__name__}: {e}"})
            k += 1
            try:
                await asyncio.wait_for(self._stop.wait(), self.period)
            except TimeoutError:
                pass

    def now(self) -> float:
        return round(asyncio.get_running_loop().time() - self.t0, 2)

    async def settle(self, stable_s: float, timeout: float, tolerance_mb: float = 0.5) -> dict[str, Any]:
        """Wait until no session and no socket is left and, since then, RSS has stayed within
        `tolerance_mb` for `stable_s`; polls the samples, no fixed sleep."""
        loop = asyncio.get_running_loop()
        t_start = loop.time()
        n = max(3, round(stable_s / self.period))
        stable = False
        while loop.time() - t_start < timeout:
            await asyncio.sleep(self.period)
            since = self.quiet_since()
            rss = [x["rss_mb"] for x in self.samples if "rss_mb" in x and since is not None and x["t"] >= since][-n:]
            if len(rss) == n and max(rss) - min(rss) <= tolerance_mb:
                stable = True
                break
        last = [x for x in self.samples if "rss_mb" in x][-1]
        return {"rss_mb": last["rss_mb"], "fds": last["fds"], "threads": last["threads"], "t": last["t"],
                "waited_s": round(loop.time() - t_start, 1), "stable": stable}

    def quiet_since(self) -> float | None:
        """Since when /healthz has shown no session and no socket (None: it does not now)."""
        health = [x for x in self.samples if x.get("sessions") is not None]
        if not health or health[-1]["sessions"] or health[-1]["subscribers"]:
            return None
        since = health[0]["t"]
        for prev, cur in zip(health, health[1:]):
            if prev["sessions"] or prev["subscribers"]:
                since = cur["t"]
        return since

    async def stop(self) -> None:
        self._stop.set()
        await self.task


async def diag(child: Any, cmd: str) -> dict[str, Any]:
    child.stdin.write(f"{cmd}\n".encode())
    await child.stdin.drain()
    while True:
        line = (await asyncio.wait_for(child.stdout.readline(), 60)).decode()
        if line.startswith("DIAG "):
            return json.loads(line[5:])
        if not line:
            raise RuntimeError("the service exited")


def object_growth(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """What the service holds after the attack vs before it (after a gc.collect() each time)."""
    keys = ("objects", "sessions", "handler_connections", "ws_connections", "ws_handler_tasks", "hub_buffers", "hub_buffered_events",
            "hub_buffered_bytes", "hub_subscribers", "tasks", "pymalloc_blocks")
    types = {t: after["types"].get(t, 0) - before["types"].get(t, 0) for t in set(before["types"]) | set(after["types"])}
    return {"before": {k: before[k] for k in keys}, "after": {k: after[k] for k in keys},
            "types_grown_most": dict(sorted(((t, d) for t, d in types.items() if d), key=lambda kv: -abs(kv[1]))[:15])}


async def bench(args: argparse.Namespace, report: dict[str, Any]) -> None:
    workdir = args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "service.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--serve", "--asr", args.asr, "--token", args.token,
           "--resume-grace", str(args.resume_grace)]
    if args.checkpoint:
        cmd += ["--checkpoint", str(args.checkpoint)]
    loop = asyncio.get_running_loop()
    t_launch = loop.time()
    with open(log_path, "w") as log_file:
        child = await asyncio.create_subprocess_exec(*cmd, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                                                     stderr=log_file)
    assert child.stdout is not None
    audio = healthy_audio(args.reps, args.clips)  # while the service loads its models
    healthy_s = len(audio) / SR / args.speed
    line = (await asyncio.wait_for(child.stdout.readline(), 300)).decode()
    if not line.startswith("PORT "):
        raise RuntimeError(f"service did not start: {line!r}; see {log_path}")
    port = int(line.split()[1])
    url, http = f"ws://{HOST}:{port}", f"http://{HOST}:{port}"
    mon = Monitor(child.pid, http, loop.time())
    marks: dict[str, float] = {"service_ready": 0.0, "service_start_s": round(loop.time() - t_launch, 1)}
    rss_idle = rss_mb(child.pid)[0]

    # 1. baseline: the healthy session alone
    marks["baseline_start"] = mon.now()
    baseline = await healthy_run(url, HEALTHY_BASELINE, audio, args.speed)
    marks["baseline_end"] = mon.now()
    before = await mon.settle(args.stable_s, args.settle_timeout)
    marks["settled_before"] = mon.now()
    diag_before = await diag(child, "count")
    await diag(child, "trim")
    rss_before_trim = rss_mb(child.pid)[0]
    marks["malloc_trim_before"] = mon.now()

    # 2. the same session under attack
    rate = args.rate if args.rate is not None else args.frames / max(2.0, 0.85 * healthy_s)

    async def attack_round(k: int) -> dict[str, Any]:
        """The healthy session again, with the attack alongside; then settle and count."""
        rm: dict[str, Any] = {}
        sid = HEALTHY_ATTACKED if k == 0 else f"{HEALTHY_ATTACKED}-{k}"
        started = asyncio.Event()
        healthy_task = asyncio.create_task(healthy_run(url, sid, audio, args.speed, started))
        await started.wait()
        acmd = [sys.executable, str(Path(__file__).resolve()), "--attack", "--port", str(port), "--service-pid", str(child.pid),
                "--frames", str(args.frames), "--token-share", str(args.token_share), "--token", args.token,
                "--rate", str(rate), "--concurrency", str(args.concurrency), "--slow-readers", str(args.slow_readers),
                "--idle-open", str(args.idle_open), "--half-open", str(args.half_open), "--seed", str(args.seed + k),
                "--healthy-id", sid]
        attacker = await asyncio.create_subprocess_exec(*acmd, stdout=asyncio.subprocess.PIPE)
        mon.attacker_pid = attacker.pid
        out, _ = await attacker.communicate()
        rm["attack_closed"] = mon.now()
        if attacker.returncode != 0:
            raise RuntimeError(f"attacker failed ({attacker.returncode})")
        result = json.loads(out.decode().strip().splitlines()[-1])
        rm["attack_start"] = round(result["t_start"] - mon.t0, 2)
        rm["tokens_on"] = round(result["t_token"] - mon.t0, 2) if result["t_token"] else None
        rm["attack_end"] = round(result["t_end"] - mon.t0, 2)
        attacked = await healthy_task
        rm["healthy_end"] = mon.now()
        after = await mon.settle(args.stable_s, args.settle_timeout)
        rm["settled_after"] = mon.now()
        diag_after = await diag(child, "count")
        await diag(child, "trim")
        rss_after_trim = rss_mb(child.pid)[0]
        await diag(child, "tokens_off")  # for the next round, which starts without tokens again
        return {"marks": rm, "result": result, "attacked": attacked, "after": after, "diag_after": diag_after,
                "rss_after_trim": rss_after_trim}

    first = await attack_round(0)
    marks.update(first["marks"])
    result, attacked, after, diag_after, rss_after_trim = (first[k] for k in ("result", "attacked", "after", "diag_after",
                                                                              "rss_after_trim"))
    repeats = []
    for k in range(1, args.repeat + 1):  # the same again: does memory keep growing, or was that a high-water mark?
        r = await attack_round(k)
        c = check_healthy(r["attacked"], baseline)
        repeats.append({"marks": r["marks"], "units": r["result"]["units"], "reply_mismatches": r["result"]["mismatches"],
                        "reply_mismatch_examples": r["result"]["mismatch_examples"][:5],
                        "healthy_exact": c["exact"], "healthy_checks_failed": [n for n, v in c["checks"].items() if not v],
                        "healthy_latency_client_s": c["latency"] and {q: c["latency"]["client_s"][q] for q in ("p50", "p95", "max")},
                        "rss_after_mb": r["after"]["rss_mb"], "in_use_after_mb": round(r["rss_after_trim"], 2),
                        "fds_after": r["after"]["fds"], "settled": r["after"]["stable"],
                        "held": object_growth(diag_before, r["diag_after"])["after"]})
    await diag(child, "forget")
    rss_after_forget = rss_mb(child.pid)[0]

    # 3. did it survive?
    alive = child.returncode is None
    h_status, h_body = await asyncio.to_thread(http_get, http + P.HEALTH_PATH)
    m_status, metrics_text = await asyncio.to_thread(http_get, http + P.METRICS_PATH, args.token)
    await mon.stop()
    child.send_signal(signal.SIGTERM)
    await asyncio.wait_for(child.wait(), 120)
    log_text = log_path.read_text(errors="replace")
    log_lines = log_text.splitlines()

    # ---- analysis ----
    base_check = check_healthy(baseline)
    att_check = check_healthy(attacked, baseline)
    samples = mon.samples
    in_attack = [s for s in samples if "rss_mb" in s and marks["attack_start"] <= s["t"] <= marks["attack_closed"]]
    a_wall = max(1e-3, marks["attack_end"] - marks["attack_start"])
    stats = result["stats"]
    kinds: dict[str, dict[str, Any]] = {}
    for phase, ks in stats.items():
        for name, k in ks.items():
            tot = kinds.setdefault(name, {"connections": 0, "frames": 0, "bytes": 0, "runs": 0, "seconds": 0.0, "tcp_connect_s": 0.0,
                                          "handshake_s": 0.0, "replies": Counter()})
            for f in ("connections", "frames", "bytes", "runs", "seconds", "tcp_connect_s", "handshake_s"):
                tot[f] += k.get(f, 0)
            tot["replies"].update(k["replies"])
    frames = sum(k["frames"] for k in kinds.values())
    conns = sum(k["connections"] for k in kinds.values())
    replies: Counter[str] = Counter()
    for k in kinds.values():
        replies.update(k["replies"])

    def cpu_between(key: str, a: float, b: float) -> float | None:
        xs = [s for s in samples if key in s and a <= s["t"] <= b]
        return round(xs[-1][key] - xs[0][key], 2) if len(xs) > 1 else None

    service_cpu = cpu_between("cpu_s", marks["attack_start"], marks["attack_closed"])
    healthy_overlap = max(0.0, min(marks["attack_end"], marks["healthy_end"]) - marks["attack_start"])
    rss_peak = max(s["rss_mb"] for s in in_attack) if in_attack else None
    held = object_growth(diag_before, diag_after)
    back = {
        f"rss_within_{args.rss_tolerance_pct:g}pct_of_before": after["rss_mb"] - before["rss_mb"] <= args.rss_tolerance_pct / 100 * before["rss_mb"],
        "python_objects_back_to_before": held["after"]["objects"] - held["before"]["objects"] <= 2_000,  # of ~490k
        "nothing_left_open": all(held["after"][k] == 0 for k in ("sessions", "handler_connections", "ws_connections",
                                                                 "ws_handler_tasks", "hub_subscribers"))
        and held["after"]["tasks"] <= held["before"]["tasks"] and after["fds"] <= before["fds"],
    }
    report.update({
        "wall_s": round(loop.time() - t_launch, 1),
        "attack": {
            "wall_s": round(a_wall, 1),
            "units": result["units"], "frames": frames, "connections": conns,
            "units_per_s": round(result["units"] / a_wall, 1), "frames_per_s": round(frames / a_wall, 1),
            "connections_per_s": round(conns / a_wall, 1),
            "bytes": sum(k["bytes"] for k in kinds.values()),
            "rate_cap_units_per_s": round(rate, 1) if rate else None,
            "token_phase_s": round(marks["attack_end"] - marks["tokens_on"], 1) if marks["tokens_on"] else None,
            "healthy_session_overlap_s": round(healthy_overlap, 1),
            "attack_ran_past_healthy_session_s": round(max(0.0, marks["attack_end"] - marks["healthy_end"]), 1),
        },
        "sent_by_kind": {name: {"frames": k["frames"], "connections": k["connections"], "bytes": k["bytes"],
                                **({"runs": k["runs"], "mean_s_per_run": round(k["seconds"] / k["runs"], 4),
                                    "mean_tcp_connect_s": round(k["tcp_connect_s"] / k["runs"], 4),
                                    "mean_handshake_s": round(k["handshake_s"] / k["runs"], 4)} if k["runs"] else {})}
                         for name, k in sorted(kinds.items())},
        "replies_by_kind": {name: dict(sorted(k["replies"].items(), key=lambda kv: -kv[1])) for name, k in sorted(kinds.items())},
        "replies_total": dict(sorted(replies.items(), key=lambda kv: -kv[1])),
        "by_phase": {ph: {name: {f: k[f] for f in ("frames", "connections")} for name, k in ks.items()} for ph, ks in stats.items()},
        "reply_mismatches": result["mismatches"],
        "repeats": repeats,
        "reply_mismatch_examples": result["mismatch_examples"],
        "survived": {
            "alive_after_attack": alive,
            "healthz_after": {"status": h_status, "body": json.loads(h_body) if h_status == 200 else h_body},
            "metrics_status": m_status,
            "service_exit_code": child.returncode,
            "log_errors": sum(" ERROR " in ln for ln in log_lines),
            "log_tracebacks": log_text.count("Traceback"),
            "log_warnings": sum(" WARNING " in ln for ln in log_lines),
            "log_error_examples": [ln[:300] for ln in log_lines if " ERROR " in ln][:10],
            "log": os.path.relpath(log_path, ROOT),
        },
        "healthy": {"baseline": base_check, "attacked": att_check, "exact": att_check["exact"] and base_check["exact"],
                    "latency_delta_client_p50_s": _r(att_check["latency"]["client_s"]["p50"] - base_check["latency"]["client_s"]["p50"])
                    if att_check["latency"] and base_check["latency"] else None},
        "memory": {
            "rss_idle_mb": round(rss_idle, 1),
            "rss_before_mb": before["rss_mb"], "rss_peak_mb": rss_peak, "rss_after_mb": after["rss_mb"],
            "rss_after_minus_before_mb": round(after["rss_mb"] - before["rss_mb"], 2),
            "rss_after_vs_before_pct": round(100 * (after["rss_mb"] - before["rss_mb"]) / before["rss_mb"], 2),
            "rss_peak_minus_before_mb": round(rss_peak - before["rss_mb"], 1) if rss_peak else None,
            "back_to_baseline": all(back.values()),
            "back_to_baseline_checks": back,
            "malloc_trimmed": {"before_mb": round(rss_before_trim, 2), "after_mb": round(rss_after_trim, 2),
                               "after_minus_before_mb": round(rss_after_trim - rss_before_trim, 2),
                               "after_and_replay_buffers_dropped_mb": round(rss_after_forget, 2),
                               "note": "RSS once glibc returned its free memory (malloc_trim(0)), before and after the attack: "
                                       "what the service still uses, without what the allocator keeps for reuse"},
            "held_by_the_service": held,
            "settle_before": before, "settle_after": after,
            "fds_before": before["fds"], "fds_peak": max(s["fds"] for s in in_attack) if in_attack else None, "fds_after": after["fds"],
            "threads_before": before["threads"], "threads_after": after["threads"],
        },
        "cpu": {
            "service_cpu_s_during_attack": service_cpu,
            "service_cores_during_attack": round(service_cpu / a_wall, 2) if service_cpu else None,
            "attacker_cpu_s": cpu_between("attacker_cpu_s", marks["attack_start"], marks["attack_closed"]),
            "service_cpu_s_baseline_run": cpu_between("cpu_s", marks["baseline_start"], marks["baseline_end"]),
        },
        "marks_s": marks,
        "metrics_at_end": {k: metric(metrics_text, k) for k in (
            "emostream_sessions_total", "emostream_errors_total", "emostream_auth_refused_total", "emostream_overloaded_total",
            "emostream_subscribers_dropped_total", "emostream_throttled_total", "emostream_events_total",
            "emostream_utterances_total")},
        "samples": samples,
    })
    report["ok"] = bool(report["healthy"]["exact"] and alive and h_status == 200 and child.returncode == 0
                        and report["survived"]["log_errors"] == 0 and report["reply_mismatches"] == 0
                        and report["memory"]["back_to_baseline"] and after["fds"] <= before["fds"]
                        and all(r["healthy_exact"] and r["reply_mismatches"] == 0 and r["fds_after"] <= before["fds"]
                                and r["rss_after_mb"] - before["rss_mb"] <= args.rss_tolerance_pct / 100 * before["rss_mb"]
                                for r in repeats))


def plot(report: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(18, 5.2), gridspec_kw={"width_ratios": [1.3, 1, 1]})
    s = [x for x in report["samples"] if "rss_mb" in x]
    m, mem = report["marks_s"], report["memory"]
    ax = axes[0]
    t = [x["t"] for x in s]
    ax.plot(t, [x["rss_mb"] for x in s], color="tab:blue", label="service RSS")
    ax.axvspan(m["baseline_start"], m["baseline_end"], color="tab:green", alpha=0.12, label="baseline (healthy session alone)")
    ax.axvspan(m["attack_start"], m["tokens_on"] or m["attack_end"], color="tab:red", alpha=0.15, label="attack")
    if m["tokens_on"]:
        ax.axvspan(m["tokens_on"], m["attack_end"], color="tab:orange", alpha=0.2, label="attack, tokens on")
    for r in report["repeats"]:
        rm = r["marks"]
        ax.axvspan(rm["attack_start"], rm["tokens_on"] or rm["attack_end"], color="tab:red", alpha=0.08)
        if rm["tokens_on"]:
            ax.axvspan(rm["tokens_on"], rm["attack_end"], color="tab:orange", alpha=0.1)
        ax.scatter([rm["settled_after"]], [r["in_use_after_mb"]], marker="v", color="tab:purple", zorder=5)
    ax.axhline(mem["rss_before_mb"], color="k", ls=":", lw=1, label=f"before {mem['rss_before_mb']:.1f} MiB")
    ax.axhline(mem["rss_after_mb"], color="tab:purple", ls="--", lw=1, label=f"after {mem['rss_after_mb']:.1f} MiB")
    ax.scatter([m["malloc_trim_before"], m["settled_after"]], [mem["malloc_trimmed"]["before_mb"], mem["malloc_trimmed"]["after_mb"]],
               marker="v", color=["k", "tab:purple"], zorder=5,
               label=f"after malloc_trim (diagnostic): before {mem['malloc_trimmed']['before_mb']:.1f} / after "
                     f"{mem['malloc_trimmed']['after_mb']:.1f} MiB")
    ax.set_xlabel("wall time (s)")
    ax.set_ylabel("service RSS (MiB)")
    ax2 = ax.twinx()
    cores = [(b["cpu_s"] - a["cpu_s"]) / max(1e-9, b["t"] - a["t"]) for a, b in zip(s, s[1:])]
    ax2.plot(t[1:], np.convolve(cores, np.ones(4) / 4, mode="same"), color="tab:gray", lw=0.7, alpha=0.7)
    ax2.set_ylabel("service CPU (cores)", color="tab:gray")
    ax.legend(fontsize=6.5, loc="lower right", framealpha=0.85)
    a = report["attack"]
    ax.set_title(f"{a['units']} units in {a['wall_s']} s ({a['units_per_s']:.0f}/s); RSS peak {mem['rss_peak_mb']:.0f}, "
                 f"after-before {mem['rss_after_minus_before_mb']:+.1f} MiB", fontsize=9)
    ax = axes[1]
    ks = sorted(report["sent_by_kind"].items(), key=lambda kv: kv[1]["frames"] + kv[1]["connections"])
    y = np.arange(len(ks))
    ax.barh(y - 0.2, [k["frames"] for _, k in ks], 0.4, label="frames", color="tab:red")
    ax.barh(y + 0.2, [k["connections"] for _, k in ks], 0.4, label="connections", color="tab:blue")
    ax.set_yticks(y, [n for n, _ in ks], fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("sent (log)")
    ax.legend(fontsize=7)
    ax.set_title("hostile traffic by kind", fontsize=9)
    ax = axes[2]
    rep = list(report["replies_total"].items())[:28][::-1]
    ax.barh(np.arange(len(rep)), [v for _, v in rep], color="tab:gray")
    ax.set_yticks(np.arange(len(rep)), [k for k, _ in rep], fontsize=6.5)
    ax.set_xscale("log")
    ax.set_xlabel("count (log)")
    h = report["healthy"]
    ax.set_title(f"server replies; healthy session {'EXACT' if h['exact'] else 'NOT EXACT'}, "
                 f"mismatches {report['reply_mismatches']}, log errors {report['survived']['log_errors']}", fontsize=9)
    c = report["config"]
    fig.suptitle(f"emostream under hostile traffic: {c['frames']} units, {c['concurrency']} concurrent loops, ASR {c['asr']}, "
                 f"{report['machine']['cpus']} CPU cores ({'OK' if report['ok'] else 'FAIL'})", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=100_000, help="hostile units: WebSocket frames + connections")
    ap.add_argument("--concurrency", type=int, default=128, help="concurrent attacker connection loops")
    ap.add_argument("--rate", type=float, default=None, help="cap in units/s (default: spread over 85%% of the healthy session; 0: none)")
    ap.add_argument("--token-share", type=float, default=0.25, help="share of the units sent with the service's tokens on")
    ap.add_argument("--token", default="hostile-bench-admin-token", help="the service's admin token in the token phase")
    ap.add_argument("--slow-readers", type=int, default=24)
    ap.add_argument("--idle-open", type=int, default=32)
    ap.add_argument("--half-open", type=int, default=30)
    ap.add_argument("--reps", type=int, default=4, help="repetitions of the healthy session's clips")
    ap.add_argument("--clips", nargs="+", default=CLIPS)
    ap.add_argument("--speed", type=float, default=1.0, help="healthy session pace, x real time")
    ap.add_argument("--asr", choices=["fake", "whisper"], default="fake")
    ap.add_argument("--model", choices=["tiny", "bundled"], default="tiny")
    ap.add_argument("--checkpoint", type=Path, default=None)
    ap.add_argument("--resume-grace", type=float, default=10.0, help="the service's resume_grace_s")
    ap.add_argument("--stable-s", type=float, default=4.0, help="RSS must be stable this long to count as settled")
    ap.add_argument("--settle-timeout", type=float, default=120.0)
    ap.add_argument("--rss-tolerance-pct", type=float, default=10.0, help="RSS after - before the attack allowed, %% of before")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=0,
                    help="run the attack (with the healthy session) this many more times: memory should plateau")
    ap.add_argument("--smoke", action="store_true", help="--frames 2000, one LJ001-0002 at 2x, small pools, short settles")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--workdir", type=Path, default=ROOT / "bench" / "out" / "hostile")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--attack", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--service-pid", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--healthy-id", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.serve:
        return serve(a)
    if a.attack:
        return attack_main(a)
    if a.smoke:
        for k, v in {"frames": 2000, "reps": 1, "clips": ["LJ001-0002.wav"], "speed": 2.0, "resume_grace": 1.0,
                     "slow_readers": 6, "idle_open": 6, "half_open": 6, "stable_s": 1.5, "settle_timeout": 30.0,
                     "concurrency": 16}.items():
            if getattr(a, k) == ap.get_default(k):
                setattr(a, k, v)

    from importlib.metadata import version

    if a.checkpoint is None and a.model == "tiny":
        a.checkpoint = tiny_checkpoint((ROOT / "bench" / "out" / "soak").resolve())
    report: dict[str, Any] = {
        "what": "hostile traffic at volume against the real service, with one healthy real-speech session that must get exactly its baseline events",
        "how": __doc__.split("\n\n", 2)[2].strip(),
        "machine": {"cpus": os.cpu_count(), "allocator": None, "platform": platform.platform(), "python": platform.python_version(),
                    "torch": version("torch"), "load_avg_at_start": os.getloadavg(),
                    "note": "shared machine: other jobs may run concurrently"},
        "config": {"frames": a.frames, "concurrency": a.concurrency, "rate": a.rate, "token_share": a.token_share,
                   "pools": {"slow_readers": a.slow_readers, "idle_open": a.idle_open, "half_open": a.half_open},
                   "healthy": {"clips": a.clips, "pauses_s": PAUSES_S, "reps": a.reps, "speed": a.speed},
                   "asr": a.asr, "fake_transcript": FAKE_TEXT if a.asr == "fake" else None,
                   "model": "bundled checkpoint" if a.checkpoint is None else
                   ("tiny random model (2-layer 32-wide BERT + speech CNN)" if a.model == "tiny" else str(a.checkpoint)),
                   "resume_grace_s": a.resume_grace, "stable_s": a.stable_s, "smoke": a.smoke, "repeat": a.repeat},
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    asyncio.run(bench(a, report))
    health = report.get("survived", {}).get("healthz_after", {}).get("body")
    report["machine"]["allocator"] = health.get("allocator") if isinstance(health, dict) else None  # the service's own
    report["machine"]["load_avg_at_end"] = os.getloadavg()
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "hostile.json").write_text(json.dumps(report, indent=1, default=str))
    plot(report, a.out / "hostile.png")
    at, mem, h = report["attack"], report["memory"], report["healthy"]
    lat_b, lat_a = h["baseline"]["latency"], h["attacked"]["latency"]
    print(f"{at['frames']} frames + {at['connections']} connections in {at['wall_s']} s ({at['units_per_s']:.0f} units/s); "
          f"mismatches {report['reply_mismatches']}, log errors {report['survived']['log_errors']}, "
          f"alive {report['survived']['alive_after_attack']}; healthy {h['attacked']['utterances']} utterances "
          f"{'EXACT' if h['exact'] else 'NOT EXACT: ' + str({k: v for k, v in h['attacked']['checks'].items() if not v})}, "
          f"latency p50 {lat_b and lat_b['client_s']['p50']} -> {lat_a and lat_a['client_s']['p50']} s; RSS before {mem['rss_before_mb']} "
          f"peak {mem['rss_peak_mb']} after {mem['rss_after_mb']} MiB (in use, malloc_trim: {mem['malloc_trimmed']['before_mb']} -> "
          f"{mem['malloc_trimmed']['after_mb']}); fds {mem['fds_before']} -> {mem['fds_after']}; "
          f"{'OK' if report['ok'] else 'FAILED'}")
    print(f"wrote {a.out / 'hostile.json'} and hostile.png")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    from streamer.memory import relaunch_with_allocator

    relaunch_with_allocator()  # as the service's own commands do (EMOSTREAM_ALLOCATOR); the --serve child inherits it
    sys.exit(main())
