"""Protocol v1: every message type, path, error code and close code, defined once.

Clients import this module (it needs only the standard library). See docs/protocol.md.

Client -> server on /v1/stream: a `start` text frame, binary PCM frames, a `stop` text frame.
Server -> client (and to subscribers on /v1/subscribe?session=ID|*): JSON event text frames, each
with `type`, `session_id`, `seq` (per session, strictly increasing) and, where it applies,
`utterance_id`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

VERSION = 1
STREAM_PATH = "/v1/stream"
TWILIO_PATH = "/v1/twilio"  # Twilio Media Streams (mu-law 8 kHz, inbound/outbound tracks)
SUBSCRIBE_PATH = "/v1/subscribe"
LISTEN_PATH = "/v1/listen"  # Deepgram-compatible live endpoint (streamer/routes/listen.py)
HEALTH_PATH = "/healthz"
METRICS_PATH = "/metrics"
ALL_SESSIONS = "*"

# client -> server message types
START = "start"
STOP = "stop"

# server -> client event types
SESSION_STARTED = "session.started"
UTTERANCE_STARTED = "utterance.started"
UTTERANCE_ENDED = "utterance.ended"
TRANSCRIPT = "transcript"
EMOTION = "emotion"
EMOTION_REVISED = "emotion.revised"
ERROR = "error"
SESSION_ENDED = "session.ended"
SESSION_RESUMED = "session.resumed"  # a dropped source reconnected within the grace period
ALERT = "alert"  # an alert rule fired (calls): rule, severity, speaker, message
CALL_SUMMARY = "call.summary"  # just before session.ended: per-speaker distribution, timeline, peaks, alerts
# interim results (opt-in: `"interim": true` in start, `interim=1` on /v1/subscribe): while someone is
# still speaking, the text so far and, for long utterances, an emotion from the speech so far. Each is
# superseded by the utterance's final `transcript` / `emotion`; they are not stored or replayed.
TRANSCRIPT_PARTIAL = "transcript.partial"
EMOTION_PARTIAL = "emotion.partial"
INTERIM_TYPES = (TRANSCRIPT_PARTIAL, EMOTION_PARTIAL)
# speakers within one channel (opt-in: `"diarize": true` in start): transcript, emotion and
# emotion.revised carry `speaker` ("S1", "S2", ... in order of first appearance); when more of the
# conversation moves an earlier utterance to another speaker, a speaker.revised says so
SPEAKER_REVISED = "speaker.revised"
MAX_SPEAKERS = 16  # the largest `max_speakers` a start may ask for
# `confidence` of emotion, emotion.partial and emotion.revised (added within v1: older servers omit it):
# "low" when the calibrated top score is below the service's threshold (default 0.5, --low-confidence)
LOW_CONFIDENCE = "low"
LOW_CONFIDENCE_NOTE = " (low confidence)"  # what the terminal views print after such a label
OK_CONFIDENCE = "ok"
# `familiar_voice` of the same events (added within v1; absent when not known): false when the
# utterance's voice is unlike the speech the model learned from; a prediction that leaned on such a
# voice (speech weight >= 0.5) is marked low confidence whatever its score
UNFAMILIAR_VOICE_NOTE = " (low confidence: unfamiliar voice)"


def confidence_note(ev: dict) -> str:
    """What a terminal view prints after an emotion's label: '' when confident, else why not."""
    if ev.get("confidence") != LOW_CONFIDENCE:
        return ""
    return UNFAMILIAR_VOICE_NOTE if ev.get("familiar_voice") is False else LOW_CONFIDENCE_NOTE


EVENT_TYPES = (
    SESSION_STARTED, UTTERANCE_STARTED, UTTERANCE_ENDED, TRANSCRIPT, EMOTION, EMOTION_REVISED, ERROR, SESSION_ENDED,
    SESSION_RESUMED, ALERT, CALL_SUMMARY, TRANSCRIPT_PARTIAL, EMOTION_PARTIAL, SPEAKER_REVISED,
)

# error codes (the `code` of an `error` event)
E_BAD_JSON = "bad_json"  # a text frame that is not a JSON object
E_UNKNOWN_TYPE = "unknown_type"  # a JSON message whose type is not start/stop
E_BAD_START = "bad_start"  # a start message with missing or invalid fields
E_UNSUPPORTED_FORMAT = "unsupported_format"  # encoding, sample rate or channel count not served
E_NOT_STARTED = "not_started"  # audio or stop before a successful start
E_ALREADY_STARTED = "already_started"  # a second start on the same socket
E_ODD_BYTES = "odd_byte_count"  # a binary frame that is not a whole number of samples
E_SESSION_EXISTS = "session_exists"  # the requested session_id is live already
E_OVERLOADED = "overloaded"  # too many sessions, or the inference queue is full
E_INTERNAL = "internal"  # a bug or a failed model call; the utterance is skipped
E_IDLE_TIMEOUT = "idle_timeout"  # a source sent nothing for too long; its session is ended
E_SESSION_TOO_LONG = "session_too_long"  # a session reached its maximum audio length; it is ended
E_REPLAY_GAP = "replay_gap"  # events after `after_seq` are no longer buffered; live events follow
E_BAD_REQUEST = "bad_request"  # an invalid query parameter (e.g. after_seq)

# WebSocket close codes
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001  # server shutdown
CLOSE_POLICY = 1008  # a subscriber too slow to keep up with its queue
CLOSE_TOO_BIG = 1009  # a frame over the size limit
CLOSE_TRY_AGAIN = 1013  # too many sessions


@dataclass(frozen=True)
class StartMessage:
    """{"type":"start","sample_rate":16000,"encoding":"pcm_s16le","channels":1, ...optional}"""

    sample_rate: int = 16_000
    encoding: str = "pcm_s16le"
    channels: int = 1
    session_id: str | None = None
    language: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    speakers: list[str] | None = None  # one name per channel: channels are kept apart, not downmixed
    after_seq: int | None = None  # resume: reattach to a dropped session_id, replaying events after this seq
    interim: bool = False  # also send transcript.partial / emotion.partial while someone speaks
    word_timestamps: bool = False  # final transcripts carry `words` (start_s, end_s, probability each)
    diarize: bool = False  # one channel, several people: label each utterance's speaker (S1, S2, ...)
    max_speakers: int | None = None  # with diarize: at most this many speakers (1-16); None: any number

    def to_json(self) -> str:
        d: dict[str, Any] = {"type": START, **asdict(self)}
        return json.dumps({k: v for k, v in d.items() if v is not None and v != {} and v is not False})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StartMessage":
        """Validate the shape of a start message; raises ValueError with a readable reason."""
        unknown = set(d) - {"type", "sample_rate", "encoding", "channels", "session_id", "language", "metadata", "speakers",
                            "after_seq", "interim", "word_timestamps", "diarize", "max_speakers"}
        if unknown:
            raise ValueError(f"unknown start fields: {sorted(unknown)}")
        rate, enc, ch = d.get("sample_rate"), d.get("encoding", "pcm_s16le"), d.get("channels", 1)
        if not isinstance(rate, int) or isinstance(rate, bool):
            raise ValueError("sample_rate must be an integer (Hz)")
        if not isinstance(enc, str):
            raise ValueError("encoding must be a string")
        if not isinstance(ch, int) or isinstance(ch, bool):
            raise ValueError("channels must be an integer")
        sid = d.get("session_id")
        if sid is not None and (not isinstance(sid, str) or not 1 <= len(sid) <= 128 or sid == ALL_SESSIONS):
            raise ValueError("session_id must be a string of 1-128 characters other than '*'")
        lang = d.get("language")
        if lang is not None and not isinstance(lang, str):
            raise ValueError("language must be a string")
        meta = d.get("metadata", {})
        if not isinstance(meta, dict):
            raise ValueError("metadata must be an object")
        speakers = d.get("speakers")
        if speakers is not None and (
            not isinstance(speakers, list) or len(speakers) != ch
            or not all(isinstance(x, str) and 1 <= len(x) <= 64 for x in speakers) or len(set(speakers)) != len(speakers)
        ):
            raise ValueError("speakers must list one distinct name (1-64 characters) per channel")
        after = d.get("after_seq")
        if after is not None and (not isinstance(after, int) or isinstance(after, bool) or after < -1 or sid is None):
            raise ValueError("after_seq must be an integer >= -1, sent with the session_id to resume")
        flags = {k: d.get(k, False) for k in ("interim", "word_timestamps", "diarize")}
        for k, v in flags.items():
            if not isinstance(v, bool):
                raise ValueError(f"{k} must be true or false")
        if flags["diarize"] and speakers is not None:
            raise ValueError("diarize labels the speakers of one channel; with `speakers` each channel is named "
                             "already: send one or the other")
        most = d.get("max_speakers")
        if most is not None and (not isinstance(most, int) or isinstance(most, bool) or not 1 <= most <= MAX_SPEAKERS
                                 or not flags["diarize"]):
            raise ValueError(f"max_speakers must be an integer 1-{MAX_SPEAKERS}, sent with diarize: true")
        return cls(sample_rate=rate, encoding=enc, channels=ch, session_id=sid, language=lang, metadata=meta,
                   speakers=speakers, after_seq=after, max_speakers=most, **flags)


STOP_MESSAGE = json.dumps({"type": STOP})


def event(type_: str, session_id: str, seq: int, **fields: Any) -> dict[str, Any]:
    """An event as sent on the wire (a dict; json.dumps it)."""
    if type_ not in EVENT_TYPES:
        raise ValueError(f"unknown event type {type_!r}")
    return {"type": type_, "session_id": session_id, "seq": seq, **fields}


def error_fields(code: str, message: str) -> dict[str, Any]:
    return {"code": code, "message": message}
