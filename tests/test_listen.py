"""/v1/listen, the Deepgram-compatible live endpoint: the client here is written against the message
shapes Deepgram publishes for its live streaming API (Results, SpeechStarted, UtteranceEnd,
Metadata; KeepAlive, Finalize, CloseStream), not against our own protocol."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import numpy as np
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from streamer import protocol as P
from streamer.pcm import pcm16
from streamer.routes import auth
from streamer.routes.listen import DeepgramMessages, listen_start

from tests.stream_util import WAIT_S, emotion_model, load, served, wer, whisper  # noqa: F401 (fixtures)

pytestmark = pytest.mark.slow


# ---- what a Deepgram live client expects (its published message shapes) ------------------------
def check_results(m: dict[str, Any]) -> None:
    assert set(m) >= {"type", "channel_index", "duration", "start", "is_final", "speech_final", "channel", "metadata"}, m
    assert m["type"] == "Results" and m["channel_index"] == [0, 1]
    assert isinstance(m["is_final"], bool) and isinstance(m["speech_final"], bool)
    assert isinstance(m["start"], float | int) and m["start"] >= 0 and m["duration"] >= 0
    alt = m["channel"]["alternatives"][0]
    assert isinstance(alt["transcript"], str) and 0.0 <= alt["confidence"] <= 1.0
    for w in alt["words"]:
        assert set(w) >= {"word", "start", "end", "confidence", "punctuated_word"}, w
        assert 0 <= w["start"] <= w["end"] and 0.0 <= w["confidence"] <= 1.0
        assert w["word"] == w["word"].lower() and w["word"] in w["punctuated_word"].lower()
    starts = [w["start"] for w in alt["words"]]
    assert starts == sorted(starts)
    assert set(m["metadata"]) >= {"request_id", "model_info", "model_uuid"}


def check_message(m: dict[str, Any]) -> None:
    if m["type"] == "Results":
        check_results(m)
    elif m["type"] == "SpeechStarted":
        assert m["channel"] == [0] and m["timestamp"] >= 0
    elif m["type"] == "UtteranceEnd":
        assert m["channel"] == [0, 1] and m["last_word_end"] >= 0
    elif m["type"] == "Metadata":
        assert set(m) >= {"request_id", "created", "duration", "channels"} and m["duration"] > 0
    else:
        assert m["type"] == "Error" and set(m) >= {"description", "message"}, m


async def listen(url: str, audio: np.ndarray, query: str, realtime: bool = True, finalize_at_s: float | None = None,
                 headers: dict[str, str] | None = None) -> tuple[list[dict[str, Any]], int | None]:
    """Stream `audio` as linear16 in 100 ms frames (a KeepAlive among them), then CloseStream;
    every message received until the server closes, and its close code."""
    got: list[dict[str, Any]] = []
    async with connect(f"{url}/v1/listen?{query}", additional_headers=headers) as ws:

        async def receive() -> None:
            async for msg in ws:
                got.append(json.loads(msg))

        reader = asyncio.create_task(receive())
        loop, chunk = asyncio.get_running_loop(), 1_600
        t0 = loop.time()
        for i in range(0, len(audio), chunk):
            await ws.send(pcm16(audio[i : i + chunk]))
            if i == 10 * chunk:
                await ws.send(json.dumps({"type": "KeepAlive"}))
            if finalize_at_s is not None and i <= finalize_at_s * 16_000 < i + chunk:
                await ws.send(json.dumps({"type": "Finalize"}))
            if realtime:
                await asyncio.sleep(max(0.0, t0 + (i + chunk) / 16_000 - loop.time()))
        await ws.send(json.dumps({"type": "CloseStream"}))
        await asyncio.wait_for(reader, WAIT_S)
        return got, ws.close_code


def test_query_string_options() -> None:
    start, opt = listen_start("/v1/listen?encoding=linear16&sample_rate=8000&channels=1&interim_results=true"
                              "&vad_events=true&utterance_end_ms=1000&diarize=true&punctuate=true&model=nova-3&language=en-US")
    assert start["sample_rate"] == 8000 and start["interim"] and start["diarize"] and start["word_timestamps"]
    assert opt == {"interim_results": True, "vad_events": True, "utterance_end_ms": 1000, "diarize": True, "channels": 1}
    assert listen_start("/v1/listen")[0]["sample_rate"] == 16_000  # Deepgram's defaults otherwise
    for bad, why in (("encoding=opus", "encoding"), ("multichannel=true", "multichannel"), ("language=de", "English"),
                     ("sample_rate=x", "integers"), ("frobnicate=1", "frobnicate")):
        with pytest.raises(ValueError, match=why):
            listen_start(f"/v1/listen?{bad}")
    assert auth.request_token("/v1/listen", "Token abc123") == "abc123"  # Deepgram's header scheme


def test_a_cut_at_the_maximum_length_is_final_but_not_an_endpoint() -> None:
    """Deepgram marks a segment it finalizes while the speaker goes on is_final without speech_final:
    so is an utterance cut at max_length (no UtteranceEnd either). A split at a short pause (reason
    "pause") is an endpoint: the speaker may have stopped there."""
    m = DeepgramMessages({"interim_results": False, "vad_events": False, "utterance_end_ms": 1000, "diarize": False,
                          "channels": 1}, lambda: 30.0)
    got = []
    for uid, reason in enumerate(("max_length", "pause", "silence")):
        m({"type": P.UTTERANCE_ENDED, "utterance_id": uid, "start_s": 15.0 * uid, "end_s": 15.0 * uid + 8, "reason": reason})
        m({"type": P.TRANSCRIPT, "utterance_id": uid, "text": " Go on", "words": []})
        out = m({"type": P.EMOTION, "utterance_id": uid, "label": "neutral", "scores": {"neutral": 1.0}, "confidence": "ok"})
        for o in out:
            check_message(o)
        got.append([(o["type"], o.get("is_final"), o.get("speech_final")) for o in out])
    assert got == [[("Results", True, False)],
                   [("Results", True, True), ("UtteranceEnd", None, None)],
                   [("Results", True, True), ("UtteranceEnd", None, None)]]


def test_translation_holds_a_final_transcript_for_its_emotion() -> None:
    m = DeepgramMessages({"interim_results": True, "vad_events": True, "utterance_end_ms": 1000, "diarize": True,
                          "channels": 1}, lambda: 4.25)
    words = [{"word": " Hello,", "start_s": 1.1, "end_s": 1.4, "probability": 0.9},
             {"word": " world.", "start_s": 1.5, "end_s": 1.9, "probability": 0.7}]
    scores = {"neutral": 0.7, "joy": 0.3}
    out = []
    for ev in ({"type": P.UTTERANCE_STARTED, "utterance_id": 0, "start_s": 1.0},
               {"type": P.TRANSCRIPT_PARTIAL, "utterance_id": 0, "text": " Hello", "audio_s": 0.6},
               {"type": P.UTTERANCE_ENDED, "utterance_id": 0, "start_s": 1.0, "end_s": 2.0, "reason": "silence"},
               {"type": P.TRANSCRIPT, "utterance_id": 0, "text": " Hello, world.", "words": words, "speaker": "S2"}):
        out += m(ev)
    assert [o["type"] for o in out] == ["SpeechStarted", "Results"] and not out[1]["is_final"]  # the final waits
    final = m({"type": P.EMOTION, "utterance_id": 0, "label": "neutral", "scores": scores, "confidence": "ok",
               "modality_weights": {"speech": 0.4, "text": 0.6}, "sentiment": "positive", "sentiment_score": 0.5,
               "familiar_voice": True})
    for o in out + final:
        check_message(o)
    res, end = final
    assert res["is_final"] and res["speech_final"] and (res["start"], res["duration"]) == (1.0, 1.0)
    alt = res["channel"]["alternatives"][0]
    assert alt["transcript"] == "Hello, world." and alt["confidence"] == pytest.approx(0.8)
    assert [(w["word"], w["punctuated_word"], w["speaker"]) for w in alt["words"]] == [("hello", "Hello,", 1), ("world", "world.", 1)]
    assert res["emotion"]["label"] == "neutral" and res["sentiment"] == {"label": "positive", "score": 0.5}
    assert res["emotion"]["familiar_voice"] is True and res["emotion"]["confidence"] == "ok"
    assert end == {"type": "UtteranceEnd", "channel": [0, 1], "last_word_end": 1.9}
    # an error releases a held transcript without an emotion; the end brings Metadata
    m({"type": P.UTTERANCE_ENDED, "utterance_id": 1, "start_s": 3.0, "end_s": 4.0, "reason": "finalize"})
    assert m({"type": P.TRANSCRIPT, "utterance_id": 1, "text": " Bye.", "words": []}) == []
    err = m({"type": P.ERROR, "code": "overloaded", "message": "utterance 1 skipped"})
    assert [o["type"] for o in err] == ["Results", "UtteranceEnd", "Error"] and "emotion" not in err[0]
    assert err[0]["from_finalize"] and err[2]["description"] == "utterance 1 skipped"
    meta, = m({"type": P.SESSION_ENDED, "utterances": 2})
    assert meta["type"] == "Metadata" and meta["duration"] == 4.25 and meta["request_id"] == res["metadata"]["request_id"]


def test_a_deepgram_client_gets_interim_and_final_results_with_emotion(emotion_model, whisper, transcripts) -> None:  # noqa: F811
    """LJ001-0004 in real time with interim_results, vad_events and utterance_end_ms: interim
    Results, then a final one with words, emotion and speech_final; Metadata last; close 1000. A
    subscriber of our own protocol sees the same session."""
    audio = np.concatenate([load("LJ001-0004.wav"), np.zeros(16_000, np.float32)])

    async def go():  # type: ignore[no-untyped-def]
        async with served(emotion_model, whisper) as app:
            async with connect(f"{app.url}{P.SUBSCRIBE_PATH}?session=*") as sub:
                got, code = await listen(app.url, audio, "encoding=linear16&sample_rate=16000&channels=1&interim_results=true"
                                                         "&vad_events=true&utterance_end_ms=1000&punctuate=true")
                ours = []
                while not ours or ours[-1]["type"] != P.SESSION_ENDED:
                    ours.append(json.loads(await asyncio.wait_for(sub.recv(), WAIT_S)))
            return got, code, ours

    got, code, ours = asyncio.run(go())
    assert code == 1000
    for m in got:
        check_message(m)
    kinds = [m["type"] for m in got]
    assert kinds[0] == "SpeechStarted" and kinds[-1] == "Metadata" and "Error" not in kinds, kinds
    finals = [m for m in got if m["type"] == "Results" and m["is_final"]]
    interims = [m for m in got if m["type"] == "Results" and not m["is_final"]]
    assert interims and got.index(interims[0]) < got.index(finals[0])  # partials before the final
    text = " ".join(m["channel"]["alternatives"][0]["transcript"] for m in finals)
    assert wer(transcripts["LJ001-0004.wav"], text) <= 0.3, text
    for m in finals:
        assert m["speech_final"] and m["channel"]["alternatives"][0]["words"]
        assert m["emotion"]["label"] == max(m["emotion"]["scores"], key=m["emotion"]["scores"].get)
        assert sum(m["emotion"]["scores"].values()) == pytest.approx(1.0, abs=1e-4)
        assert kinds[got.index(m) + 1] == "UtteranceEnd"
    assert got[-1]["duration"] == pytest.approx(len(audio) / 16_000, abs=0.01)
    assert [e["text"].strip() for e in ours if e["type"] == P.TRANSCRIPT] == \
        [m["channel"]["alternatives"][0]["transcript"] for m in finals]  # the same session, in our protocol


def test_finalize_cuts_the_utterance_and_bad_options_are_refused(emotion_model, whisper) -> None:  # noqa: F811
    """Finalize in the middle of speech: a final Results with from_finalize, then the rest of the
    speech as another; an unsupported option is refused at once (close 1008 naming it); with API
    tokens, Deepgram's `Authorization: Token KEY` is accepted."""
    from dataclasses import replace

    from streamer.server import create_app
    from tests.stream_util import app_config

    audio = load("LJ001-0004.wav")

    async def go():  # type: ignore[no-untyped-def]
        cfg = replace(app_config(), auth=auth.AuthConfig(tokens=(("dg-key-12345", (auth.SOURCE,)),)))
        app = create_app(cfg, model=emotion_model, asr=whisper)
        await app.start()
        try:
            token = {"Authorization": "Token dg-key-12345"}
            got, code = await listen(app.url, audio, "encoding=linear16&sample_rate=16000", realtime=False,
                                     finalize_at_s=2.0, headers=token)
            with pytest.raises(InvalidStatus) as refused:
                async with connect(f"{app.url}/v1/listen"):
                    pass
            async with connect(f"{app.url}/v1/listen?encoding=mulaw", additional_headers=token) as ws:
                with pytest.raises(ConnectionClosed):
                    await asyncio.wait_for(ws.recv(), WAIT_S)
                bad = ws.close_code, ws.close_reason
        finally:
            await asyncio.wait_for(app.shutdown(), WAIT_S)
        return got, code, refused.value.response.status_code, bad

    got, code, status, bad = asyncio.run(go())
    assert code == 1000 and status == 401
    assert bad[0] == P.CLOSE_POLICY and "encoding" in bad[1]
    finals = [m for m in got if m["type"] == "Results" and m["is_final"]]
    assert len(finals) >= 2 and finals[0]["from_finalize"] and not finals[-1]["from_finalize"], got
    assert finals[0]["start"] + finals[0]["duration"] <= finals[1]["start"] + 1e-6
