"""A small protocol-v1 client: stream audio to /v1/stream and collect the events. Used by
`python -m streamer --demo/--file`, the tests and bench/stream_bench.py; needs only websockets."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from streamer import protocol as P
from streamer.pcm import paced_chunks, pcm16
from streamer.config import SAMPLE_RATE


@dataclass
class StreamResult:
    events: list[dict[str, Any]] = field(default_factory=list)
    received_at: list[float] = field(default_factory=list)  # clock() when each event arrived
    sent: list[tuple[float, float]] = field(default_factory=list)  # (stream end s, clock() when sent)
    close_code: int | None = None

    def of_type(self, type_: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == type_]

    def sent_time(self, stream_s: float) -> float:
        """When the audio up to stream position `stream_s` had been sent."""
        for end, t in self.sent:
            if end >= stream_s - 1e-6:
                return t
        return self.sent[-1][1]


to_pcm16 = pcm16  # the name the benches and tests use


async def stream_audio(
    url: str,
    audio: np.ndarray,
    *,
    sample_rate: int = SAMPLE_RATE,
    realtime: bool = True,
    chunk_s: float = 0.1,
    session_id: str | None = None,
    on_event: Callable[[dict[str, Any]], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
    timeout_s: float = 120.0,
    speakers: list[str] | None = None,
    token: str | None = None,
    interim: bool = False,
    word_timestamps: bool = False,
    diarize: bool = False,
) -> StreamResult:
    """Send `audio` (float32 mono at `sample_rate`; or (channels, n) with one name per channel in
    `speakers`) as pcm_s16le to url + /v1/stream, then stop; return every event up to
    session.ended and the close code. `interim` / `word_timestamps` / `diarize` are the start message's
    flags (transcript.partial / emotion.partial while someone speaks; per-word timings on transcripts;
    a `speaker` label per utterance of a one-channel conversation)."""
    result = StreamResult()
    channels = len(speakers) if speakers else 1
    if audio.ndim != (2 if speakers else 1) or (speakers and audio.shape[0] != channels):
        raise ValueError(f"audio of shape {audio.shape} does not match speakers {speakers}")
    start = P.StartMessage(sample_rate=sample_rate, session_id=session_id, channels=channels, speakers=speakers,
                           interim=interim, word_timestamps=word_timestamps, diarize=diarize)
    headers = {"Authorization": f"Bearer {token}"} if token else None
    async with connect(url.rstrip("/") + P.STREAM_PATH, max_size=P_MAX, additional_headers=headers,
                       ssl=tls_for(url)) as ws:

        async def receive() -> None:
            async for msg in ws:
                ev = json.loads(msg)
                result.events.append(ev)
                result.received_at.append(clock())
                if on_event is not None:
                    on_event(ev)

        recv = asyncio.create_task(receive())
        await ws.send(start.to_json())
        pos = 0
        async for chunk in paced_chunks(audio, sample_rate, realtime=realtime, chunk_s=chunk_s, clock=clock):
            try:
                await ws.send(pcm16(chunk.T.reshape(-1) if speakers else chunk))  # frames interleaved
            except ConnectionClosed:
                break  # the server closed (e.g. shutting down): collect what it sent
            pos += chunk.shape[-1]
            result.sent.append((pos / sample_rate, clock()))
        else:
            try:
                await ws.send(P.STOP_MESSAGE)
            except ConnectionClosed:
                pass
        try:
            await asyncio.wait_for(recv, timeout_s)
        finally:
            recv.cancel()
        result.close_code = ws.close_code
    return result


P_MAX = 1 << 22  # the client accepts events up to 4 MiB


def tls_for(url: str):  # type: ignore[no-untyped-def]
    """TLS for a URL: None for ws://; for wss:// to this machine (the demo/--file client talking to
    its own server, often with a self-signed certificate) no verification; else the default."""
    import ssl
    from urllib.parse import urlsplit

    if not url.startswith("wss://"):
        return None
    if urlsplit(url).hostname in ("127.0.0.1", "localhost", "::1"):
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    return ssl.create_default_context()


def _sentiment(ev: dict[str, Any]) -> str:
    """' | sentiment negative -0.62' for an emotion event that carries one, else ''."""
    return f" | sentiment {ev['sentiment']} {ev.get('sentiment_score', 0.0):+.2f}" if ev.get("sentiment") else ""


def format_event(ev: dict[str, Any]) -> str | None:
    """Human-readable line(s) for the events a person watching wants; None for the rest. Interim
    results (transcript.partial, emotion.partial) are one line marked `… interim`; a transcript
    with word timings gets a second line `0.00–0.76 And · 0.76–1.02 so …` (seconds of the stream);
    an emotion marked `"confidence": "low"` says so."""
    t, uid = ev["type"], ev.get("utterance_id")
    if ev.get("speaker") and t != P.ALERT:
        uid = f"{uid} {ev['speaker']}"
    if t == P.SESSION_STARTED:
        return f"session {ev['session_id']} started"
    if t == P.UTTERANCE_ENDED:
        return f"[{ev['start_s']:7.2f} - {ev['end_s']:7.2f} s] utterance {uid} ended ({ev.get('reason', '')})"
    if t == P.TRANSCRIPT:
        line = f"    #{uid} transcript: {ev['text']!r}" if ev["text"] else f"    #{uid} transcript: (nothing recognised; text masked)"
        if ev.get("words"):
            line += "\n        " + " · ".join(f"{w['start_s']:.2f}–{w['end_s']:.2f} {str(w['word']).strip()}"
                                             for w in ev["words"])
        return line
    if t == P.TRANSCRIPT_PARTIAL:
        return f"    #{uid} … interim transcript ({ev.get('audio_s', 0.0):.1f} s): {ev['text']!r}"
    if t == P.EMOTION_PARTIAL:
        w = ev["modality_weights"]
        return (f"    #{uid} … interim emotion ({ev.get('audio_s', 0.0):.1f} s): {ev['label'].upper()}? "
                f"{ev['scores'][ev['label']]:.2f}{P.confidence_note(ev)} | speech {w['speech']:.2f} / text {w['text']:.2f}"
                + (f" | {ev['text']!r}" if ev.get("text") else ""))
    if t == P.EMOTION:
        top = sorted(ev["scores"].items(), key=lambda kv: -kv[1])[:3]
        w = ev["modality_weights"]
        return (f"    #{uid} emotion: {ev['label'].upper():8s} "
                + "  ".join(f"{k} {v:.2f}" for k, v in top) + P.confidence_note(ev)
                + f"  | speech {w['speech']:.2f} / text {w['text']:.2f}" + _sentiment(ev)
                + f" | {ev['latency_ms']:.0f} ms after end of speech")
    if t == P.EMOTION_REVISED:
        return (f"    #{uid} revised with #{ev.get('revised_with')}: {ev['label']} ({ev['scores'][ev['label']]:.2f})"
                + P.confidence_note(ev))
    if t == P.SPEAKER_REVISED:
        return (f"    #{ev.get('utterance_id')} speaker revised with #{ev.get('revised_with')}: "
                f"{ev.get('previous_speaker')} -> {ev.get('speaker')}")
    if t == P.ERROR:
        return f"error {ev['code']}: {ev['message']}"
    if t == P.ALERT:
        return f"!! ALERT {ev['rule']} ({ev.get('severity', '')}): {ev.get('message', '')}"
    if t == P.CALL_SUMMARY:
        sides = "; ".join(f"{who}: {s['dominant']} over {s['utterances']} utterances"
                          for who, s in ev.get("speakers", {}).items())
        return f"summary: {sides or 'no utterances'}; {len(ev.get('alerts', []))} alert(s)"
    if t == P.SESSION_ENDED:
        return f"session {ev['session_id']} ended: {ev.get('utterances', 0)} utterances"
    return None
