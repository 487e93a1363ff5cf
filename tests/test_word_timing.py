"""Opt-in word timings of final transcripts: Whisper's cross-attention alignment in Transcriber
(packaged tiny.en on the bundled speech), and their trip through the remote-inference wire format
(job flag w, reply field wd) and a worker, on a real Redis (Debian's redis-server on a unix socket)."""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import numpy as np
import pytest
import torch

from streamer.infer.transcriber import Transcript, Word
from tests.stream_util import WAIT_S, emotion_model, load, whisper  # noqa: F401
from tests.test_bus import redis_server  # noqa: F401

SR = 16_000


def squash(text: str) -> str:
    return re.sub(r"\s+", "", text)


def check_words(tr: Transcript, n_samples: int) -> None:
    """The words spell the transcript, in order, with monotonic times inside the audio."""
    assert tr.words is not None
    assert squash("".join(w.word for w in tr.words)) == squash(tr.text)
    assert all(w.word and w.word == w.word.strip() for w in tr.words)
    last = 0.0
    for w in tr.words:
        assert last <= w.start_s <= w.end_s <= n_samples / SR, (w, tr.words)
        assert 0.0 <= w.probability <= 1.0
        last = w.end_s


def to_redis(fields: dict[str, Any]) -> dict[bytes, bytes]:
    """A stream entry's fields as redis-py reads them back: bytes keys and values."""
    return {k.encode(): v if isinstance(v, bytes) else str(v).encode() for k, v in fields.items()}


# ---- Transcriber ------------------------------------------------------------------------------
@pytest.mark.slow
def test_words_time_the_transcript_without_changing_it(whisper, transcripts):  # noqa: F811
    """jfk.flac (11 s). Reference points: OpenAI Whisper's own word-timestamp test asserts that
    "Americans" spans 1.8 s; "country" (first) measured here at 6.04-6.36 s (tiny.en, int8,
    CPU), checked to +-0.5 s."""
    audio = load("jfk.flac")
    timed, = whisper.transcribe([audio], words=[True])
    plain, = whisper.transcribe([audio])
    assert plain.words is None
    assert timed.text == plain.text and timed.avg_logprob == plain.avg_logprob
    assert np.array_equal(timed.whisper_states, plain.whisper_states)
    check_words(timed, len(audio))
    assert len(timed.words) == len(timed.text.split()) >= 20
    by_word = {}
    for w in timed.words:
        by_word.setdefault(w.word.strip(",.").lower(), w)
    americans, country = by_word["americans"], by_word["country"]
    assert americans.start_s <= 1.8 <= americans.end_s
    assert abs(country.start_s - 6.04) <= 0.5 and abs(country.end_s - 6.36) <= 0.5
    assert country.probability > 0.5


@pytest.mark.slow
def test_a_batch_times_only_the_utterances_that_ask(whisper):  # noqa: F811
    """Mixed flags in one batch: words where asked (() for an utterance with no text), None
    elsewhere, and every text as without word timings."""
    batch = [load("jfk.flac")[: 8 * SR], load("LJ001-0002.wav"), np.zeros(SR, dtype=np.float32)]
    mixed = whisper.transcribe(batch, words=[False, True, True])
    plain = whisper.transcribe(batch)
    assert [t.text for t in mixed] == [t.text for t in plain]
    assert [t.words for t in plain] == [None, None, None]
    assert mixed[0].words is None
    check_words(mixed[1], len(batch[1]))
    assert mixed[1].words and squash(mixed[1].text).lower().startswith("inbeing")
    assert (mixed[2].words == ()) == (mixed[2].text == "") and mixed[2].words is not None
    with pytest.raises(ValueError):
        whisper.transcribe(batch, words=[True])


# ---- wire format ------------------------------------------------------------------------------
def test_job_asks_for_words_only_when_flagged():
    from streamer.infer.remote import job_fields, wants_words

    audio = np.zeros(1600, dtype=np.float32)
    asked = to_redis(job_fields("j1", "r", audio, time.time() + 5, ["earlier"], words=True))
    plain = to_redis(job_fields("j2", "r", audio, time.time() + 5))
    assert asked[b"w"] == b"1" and wants_words(asked)
    assert b"w" not in plain and not wants_words(plain)  # also how an older front-end's job reads


def test_job_asks_for_no_features_only_for_an_unscored_side():
    from streamer.infer.remote import job_fields, parse_reply, reply_fields, wants_encoding
    from model import EncodedUtterance

    audio = np.zeros(1600, dtype=np.float32)
    unscored = to_redis(job_fields("j1", "r", audio, time.time() + 5, encode=False))
    plain = to_redis(job_fields("j2", "r", audio, time.time() + 5))
    assert unscored[b"e"] == b"0" and not wants_encoding(unscored)
    assert b"e" not in plain and wants_encoding(plain)  # also how an older front-end's job reads
    reply = to_redis(reply_fields(b"j1", Transcript("hello", 0.0, -0.1), EncodedUtterance(None, None), 0.1, 0.0, "w1"))
    _, analysis = parse_reply(reply, torch.device("cpu"))
    assert analysis.transcript.text == "hello" and analysis.encoded == EncodedUtterance(None, None)


def test_reply_carries_words_only_when_present():
    from model import EncodedUtterance
    from streamer.infer.remote import parse_reply, reply_fields

    enc = EncodedUtterance(text_vec=torch.ones(4), speech_vec=None)
    words = (Word("Ask", 0.0, 0.42, 0.9), Word("not—", 0.42, 0.8, 0.75), Word("ünïcode.", 0.8, 1.0, 1.0))
    cases = {"timed": Transcript("Ask not— ünïcode.", 0.01, -0.2, words=words),
             "empty": Transcript("", 0.9, -2.0, words=()),
             "untimed": Transcript("Ask not.", 0.01, -0.2)}
    got = {}
    for key, tr in cases.items():
        fields = to_redis(reply_fields(key.encode(), tr, enc, 0.1, 0.02, "w1"))
        assert (b"wd" in fields) == (tr.words is not None)
        job_id, analysis = parse_reply(fields, torch.device("cpu"))
        assert job_id == key
        got[key] = analysis.transcript
    assert got["timed"].words == words and got["timed"].text == "Ask not— ünïcode."
    assert got["empty"].words == () and got["untimed"].words is None
    old = to_redis(reply_fields(b"old", cases["untimed"], enc, 0.1, 0.02, "w1"))  # a worker from before wd
    assert parse_reply(old, torch.device("cpu"))[1].transcript.words is None
    for bad in (b"{}", b"[[1, 0, 1, 1]]", b"[[\"a\", 0, 1]]", b"not json"):
        with pytest.raises(ValueError):
            parse_reply({**old, b"wd": bad}, torch.device("cpu"))


@pytest.mark.slow
def test_remote_engine_and_worker_round_trip_word_timings(redis_server, tiny_checkpoint, emotion_model,  # noqa: F811
                                                          whisper):  # noqa: F811
    """RemoteInferenceEngine.analyze(words=True) -> job field w -> a Worker (run here, one batch)
    -> reply field wd -> Transcript.words; the job without the flag in the same batch gets None."""
    from model import load_checkpoint
    from streamer.config import InferenceConfig, WorkerConfig
    from streamer.metrics import Metrics
    from streamer.infer.remote import JOBS, RemoteInferenceEngine
    from streamer.infer.consumer import Worker

    head = load_checkpoint(tiny_checkpoint, device="cpu", load_encoder=False)
    cfg = InferenceConfig(checkpoint=tiny_checkpoint, device="cpu", remote=redis_server.url, remote_timeout_s=WAIT_S)
    worker = Worker(WorkerConfig(url=redis_server.url, max_wait_ms=0), emotion_model, whisper, name="test-worker")
    worker.ensure_group()
    timed_audio, plain_audio = load("LJ001-0002.wav"), load("LJ001-0008.wav")

    async def scenario() -> dict[str, Any]:
        engine = RemoteInferenceEngine(head, cfg, Metrics())
        engine.start()
        try:
            timed = engine.analyze(timed_audio, ["earlier words"], words=True)
            plain = engine.analyze(plain_audio)
            deadline = time.monotonic() + WAIT_S
            while worker.redis.xlen(JOBS) < 2:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)  # polling Redis state, bounded by WAIT_S
            sent = [f for _id, f in worker.redis.xrange(JOBS)]
            batch = await asyncio.wait_for(asyncio.to_thread(worker._next_batch), WAIT_S)
            await asyncio.wait_for(asyncio.to_thread(worker.process, batch), WAIT_S)
            results = await asyncio.wait_for(asyncio.gather(timed.future, plain.future), WAIT_S)
            return {"sent": sent, "batch": len(batch), "results": results}
        finally:
            engine.stop()
            await engine.aclose()

    out = asyncio.run(scenario())
    assert [f.get(b"w") for f in out["sent"]] == [b"1", None] and out["batch"] == 2
    timed, plain = (a.transcript for a in out["results"])
    check_words(timed, len(timed_audio))
    assert timed.words and plain.words is None and plain.text
    local, = whisper.transcribe([timed_audio], words=[True])
    assert timed.text == local.text and [w.word for w in timed.words] == [w.word for w in local.words]
    assert all(abs(a.start_s - b.start_s) <= 0.1 and abs(a.end_s - b.end_s) <= 0.1  # batched vs alone
               for a, b in zip(timed.words, local.words))
