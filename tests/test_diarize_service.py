"""Speakers within one channel through the real service: a two-speaker conversation built from
RAVDESS fixture clips (actor 21, male, and actor 22, female, taking turns; tests/fixtures/ravdess)
streamed with `"diarize": true` gets a `speaker` on every transcript and emotion, two distinct
labels that follow the actors, and a per-speaker call summary; without it no event has a
`speaker`. Real Whisper, the packaged resemblyzer voice model, the tiny emotion model."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from websockets.asyncio.client import connect

from streamer import protocol as P
from streamer.client import stream_audio

from tests.stream_util import WAIT_S, check_session_events, emotion_model, recv_json, recv_until, served, whisper  # noqa: F401

pytestmark = pytest.mark.slow
RAVDESS = Path(__file__).resolve().parent / "fixtures" / "ravdess"
CLIPS = [("21", "03-01-01-01-02-01-21"), ("22", "03-01-01-01-02-01-22"), ("21", "03-01-05-02-02-01-21"),
         ("22", "03-01-04-02-02-01-22"), ("21", "03-01-04-02-02-01-21"), ("22", "03-01-05-02-02-01-22")]
# each clip twice (~12 s of voice per actor): a voice gets a label of its own once it has said
# several seconds (streamer/pipeline/diarize.py); until then it sits with the nearest one
TURNS = CLIPS + CLIPS[2:] + CLIPS[:2]


def conversation() -> tuple[np.ndarray, list[tuple[str, float, float]]]:
    """The turns, 1 s of low noise around each; (audio, [(actor, start_s, end_s)])."""
    from model.features import load_audio

    rng = np.random.default_rng(0)
    parts, spans, pos = [], [], 0
    for actor, name in TURNS:
        gap = (1e-3 * rng.standard_normal(16_000)).astype(np.float32)
        clip = load_audio(str(RAVDESS / f"{name}.flac"), sr=16_000)
        parts += [gap, clip]
        spans.append((actor, (pos + len(gap)) / 16_000, (pos + len(gap) + len(clip)) / 16_000))
        pos += len(gap) + len(clip)
    parts.append((1e-3 * rng.standard_normal(16_000)).astype(np.float32))
    return np.concatenate(parts), spans


def actor_of(spans: list[tuple[str, float, float]], start: float, end: float) -> str:
    return max(spans, key=lambda s: min(end, s[2]) - max(start, s[1]))[0]


def test_diarized_conversation_gets_two_speakers_and_plain_gets_none(emotion_model, whisper) -> None:  # noqa: F811
    audio, spans = conversation()

    async def scenario():  # type: ignore[no-untyped-def]
        async with served(emotion_model, whisper) as app:
            on = await stream_audio(app.url, audio, realtime=False, diarize=True, session_id="two")
            off = await stream_audio(app.url, audio, realtime=False, session_id="plain")
            return on.events, off.events

    on, off = asyncio.run(scenario())
    for events in (on, off):
        check_session_events(events)
        assert not [e for e in events if e["type"] == P.ERROR], events
    assert on[0]["diarize"] is True and "diarize" not in off[0]
    ended = {e["utterance_id"]: actor_of(spans, e["start_s"], e["end_s"]) for e in on if e["type"] == P.UTTERANCE_ENDED}
    assert sorted(ended.values()) == sorted(a for a, _ in TURNS)  # one utterance per clip
    labelled = [e for e in on if e["type"] in (P.TRANSCRIPT, P.EMOTION, P.EMOTION_REVISED)]
    assert labelled and all(e.get("speaker") in ("S1", "S2") for e in labelled), labelled
    assert all("speaker" not in e for e in on if e["type"] == P.UTTERANCE_ENDED)  # documented: known only later
    # the final label of each utterance (its transcript's, then any speaker.revised) follows the actor
    final = {e["utterance_id"]: e["speaker"] for e in on if e["type"] == P.TRANSCRIPT}
    for e in on:
        if e["type"] == P.SPEAKER_REVISED:
            assert e["previous_speaker"] != e["speaker"] and e["revised_with"] > e["utterance_id"]
            final[e["utterance_id"]] = e["speaker"]
    by_actor = {actor: {final[u] for u, a in ended.items() if a == actor} for actor in ("21", "22")}
    assert all(len(labels) == 1 for labels in by_actor.values()), (by_actor, on)
    assert by_actor["21"] != by_actor["22"]
    assert final[0] == "S1"  # labels in order of first appearance
    summary = next(e for e in on if e["type"] == P.CALL_SUMMARY)
    assert sorted(summary["speakers"]) == ["S1", "S2"]
    assert sum(s["utterances"] for s in summary["speakers"].values()) == len(ended)
    # without diarize: not one event names a speaker
    assert all("speaker" not in e for e in off), [e for e in off if "speaker" in e]
    assert "speakers" not in off[-2] or list(off[-2]["speakers"]) == ["speaker"]


def test_diarize_start_errors_and_the_server_default(emotion_model, whisper) -> None:  # noqa: F811
    """diarize with named channels is a bad_start; serve --diarize (DiarizeConfig.default) loads the
    voice model at start and labels an internal source's speakers."""
    from dataclasses import replace

    from streamer.config import DiarizeConfig
    from streamer.server import create_app
    from tests.stream_util import app_config

    audio, _ = conversation()

    async def scenario():  # type: ignore[no-untyped-def]
        app = create_app(replace(app_config(), diarize=DiarizeConfig(default=True)), model=emotion_model, asr=whisper)
        await app.start()
        try:
            assert app.voices.loaded  # loaded at start, not by the first session
            async with connect(app.url + P.STREAM_PATH) as ws:
                await ws.send(P.StartMessage(channels=2, speakers=["agent", "customer"]).to_json()[:-1]
                              + ', "diarize": true}')
                refused = await recv_json(ws)
                await ws.send(P.StartMessage(max_speakers=None).to_json()[:-1] + ', "max_speakers": 2}')
                refused2 = await recv_json(ws)
            async with connect(f"{app.url}{P.SUBSCRIBE_PATH}?session=internal") as sub:

                async def chunks():  # type: ignore[no-untyped-def]
                    for i in range(0, len(audio), 16_000):
                        yield audio[i : i + 16_000]
                        await asyncio.sleep(0)

                app.add_source("internal", chunks(), "file")
                events = await recv_until(sub, P.SESSION_ENDED, WAIT_S)
            return refused, refused2, events
        finally:
            await asyncio.wait_for(app.shutdown(), WAIT_S)

    refused, refused2, events = asyncio.run(scenario())
    assert refused["code"] == P.E_BAD_START and "speakers" in refused["message"], refused
    assert refused2["code"] == P.E_BAD_START and "max_speakers" in refused2["message"], refused2
    assert events[0]["type"] == P.SESSION_STARTED and events[0]["diarize"] is True
    labels = {e["speaker"] for e in events if e["type"] == P.EMOTION}
    assert len(labels) == 2, events
