"""The asyncio WebSocket service: routes, sessions, fan-out to subscribers, health and metrics.

This layer only moves bytes and events: segmentation lives in Session/Segmenter (synchronous),
models live on the InferenceEngine's thread. `create_app(config)` builds everything; tests pass a
tiny model, a shared Whisper, and port 0.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from model import EmotionModel, load_checkpoint
from streamer import protocol as P
from streamer.alerts import AlertEngine, load_rules
from streamer.config import AppConfig
from streamer.inference import Analysis, InferenceEngine, Overloaded, SpeechToText
from streamer.metrics import Metrics
from streamer.segmenter import SpeechEnded, SpeechPaused, SpeechResumed, SpeechStarted
from streamer.static_files import set_header, static_response
from streamer.summary import CallSummary
from streamer.telephony import MULAW_RATE, TwilioError, parse_media, parse_start
from streamer.webhook import WebhookSender
from streamer.session import PcmDecoder, SeqCounter, Session

log = logging.getLogger("streamer")


# ---- fan-out ----------------------------------------------------------------------------------
class Subscriber:
    """One socket's outgoing events: a bounded queue drained by a writer task. Overflow drops it."""

    def __init__(self, ws: ServerConnection, maxsize: int, metrics: Metrics) -> None:
        self.ws = ws
        self.queue: asyncio.Queue[str | tuple[int, str]] = asyncio.Queue(maxsize)
        self.metrics = metrics
        self.dropped = False
        self.task = asyncio.create_task(self._write())

    def offer(self, text: str) -> None:
        if self.dropped:
            return
        try:
            self.queue.put_nowait(text)
        except asyncio.QueueFull:
            self.dropped = True
            self.metrics.inc("emostream_subscribers_dropped_total")
            self.task.cancel()
            asyncio.create_task(self.ws.close(P.CLOSE_POLICY, "subscriber too slow: event queue overflowed"))

    def finish(self, code: int = P.CLOSE_NORMAL, reason: str = "") -> None:
        """Send what is queued, then close with `code`."""
        if self.dropped:
            return
        try:
            self.queue.put_nowait((code, reason))
        except asyncio.QueueFull:
            self.task.cancel()
            asyncio.create_task(self.ws.close(code, reason))

    async def _write(self) -> None:
        try:
            while True:
                item = await self.queue.get()
                if isinstance(item, tuple):
                    await self.ws.close(*item)
                    return
                await self.ws.send(item)
        except ConnectionClosed:
            return


class Hub:
    """session id (or '*') -> subscribers. Publishing never waits on a socket."""

    def __init__(self, metrics: Metrics) -> None:
        self.subs: dict[str, set[Subscriber]] = {}
        self.end_close: tuple[int, str] = (P.CLOSE_NORMAL, "session ended")  # 1001 once shutting down
        self.metrics = metrics

    def add(self, key: str, sub: Subscriber) -> None:
        self.subs.setdefault(key, set()).add(sub)

    def remove(self, key: str, sub: Subscriber) -> None:
        group = self.subs.get(key)
        if group is not None:
            group.discard(sub)
            if not group:
                del self.subs[key]

    def publish(self, ev: dict[str, Any]) -> None:
        text = json.dumps(ev)
        self.metrics.inc("emostream_events_total")
        for key in (ev["session_id"], P.ALL_SESSIONS):
            for sub in list(self.subs.get(key, ())):
                sub.offer(text)
        if ev["type"] == P.SESSION_ENDED:  # a session's own subscribers are done
            for sub in list(self.subs.get(ev["session_id"], ())):
                sub.finish(*self.end_close)


# ---- one session's pipeline -------------------------------------------------------------------
@dataclass(frozen=True)
class Channel:
    """One audio channel of a session with its own segmenter. A phone call has two (one per
    speaker); they share the session's event numbering and one dialogue context, in turn order."""

    number: int
    session: Session
    speaker: str | None = None


@dataclass
class _Pending:
    end: SpeechEnded
    job: Any  # the inference job whose future gives an Analysis
    channel: Channel
    utterance_id: int


class SessionRunner:
    """Drives one Session (one or more channels): segment events -> inference jobs -> events, in
    the order utterances end. Publishes alerts and, at the end, a call summary."""

    def __init__(self, app: App, session: Session, extra: list[Session] | None = None,
                 speakers: list[str] | None = None) -> None:
        self.app = app
        self.session = session  # channel 0: the session's id, event numbering and totals
        sessions = [session, *(extra or [])]
        if speakers is not None and len(speakers) != len(sessions):
            raise ValueError("one speaker name per channel")
        self.channels = [Channel(i, s, speakers[i] if speakers else None) for i, s in enumerate(sessions)]
        self.multi = speakers is not None
        self.context = app.engine.new_context()
        self.summary = CallSummary(session.session_id)
        self._uids: dict[tuple[int, int], int] = {}  # (channel, segmenter index) -> utterance id
        self._speculative: dict[tuple[int, int], Any] = {}  # -> (samples, job) started at SpeechPaused
        self._finish: asyncio.Queue[_Pending | None] = asyncio.Queue()
        self._finisher = asyncio.create_task(self._finish_loop())
        self._close_task: asyncio.Task[None] | None = None
        self.closing = False

    def publish(self, type_: str, **fields: Any) -> None:
        ev = self.session.event(type_, **fields)
        self.app.hub.publish(ev)
        self.summary.add(ev)
        if type_ == P.EMOTION and self.app.alerts is not None:
            for alert in self.app.alerts.evaluate(ev):
                self.app.metrics.inc("emostream_alerts_total")
                self.publish(P.ALERT, **alert)
                if self.app.webhook is not None:
                    self.app.webhook.send({"type": P.ALERT, "session_id": self.session.session_id, **alert})

    def error(self, code: str, message: str) -> None:
        self.app.metrics.inc("emostream_errors_total")
        self.publish(P.ERROR, **P.error_fields(code, message))

    def audio(self, samples: np.ndarray, channel: int = 0) -> None:
        """Feed 16 kHz float32 samples of one channel (on the event loop; VAD ~0.1 ms per 32 ms)."""
        if self.closing or samples.size == 0:
            return
        ch = self.channels[channel]
        self._handle(ch.session.feed(samples), ch)

    def _who(self, ch: Channel) -> dict[str, Any]:
        return {"speaker": ch.speaker, "channel": ch.number} if self.multi else {}

    def _uid(self, ch: Channel, index: int) -> int:
        key = (ch.number, index)
        if key not in self._uids:
            self._uids[key] = len(self._uids)
        return self._uids[key]

    def _handle(self, events: list[Any], ch: Channel) -> None:
        engine, metrics = self.app.engine, self.app.metrics
        for ev in events:
            uid = self._uid(ch, ev.index)
            if isinstance(ev, SpeechStarted):
                self.publish(P.UTTERANCE_STARTED, utterance_id=uid, start_s=round(ev.start_s, 3), **self._who(ch))
            elif isinstance(ev, SpeechPaused):
                try:
                    self._speculative[(ch.number, ev.index)] = (len(ev.audio), engine.analyze(ev.audio))
                    metrics.inc("emostream_speculative_decodes_total")
                except Overloaded:
                    pass  # the decode will be requested again when the utterance ends
            elif isinstance(ev, SpeechResumed):
                spec = self._speculative.pop((ch.number, ev.index), None)
                if spec is not None:
                    spec[1].abandoned = True
                    metrics.inc("emostream_speculative_wasted_total")
            elif isinstance(ev, SpeechEnded):
                metrics.inc("emostream_utterances_total")
                self.session.utterances += 1
                self.publish(
                    P.UTTERANCE_ENDED, utterance_id=uid, start_s=round(ev.start_s, 3),
                    end_s=round(ev.end_s, 3), reason=ev.reason, **self._who(ch),
                )
                spec = self._speculative.pop((ch.number, ev.index), None)
                if spec is not None and spec[0] == len(ev.audio):
                    job = spec[1]  # the speculative decode saw exactly this audio
                else:
                    if spec is not None:
                        spec[1].abandoned = True
                    try:
                        job = engine.analyze(ev.audio)
                    except Overloaded as e:
                        self.error(P.E_OVERLOADED, f"utterance {uid} skipped: {e}")
                        continue
                self._finish.put_nowait(_Pending(ev, job, ch, uid))

    async def _finish_loop(self) -> None:
        """Publish transcript, emotion (and revision) for each ended utterance, in order."""
        while True:
            item = await self._finish.get()
            if item is None:
                return
            ev, uid, who = item.end, item.utterance_id, self._who(item.channel)
            try:
                analysis: Analysis = await item.job.future
                self.publish(P.TRANSCRIPT, utterance_id=uid, text=analysis.transcript.text, **who)
                scored = await self.app.engine.predict(self.context, uid, analysis.encoded)
            except asyncio.CancelledError:
                if not item.job.future.cancelled():
                    raise  # this task itself is being cancelled
                self.error(P.E_INTERNAL, f"utterance {uid}: decode was cancelled")
                continue
            except Overloaded as e:
                self.error(P.E_OVERLOADED, f"utterance {uid} skipped: {e}")
                continue
            except Exception as e:  # a model failure skips this utterance, never the session
                log.exception("utterance %s of %s failed", uid, self.session.session_id)
                self.error(P.E_INTERNAL, f"utterance {uid} failed: {type(e).__name__}: {e}")
                continue
            latency = item.channel.session.latency_ms(ev.end_s)
            self.app.metrics.latency_seconds.observe(latency / 1000)
            pred = scored.prediction
            self.publish(
                P.EMOTION, utterance_id=uid, label=pred.label, scores=pred.scores,
                modality_weights=pred.modality_weights, latency_ms=latency,
                asr_ms=round(analysis.asr_s * 1000, 1), text_masked=not analysis.transcript.text, **who,
            )
            if scored.revised is not None:
                r = scored.revised
                rwho = self._who(self.channels[self._channel_of(scored.revised_id)]) if self.multi else {}
                self.publish(
                    P.EMOTION_REVISED, utterance_id=scored.revised_id, label=r.label, scores=r.scores,
                    modality_weights=r.modality_weights, revised_with=uid, **rwho,
                )

    def _channel_of(self, uid: int) -> int:
        return next((ch for (ch, _), u in self._uids.items() if u == uid), 0)

    def close(self) -> asyncio.Task[None]:
        """End of input: flush the open utterances, finish every utterance, publish session.ended."""
        if self._close_task is None:
            self._close_task = asyncio.create_task(self._close())
        return self._close_task

    async def _close(self) -> None:
        self.closing = True
        for ch in self.channels:
            self._handle(ch.session.flush(), ch)
        self._finish.put_nowait(None)
        await self._finisher
        self.session.ended = True
        summary = self.summary.to_dict()
        self.publish(P.CALL_SUMMARY, **{k: v for k, v in summary.items() if k != "session_id"})
        self.app.save_summary(summary)
        if self.app.webhook is not None:
            self.app.webhook.send({"type": P.CALL_SUMMARY, **summary})
        if self.app.alerts is not None:
            self.app.alerts.forget(self.session.session_id)
        self.publish(P.SESSION_ENDED, utterances=self.session.utterances)
        self.app.sessions.pop(self.session.session_id, None)


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
        self.metrics = Metrics()
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
        self.hub = Hub(self.metrics)
        self.sessions: dict[str, SessionRunner] = {}
        self.connections: set[Subscriber] = set()
        self.server: Server | None = None
        self.started_at = clock()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._shutdown: asyncio.Task[None] | None = None
        self.metrics.gauge("emostream_sessions_active", "live sessions", lambda: len(self.sessions))
        self.metrics.gauge("emostream_subscribers", "open event sockets", lambda: len(self.connections))
        self.metrics.gauge("emostream_inference_queue_depth", "jobs waiting for the inference thread", lambda: self.engine.depth)

    # ---- lifecycle ----
    async def start(self) -> None:
        self.engine.start()
        if self.webhook is not None:
            self.webhook.start()
        sc = self.config.server
        self.server = await serve(
            self._handler, sc.host, sc.port,
            process_request=self._process_request,
            max_size=self.config.limits.max_message_bytes,
            max_queue=sc.max_incoming_queue,
            ping_interval=sc.ping_interval_s,
        )

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        return f"ws://{self.config.server.host}:{self.port}"

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
        if self.webhook is not None:
            try:
                await self.webhook.drain(timeout=10)
            except asyncio.TimeoutError:
                log.warning("webhook: %d payloads undelivered at shutdown", self.webhook.queue.qsize())
            await self.webhook.stop()

    async def wait_closed(self) -> None:
        assert self.server is not None
        await self.server.wait_closed()

    # ---- HTTP ----
    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        path = urlsplit(request.path).path
        if path == P.HEALTH_PATH:
            resp = connection.respond(HTTPStatus.OK, json.dumps(self.health()) + "\n")
            set_header(resp, "Content-Type", "application/json")
            return resp
        if path == P.METRICS_PATH:
            resp = connection.respond(HTTPStatus.OK, self.metrics.render())
            set_header(resp, "Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            return resp
        static = static_response(connection, path)
        if static is not None:  # the browser dashboard
            return static
        if path not in (P.STREAM_PATH, P.SUBSCRIBE_PATH, P.TWILIO_PATH):
            return connection.respond(HTTPStatus.NOT_FOUND, f"no route {path}; see docs/protocol.md\n")
        if self._shutdown is not None:
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "shutting down\n")
        return None

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok" if self._shutdown is None else "shutting_down",
            "protocol": P.VERSION,
            "sessions": len(self.sessions),
            "subscribers": len(self.connections),
            "inference_queue": self.engine.depth,
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
                await self._subscribe(ws, sub, parse_qs(url.query).get("session", [P.ALL_SESSIONS])[0])
        finally:
            self.connections.discard(sub)

    async def _subscribe(self, ws: ServerConnection, sub: Subscriber, key: str) -> None:
        self.hub.add(key, sub)
        try:
            async for _ in ws:  # subscribers have nothing to say; their frames are ignored
                pass
        except ConnectionClosed:
            pass
        finally:
            self.hub.remove(key, sub)
            await sub.task

    async def _stream(self, ws: ServerConnection, sub: Subscriber) -> None:
        seq = SeqCounter()
        runner: SessionRunner | None = None
        decoder: PcmDecoder | None = None
        split: list[PcmDecoder] = []  # per-channel decoders when the start names speakers

        def reply_error(code: str, message: str) -> None:
            self.metrics.inc("emostream_errors_total")
            if runner is not None:
                runner.error(code, message)
            else:
                sub.offer(json.dumps(P.event(P.ERROR, None, seq.next(), **P.error_fields(code, message))))  # type: ignore[arg-type]

        try:
            async for msg in ws:
                if isinstance(msg, bytes):
                    if runner is None or decoder is None:
                        reply_error(P.E_NOT_STARTED, "audio before a successful start message; send start first")
                        continue
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
                    continue
                try:
                    obj = json.loads(msg)
                except json.JSONDecodeError as e:
                    reply_error(P.E_BAD_JSON, f"text frames must be JSON objects ({e.msg} at {e.pos})")
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
                    if sid in self.sessions:
                        reply_error(P.E_SESSION_EXISTS, f"session {sid!r} is live already; pick another session_id")
                        continue
                    if len(self.sessions) >= self.config.server.max_sessions or self._shutdown is not None:
                        reply_error(P.E_OVERLOADED, f"{len(self.sessions)} sessions live (limit {self.config.server.max_sessions})")
                        sub.finish(P.CLOSE_TRY_AGAIN, "too many sessions")
                        break
                    decoder = PcmDecoder(start.sample_rate, start.channels)
                    if start.speakers:  # channels kept apart: one decoder and segmenter each
                        split = [PcmDecoder(start.sample_rate, 1) for _ in start.speakers]
                    self.hub.add(sid, sub)
                    runner = self._new_runner(sid, seq, "websocket", start.speakers)
                    runner.publish(
                        P.SESSION_STARTED, sample_rate=start.sample_rate, encoding=start.encoding,
                        channels=start.channels, language=start.language, metadata=start.metadata, protocol=P.VERSION,
                    )
                elif mtype == P.STOP:
                    if runner is None:
                        reply_error(P.E_NOT_STARTED, "stop before a successful start")
                        continue
                    break
                else:
                    reply_error(P.E_UNKNOWN_TYPE, f"unknown message type {mtype!r}; expected 'start' or 'stop'")
        except ConnectionClosed:
            pass  # a vanished client still gets its last utterance processed (for subscribers)
        finally:
            if runner is not None:
                if split:
                    for c, dec in enumerate(split):
                        runner.audio(dec.flush(), c)
                elif decoder is not None:
                    runner.audio(decoder.flush())
                await runner.close()
                self.hub.remove(runner.session.session_id, sub)
            if self._shutdown is None:
                sub.finish(P.CLOSE_NORMAL, "session ended" if runner is not None else "")
            await sub.task

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
                   speakers: list[str] | None = None) -> asyncio.Task[None]:
        """Run a server-side session fed by `chunks` (16 kHz float32); subscribers see it via '*'.
        With `speakers`, chunks are (channels, n) and each channel is its own speaker."""

        async def run() -> None:
            runner = self._new_runner(session_id, SeqCounter(), source, speakers)
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
                                                 "tracks": list(start.tracks), **start.custom_parameters})
                    elif kind == "stop":
                        break
                    elif kind not in ("connected", "mark", "dtmf", "start"):
                        problem(f"unknown Twilio event {kind!r}")
                except (json.JSONDecodeError, TwilioError) as e:
                    problem(str(e))
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
