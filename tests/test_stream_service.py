"""The streaming service end to end, over real sockets on port 0, with real speech and real Whisper
(tiny.en) and the tiny random emotion model: transcripts, event contract, concurrency, fan-out."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from websockets.asyncio.client import connect

from streamer import protocol as P
from streamer.client import stream_audio, to_pcm16

from tests.stream_util import check_session_events, emotion_model, load, recv_until, served, wer, whisper  # noqa: F401

pytestmark = pytest.mark.slow


def transcript_of(events: list[dict]) -> str:
    return " ".join(e["text"] for e in events if e["type"] == P.TRANSCRIPT)


def test_files_are_transcribed_and_scored(emotion_model, whisper, transcripts) -> None:  # noqa: F811
    """Each bundled recording, sent as fast as possible: WER <= 0.3, the event contract holds, and
    the last utterance (the file ends right after it) is never dropped."""

    async def scenario() -> dict[str, list[dict]]:
        out = {}
        async with served(emotion_model, whisper) as app:
            for name in transcripts:
                res = await stream_audio(app.url, load(name), realtime=False)
                assert res.close_code == P.CLOSE_NORMAL
                out[name] = res.events
        return out

    results = asyncio.run(scenario())
    for name, events in results.items():
        check_session_events(events)
        assert wer(transcripts[name], transcript_of(events)) <= 0.3, (name, transcript_of(events))
    assert len([e for e in results["jfk.flac"] if e["type"] == P.EMOTION]) >= 3  # it pauses 3 times
    last = [e for e in results["jfk.flac"] if e["type"] == P.UTTERANCE_ENDED][-1]
    assert last["reason"] == "end_of_stream"


def test_realtime_stream_and_subscribers_see_the_same_events(emotion_model, whisper, transcripts) -> None:  # noqa: F811
    """Real-time pacing, as a microphone would send: a `*` subscriber and a subscriber to the
    session id see exactly the source's events; revisions arrive for all but the last utterance."""

    async def scenario():  # type: ignore[no-untyped-def]
        async with served(emotion_model, whisper) as app:
            async with connect(f"{app.url}{P.SUBSCRIBE_PATH}?session=*") as star, \
                    connect(f"{app.url}{P.SUBSCRIBE_PATH}?session=talk-1") as one:
                res = await stream_audio(app.url, load("jfk.flac"), realtime=True, session_id="talk-1")
                got_star = await recv_until(star, P.SESSION_ENDED)
                got_one = await recv_until(one, P.SESSION_ENDED)
                await asyncio.wait_for(one.wait_closed(), 10)  # a per-session subscriber is closed at the end
                return res, got_star, got_one, one.close_code

    res, got_star, got_one, one_code = asyncio.run(scenario())
    check_session_events(res.events)
    assert res.events == got_star == got_one
    assert one_code == P.CLOSE_NORMAL
    assert wer(transcripts["jfk.flac"], transcript_of(res.events)) <= 0.3
    n = len(res.of_type(P.EMOTION))
    assert len(res.of_type(P.EMOTION_REVISED)) == n - 1
    assert all(e["session_id"] == "talk-1" for e in res.events)


def test_concurrent_sessions_do_not_mix(emotion_model, whisper, transcripts) -> None:  # noqa: F811
    """Three clients at once, at 8, 16 and 44.1 kHz (resampled on the server), in real time."""
    names = ["LJ001-0002.wav", "LJ001-0004.wav", "LJ001-0008.wav"]
    rates = [8_000, 16_000, 44_100]

    async def scenario():  # type: ignore[no-untyped-def]
        async with served(emotion_model, whisper) as app:
            return await asyncio.gather(*[
                stream_audio(app.url, load(n, sr=r), sample_rate=r, realtime=True, session_id=f"s{i}")
                for i, (n, r) in enumerate(zip(names, rates))
            ])

    results = asyncio.run(scenario())
    for i, (name, res) in enumerate(zip(names, results)):
        check_session_events(res.events)
        assert {e["session_id"] for e in res.events} == {f"s{i}"}
        assert wer(transcripts[name], transcript_of(res.events)) <= 0.3, (name, transcript_of(res.events))


def test_stereo_input_is_downmixed(emotion_model, whisper, transcripts) -> None:  # noqa: F811
    mono = load("LJ001-0002.wav")
    stereo = np.stack([mono, mono], axis=1).reshape(-1)  # interleaved L R

    async def scenario():  # type: ignore[no-untyped-def]
        async with served(emotion_model, whisper) as app:
            async with connect(app.url + P.STREAM_PATH) as ws:
                await ws.send(P.StartMessage(sample_rate=16_000, channels=2).to_json())
                for i in range(0, len(stereo), 6400):
                    await ws.send(to_pcm16(stereo[i : i + 6400]))
                await ws.send(P.STOP_MESSAGE)
                return await recv_until(ws, P.SESSION_ENDED)

    events = asyncio.run(scenario())
    check_session_events(events)
    assert wer(transcripts["LJ001-0002.wav"], transcript_of(events)) <= 0.3


def test_client_vanishing_mid_utterance_still_finishes_it(emotion_model, whisper) -> None:  # noqa: F811
    """A source that disconnects without `stop`: subscribers still get its last utterance."""
    audio = load("LJ001-0004.wav")

    async def scenario():  # type: ignore[no-untyped-def]
        async with served(emotion_model, whisper) as app:
            async with connect(f"{app.url}{P.SUBSCRIBE_PATH}?session=gone") as sub:
                async with connect(app.url + P.STREAM_PATH) as ws:
                    await ws.send(P.StartMessage(session_id="gone").to_json())
                    await ws.send(to_pcm16(audio[: len(audio) * 3 // 4]))  # cut mid-sentence
                    await recv_until(ws, P.UTTERANCE_STARTED)
                # closed without stop
                return await recv_until(sub, P.SESSION_ENDED)

    events = asyncio.run(scenario())
    check_session_events(events)
    assert [e["reason"] for e in events if e["type"] == P.UTTERANCE_ENDED] == ["end_of_stream"]
    assert json.dumps(events)  # plain JSON all the way
