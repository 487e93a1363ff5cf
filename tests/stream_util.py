"""Helpers for the streaming-service tests: a WER, shared models, and an app served on port 0."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from websockets.asyncio.client import connect

from streamer import protocol as P
from streamer.pcm import pcm16 as to_pcm16

SPEECH = Path(__file__).resolve().parent / "fixtures" / "speech"
WAIT_S = 60.0  # upper bound on any single wait in these tests (never a fixed sleep)
# Load-based admission off, for a service whose tests are not about admission (fuzz, hostile
# traffic): in the two-worker suite (tests/conftest.py) the other worker's CPU load slows these
# decoders too, and the admission check would refuse a healthy session for it. Session limits stay.
NO_LOAD_ADMISSION: dict[str, Any] = {"admit_max_load": 1.0, "admit_max_wait_s": WAIT_S}


class StubAsr:
    """What the engines read of an ASR besides transcribe() (streamer.infer.backend.SpeechToText):
    the tests' fake ASRs derive from it and override transcribe(); this one hears nothing. No
    Whisper name, so no pooled Whisper states are used."""

    name: str | None = None
    workers = 1
    batch_size = 8

    def transcribe(self, audios: list[np.ndarray], words: Any = None, redecode: Any = None) -> list[Any]:
        from streamer.infer.transcriber import Transcript

        return [Transcript("", 0.0, 0.0) for _ in audios]


def words(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9' ]+", " ", text.lower().replace("-", " ")).split()


def word_edits(ref: list[str], hyp: list[str]) -> int:
    """Word-level Levenshtein distance between two word lists (substitutions, insertions, deletions)."""
    d = list(range(len(hyp) + 1))
    for i in range(1, len(ref) + 1):
        prev, d[0] = d[0], i
        for j in range(1, len(hyp) + 1):
            cur = min(d[j] + 1, d[j - 1] + 1, prev + (ref[i - 1] != hyp[j - 1]))
            prev, d[j] = d[j], cur
    return d[len(hyp)]


def wer(reference: str, hypothesis: str) -> float:
    """Word error rate: word-level Levenshtein distance / reference length (case, punctuation ignored)."""
    ref = words(reference)
    return word_edits(ref, words(hypothesis)) / max(1, len(ref))


def load(name: str, sr: int = 16_000) -> np.ndarray:
    from model.features import load_audio

    return load_audio(str(SPEECH / name), sr=sr)


@pytest.fixture(scope="session")
def whisper():  # type: ignore[no-untyped-def]
    """The packaged Whisper tiny.en, loaded once for every service test."""
    from streamer.config import AsrConfig
    from streamer.infer.transcriber import Transcriber

    return Transcriber(AsrConfig(device="cpu"))


@pytest.fixture(scope="session")
def emotion_model(tiny_checkpoint):  # type: ignore[no-untyped-def]
    from model import load_checkpoint

    return load_checkpoint(tiny_checkpoint, device="cpu")


def app_config(checkpoint: Path | None = None, **server: Any):  # type: ignore[no-untyped-def]
    from streamer.config import AppConfig, InferenceConfig, ServerConfig

    inf = InferenceConfig(checkpoint=checkpoint, device="cpu") if checkpoint else InferenceConfig(device="cpu")
    return AppConfig(server=replace(ServerConfig(port=0), **server), inference=inf)


@asynccontextmanager
async def served(model: Any, asr: Any, **server: Any) -> AsyncIterator[Any]:
    """A started App on port 0 with the shared models; shut down (gracefully) on exit. Load-based
    admission is off unless the test sets it (NO_LOAD_ADMISSION): a session streamed faster than
    real time keeps the decoders busy for the next 10 s, and a busy machine would then refuse the
    test's next session with 1013 (seen in test_diarize_service)."""
    from streamer.server import create_app

    app = create_app(app_config(**(NO_LOAD_ADMISSION | server)), model=model, asr=asr)
    await app.start()
    try:
        yield app
    finally:
        await asyncio.wait_for(app.shutdown(), WAIT_S)


async def recv_json(ws: Any, timeout: float = WAIT_S) -> dict[str, Any]:
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


async def recv_until(ws: Any, type_: str, timeout: float = WAIT_S) -> list[dict[str, Any]]:
    """Events up to and including the first of `type_`."""
    out = []
    while True:
        ev = await recv_json(ws, timeout)
        out.append(ev)
        if ev["type"] == type_:
            return out


def scraped(text: str) -> dict[str, float]:
    """GET /metrics text as prometheus_client's own parser reads it: sample -> value, a labelled
    sample keyed like `name{le="0.5"}` (the parser raises on text a scraper would refuse)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def check_session_events(events: list[dict[str, Any]]) -> None:
    """The per-session contract: seq strictly increasing, one emotion per ended utterance, scores
    and modality weights are distributions, started first and ended last."""
    from streamer import protocol as P

    assert events[0]["type"] == P.SESSION_STARTED and events[-1]["type"] == P.SESSION_ENDED
    seqs = [e["seq"] for e in events]
    assert all(b > a for a, b in zip(seqs, seqs[1:])), seqs
    assert len({e["session_id"] for e in events}) == 1
    ended = [e["utterance_id"] for e in events if e["type"] == P.UTTERANCE_ENDED]
    emotions = [e["utterance_id"] for e in events if e["type"] == P.EMOTION]
    transcripts = [e["utterance_id"] for e in events if e["type"] == P.TRANSCRIPT]
    assert ended == emotions == transcripts == sorted(set(ended))
    assert events[-1]["utterances"] == len(ended)
    for e in events:
        assert set(e) >= {"type", "session_id", "seq"}
        if e["type"] in (P.EMOTION, P.EMOTION_REVISED):
            assert sum(e["scores"].values()) == pytest.approx(1.0, abs=1e-4)
            assert all(0.0 <= p <= 1.0 for p in e["scores"].values())
            assert e["label"] == max(e["scores"], key=e["scores"].get)
            assert sum(e["modality_weights"].values()) == pytest.approx(1.0, abs=1e-4)
            assert e["confidence"] in (P.LOW_CONFIDENCE, P.OK_CONFIDENCE)
            if "sentiment" in e:  # a model with a sentiment head
                assert e["sentiment"] in ("negative", "neutral", "positive") and -1.0 <= e["sentiment_score"] <= 1.0
        if e["type"] == P.EMOTION:
            assert 0.0 <= e["latency_ms"] < 60_000
        if e["type"] == P.EMOTION_REVISED:
            assert e["utterance_id"] < e["revised_with"]


class ErrorLog(logging.Handler):
    """Collects ERROR records (a crashed connection handler, a failed utterance) from any thread."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []
        self.setFormatter(logging.Formatter("%(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def report(self, since: int = 0) -> str:
        return "\n".join(self.format(r) for r in self.records[since:])


class ServiceThread:
    """A real App with its event loop in a thread of its own, ERROR logs collected; tests (plain
    functions, e.g. hypothesis ones) submit coroutines to that loop with call()."""

    def __init__(self, name: str) -> None:
        self.errors = ErrorLog()
        logging.getLogger().addHandler(self.errors)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()
        self.app: Any = None

    def serve(self, app: Any) -> Any:
        self.app = app
        self.call(app.start())
        return app

    def call(self, coro: Coroutine[Any, Any, Any], timeout: float = WAIT_S) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        async def shutdown() -> None:
            await self.app.shutdown()

        try:
            if self.app is not None:
                self.call(shutdown())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(30)
            logging.getLogger().removeHandler(self.errors)


# ---- a healthy session beside fuzz or hostile traffic --------------------------------------------
HEALTHY = "healthy"  # the well-behaved sessions are healthy-0, healthy-1, ... (one per test)
HEALTHY_FILE = "LJ001-0004.wav"


async def healthy_source(url: str, session_id: str, done: asyncio.Event,
                         headers: dict[str, str] | None = None) -> tuple[list[dict[str, Any]], int, int | None]:
    """LJ001-0004 then 1 s of silence, at real-time pace, repeated until `done` (at least once);
    then stop. Returns (every event, repetitions sent, close code)."""
    rep = np.concatenate([load(HEALTHY_FILE), np.zeros(16_000, np.float32)])
    chunk = 1_600  # 100 ms
    events: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    async with connect(url + P.STREAM_PATH, additional_headers=headers) as ws:

        async def receive() -> None:
            async for msg in ws:
                events.append(json.loads(msg))

        reader = asyncio.create_task(receive())
        await ws.send(P.StartMessage(session_id=session_id).to_json())
        t0, sent, reps = loop.time(), 0, 0
        while reps == 0 or not done.is_set():
            for i in range(0, len(rep), chunk):
                delay = t0 + sent / 16_000 - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)  # pacing to the audio's own clock
                await ws.send(to_pcm16(rep[i : i + chunk]))
                sent += len(rep[i : i + chunk])
            reps += 1
        await ws.send(P.STOP_MESSAGE)
        await asyncio.wait_for(reader, WAIT_S)
        return events, reps, ws.close_code


@contextmanager
def healthy_session(h: Any, reference: str, headers: dict[str, str] | None = None) -> Iterator[list[dict[str, Any]]]:
    """Runs a healthy real-speech session for the duration of the block beside fuzz traffic on
    `h` (a ServiceThread counting its fuzz `connections`), then checks it got exactly its normal
    events. Yields the list its events end up in."""
    session_id = h.live = f"{HEALTHY}-{h.healthy_runs}"
    h.healthy_runs += 1
    done = asyncio.Event()
    fut = asyncio.run_coroutine_threadsafe(healthy_source(h.url, session_id, done, headers), h.loop)
    out: list[dict[str, Any]] = []
    connections_before = h.connections
    try:
        yield out
    except BaseException:
        h.loop.call_soon_threadsafe(done.set)
        with suppress(Exception):
            fut.result(WAIT_S)  # let it finish before the service goes; the body's failure is the news
        raise
    h.loop.call_soon_threadsafe(done.set)
    events, reps, code = fut.result(WAIT_S * 2)
    out.extend(events)
    assert h.connections > connections_before, "no fuzz traffic ran during the healthy session"
    assert code == P.CLOSE_NORMAL
    assert not [e for e in events if e["type"] == P.ERROR], [e for e in events if e["type"] == P.ERROR]
    check_session_events(events)
    assert [e["seq"] for e in events] == list(range(len(events)))  # gap-free from 0
    assert {e["type"] for e in events} <= {P.SESSION_STARTED, P.UTTERANCE_STARTED, P.UTTERANCE_ENDED, P.TRANSCRIPT,
                                           P.EMOTION, P.EMOTION_REVISED, P.CALL_SUMMARY, P.SESSION_ENDED}
    texts = [e["text"] for e in events if e["type"] == P.TRANSCRIPT]
    assert len(texts) == reps, texts  # one utterance per repetition: nothing split, merged or lost
    for text in texts:
        assert wer(reference, text) <= 0.3, text
    assert len([e for e in events if e["type"] == P.EMOTION_REVISED]) == reps - 1
    assert all(e["reason"] == "silence" for e in events if e["type"] == P.UTTERANCE_ENDED)
