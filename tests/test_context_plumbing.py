"""Dialogue context and Whisper states reach the emotion model, in process and through remote
workers: each utterance is encoded with the session's earlier transcripts (most recent first), and
with the ASR's pooled Whisper states exactly when the model's speech branch accepts them (same ASR
model name, same size). A tiny model with text_context and a whisper branch, a fake ASR, and a
recorder on `encode_utterances` show what the model was given."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from collections.abc import Sequence

import numpy as np
import pytest
import torch
from websockets.asyncio.client import connect

from streamer import protocol as P
from streamer.client import to_pcm16
from streamer.config import InferenceConfig, WorkerConfig
from streamer.infer.engine import CONTEXT_CHARS, CONTEXT_TRANSCRIPTS, InferenceEngine
from streamer.metrics import Metrics
from streamer.infer.transcriber import Transcript
from tests.stream_util import StubAsr, WAIT_S, check_session_events, load, recv_until, served
from tests.test_bus import redis_server  # noqa: F401  (fixture)

ASR_NAME = "fake-asr"
WHISPER_DIM = 8


class FakeAsr(StubAsr):
    """Numbered transcripts ("words number k", unique per decoded utterance, or a fixed text), each
    with pooled 'Whisper states' of `dim` values (None: an ASR that gives none)."""

    def __init__(self, name: str = ASR_NAME, dim: int | None = WHISPER_DIM, text: str | None = None) -> None:
        self.name, self.dim, self.text = name, dim, text
        self.n = 0

    def transcribe(self, audios: list[np.ndarray], words: Sequence[bool] | None = None,
                   redecode: Sequence[bool] | None = None) -> list[Transcript]:
        out = []
        for a in audios:
            self.n += 1
            states = None if self.dim is None else np.linspace(-1, 1, self.dim, dtype=np.float32) * (1 + len(a) % 7)
            out.append(Transcript(self.text or f"words number {self.n}", 0.0, -0.1, whisper_states=states))
        return out


class Recorder:
    """Stands in for a model's encode_utterances (runs the real one) and keeps each call's inputs."""

    def __init__(self, model: Any) -> None:
        self.real = model.encode_utterances
        self.calls: list[dict[str, Any]] = []

    def __call__(self, texts, audios, whisper=None, contexts=None):  # type: ignore[no-untyped-def]
        self.calls.append({"texts": list(texts), "whisper": whisper, "contexts": contexts})
        return self.real(texts, audios, whisper=whisper, contexts=contexts)

    def by_text(self) -> dict[str, tuple[list[str] | None, np.ndarray | None]]:
        """text -> (its context, its Whisper states) over every call."""
        out = {}
        for c in self.calls:
            for i, t in enumerate(c["texts"]):
                out[t] = (None if c["contexts"] is None else list(c["contexts"][i]),
                          None if c["whisper"] is None else c["whisper"][i])
        return out


@pytest.fixture()
def ctx_model(tiny_encoder_dir):  # type: ignore[no-untyped-def]
    """The tiny model, reading two earlier transcripts and taking 8-d states of FakeAsr's Whisper."""
    from model import EmotionModel, ModelConfig

    torch.manual_seed(0)
    cfg = ModelConfig(encoder=str(tiny_encoder_dir), encoder_dim=32, text_context=2,
                      whisper_dim=WHISPER_DIM, whisper_model=ASR_NAME)
    return EmotionModel(cfg).eval()


def redis_fields(fields: dict[str, Any]) -> dict[bytes, bytes]:
    """A stream entry's fields as redis-py returns them (names and str values UTF-8 encoded)."""
    return {k.encode(): v if isinstance(v, bytes) else str(v).encode() for k, v in fields.items()}


# ---- the service: one session's transcripts become the next utterances' context -----------------
def test_each_utterance_is_encoded_with_the_sessions_earlier_transcripts(ctx_model, monkeypatch) -> None:
    """Three utterances, each sent once the previous one's transcript is out: the second is encoded
    with [first], the third with [second, first] (most recent first), all with their Whisper states."""
    rec = Recorder(ctx_model)
    monkeypatch.setattr(ctx_model, "encode_utterances", rec)
    speech, silence = load("LJ001-0008.wav"), np.zeros(16_000, dtype=np.float32)
    pcm = to_pcm16(np.concatenate([silence[:8000], speech, silence]))

    async def scenario() -> tuple[list[str], list[dict[str, Any]]]:
        async with served(ctx_model, FakeAsr()) as app:
            async with connect(app.url + P.STREAM_PATH) as ws:
                await ws.send(P.StartMessage(session_id="ctx").to_json())
                events = await recv_until(ws, P.SESSION_STARTED)
                texts = []
                for _ in range(3):
                    for i in range(0, len(pcm), 3200):  # 100 ms frames, as fast as they go
                        await ws.send(pcm[i : i + 3200])
                    events += await recv_until(ws, P.TRANSCRIPT)
                    texts.append(events[-1]["text"])
                await ws.send(P.STOP_MESSAGE)
                events += await recv_until(ws, P.SESSION_ENDED)
                return texts, events

    texts, events = asyncio.run(scenario())
    check_session_events(events)
    assert len([e for e in events if e["type"] == P.UTTERANCE_ENDED]) == 3
    seen = rec.by_text()
    assert [seen[t][0] for t in texts] == [[], [texts[0]], [texts[1], texts[0]]]
    assert all(seen[t][1] is not None and seen[t][1].shape == (WHISPER_DIM,) for t in texts)


# ---- the in-process engine ----------------------------------------------------------------------
@pytest.mark.parametrize(("asr", "accepted"), [
    (FakeAsr(), True),
    (FakeAsr(name="other-asr"), False),  # states of another Whisper do not fit the branch
    (FakeAsr(dim=WHISPER_DIM - 2), False),  # nor states of another size
    (FakeAsr(dim=None), False),  # an ASR without states (tests' stubs, older transcribers)
], ids=["same-asr", "other-name", "other-dim", "no-states"])
def test_engine_passes_context_and_only_fitting_whisper_states(ctx_model, monkeypatch, asr: FakeAsr,
                                                               accepted: bool) -> None:
    """analyze(audio, context) -> encode_utterances gets the context and, only when the model
    accepts them, the ASR's states; both change the encoded vectors (they reached the model)."""
    rec = Recorder(ctx_model)
    monkeypatch.setattr(ctx_model, "encode_utterances", rec)
    engine = InferenceEngine(ctx_model, asr, InferenceConfig(device="cpu"), Metrics())
    audio = load("LJ001-0002.wav")
    context = ["the second thing said", "the first thing said"]

    async def scenario():  # type: ignore[no-untyped-def]
        engine.start()
        try:
            job = engine.analyze(audio, context=context)
            context.append("said later")  # the job keeps the snapshot it was given
            return await asyncio.wait_for(job.future, WAIT_S)
        finally:
            await asyncio.to_thread(engine.stop)

    engine.warmup()  # still works with states and contexts
    analysis = asyncio.run(scenario())
    call = rec.calls[-1]
    assert call["contexts"] == [["the second thing said", "the first thing said"]]
    states = FakeAsr(dim=asr.dim).transcribe([audio])[0].whisper_states
    if accepted:
        assert call["whisper"] is not None and np.array_equal(call["whisper"][0], states)
    else:
        assert call["whisper"] is None
    bare = rec.real([analysis.transcript.text], [audio])[0]  # no context, no states
    assert not torch.allclose(analysis.encoded.text_vec, bare.text_vec)  # the context was read
    assert torch.allclose(analysis.encoded.speech_vec, bare.speech_vec) != accepted


def test_engine_bounds_the_context_it_keeps(ctx_model, monkeypatch) -> None:
    rec = Recorder(ctx_model)
    monkeypatch.setattr(ctx_model, "encode_utterances", rec)
    engine = InferenceEngine(ctx_model, FakeAsr(), InferenceConfig(device="cpu"), Metrics())
    long = [f"utterance {i} " + "x" * (2 * CONTEXT_CHARS) for i in range(3 * CONTEXT_TRANSCRIPTS)]

    async def scenario():  # type: ignore[no-untyped-def]
        engine.start()
        try:
            await asyncio.wait_for(engine.analyze(load("LJ001-0002.wav"), context=long).future, WAIT_S)
        finally:
            await asyncio.to_thread(engine.stop)

    asyncio.run(scenario())
    (ctx,) = rec.calls[-1]["contexts"]
    assert ctx == [t[:CONTEXT_CHARS] for t in long[:CONTEXT_TRANSCRIPTS]]  # the most recent ones, cut


# ---- remote: the job's context field, and the worker's use of it -------------------------------
def test_job_field_round_trips_the_context_and_old_jobs_have_none() -> None:
    from streamer.infer.remote import decode_context, job_fields

    context = ["ça va? — oui", "", "first"]
    fields = redis_fields(job_fields("j1", "r", np.zeros(160, np.float32), time.time() + 5, context))
    assert decode_context(fields) == context
    assert decode_context(redis_fields(job_fields("j2", "r", np.zeros(160, np.float32), time.time() + 5))) == []
    del fields[b"c"]  # a job from a front-end that predates the field
    assert decode_context(fields) == []
    many = [str(i) * (2 * CONTEXT_CHARS) for i in range(2 * CONTEXT_TRANSCRIPTS)]
    sent = json.loads(job_fields("j3", "r", np.zeros(160, np.float32), 0.0, many)["c"])
    assert sent == [t[:CONTEXT_CHARS] for t in many[:CONTEXT_TRANSCRIPTS]]  # bounded on the wire
    for bad in (b"not json", b'"a string"', b"[1, 2]", b"\xff\xfe"):
        with pytest.raises(ValueError):
            decode_context({b"c": bad})


def test_worker_encodes_like_the_in_process_engine(ctx_model, monkeypatch) -> None:
    """Jobs as a worker reads them: the context (or none, for an old front-end's job) and the
    Whisper states reach encode_utterances, the replies' vectors equal the in-process engine's,
    and a job with a malformed context gets an error reply (the others go on)."""
    from streamer.infer.remote import job_fields, parse_reply
    from streamer.infer.consumer import Worker

    rec = Recorder(ctx_model)
    monkeypatch.setattr(ctx_model, "encode_utterances", rec)
    asr = FakeAsr(text="how are you")
    audio = load("LJ001-0002.wav")
    context = ["fine thanks", "hello there"]
    deadline = time.time() + WAIT_S
    new = redis_fields(job_fields("new", "replies", audio, deadline, context))
    old = redis_fields(job_fields("old", "replies", audio, deadline))
    del old[b"c"]
    bad = {**new, b"j": b"bad", b"c": b"{oops"}

    worker = Worker(WorkerConfig(url="redis://127.0.0.1:1/0"), ctx_model, asr, name="w-test")  # never connects
    answered: list[tuple[bytes, bytes, dict[str, Any]]] = []
    monkeypatch.setattr(worker, "_answer", lambda replies, dead: answered.extend(replies))
    worker.process([(b"1-0", new), (b"2-0", old), (b"3-0", bad)])

    call = rec.calls[-1]
    assert call["contexts"] == [context, []]
    assert call["whisper"] is not None and all(w is not None and w.shape == (WHISPER_DIM,) for w in call["whisper"])
    replies = {f["j"]: parse_reply(redis_fields(f), torch.device("cpu"))[1] for _eid, _to, f in answered}
    assert isinstance(replies[b"bad"], Exception) and "malformed job" in str(replies[b"bad"])

    engine = InferenceEngine(ctx_model, FakeAsr(text="how are you"), InferenceConfig(device="cpu"), Metrics())

    async def in_process():  # type: ignore[no-untyped-def]
        engine.start()
        try:
            jobs = [engine.analyze(audio, context=context), engine.analyze(audio)]
            return await asyncio.wait_for(asyncio.gather(*[j.future for j in jobs]), WAIT_S)
        finally:
            await asyncio.to_thread(engine.stop)

    want = asyncio.run(in_process())
    for key, ref in zip((b"new", b"old"), want):
        got = replies[key]
        assert got.transcript.text == ref.transcript.text
        assert torch.allclose(got.encoded.text_vec, ref.encoded.text_vec, atol=1e-6)
        assert torch.allclose(got.encoded.speech_vec, ref.encoded.speech_vec, atol=1e-6)
    assert not torch.allclose(replies[b"new"].encoded.text_vec, replies[b"old"].encoded.text_vec)


@pytest.mark.slow
def test_remote_engine_sends_the_context_through_redis(redis_server, tiny_checkpoint) -> None:  # noqa: F811
    """RemoteInferenceEngine.analyze(audio, context) writes a job whose c field decodes to it."""
    import redis

    from model import load_checkpoint
    from streamer.infer.remote import JOBS, RemoteInferenceEngine, decode_context

    client = redis.Redis.from_url(redis_server.url)
    head = load_checkpoint(tiny_checkpoint, device="cpu", load_encoder=False)
    cfg = InferenceConfig(checkpoint=tiny_checkpoint, device="cpu", remote=redis_server.url, remote_timeout_s=WAIT_S)

    async def scenario() -> list[dict[bytes, bytes]]:
        engine = RemoteInferenceEngine(head, cfg, Metrics())
        engine.start()
        try:
            jobs = [engine.analyze(np.zeros(8000, np.float32), context=["later", "earlier"]),
                    engine.analyze(np.zeros(8000, np.float32))]
            deadline = time.monotonic() + WAIT_S
            while client.xlen(JOBS) < 2:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)  # polling Redis state, bounded by WAIT_S
            entries = [fields for _eid, fields in client.xrange(JOBS)]
            for j in jobs:
                j.abandoned = True  # no worker: withdraw them rather than wait for the timeout
            return entries
        finally:
            engine.stop()
            await engine.aclose()

    entries = asyncio.run(scenario())
    assert [decode_context(f) for f in entries] == [["later", "earlier"], []]
