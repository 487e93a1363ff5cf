"""Interim results, word timings, the decoders' load bookkeeping and admission past capacity."""

from __future__ import annotations

import asyncio
import json
import threading
from dataclasses import replace

from collections.abc import Sequence

import numpy as np
import pytest
from websockets.asyncio.client import connect

from streamer import protocol as P
from streamer.client import stream_audio
from streamer.config import InferenceConfig
from streamer.infer.engine import InferenceEngine, Overloaded
from streamer.metrics import Metrics
from streamer.infer.transcriber import Transcript

from tests.stream_util import (  # noqa: F401 (fixtures)
    StubAsr,
    WAIT_S, check_session_events, emotion_model, load, recv_json, served, whisper,
)


class GatedAsr(StubAsr):
    """Blocks inside transcribe until released; says when a decoder is inside."""

    def __init__(self, workers: int) -> None:
        self.workers, self.batch_size = workers, 1
        self.inside = threading.Semaphore(0)
        self.release = threading.Event()

    def transcribe(self, audios: list[np.ndarray], words: Sequence[bool] | None = None,
                   redecode: Sequence[bool] | None = None) -> list[Transcript]:
        self.inside.release()
        assert self.release.wait(WAIT_S)
        return [Transcript("hello there", 0.0, -0.1) for _ in audios]


async def interim_done(engine: InferenceEngine, audio: np.ndarray) -> None:
    """An interim decode once the engine is idle, awaited."""
    while not engine.idle():  # the decoders finish their batches
        await asyncio.sleep(0.01)
    job = engine.interim(audio)
    assert job is not None
    await asyncio.wait_for(job.future, WAIT_S)


@pytest.mark.parametrize("workers", [1, 2])
def test_interim_runs_only_on_an_idle_decoder_and_finals_are_bounded(tiny_model, workers: int) -> None:
    asr = GatedAsr(workers)
    engine = InferenceEngine(tiny_model, asr, InferenceConfig(max_wait_ms=0, max_queue_s=0.5), Metrics())
    audio = np.zeros(16_000, np.float32)

    async def scenario():  # type: ignore[no-untyped-def]
        engine.start()
        try:
            assert engine.idle()
            first = engine.analyze(audio)
            assert await asyncio.to_thread(asr.inside.acquire, True, WAIT_S)  # a decoder is busy with it
            # with two decoders one stays free for finals, so interim work needs both idle
            assert engine.interim(audio) is None and not engine.idle()
            for _ in range(workers - 1):  # fill the other decoders
                engine.analyze(audio)
                assert await asyncio.to_thread(asr.inside.acquire, True, WAIT_S)
            queued = []  # each waits about one decode (0.3 s, the first estimate) per decoder ahead of it
            with pytest.raises(Overloaded):  # ... until the wait would exceed max_queue_s: refused at once
                for _ in range(10):
                    queued.append(engine.analyze(audio))
            assert engine.wait_estimate_s() > 0.5 and len(queued) <= 2 * workers
            asr.release.set()
            assert queued, "one job may always wait for the decoders"
            done = await asyncio.wait_for(asyncio.gather(first.future, *[j.future for j in queued]), WAIT_S)
            assert all(a.transcript.text == "hello there" for a in done)
            await interim_done(engine, audio)
        finally:
            await asyncio.to_thread(engine.stop)

    asyncio.run(scenario())
    assert 0.0 < engine.load() <= 1.0  # the blocked batches count as busy time


def test_peek_predicts_without_changing_the_dialogue(tiny_model) -> None:
    from model import EncodedUtterance
    import torch

    cfg = tiny_model.config
    torch.manual_seed(0)
    utts = [EncodedUtterance(torch.randn(cfg.encoder_dim), torch.randn(cfg.speech_dim)) for _ in range(3)]
    from streamer.infer.head import PredictionHead

    plain, peeked = PredictionHead(tiny_model, InferenceConfig(), Metrics()), None
    a, b = plain.new_context(), plain.new_context()
    for i, u in enumerate(utts[:2]):
        tiny_model.predict(a.add(i, u))
        tiny_model.predict(b.add(i, u))
    peeked = tiny_model.predict(b.peek(utts[2]))[0]
    assert len(b.dialogue.utterances) == 2  # nothing added
    final_a = b.scored(tiny_model.predict(b.add(2, utts[2])))
    final_b = a.scored(tiny_model.predict(a.add(2, utts[2])))
    assert final_a.prediction.scores == pytest.approx(final_b.prediction.scores)
    assert peeked.scores == pytest.approx(final_a.prediction.scores)  # no lookahead yet: the same window


def _order_ok(events: list[dict]) -> None:
    """Every partial of an utterance comes after its utterance.started and before its final transcript."""
    started, finished = set(), set()
    for ev in events:
        uid = ev.get("utterance_id")
        if ev["type"] == P.UTTERANCE_STARTED:
            started.add(uid)
        elif ev["type"] == P.TRANSCRIPT:
            finished.add(uid)
        elif ev["type"] in P.INTERIM_TYPES:
            assert uid in started and uid not in finished, ev


def test_interim_and_word_timings_end_to_end(emotion_model, whisper) -> None:  # noqa: F811
    """A real-time stream asking for interim results and word timings; a subscriber that asks for
    interim results sees the partials, one that does not sees exactly the final events."""
    # a 5.7 s sentence (room for several partials even on a loaded machine), a pause, a short one
    audio = np.concatenate([load("LJ001-0006.wav"), np.zeros(16_000, np.float32), load("LJ001-0002.wav")])

    async def go():  # type: ignore[no-untyped-def]
        async with served(emotion_model, whisper, interim_emotion_every_s=1.0) as app:
            async with connect(f"{app.url}{P.SUBSCRIBE_PATH}?session=jfk&interim=1") as with_partials, \
                    connect(f"{app.url}{P.SUBSCRIBE_PATH}?session=jfk") as finals_only:
                await asyncio.sleep(0)  # both registered before the session starts (same loop, in order)
                while app.hub.subscriber_count() < 2:
                    await asyncio.sleep(0.01)
                src = await stream_audio(app.url, audio, realtime=True, session_id="jfk", interim=True,
                                         word_timestamps=True)
                seen = []
                for ws in (with_partials, finals_only):
                    evs = []
                    async for msg in ws:
                        evs.append(json.loads(msg))
                    seen.append(evs)
            plain = await stream_audio(app.url, load("LJ001-0008.wav"), realtime=False, session_id="plain")
            return src.events, seen[0], seen[1], plain.events

    src, sub_interim, sub_final, plain = asyncio.run(go())
    check_session_events([e for e in src if e["type"] not in P.INTERIM_TYPES])
    partials = [e for e in src if e["type"] == P.TRANSCRIPT_PARTIAL]
    assert partials, "a 5.7 s sentence streamed in real time gets transcript.partial events"
    assert any(e["type"] == P.EMOTION_PARTIAL for e in src), "utterances over 1 s (here) get an emotion.partial"
    assert all(e["text"] and e["audio_s"] > 0 for e in partials)
    _order_ok(src)
    seqs = [e["seq"] for e in src]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    for e in (x for x in src if x["type"] == P.EMOTION_PARTIAL):
        assert abs(sum(e["scores"].values()) - 1) < 1e-4 and set(e["modality_weights"]) == {"speech", "text"}
    # subscribers: the one that asked sees what the source saw; the other only the finals
    assert [e["seq"] for e in sub_interim] == seqs
    assert [e["seq"] for e in sub_final] == [e["seq"] for e in src if e["type"] not in P.INTERIM_TYPES]
    # word timings: inside the utterance, in order, covering the text
    ends = {e["utterance_id"]: e for e in src if e["type"] == P.UTTERANCE_ENDED}
    for t in (e for e in src if e["type"] == P.TRANSCRIPT and e["text"]):
        words, end = t["words"], ends[t["utterance_id"]]
        assert " ".join(w["word"] for w in words).split() == t["text"].split()
        assert all(end["start_s"] - 1e-6 <= w["start_s"] <= w["end_s"] <= end["end_s"] + 0.5 for w in words), words
        assert all(a["end_s"] <= b["start_s"] + 1e-6 for a, b in zip(words, words[1:]))
        assert all(0.0 <= w["probability"] <= 1.0 for w in words)
    # a session that did not ask gets neither
    assert not [e for e in plain if e["type"] in P.INTERIM_TYPES]
    assert all("words" not in e for e in plain if e["type"] == P.TRANSCRIPT)


@pytest.mark.exclusive  # admission measures the decoders' load
def test_sessions_are_refused_past_capacity_and_live_ones_go_on(emotion_model, whisper) -> None:  # noqa: F811
    async def go():  # type: ignore[no-untyped-def]
        async with served(emotion_model, whisper, admit_max_load=0.5) as app:
            async with connect(app.url + P.STREAM_PATH) as live:
                await live.send(P.StartMessage(session_id="live").to_json())
                assert (await recv_json(live))["type"] == P.SESSION_STARTED
                app.engine.load = lambda: 0.9  # the decoders were busy 90 % of the last 10 s
                async with connect(app.url + P.STREAM_PATH) as late:
                    await late.send(P.StartMessage(session_id="late").to_json())
                    refused = await recv_json(late)
                    await late.wait_closed()
                app.engine.load = lambda: 0.1
                pcm = (load("LJ001-0008.wav") * 32767).astype("<i2").tobytes()
                await live.send(pcm)
                await live.send(P.STOP_MESSAGE)
                events = [json.loads(m) async for m in live]
            return refused, late.close_code, events, app.metrics.value("emostream_overloaded_total")

    refused, code, events, overloaded = asyncio.run(go())
    assert refused["type"] == P.ERROR and refused["code"] == P.E_OVERLOADED and "capacity" in refused["message"]
    assert code == P.CLOSE_TRY_AGAIN and overloaded == 1
    assert any(e["type"] == P.EMOTION for e in events) and events[-1]["type"] == P.SESSION_ENDED
