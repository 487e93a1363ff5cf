"""/v1/twilio: Twilio Media Streams. One session per call (id = callSid), one channel per track
(inbound: the caller, outbound: what the platform plays), both in one dialogue context; μ-law is
decoded by streamer.calls.telephony. Events go to subscribers, not back to Twilio (it reads media only)."""

from __future__ import annotations

import json
import logging

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from streamer.routes import auth
from streamer import protocol as P
from streamer.events.fanout import Subscriber
from streamer.pipeline.runner import SessionRunner
from streamer.pipeline.session import PcmDecoder, SeqCounter
from streamer.calls.telephony import MULAW_RATE, TwilioError, TwilioStart, parse_media, parse_start
from streamer.routes.host import SessionHost, refusal_close_reason


log = logging.getLogger("streamer")


async def twilio_connection(app: SessionHost, ws: ServerConnection, sub: Subscriber) -> None:
    """Twilio Media Streams: one session per call (id = callSid), one channel per track, both in
    one dialogue context. Events go to subscribers, not back to Twilio (it reads media only).
    One loop over Twilio's event kinds, as in its docs."""
    runner: SessionRunner | None = None
    tracks: dict[str, tuple[int, PcmDecoder]] = {}
    assert ws.request is not None
    handshake_token = auth.request_token(ws.request.path, ws.request.headers.get("Authorization"))

    def problem(message: str) -> None:
        app.metrics.inc("emostream_errors_total")
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
                    if await _refused(app, ws, start, handshake_token):
                        break
                    if start.call_sid in app.sessions:
                        problem(f"call {start.call_sid} is live already")
                        break
                    tracks = {t: (i, PcmDecoder(MULAW_RATE, 1)) for i, t in enumerate(start.tracks)}
                    runner = _start_call(app, start)
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


async def _refused(app: SessionHost, ws: ServerConnection, start: TwilioStart, handshake_token: str | None) -> bool:
    """Close the stream when the call may not start: no valid token (in the handshake or the
    start's customParameters), or the service past capacity (the same admission as /v1/stream)."""
    if not (auth.token_allows(app.config.auth, handshake_token, auth.SOURCE)
            or auth.token_allows(app.config.auth, start.custom_parameters.get("token"), auth.SOURCE)):
        app.metrics.inc("emostream_auth_refused_total")
        log.warning("twilio: call %s refused: no valid token", start.call_sid)
        await ws.close(P.CLOSE_POLICY, "missing or unknown API token")
        return True
    refused = app.admission_problem()
    if refused is not None:
        app.metrics.inc("emostream_overloaded_total")
        log.warning("twilio: call %s refused: %s", start.call_sid, refused)
        await ws.close(P.CLOSE_TRY_AGAIN, refusal_close_reason(refused))
        return True
    return False


def _start_call(app: SessionHost, start: TwilioStart) -> SessionRunner:
    """The call's session: one speaker channel per track, its Twilio ids in the metadata."""
    calls = app.config.calls
    names = {"inbound": calls.inbound_speaker, "outbound": calls.outbound_speaker}
    speakers = [names[t] for t in start.tracks]
    runner = app.new_runner(start.call_sid, SeqCounter(), "twilio", speakers)
    runner.publish(P.SESSION_STARTED, sample_rate=MULAW_RATE, encoding="mulaw", channels=len(speakers),
                   source="twilio", speakers=speakers, protocol=P.VERSION,
                   metadata={"callSid": start.call_sid, "streamSid": start.stream_sid, "tracks": list(start.tracks),
                             **{k: v for k, v in start.custom_parameters.items() if k != "token"}})
    return runner
