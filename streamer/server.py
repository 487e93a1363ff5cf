"""The asyncio WebSocket service: the App that wires the parts, its routes (/v1/stream,
/v1/subscribe, /v1/twilio, HTTP), limits, resume and shutdown.

This layer only moves bytes and events: a session's pipeline is runner.SessionRunner, fan-out is
fanout.Hub, segmentation lives in Session/Segmenter (synchronous), models live on the inference
engine's threads. `create_app(config)` builds everything; tests pass a tiny model, a shared
Whisper, and port 0.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Callable
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State

from model import EmotionModel, load_checkpoint
from streamer import auth
from streamer import protocol as P
from streamer.alerts import AlertEngine, load_rules
from streamer.bus import BusError, make_bus
from streamer.config import AppConfig
from streamer.inference import InferenceEngine, SpeechToText
from streamer.remote import RemoteInferenceEngine
from streamer.memory import tune_allocator
from streamer.metrics import Metrics
from streamer.http_api import MAX_SQL_INT, api_response
from streamer.static_files import set_header, static_response
from streamer.store import EventStore
from streamer.telephony import MULAW_RATE, TwilioError, parse_media, parse_start
from streamer.webhook import WebhookSender
from streamer.session import PcmDecoder, SeqCounter, Session
from streamer.fanout import Hub, Subscriber
from streamer.runner import SessionRunner

log = logging.getLogger("streamer")


# ---- the app ----------------------------------------------------------------------------------
class App:
    """The service. `await start()`, then `port`; `await shutdown()` finishes in-flight work."""

    def __init__(
        self,
        config: AppConfig,
        model: EmotionModel | None = None,
        asr: SpeechToText | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.clock = clock
        tune_allocator()  # before the inference threads allocate: keeps RSS flat over days (streamer/memory.py)
        self.metrics = Metrics()
        self.engine: InferenceEngine | RemoteInferenceEngine
        if config.inference.remote:  # Whisper + text encoder live in streamer.worker processes
            if model is None:
                model = load_checkpoint(config.inference.checkpoint, device=config.inference.device, load_encoder=False)
            self.model, self.asr = model, None
            self.engine = RemoteInferenceEngine(model, config.inference, self.metrics)
        else:
            if model is None:
                model = load_checkpoint(config.inference.checkpoint, device=config.inference.device)
            if asr is None:
                from streamer.transcriber import Transcriber

                asr = Transcriber(config.asr)
            self.model = model
            self.asr = asr
            self.engine = InferenceEngine(model, asr, config.inference, self.metrics)
        calls = config.calls
        self.alerts = AlertEngine(load_rules(calls.alert_rules)) if calls.alert_rules else None
        self.webhook = WebhookSender(calls.webhook_url, retries=calls.webhook_retries) if calls.webhook_url else None
        self.store = EventStore(config.store.path, metrics=self.metrics) if config.store.path else None
        self.bus = make_bus(config.bus, self.metrics, config.server.replay_events)
        self.hub = Hub(self.metrics, self.store, config.server.replay_events, config.server.replay_sessions, self.bus)
        self.sessions: dict[str, SessionRunner] = {}
        self.connections: set[Subscriber] = set()
        self.server: Server | None = None
        self.started_at = clock()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._shutdown: asyncio.Task[None] | None = None
        self.metrics.gauge("emostream_sessions_active", "live sessions", lambda: len(self.sessions))
        self.metrics.gauge("emostream_subscribers", "open event sockets", lambda: len(self.connections))
        self.metrics.gauge("emostream_inference_queue_depth", "jobs waiting for the inference thread", lambda: self.engine.depth)
        self.metrics.gauge("emostream_subscriber_queue_max", "events waiting in the fullest subscriber queue",
                           lambda: max((s.queue.qsize() for s in self.connections), default=0))
        self.metrics.gauge("emostream_utterances_pending", "ended utterances waiting for transcript + emotion",
                           lambda: sum(r._finish.qsize() for r in self.sessions.values()))

    # ---- lifecycle ----
    async def start(self) -> None:
        if self.config.inference.warmup:
            try:
                await asyncio.to_thread(self.engine.warmup)  # before the worker thread owns the models
            except Exception:  # serve anyway: a broken model then fails per utterance, with an error event
                log.exception("model warm-up failed")
        self.engine.start()
        await self.bus.start(self.hub.deliver)
        if self.webhook is not None:
            self.webhook.start()
        sc = self.config.server
        if not self.config.auth.enabled and not auth.is_loopback(sc.host):
            log.warning("SECURITY: serving on %s without API tokens: anyone who can reach this port can stream "
                        "and watch every session. Set --token/--token-file (and TLS with --certfile/--keyfile).", sc.host)
        self.server = await serve(
            self._handler, sc.host, sc.port,
            process_request=self._process_request,
            max_size=self.config.limits.max_message_bytes,
            max_queue=sc.max_incoming_queue,
            ping_interval=sc.ping_interval_s,
            ssl=self._ssl_context(),
        )

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        scheme = "wss" if self.config.auth.certfile else "ws"
        return f"{scheme}://{self.config.server.host}:{self.port}"

    def _ssl_context(self) -> ssl.SSLContext | None:
        a = self.config.auth
        if a.certfile is None:
            return None
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(a.certfile, a.keyfile)
        return ctx

    @property
    def shutting_down(self) -> bool:
        return self._shutdown is not None

    def shutdown(self) -> asyncio.Task[None]:
        """Stop accepting, finish utterances in flight, close every socket with 1001. Idempotent."""
        if self._shutdown is None:
            self._shutdown = asyncio.create_task(self._do_shutdown())
        return self._shutdown

    async def _do_shutdown(self) -> None:
        assert self.server is not None
        self.hub.end_close = (P.CLOSE_GOING_AWAY, "server shutting down")
        self.server.close(close_connections=False)  # no new connections from here on
        if isinstance(self.engine, RemoteInferenceEngine):
            self.engine.begin_shutdown()  # with Redis gone, jobs in flight fail now rather than after remote_timeout_s
        for t in list(self._tasks):  # internal sources (microphone) stop producing
            t.cancel()
        runners = [r.close() for r in list(self.sessions.values())]
        if runners:
            await asyncio.wait(runners, timeout=self.config.server.shutdown_timeout_s)
        for sub in list(self.connections):
            sub.finish(P.CLOSE_GOING_AWAY, "server shutting down")
        writers = [s.task for s in self.connections]
        if writers:
            await asyncio.wait(writers, timeout=5)
        self.server.close(close_connections=True)
        await self.server.wait_closed()
        await asyncio.to_thread(self.engine.stop)
        if isinstance(self.engine, RemoteInferenceEngine):
            await self.engine.aclose()  # its Redis tasks live on this loop
        await self.bus.close()  # after the last event: queued ones still reach the other instances
        if self.webhook is not None:
            try:
                await self.webhook.drain(timeout=10)
            except asyncio.TimeoutError:
                log.warning("webhook: %d payloads undelivered at shutdown", self.webhook.queue.qsize())
            await self.webhook.stop()
        if self.store is not None:
            self.store.close()  # after the last event: checkpoints the WAL into the database

    async def wait_closed(self) -> None:
        assert self.server is not None
        await self.server.wait_closed()

    # ---- HTTP ----
    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        protocol = connection.protocol
        if protocol.state is State.CONNECTING and protocol.eof_sent:  # bytes after the request (a body, a
            protocol.state = State.CLOSING  # pipelined request): websockets read them as frames and failed the
            return connection.respond(HTTPStatus.BAD_REQUEST, "")  # connection; a response would assert: none
        try:
            path = urlsplit(request.path).path
        except ValueError:  # e.g. "//[": an unclosed IPv6 host in the request target
            return connection.respond(HTTPStatus.BAD_REQUEST, "malformed request target\n")
        for name in ("Authorization", "Origin"):  # Headers.get() raises on a repeated header
            if len(request.headers.get_all(name)) > 1:
                return connection.respond(HTTPStatus.BAD_REQUEST, f"more than one {name} header\n")
        refused = auth.check(self.config.auth, request.path, request.headers.get("Authorization"),
                             request.headers.get("Origin"))
        if refused is not None:  # before any data flows
            self.metrics.inc("emostream_auth_refused_total")
            resp = connection.respond(refused[0], refused[1] + "\n")
            if refused[0] == HTTPStatus.UNAUTHORIZED:
                resp.headers["WWW-Authenticate"] = 'Bearer realm="emostream"'
            return resp
        if request.method != "GET":  # every route is read-only (WebSocket handshakes are GETs too)
            resp = connection.respond(HTTPStatus.METHOD_NOT_ALLOWED, f"{request.method} is not allowed; use GET\n")
            resp.headers["Allow"] = "GET"
            return resp
        if path == P.HEALTH_PATH:
            resp = connection.respond(HTTPStatus.OK, json.dumps(self.health()) + "\n")
            set_header(resp, "Content-Type", "application/json")
            return resp
        if path == P.METRICS_PATH:
            resp = connection.respond(HTTPStatus.OK, self.metrics.render())
            set_header(resp, "Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            return resp
        api = api_response(self, connection, request)
        if api is not None:  # /v1/sessions...
            return api
        static = static_response(connection, path)
        if static is not None:  # the browser dashboard
            return static
        if path not in (P.STREAM_PATH, P.SUBSCRIBE_PATH, P.TWILIO_PATH):
            return connection.respond(HTTPStatus.NOT_FOUND, f"no route {path}; see docs/protocol.md\n")
        if self._shutdown is not None:
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "shutting down\n")
        return None

    def health(self) -> dict[str, Any]:
        degraded = self.store is not None and self.store.failing  # events go out live but are not stored
        return {
            "status": "shutting_down" if self._shutdown is not None else "degraded" if degraded else "ok",
            "protocol": P.VERSION,
            "sessions": len(self.sessions),
            "subscribers": len(self.connections),
            "inference_queue": self.engine.depth,
            "bus": self.bus.status(),
            **({"store": self.store.status()} if self.store is not None else {}),
            "model": {"labels": list(self.model.config.labels), "device": str(self.model.device)},
            "uptime_s": round(self.clock() - self.started_at, 1),
        }

    # ---- WebSocket routes ----
    async def _handler(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        url = urlsplit(ws.request.path)
        sub = Subscriber(ws, self.config.server.subscriber_queue, self.metrics)
        self.connections.add(sub)
        try:
            if url.path == P.STREAM_PATH:
                await self._stream(ws, sub)
            elif url.path == P.TWILIO_PATH:
                await self._twilio(ws, sub)
            else:
                query = parse_qs(url.query)
                sub.interim = query.get("interim", ["0"])[0].lower() in ("1", "true", "yes")
                await self._subscribe(ws, sub, query.get("session", [P.ALL_SESSIONS])[0], query.get("after_seq", [None])[0])
        finally:
            self.connections.discard(sub)

    def _attach(self, sub: Subscriber, key: str, after_seq: int | None) -> None:
        """Register `sub` for `key`, first replaying what it missed after `after_seq`. Nothing
        is published in between (one thread), so every event arrives exactly once."""
        if after_seq is not None:
            texts, complete = self.hub.replay(key, after_seq)
            if not complete:
                sub.offer(json.dumps(P.event(P.ERROR, key, -1, **P.error_fields(
                    P.E_REPLAY_GAP, f"events after seq {after_seq} of {key} are no longer buffered; "
                                    f"replaying from the oldest kept"))))
            for text in texts:
                sub.offer(text)
        self.hub.add(key, sub)

    async def _attach_from_bus(self, sub: Subscriber, key: str, after_seq: int) -> None:
        """`_attach` when the replay must be read from the bus (an await). Exactly once: `sub` is
        registered first with live events held; then the replay is sent, then the held events
        newer than the last replayed seq; later live events up to that seq are dropped too."""
        sub.held = []
        self.hub.add(key, sub)
        try:
            events, complete = await self.bus.history(key, after_seq)
        except BusError:  # Redis down: what this instance has, flagged as incomplete
            texts, _ = self.hub.replay(key, after_seq)
            events, complete = [(json.loads(t)["seq"], t) for t in texts], False
        except BaseException:
            self.hub.remove(key, sub)
            raise
        held, sub.held = sub.held, None
        if not complete:
            sub.offer(json.dumps(P.event(P.ERROR, key, -1, **P.error_fields(
                P.E_REPLAY_GAP, f"events after seq {after_seq} of {key} are no longer buffered; "
                                f"replaying from the oldest kept"))))
        last, finished = after_seq, False
        for seq, text in events:
            sub.offer(text)
            last = max(last, seq)
        for item in held:
            if isinstance(item, tuple):
                sub.finish(*item)
                finished = True
            elif json.loads(item)["seq"] > last:
                sub.offer(item)
        sub.after = last  # the live reader may still be behind the replay
        if not finished and events and json.loads(events[-1][1])["type"] == P.SESSION_ENDED:
            sub.finish(*self.hub.end_close)  # the replay was all of it

    async def _subscribe(self, ws: ServerConnection, sub: Subscriber, key: str, after_seq: str | None = None) -> None:
        subscribers = sum(len(g) for g in self.hub.subs.values())
        if subscribers >= self.config.server.max_subscribers:
            sub.finish(P.CLOSE_TRY_AGAIN, f"too many subscribers (limit {self.config.server.max_subscribers})")
            await sub.task
            return
        after: int | None = None
        if after_seq is not None:
            try:
                after = int(after_seq)
            except ValueError:
                after = None
            if after is None or key == P.ALL_SESSIONS or not -1 <= after <= MAX_SQL_INT:  # the store's INTEGER
                sub.offer(json.dumps(P.event(P.ERROR, key, -1, **P.error_fields(
                    P.E_BAD_REQUEST, "after_seq must be an integer >= -1 and needs a single session"))))
                sub.finish(P.CLOSE_POLICY, "bad after_seq")
                await sub.task
                return
        if after is not None and self.bus.remote and not self.hub.covers(key, after):
            await self._attach_from_bus(sub, key, after)  # e.g. a session that another instance runs
        else:
            self._attach(sub, key, after)
        if after is not None and self.hub.is_over(key) and key not in self.sessions:
            sub.finish(*self.hub.end_close)  # the session is over: the replay was all of it
        try:
            async for _ in ws:  # subscribers have nothing to say; their frames are ignored
                pass
        except ConnectionClosed:
            pass
        finally:
            self.hub.remove(key, sub)
            if not sub.task.done():
                sub.task.cancel()  # the connection is gone: nothing left to write
            await asyncio.gather(sub.task, return_exceptions=True)

    async def _stream(self, ws: ServerConnection, sub: Subscriber) -> None:
        sc = self.config.server
        seq = SeqCounter()
        runner: SessionRunner | None = None
        decoder: PcmDecoder | None = None
        split: list[PcmDecoder] = []  # per-channel decoders when the start names speakers
        stopped = False  # a `stop` (or a limit) ended the input: no resume grace
        received_s, t_start = 0.0, self.clock()  # audio seconds on this connection, for throttling

        def reply_error(code: str, message: str) -> None:
            self.metrics.inc("emostream_errors_total")
            if runner is not None:
                runner.error(code, message)
            else:
                sub.offer(json.dumps(P.event(P.ERROR, None, seq.next(), **P.error_fields(code, message))))  # type: ignore[arg-type]

        try:
            while True:
                try:
                    msg = await asyncio.wait_for(ws.recv(), sc.idle_timeout_s)
                except asyncio.TimeoutError:
                    if runner is not None:
                        reply_error(P.E_IDLE_TIMEOUT, f"no audio for {sc.idle_timeout_s:g} s: session ended")
                        stopped = True
                    break
                if isinstance(msg, bytes):
                    if runner is None or decoder is None:
                        reply_error(P.E_NOT_STARTED, "audio before a successful start message; send start first")
                        continue
                    received_s += len(msg) / decoder.bytes_per_frame / decoder.sample_rate
                    ahead = received_s - sc.realtime_burst_s - (self.clock() - t_start) * sc.max_realtime_factor
                    if ahead > 0:  # faster than the limit: stop reading for a while (TCP back-pressure)
                        self.metrics.inc("emostream_throttled_total")
                        await asyncio.sleep(ahead / sc.max_realtime_factor)
                    if split:
                        usable = len(msg) - len(msg) % decoder.bytes_per_frame
                        frames = np.frombuffer(msg[:usable], dtype="<i2").reshape(-1, len(split))
                        for c, dec in enumerate(split):
                            runner.audio(dec.decode(frames[:, c].tobytes())[0], c)
                        dropped = len(msg) - usable
                    else:
                        samples, dropped = decoder.decode(msg)
                        runner.audio(samples)
                    if dropped:
                        reply_error(P.E_ODD_BYTES, f"binary frame of {len(msg)} bytes is not a whole number of "
                                    f"{decoder.bytes_per_frame}-byte sample frames; the last {dropped} bytes were dropped")
                    if runner.session.segmenter.position_s > sc.max_session_s:
                        reply_error(P.E_SESSION_TOO_LONG, f"session reached {sc.max_session_s:g} s of audio: ended")
                        stopped = True
                        break
                    continue
                try:
                    obj = json.loads(msg)
                except json.JSONDecodeError as e:
                    reply_error(P.E_BAD_JSON, f"text frames must be JSON objects ({e.msg} at {e.pos})")
                    continue
                except RecursionError:
                    reply_error(P.E_BAD_JSON, "text frames must be JSON objects (nested too deeply)")
                    continue
                if not isinstance(obj, dict):
                    reply_error(P.E_BAD_JSON, "text frames must be JSON objects")
                    continue
                mtype = obj.get("type")
                if mtype == P.START:
                    if runner is not None:
                        reply_error(P.E_ALREADY_STARTED, f"session {runner.session.session_id} already started on this socket")
                        continue
                    try:
                        start = P.StartMessage.from_dict(obj)
                    except ValueError as e:
                        reply_error(P.E_BAD_START, str(e))
                        continue
                    problem = self._check_format(start)
                    if problem:
                        reply_error(P.E_UNSUPPORTED_FORMAT, problem)
                        continue
                    sid = start.session_id or uuid.uuid4().hex[:12]
                    live = self.sessions.get(sid)
                    if live is not None and not (live.detached and start.after_seq is not None):
                        reply_error(P.E_SESSION_EXISTS, f"session {sid!r} is live already; pick another session_id "
                                    "(a dropped source resumes with its session_id and after_seq)")
                        continue
                    refused = self.admission_problem() if live is None else None
                    if refused is not None:
                        self.metrics.inc("emostream_overloaded_total")
                        reply_error(P.E_OVERLOADED, refused)
                        sub.finish(P.CLOSE_TRY_AGAIN, "too many sessions" if "sessions live" in refused else "overloaded")
                        break
                    decoder = PcmDecoder(start.sample_rate, start.channels)
                    if start.speakers:  # channels kept apart: one decoder and segmenter each
                        split = [PcmDecoder(start.sample_rate, 1) for _ in start.speakers]
                    received_s, t_start = 0.0, self.clock()
                    sub.interim = start.interim
                    if live is not None:  # resume: the same pipeline, the events it missed, then live ones
                        runner = live
                        runner.reattach()
                        runner.interim, runner.words = start.interim, start.word_timestamps
                        self._attach(sub, sid, start.after_seq)
                        runner.publish(P.SESSION_RESUMED, after_seq=start.after_seq, sample_rate=start.sample_rate,
                                       channels=start.channels)
                        continue
                    self.hub.add(sid, sub)
                    runner = self._new_runner(sid, seq, "websocket", start.speakers)
                    runner.interim, runner.words = start.interim, start.word_timestamps
                    runner.publish(
                        P.SESSION_STARTED, sample_rate=start.sample_rate, encoding=start.encoding,
                        channels=start.channels, language=start.language, metadata=start.metadata, protocol=P.VERSION,
                        **({"speakers": start.speakers} if start.speakers else {}),
                    )
                elif mtype == P.STOP:
                    if runner is None:
                        reply_error(P.E_NOT_STARTED, "stop before a successful start")
                        continue
                    stopped = True
                    break
                else:
                    reply_error(P.E_UNKNOWN_TYPE, f"unknown message type {mtype!r}; expected 'start' or 'stop'")
        except ConnectionClosed:
            pass  # dropped: the session waits resume_grace_s for the source to come back, then finishes
        finally:
            if runner is not None:
                if split:
                    for c, dec in enumerate(split):
                        runner.audio(dec.flush(), c)
                elif decoder is not None:
                    runner.audio(decoder.flush())
                if stopped or sc.resume_grace_s <= 0 or self._shutdown is not None:
                    await runner.close()  # this socket still gets the last events
                else:
                    runner.detach(sc.resume_grace_s)
                self.hub.remove(runner.session.session_id, sub)
            if self._shutdown is None:
                sub.finish(P.CLOSE_NORMAL, "session ended" if runner is not None else "")
            await sub.task

    def finals_imminent(self) -> bool:
        """Some channel of some session is in a pause after speech: its utterance may end soon."""
        return any(ch.session.segmenter.pausing for r in self.sessions.values() for ch in r.channels)

    def admission_problem(self) -> str | None:
        """Why a new session is refused now (None: admitted). Past capacity the service refuses new
        sessions before the live ones' latency runs away: see ServerConfig.admit_*."""
        sc = self.config.server
        if self._shutdown is not None:
            return "shutting down"
        if len(self.sessions) >= sc.max_sessions:
            return f"{len(self.sessions)} sessions live (limit {sc.max_sessions})"
        load, wait = self.engine.load(), self.engine.wait_estimate_s()
        if load > sc.admit_max_load or wait > sc.admit_max_wait_s:
            return (f"at capacity: decoders busy {load:.0%} of the last 10 s (limit {sc.admit_max_load:.0%}), "
                    f"a new utterance would wait {wait:.1f} s (limit {sc.admit_max_wait_s:g} s); try again later")
        return None

    def _check_format(self, start: P.StartMessage) -> str | None:
        lim = self.config.limits
        if start.encoding not in lim.encodings:
            return f"encoding {start.encoding!r} not supported; use one of {list(lim.encodings)}"
        if not lim.min_sample_rate <= start.sample_rate <= lim.max_sample_rate:
            return f"sample_rate {start.sample_rate} outside {lim.min_sample_rate}-{lim.max_sample_rate} Hz"
        if not 1 <= start.channels <= lim.max_channels:
            return f"channels {start.channels} not supported (1..{lim.max_channels}; stereo is downmixed)"
        return None

    def _new_runner(self, sid: str, seq: SeqCounter, source: str, speakers: list[str] | None = None) -> SessionRunner:
        session = Session(sid, self.config.segmenter, self.clock, seq=seq, source=source)
        extra = [Session(sid, self.config.segmenter, self.clock, seq=seq, source=source) for _ in (speakers or [])[1:]]
        runner = SessionRunner(self, session, extra, speakers)
        self.sessions[sid] = runner
        self.metrics.inc("emostream_sessions_total")
        return runner

    # ---- internal sources (microphone, files) ----
    def add_source(self, session_id: str, chunks: AsyncIterator[np.ndarray], source: str,
                   speakers: list[str] | None = None, interim: bool = False,
                   word_timestamps: bool = False) -> asyncio.Task[None]:
        """Run a server-side session fed by `chunks` (16 kHz float32); subscribers see it via '*'.
        With `speakers`, chunks are (channels, n) and each channel is its own speaker; `interim` and
        `word_timestamps` as in a start message."""

        async def run() -> None:
            runner = self._new_runner(session_id, SeqCounter(), source, speakers)
            runner.interim, runner.words = interim, word_timestamps
            runner.publish(P.SESSION_STARTED, sample_rate=16_000, encoding="float32", channels=len(speakers or [0]),
                           source=source, protocol=P.VERSION, **({"speakers": speakers} if speakers else {}))
            try:
                async for chunk in chunks:
                    if speakers:
                        for c in range(len(speakers)):
                            runner.audio(chunk[c], c)
                    else:
                        runner.audio(chunk)
            finally:
                await asyncio.shield(runner.close())

        task = asyncio.create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ---- telephony: Twilio Media Streams ----
    async def _twilio(self, ws: ServerConnection, sub: Subscriber) -> None:
        """Twilio Media Streams: one session per call (id = callSid), one channel per track, both in
        one dialogue context. Events go to subscribers, not back to Twilio (it reads media only)."""
        calls = self.config.calls
        runner: SessionRunner | None = None
        tracks: dict[str, tuple[int, PcmDecoder]] = {}
        assert ws.request is not None
        handshake_token = auth.request_token(ws.request.path, ws.request.headers.get("Authorization"))

        def problem(message: str) -> None:
            self.metrics.inc("emostream_errors_total")
            log.warning("twilio: %s", message)
            if runner is not None:
                runner.error(P.E_BAD_START if "start" in message else P.E_BAD_JSON, message)

        try:
            async for msg in ws:
                try:
                    obj = json.loads(msg)
                    kind = obj.get("event") if isinstance(obj, dict) else None
                    if kind == "media":
                        media = parse_media(obj)
                        if runner is None:
                            problem("media before start")
                        elif media.track in tracks:
                            channel, decoder = tracks[media.track]
                            runner.audio(decoder.resample(media.audio), channel)
                    elif kind == "start" and runner is None:
                        start = parse_start(obj)
                        if not (auth.token_allows(self.config.auth, handshake_token, auth.SOURCE)
                                or auth.token_allows(self.config.auth, start.custom_parameters.get("token"), auth.SOURCE)):
                            self.metrics.inc("emostream_auth_refused_total")
                            log.warning("twilio: call %s refused: no valid token", start.call_sid)
                            await ws.close(P.CLOSE_POLICY, "missing or unknown API token")
                            break
                        if start.call_sid in self.sessions:
                            problem(f"call {start.call_sid} is live already")
                            break
                        names = {"inbound": calls.inbound_speaker, "outbound": calls.outbound_speaker}
                        speakers = [names[t] for t in start.tracks]
                        tracks = {t: (i, PcmDecoder(MULAW_RATE, 1)) for i, t in enumerate(start.tracks)}
                        runner = self._new_runner(start.call_sid, SeqCounter(), "twilio", speakers)
                        runner.publish(P.SESSION_STARTED, sample_rate=MULAW_RATE, encoding="mulaw", channels=len(tracks),
                                       source="twilio", speakers=speakers, protocol=P.VERSION,
                                       metadata={"callSid": start.call_sid, "streamSid": start.stream_sid,
                                                 "tracks": list(start.tracks),
                                                 **{k: v for k, v in start.custom_parameters.items() if k != "token"}})
                    elif kind == "stop":
                        break
                    elif kind not in ("connected", "mark", "dtmf", "start"):
                        problem(f"unknown Twilio event {kind!r}")
                except (ValueError, TwilioError) as e:  # JSONDecodeError, UnicodeDecodeError (binary frames)
                    problem(f"{type(e).__name__}: {e}"[:500])
                except RecursionError:
                    problem("message nested too deeply")
        except ConnectionClosed:
            pass  # the call's last utterance is still processed
        finally:
            if runner is not None:
                for channel, decoder in tracks.values():
                    runner.audio(decoder.flush(), channel)
                await runner.close()
            sub.finish(P.CLOSE_NORMAL, "")
            await sub.task

    def save_summary(self, summary: dict[str, Any]) -> None:
        folder = self.config.calls.summaries_dir
        if folder is None:
            return
        folder.mkdir(parents=True, exist_ok=True)
        name = "".join(c if c.isalnum() or c in "-_." else "_" for c in summary["session_id"])
        (folder / f"{name}.json").write_text(json.dumps(summary, indent=2))


def create_app(
    config: AppConfig,
    *,
    model: EmotionModel | None = None,
    asr: SpeechToText | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> App:
    """Build the service (models loaded now, nothing bound yet): `await app.start()` to serve."""
    return App(config, model=model, asr=asr, clock=clock)
