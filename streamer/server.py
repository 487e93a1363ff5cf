"""The App: wires the parts of the service together, starts the WebSocket server, hands each
connection to its route (streamer/routes/: source.py /v1/stream, subscribe.py /v1/subscribe,
twilio.py /v1/twilio, listen.py /v1/listen, dispatched by websockets' router; http.py the plain
HTTP ones, on werkzeug's), admits sessions, reports health, and shuts down finishing the utterances
in flight.

It only moves bytes and events: a session's pipeline is pipeline.runner.SessionRunner (segmentation
in pipeline.session/segmenter, synchronous), fan-out and replay are events.fanout.Hub, the models
run on the inference engine's threads (infer/). `create_app(config)` builds everything; tests pass a
tiny model, a shared Whisper, and port 0.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import ssl
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
from websockets.asyncio.router import route
from websockets.asyncio.server import Server

from model import EmotionModel, load_checkpoint
from streamer.routes import auth
from streamer import protocol as P
from streamer.calls.alerts import AlertEngine, load_rules
from streamer.calls.observers import AlertObserver, SummaryObserver
from streamer.events.bus import make_bus
from streamer.config import AppConfig
from streamer.routes.auth import AuthConfig
from streamer.infer.backend import InferenceBackend, SpeechToText
from streamer.infer.engine import InferenceEngine
from streamer.infer.remote import RemoteInferenceEngine
from streamer.infer.voice import VoiceEmbedder
from streamer.memory import tune_allocator
from streamer.metrics import Metrics
from streamer.routes.http import SERVER_NAME, WebSocketRouter, process_request
from streamer.routes.websocket import websocket_routes
from streamer.events.store import EventStore
from streamer.calls.webhook import WebhookSender
from streamer.pipeline.session import SeqCounter, Session
from streamer.events.fanout import Hub, Subscriber
from streamer.pipeline.parts import RunnerParts, SessionObserver
from streamer.pipeline.runner import SessionRunner

log = logging.getLogger("streamer")


def ssl_context(a: AuthConfig) -> ssl.SSLContext | None:
    """TLS for the server socket (--certfile/--keyfile), TLS 1.2 at least; None without a certificate."""
    if a.certfile is None:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(a.certfile, a.keyfile)
    return ctx


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
        self.allocator = tune_allocator()  # before the inference threads allocate (streamer/memory.py)
        self.metrics = Metrics()
        self.engine: InferenceBackend
        if config.inference.remote:  # Whisper + text encoder live in streamer.infer.worker processes
            if model is None:
                model = load_checkpoint(config.inference.checkpoint, device=config.inference.device, load_encoder=False)
            self.model, self.asr = model, None
            self.engine = RemoteInferenceEngine(model, config.inference, self.metrics)
        else:
            if model is None:
                model = load_checkpoint(config.inference.checkpoint, device=config.inference.device)
            if asr is None:
                from streamer.infer.transcriber import Transcriber

                asr = Transcriber(config.asr)
            self.model = model
            self.asr = asr
            self.engine = InferenceEngine(model, asr, config.inference, self.metrics)
        calls = config.calls
        self.webhook = WebhookSender(calls.webhook_url, retries=calls.webhook_retries) if calls.webhook_url else None
        observers: list[SessionObserver] = [SummaryObserver(calls.summaries_dir, self.webhook)]
        if calls.alert_rules:
            observers.insert(0, AlertObserver(AlertEngine(load_rules(calls.alert_rules)), self.metrics, self.webhook))
        self.store = EventStore(config.store.path, metrics=self.metrics) if config.store.path else None
        self.bus = make_bus(config.bus, self.metrics, config.server.replay_events)
        self.hub = Hub(self.metrics, self.store, config.server.replay_events, config.server.replay_sessions, self.bus)
        # speakers within one channel (diarize): the voice model loads when a session first asks, or at start
        self.voices = VoiceEmbedder(config.inference.device, config.diarize.max_pending, config.diarize.voice_nice)
        self.sessions: dict[str, SessionRunner] = {}
        # what every session's runner is given (it never sees the App)
        self.parts = RunnerParts(self.engine, self.hub, self.metrics, config, observers, self.voices,
                                 finals_imminent=self.finals_imminent, closed=self._session_closed)
        self.connections: set[Subscriber] = set()
        self.server: Server | None = None
        self.started_at = clock()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._shutdown: asyncio.Task[None] | None = None
        self.metrics.gauge("emostream_sessions_active", "live sessions", lambda: len(self.sessions))
        self.metrics.gauge("emostream_subscribers", "open event sockets", lambda: len(self.connections))
        self.metrics.gauge("emostream_inference_queue_depth", "jobs waiting for the inference threads", lambda: self.engine.depth)
        self.metrics.gauge("emostream_subscriber_queue_max", "events waiting in the fullest subscriber queue",
                           lambda: max((s.queue.qsize() for s in self.connections), default=0))
        self.metrics.gauge("emostream_utterances_pending", "ended utterances waiting for transcript + emotion",
                           lambda: sum(r.pending for r in self.sessions.values()))

    # ---- lifecycle ----
    async def start(self) -> None:
        if self.config.inference.warmup:
            try:
                await asyncio.to_thread(self.engine.warmup)  # before the worker thread owns the models
            except Exception:  # serve anyway: a broken model then fails per utterance, with an error event
                log.exception("model warm-up failed")
        self.engine.start()
        if self.config.diarize.default:  # serve --diarize: the internal sources diarize; load the voice model now
            try:
                await self.voices.preload()
            except Exception:  # serve anyway: diarized utterances then get an error event each, without a speaker
                log.exception("voice encoder failed to load")
        await self.engine.ready()  # remote: the workers' heartbeats read once, so admission is not a guess
        await self.bus.start(self.hub.deliver)
        if self.webhook is not None:
            self.webhook.start()
        sc = self.config.server
        if not self.config.auth.enabled and not auth.is_loopback(sc.host):
            log.warning("SECURITY: serving on %s without API tokens: anyone who can reach this port can stream "
                        "and watch every session. Set --token/--token-file (and TLS with --certfile/--keyfile).", sc.host)
        self.server = await route(
            websocket_routes(self), sc.host, sc.port,
            process_request=functools.partial(process_request, self),  # the HTTP routes, auth, sanity
            create_router=functools.partial(WebSocketRouter, self), server_name=SERVER_NAME,
            max_size=self.config.limits.max_message_bytes,
            max_queue=sc.max_incoming_queue,
            ping_interval=sc.ping_interval_s,
            ssl=ssl_context(self.config.auth),
        )

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        scheme = "wss" if self.config.auth.certfile else "ws"
        return f"{scheme}://{self.config.server.host}:{self.port}"

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
        self.engine.begin_shutdown()  # remote, Redis gone: jobs in flight fail now rather than after remote_timeout_s
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
        await asyncio.to_thread(self.voices.stop)
        await self.engine.aclose()  # remote: its Redis tasks live on this loop
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
    def health(self) -> dict[str, Any]:
        inference = self.engine.status()  # remote: not ok while no worker is alive or Redis is unreachable
        store_failing = self.store is not None and self.store.failing  # events go out live but are not stored
        degraded = store_failing or not inference["ok"]
        return {
            "status": "shutting_down" if self._shutdown is not None else "degraded" if degraded else "ok",
            "protocol": P.VERSION,
            "sessions": len(self.sessions),
            "subscribers": len(self.connections),
            "inference_queue": self.engine.depth,
            "inference": inference,
            "bus": self.bus.status(),
            **({"store": self.store.status()} if self.store is not None else {}),
            "model": {"labels": list(self.model.config.labels), "device": str(self.model.device)},
            "allocator": self.allocator,  # jemalloc | tcmalloc | trim | pinned | glibc (streamer/memory.py)
            "uptime_s": round(self.clock() - self.started_at, 1),
        }

    def finals_imminent(self) -> bool:
        """Some channel of some session is in a pause after speech: its utterance may end soon."""
        return any(r.pausing for r in self.sessions.values())

    def admission_problem(self) -> str | None:
        """Why a new session is refused now (None: admitted). Past capacity the service refuses new
        sessions before the live ones' latency runs away: see ServerConfig.admit_*."""
        sc = self.config.server
        if self._shutdown is not None:
            return "shutting down"
        if len(self.sessions) >= sc.max_sessions:
            return f"{len(self.sessions)} sessions live (limit {sc.max_sessions})"
        down = self.engine.unavailable()  # remote: no worker alive, or Redis unreachable
        if down is not None:
            return f"inference unavailable: {down}; try again later"
        load, wait = self.engine.load(), self.engine.wait_estimate_s()
        if not sc.within_capacity(load, wait):
            return (f"at capacity: decoders busy {load:.0%} of the last 10 s (limit {sc.admit_max_load:.0%}), "
                    f"a new utterance would wait {wait:.1f} s (limit {sc.admit_max_wait_s:g} s); try again later")
        return None

    def new_runner(self, sid: str, seq: SeqCounter, source: str, speakers: list[str] | None = None) -> SessionRunner:
        session = Session(sid, self.config.segmenter, self.clock, seq=seq, source=source)
        extra = [Session(sid, self.config.segmenter, self.clock, seq=seq, source=source) for _ in (speakers or [])[1:]]
        runner = SessionRunner(self.parts, session, extra, speakers)
        self.sessions[sid] = runner
        self.metrics.inc("emostream_sessions_total")
        return runner

    # ---- internal sources (microphone, files) ----
    def add_source(self, session_id: str, chunks: AsyncIterator[np.ndarray], source: str,
                   speakers: list[str] | None = None, interim: bool = False,
                   word_timestamps: bool = False, diarize: bool | None = None) -> asyncio.Task[None]:
        """Run a server-side session fed by `chunks` (16 kHz float32); subscribers see it via '*'.
        With `speakers`, chunks are (channels, n) and each channel is its own speaker; `interim` and
        `word_timestamps` as in a start message; `diarize` too (None: the server's default, serve --diarize;
        never with `speakers`)."""

        async def run() -> None:
            runner = self.new_runner(session_id, SeqCounter(), source, speakers)
            runner.interim, runner.words = interim, word_timestamps
            if (self.config.diarize.default if diarize is None else diarize) and not speakers:
                runner.diarize()
            runner.publish(P.SESSION_STARTED, sample_rate=16_000, encoding="float32", channels=len(speakers or [0]),
                           source=source, protocol=P.VERSION, **({"speakers": speakers} if speakers else {}),
                           **({"diarize": True} if runner.speakers is not None else {}))
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

    def _session_closed(self, session_id: str) -> None:
        self.sessions.pop(session_id, None)


def create_app(
    config: AppConfig,
    *,
    model: EmotionModel | None = None,
    asr: SpeechToText | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> App:
    """Build the service (models loaded now, nothing bound yet): `await app.start()` to serve."""
    return App(config, model=model, asr=asr, clock=clock)
