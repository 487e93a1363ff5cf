"""/v1/listen: a drop-in for apps written against Deepgram's live streaming API (the WebSocket of
`wss://api.deepgram.com/v1/listen`): the options in the query string, binary audio up, `KeepAlive`,
`Finalize` and `CloseStream` as text frames; down come `Results` (interim with `is_final: false`,
final with `is_final` and `speech_final`, words with times and confidences), `SpeechStarted`,
`UtteranceEnd`, `Metadata` at the end, and `Error`. The final `Results` of an utterance carries our
`emotion` and `sentiment` as extra fields (see docs/protocol.md). Under the hood it is an ordinary
/v1/stream session (SourceConnection: admission, throttling, limits), so the dashboard and
/v1/subscribe see it as one; only the messages on this socket are translated.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection

from streamer import protocol as P
from streamer.events.fanout import Subscriber
from streamer.metrics import Metrics
from streamer.routes.source import SourceConnection

MODEL_NAME = "emostream-whisper-tiny.en"
TRUE = ("true", "1", "yes")
IGNORED = ("model", "version", "tier", "punctuate", "smart_format", "endpointing", "filler_words", "numerals",
           "profanity_filter", "keywords", "keyterm", "search", "replace", "tag", "callback", "no_delay", "mip_opt_out",
           "token", "dictation", "measurements", "redact", "extra")


def listen_start(raw_path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The query string of a /v1/listen handshake -> (our `start` message, the Deepgram options we
    honour). ValueError names an option we cannot honour; unknown ones are refused too, options
    that only tune Deepgram's own models (IGNORED) are accepted and ignored."""
    q = {k: v[-1] for k, v in parse_qs(urlsplit(raw_path).query, keep_blank_values=True).items()}

    def flag(name: str) -> bool:
        return q.get(name, "false").lower() in TRUE

    unknown = sorted(set(q) - set(IGNORED) - {"encoding", "sample_rate", "channels", "interim_results", "vad_events",
                                              "utterance_end_ms", "diarize", "language", "multichannel"})
    if unknown:
        raise ValueError(f"unsupported option(s) {', '.join(unknown)}")
    encoding = q.get("encoding", "linear16")
    if encoding != "linear16":
        raise ValueError(f"encoding {encoding!r} is not supported; send linear16 (16-bit little-endian PCM)")
    if flag("multichannel"):
        raise ValueError("multichannel=true is not supported; use /v1/stream with `speakers` to keep channels apart")
    language = q.get("language", "en")
    if not language.lower().startswith("en"):
        raise ValueError(f"language {language!r} is not supported: the transcriber is English-only")
    try:
        rate, channels = int(q.get("sample_rate", "16000")), int(q.get("channels", "1"))
        end_ms = int(q["utterance_end_ms"]) if q.get("utterance_end_ms") else None
    except ValueError:
        raise ValueError("sample_rate, channels and utterance_end_ms must be integers") from None
    options = {"interim_results": flag("interim_results"), "vad_events": flag("vad_events"),
               "utterance_end_ms": end_ms, "diarize": flag("diarize"), "channels": channels}
    start = {"type": P.START, "sample_rate": rate, "encoding": "pcm_s16le", "channels": channels, "language": "en",
             "interim": options["interim_results"], "word_timestamps": True, "diarize": options["diarize"],
             "metadata": {"source": "deepgram-compatible /v1/listen"}}
    return start, options


class DeepgramMessages:
    """Our events of one session -> the Deepgram messages for its /v1/listen socket. A final
    transcript waits for its utterance's emotion (a few ms later), an error, the next transcript or
    the end of the session, so one `Results` carries both."""

    def __init__(self, options: dict[str, Any], audio_s: Callable[[], float]) -> None:
        self.options, self.audio_s = options, audio_s
        self.request_id = str(uuid.uuid4())
        self.created = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
        self.spans: dict[int, tuple[float, float | None, str]] = {}  # utterance -> start, end, why it ended
        self.held: dict[str, Any] | None = None  # a final transcript waiting for its emotion
        self.metadata = {"request_id": self.request_id, "model_uuid": self.request_id,
                         "model_info": {"name": MODEL_NAME, "version": P.VERSION, "arch": "whisper"}}

    def __call__(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        kind, out = event.get("type"), []
        if kind == P.UTTERANCE_STARTED:
            self.spans[event["utterance_id"]] = (event["start_s"], None, "")
            if self.options["vad_events"]:
                out.append({"type": "SpeechStarted", "channel": [0], "timestamp": event["start_s"]})
        elif kind == P.UTTERANCE_ENDED:
            self.spans[event["utterance_id"]] = (event["start_s"], event["end_s"], event.get("reason", ""))
        elif kind == P.TRANSCRIPT_PARTIAL and self.options["interim_results"]:
            start = self.spans.get(event["utterance_id"], (0.0, None, ""))[0]
            out.append(self.results(event["text"], [], start, event.get("audio_s", 0.0), final=False))
        elif kind == P.TRANSCRIPT:
            out += self.release()
            self.held = event
        elif kind == P.EMOTION:
            out += self.release(event)
        elif kind == P.ERROR:
            out += self.release()
            out.append({"type": "Error", "variant": event["code"], "message": event["code"], "description": event["message"]})
        elif kind == P.SESSION_ENDED:
            out += self.release()
            out.append({"type": "Metadata", "transaction_key": "deprecated", "request_id": self.request_id, "sha256": "",
                        "created": self.created, "duration": round(self.audio_s(), 3), "channels": self.options["channels"],
                        "models": [self.request_id], "model_info": {self.request_id: self.metadata["model_info"]}})
        return out

    def release(self, emotion: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """The held final transcript as `Results` (with `emotion`, when it is the one for it)."""
        t, self.held = self.held, None
        if t is None:
            return []
        uid = t["utterance_id"]
        start, end, reason = self.spans.pop(uid, (0.0, None, ""))
        words = [self.word(w, t.get("speaker")) for w in t.get("words", [])]
        end = end if end is not None else (words[-1]["end"] if words else start)
        # cut at the maximum length, the speaker is still talking: final, but no endpoint (as Deepgram marks a
        # segment it finalizes mid-speech). Every other end, a short split pause included, is an endpoint
        speech_final = reason != "max_length"
        msg = self.results(t["text"], words, start, end - start, final=True, finalized=reason == "finalize",
                           speech_final=speech_final)
        if emotion is not None and emotion["utterance_id"] == uid:
            msg["emotion"] = {k: emotion[k] for k in ("label", "scores", "confidence", "modality_weights", "familiar_voice")
                              if k in emotion}
            if "sentiment" in emotion:
                msg["sentiment"] = {"label": emotion["sentiment"], "score": emotion["sentiment_score"]}
        out = [msg]
        if self.options["utterance_end_ms"] is not None and speech_final:
            out.append({"type": "UtteranceEnd", "channel": [0, 1], "last_word_end": words[-1]["end"] if words else end})
        return out

    def results(self, text: str, words: list[dict[str, Any]], start: float, duration: float, final: bool,
                finalized: bool = False, speech_final: bool = True) -> dict[str, Any]:
        confidence = sum(w["confidence"] for w in words) / len(words) if words else (1.0 if text.strip() else 0.0)
        return {"type": "Results", "channel_index": [0, 1], "duration": round(duration, 3), "start": round(start, 3),
                "is_final": final, "speech_final": final and speech_final,
                "from_finalize": finalized,
                "channel": {"alternatives": [{"transcript": text.strip(), "confidence": round(confidence, 4), "words": words}]},
                "metadata": self.metadata}

    def word(self, w: dict[str, Any], speaker: str | None) -> dict[str, Any]:
        shown = w["word"].strip()
        out = {"word": shown.strip(".,!?;:\"()").lower(), "start": w["start_s"], "end": w["end_s"],
               "confidence": w["probability"], "punctuated_word": shown}
        if self.options["diarize"] and speaker and speaker[1:].isdigit():
            out["speaker"] = int(speaker[1:]) - 1  # S1 -> 0, as Deepgram counts
        return out


class ListenSubscriber(Subscriber):
    """The /v1/listen socket's outgoing side: each event offered is translated first."""

    def __init__(self, ws: ServerConnection, maxsize: int, metrics: Metrics) -> None:
        super().__init__(ws, maxsize, metrics)
        self.translate: DeepgramMessages | None = None

    def offer(self, text: str) -> None:
        if self.translate is None:
            return
        for msg in self.translate(json.loads(text)):
            super().offer(json.dumps(msg))


class ListenConnection(SourceConnection):
    """A /v1/stream session started from the handshake's query string; Deepgram's control frames."""

    async def run(self) -> None:
        assert self.ws.request is not None and isinstance(self.sub, ListenSubscriber)
        try:
            start, options = listen_start(self.ws.request.path)
        except ValueError as e:
            self.sub.finish(P.CLOSE_POLICY, str(e)[:120])
            await self.sub.task
            return
        self.sub.translate = DeepgramMessages(options, lambda: self.received_s)
        if self.on_start(start) or self.runner is None:  # refused: by admission (which closed it already), or the format
            self.sub.finish(P.CLOSE_POLICY, "start refused: see the Error message")  # a no-op after admission's close
            await self.finish()
            return
        await super().run()

    def on_text(self, msg: str) -> bool:
        try:
            obj = json.loads(msg)
        except (ValueError, RecursionError):
            obj = None
        kind = obj.get("type") if isinstance(obj, dict) else None
        if kind == "CloseStream":  # flush, the last Results, Metadata, close 1000
            self.stopped = True
            return True
        if kind == "Finalize" and self.runner is not None:
            self.runner.finalize()
        elif kind not in ("KeepAlive", "Finalize"):
            self.reply_error(P.E_UNKNOWN_TYPE, f"unknown message {msg[:80]!r}; expected KeepAlive, Finalize or CloseStream")
        return False

    async def finish(self) -> None:
        self.stopped = True  # no resume on this route: a dropped socket ends its session
        await super().finish()
