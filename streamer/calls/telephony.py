"""Telephony media streams: G.711 μ-law decoding and Twilio Media Streams messages.

Twilio sends JSON text frames on the WebSocket: `connected`, then `start` (streamSid, callSid,
tracks, mediaFormat audio/x-mulaw 8000 Hz mono), then many `media` (base64 μ-law payload with
`track` inbound|outbound, `timestamp` ms, `chunk`), optional `mark`, and `stop`. Plain parsing and
decoding only, no I/O.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from typing import Any

import numpy as np

MULAW_RATE = 8_000
TRACKS = ("inbound", "outbound")  # inbound: the caller (customer); outbound: what the call sends (agent)


def _mulaw_table() -> np.ndarray:
    """ITU-T G.711 μ-law byte -> 16-bit linear sample (the classic Sun/CCITT expansion)."""
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    sign = u & 0x80
    exponent = (u >> 4) & 0x07
    mantissa = u & 0x0F
    magnitude = (((mantissa << 3) + 0x84) << exponent) - 0x84
    return np.where(sign != 0, -magnitude, magnitude).astype(np.int16)


MULAW_TO_PCM16 = _mulaw_table()


def mulaw_decode(data: bytes) -> np.ndarray:
    """μ-law bytes -> float32 samples in [-1, 1) at the same rate."""
    return MULAW_TO_PCM16[np.frombuffer(data, dtype=np.uint8)].astype(np.float32) / 32768.0


def mulaw_encode(samples: np.ndarray) -> bytes:
    """float32 [-1, 1] -> μ-law bytes (for tests and simulators): nearest table entry."""
    pcm = np.clip(np.asarray(samples, dtype=np.float32) * 32768.0, -32768, 32767)
    order = np.argsort(MULAW_TO_PCM16)
    table = MULAW_TO_PCM16[order].astype(np.float32)
    idx = np.clip(np.searchsorted(table, pcm), 1, 255)
    nearer_left = (pcm - table[idx - 1]) < (table[idx] - pcm)
    return order[np.where(nearer_left, idx - 1, idx)].astype(np.uint8).tobytes()


class TwilioError(ValueError):
    """A Twilio Media Streams message that is malformed or out of order."""


@dataclass(frozen=True)
class TwilioStart:
    stream_sid: str
    call_sid: str
    tracks: tuple[str, ...]
    encoding: str
    sample_rate: int
    channels: int
    custom_parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TwilioMedia:
    track: str
    timestamp_ms: int
    chunk: int
    audio: np.ndarray  # float32 at 8 kHz


def parse_start(msg: dict[str, Any]) -> TwilioStart:
    start = msg.get("start")
    if not isinstance(start, dict):
        raise TwilioError("start message without a 'start' object")
    fmt = start.get("mediaFormat") or {}
    if not isinstance(fmt, dict):
        raise TwilioError("mediaFormat must be an object")
    call_sid, stream_sid = start.get("callSid"), start.get("streamSid") or msg.get("streamSid")
    if not isinstance(call_sid, str) or not call_sid or not isinstance(stream_sid, str) or not stream_sid:
        raise TwilioError("start needs callSid and streamSid")
    tracks = start.get("tracks") or ["inbound"]
    if not isinstance(tracks, list) or not tracks or any(t not in TRACKS for t in tracks):
        raise TwilioError(f"tracks must be a non-empty subset of {TRACKS}, got {tracks!r}")
    encoding = fmt.get("encoding", "audio/x-mulaw")
    rate, channels = fmt.get("sampleRate", MULAW_RATE), fmt.get("channels", 1)
    if encoding != "audio/x-mulaw" or rate != MULAW_RATE or channels != 1:
        raise TwilioError(f"unsupported media format {encoding} {rate} Hz x{channels}; Twilio sends audio/x-mulaw 8000 Hz mono")
    params = start.get("customParameters") or {}
    return TwilioStart(stream_sid, call_sid, tuple(tracks), encoding, rate, channels,
                       params if isinstance(params, dict) else {})


def parse_media(msg: dict[str, Any]) -> TwilioMedia:
    media = msg.get("media")
    if not isinstance(media, dict) or not isinstance(media.get("payload"), str):
        raise TwilioError("media message without a base64 'payload'")
    track = media.get("track", "inbound")
    if track not in TRACKS:
        raise TwilioError(f"unknown track {track!r}")
    try:
        raw = base64.b64decode(media["payload"], validate=True)
    except (binascii.Error, ValueError) as e:
        raise TwilioError(f"payload is not base64: {e}") from e
    try:
        ts, chunk = int(media.get("timestamp", 0)), int(media.get("chunk", 0))
    except (TypeError, ValueError, OverflowError) as e:  # OverflowError: Infinity
        raise TwilioError("timestamp and chunk must be integers") from e
    return TwilioMedia(track=track, timestamp_ms=ts, chunk=chunk, audio=mulaw_decode(raw))


def media_message(stream_sid: str, track: str, chunk: int, timestamp_ms: int, mulaw: bytes) -> dict[str, Any]:
    """A `media` message as Twilio sends it (used by the simulator and tests)."""
    return {"event": "media", "sequenceNumber": str(chunk + 2), "streamSid": stream_sid,
            "media": {"track": track, "chunk": str(chunk), "timestamp": str(timestamp_ms),
                      "payload": base64.b64encode(mulaw).decode()}}
