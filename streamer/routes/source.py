"""/v1/stream: one source connection — a `start` (or a resume), binary PCM frames, a `stop` — with
one handler per message kind. Its events go back on the same socket (its Subscriber); errors are
`error` events and the session goes on. The App owns the sessions, admission and the hub."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import numpy as np
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from streamer import protocol as P
from streamer.events.fanout import Subscriber
from streamer.infer.voice import available as voice_available
from streamer.pipeline.runner import SessionRunner
from streamer.pipeline.session import PcmDecoder, SeqCounter
from streamer.routes.subscribe import attach
from streamer.routes.host import SessionHost, refusal_close_reason



class SourceConnection:
    """One /v1/stream socket from connect to close. Each handler returns True when the input ends."""

    def __init__(self, app: SessionHost, ws: ServerConnection, sub: Subscriber) -> None:
        self.app, self.ws, self.sub = app, ws, sub
        self.limits = app.config.server
        self.seq = SeqCounter()  # numbers errors sent before a session exists too
        self.runner: SessionRunner | None = None
        self.decoder: PcmDecoder | None = None
        self.split: list[PcmDecoder] = []  # per-channel decoders when the start names speakers
        self.stopped = False  # a `stop` (or a limit) ended the input: no resume grace
        self.received_s, self.t_start = 0.0, app.clock()  # audio seconds on this connection, for throttling

    async def run(self) -> None:
        try:
            while True:
                try:
                    msg = await asyncio.wait_for(self.ws.recv(), self.limits.idle_timeout_s)
                except asyncio.TimeoutError:
                    if self.runner is not None:
                        self.reply_error(P.E_IDLE_TIMEOUT, f"no audio for {self.limits.idle_timeout_s:g} s: session ended")
                        self.stopped = True
                    break
                if await self.on_audio(msg) if isinstance(msg, bytes) else self.on_text(msg):
                    break
        except ConnectionClosed:
            pass  # dropped: the session waits resume_grace_s for the source to come back, then finishes
        finally:
            await self.finish()

    def reply_error(self, code: str, message: str) -> None:
        self.app.metrics.inc("emostream_errors_total")
        if self.runner is not None:
            self.runner.error(code, message)
        else:
            self.sub.offer(json.dumps(P.event(P.ERROR, None, self.seq.next(), **P.error_fields(code, message))))  # type: ignore[arg-type]

    # ---- binary frames ----
    async def on_audio(self, msg: bytes) -> bool:
        runner, decoder, sc = self.runner, self.decoder, self.limits
        if runner is None or decoder is None:
            self.reply_error(P.E_NOT_STARTED, "audio before a successful start message; send start first")
            return False
        self.received_s += len(msg) / decoder.bytes_per_frame / decoder.sample_rate
        ahead = self.received_s - sc.realtime_burst_s - (self.app.clock() - self.t_start) * sc.max_realtime_factor
        if ahead > 0:  # faster than the limit: stop reading for a while (TCP back-pressure)
            self.app.metrics.inc("emostream_throttled_total")
            await asyncio.sleep(ahead / sc.max_realtime_factor)
        if self.split:
            usable = len(msg) - len(msg) % decoder.bytes_per_frame
            frames = np.frombuffer(msg[:usable], dtype="<i2").reshape(-1, len(self.split))
            for c, dec in enumerate(self.split):
                runner.audio(dec.decode(frames[:, c].tobytes())[0], c)
            dropped = len(msg) - usable
        else:
            samples, dropped = decoder.decode(msg)
            runner.audio(samples)
        if dropped:
            self.reply_error(P.E_ODD_BYTES, f"binary frame of {len(msg)} bytes is not a whole number of "
                             f"{decoder.bytes_per_frame}-byte sample frames; the last {dropped} bytes were dropped")
        if runner.position_s > sc.max_session_s:
            self.reply_error(P.E_SESSION_TOO_LONG, f"session reached {sc.max_session_s:g} s of audio: ended")
            self.stopped = True
            return True
        return False

    # ---- text frames ----
    def on_text(self, msg: str) -> bool:
        try:
            obj = json.loads(msg)
        except json.JSONDecodeError as e:
            self.reply_error(P.E_BAD_JSON, f"text frames must be JSON objects ({e.msg} at {e.pos})")
            return False
        except RecursionError:
            self.reply_error(P.E_BAD_JSON, "text frames must be JSON objects (nested too deeply)")
            return False
        if not isinstance(obj, dict):
            self.reply_error(P.E_BAD_JSON, "text frames must be JSON objects")
            return False
        mtype = obj.get("type")
        if mtype == P.START:
            return self.on_start(obj)
        if mtype == P.STOP:
            return self.on_stop()
        self.reply_error(P.E_UNKNOWN_TYPE, f"unknown message type {mtype!r}; expected 'start' or 'stop'")
        return False

    def on_start(self, obj: dict[str, Any]) -> bool:
        """A new session, or the resume of a dropped one (its session_id and after_seq)."""
        app = self.app
        if self.runner is not None:
            self.reply_error(P.E_ALREADY_STARTED, f"session {self.runner.session.session_id} already started on this socket")
            return False
        try:
            start = P.StartMessage.from_dict(obj)
        except ValueError as e:
            self.reply_error(P.E_BAD_START, str(e))
            return False
        problem = app.config.limits.format_problem(start.encoding, start.sample_rate, start.channels)
        if start.diarize and problem is None and not voice_available():
            self.reply_error(P.E_BAD_START, "diarize is not available on this server (resemblyzer is not installed); "
                             "start without it")
            return False
        if problem:
            self.reply_error(P.E_UNSUPPORTED_FORMAT, problem)
            return False
        sid = start.session_id or uuid.uuid4().hex[:12]
        live = app.sessions.get(sid)
        if live is not None and not (live.detached and start.after_seq is not None):
            self.reply_error(P.E_SESSION_EXISTS, f"session {sid!r} is live already; pick another session_id "
                             "(a dropped source resumes with its session_id and after_seq)")
            return False
        refused = app.admission_problem() if live is None else None
        if refused is not None:
            app.metrics.inc("emostream_overloaded_total")
            self.reply_error(P.E_OVERLOADED, refused)
            self.sub.finish(P.CLOSE_TRY_AGAIN, refusal_close_reason(refused))
            return True
        self.decoder = PcmDecoder(start.sample_rate, start.channels)
        if start.speakers:  # channels kept apart: one decoder and segmenter each
            self.split = [PcmDecoder(start.sample_rate, 1) for _ in start.speakers]
        self.received_s, self.t_start = 0.0, app.clock()
        self.sub.interim = start.interim
        if live is not None:  # resume: the same pipeline, the events it missed, then live ones
            self.runner = live
            live.reattach()
            live.interim, live.words = start.interim, start.word_timestamps
            attach(app, self.sub, sid, start.after_seq)
            live.publish(P.SESSION_RESUMED, after_seq=start.after_seq, sample_rate=start.sample_rate,
                         channels=start.channels)
            return False
        app.hub.add(sid, self.sub)
        runner = self.runner = app.new_runner(sid, self.seq, "websocket", start.speakers)
        runner.interim, runner.words = start.interim, start.word_timestamps
        if start.diarize:  # one channel, several people: label the speakers (never with `speakers`: refused above)
            runner.diarize(start.max_speakers)
        runner.publish(
            P.SESSION_STARTED, sample_rate=start.sample_rate, encoding=start.encoding,
            channels=start.channels, language=start.language, metadata=start.metadata, protocol=P.VERSION,
            **({"speakers": start.speakers} if start.speakers else {}),
            **({"diarize": True, "max_speakers": start.max_speakers} if start.diarize else {}),
        )
        return False

    def on_stop(self) -> bool:
        if self.runner is None:
            self.reply_error(P.E_NOT_STARTED, "stop before a successful start")
            return False
        self.stopped = True
        return True

    # ---- the end ----
    async def finish(self) -> None:
        """Flush the decoders; close the session (after `stop`, a limit or at shutdown: this socket
        still gets the last events) or keep it for resume_grace_s (a dropped source)."""
        runner, app = self.runner, self.app
        if runner is not None:
            if self.split:
                for c, dec in enumerate(self.split):
                    runner.audio(dec.flush(), c)
            elif self.decoder is not None:
                runner.audio(self.decoder.flush())
            if self.stopped or self.limits.resume_grace_s <= 0 or app.shutting_down:
                await runner.close()
            else:
                runner.detach(self.limits.resume_grace_s)
            app.hub.remove(runner.session.session_id, self.sub)
        if not app.shutting_down:
            self.sub.finish(P.CLOSE_NORMAL, "session ended" if runner is not None else "")
        await self.sub.task
