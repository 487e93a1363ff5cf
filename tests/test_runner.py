"""SessionRunner without a server: a fake inference backend, a list for a sink, an observer, real
segmentation of real speech. The runner's whole world is its RunnerParts (pipeline/parts.py)."""

from __future__ import annotations

import ast
import asyncio
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from model import Prediction
from streamer import protocol as P
from streamer.config import AppConfig, CallsConfig
from streamer.infer.backend import Analysis, InferenceBackend
from streamer.infer.transcriber import Transcript
from streamer.metrics import Metrics
from streamer.pipeline.context import Scored
from streamer.pipeline.parts import RunnerParts
from streamer.pipeline.runner import SessionRunner
from streamer.pipeline.session import SeqCounter, Session
from tests.stream_util import WAIT_S, check_session_events, load

ROOT = Path(__file__).resolve().parent.parent
CHUNK = 512  # 32 ms at 16 kHz


class Job:
    def __init__(self, result: Analysis) -> None:
        self.future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.future.set_result(result)
        self.abandoned = False


class FakeBackend:
    """Numbered transcripts at once; every prediction 'joy'. Records what each analyze was sent."""

    depth = 0

    def __init__(self) -> None:
        self.contexts: list[list[str]] = []
        self.encodes: list[bool] = []
        self.predicted: list[int] = []
        self.n = 0

    def new_context(self) -> Any:
        return object()

    def analyze(self, audio: np.ndarray, context: Sequence[str] | None = None, *, words: bool = False,
                max_wait_s: float | None = None, encode: bool = True) -> Job:
        self.n += 1
        self.contexts.append(list(context or ()))
        self.encodes.append(encode)
        return Job(Analysis(Transcript(f"words number {self.n}", 0.0, -0.1), None, 0.01, 0.01))  # type: ignore[arg-type]

    def interim(self, audio: np.ndarray, context: Sequence[str] | None = None, *, encode: bool = True) -> None:
        return None

    async def predict(self, context: Any, utterance_id: int, encoded: Any) -> Scored:
        self.predicted.append(utterance_id)
        pred = Prediction("joy", {"joy": 0.9, "neutral": 0.1}, {"speech": 0.5, "text": 0.5}, "ok")
        return Scored(utterance_id, pred)

    async def peek(self, context: Any, encoded: Any) -> Prediction:
        raise AssertionError("no interim results were asked for")

    def warmup(self) -> float: return 0.0
    def start(self) -> None: ...
    async def ready(self) -> None: ...
    def begin_shutdown(self) -> None: ...
    def stop(self, timeout: float = 30.0) -> None: ...
    async def aclose(self, timeout_s: float = 2.0) -> None: ...
    def load(self) -> float: return 0.0
    def wait_estimate_s(self) -> float: return 0.0
    def unavailable(self) -> str | None: return None
    def status(self) -> dict[str, Any]: return {"ok": True}


class ListSink:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def publish(self, ev: dict[str, Any]) -> None:
        self.events.append(ev)

    def publish_interim(self, ev: dict[str, Any]) -> None:
        self.events.append(ev)


class Flagger:
    """An observer that answers each emotion with an alert and keeps the summary it is handed."""

    def __init__(self) -> None:
        self.summaries: list[dict[str, Any]] = []

    def on_event(self, ev: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        if ev["type"] != P.EMOTION:
            return []
        return [(P.ALERT, {"rule": "any-emotion", "severity": "info", "utterance_id": ev["utterance_id"]})]

    def on_end(self, summary: dict[str, Any]) -> None:
        self.summaries.append(summary)


def run(audio_by_channel: list[np.ndarray], config: AppConfig, speakers: list[str] | None = None,  # type: ignore[no-untyped-def]
        backend: FakeBackend | None = None):
    backend, sink, flagger, closed = backend or FakeBackend(), ListSink(), Flagger(), []
    parts = RunnerParts(backend, sink, Metrics(), config, [flagger], closed=closed.append)

    async def go() -> None:
        seq = SeqCounter()
        sessions = [Session("s1", config.segmenter, asyncio.get_running_loop().time, seq=seq, source="test")
                    for _ in audio_by_channel]
        runner = SessionRunner(parts, sessions[0], sessions[1:], speakers)
        runner.publish(P.SESSION_STARTED, sample_rate=16_000, encoding="float32", channels=len(sessions))
        n = max(len(a) for a in audio_by_channel)
        for i in range(0, n, CHUNK):
            for c, audio in enumerate(audio_by_channel):
                runner.audio(audio[i : i + CHUNK], c)
            for _ in range(4):  # as between a socket's frames: the finisher publishes what is done
                await asyncio.sleep(0)
        await asyncio.wait_for(runner.close(), WAIT_S)

    asyncio.run(go())
    return backend, sink.events, flagger, closed


def test_a_runner_needs_no_server_and_publishes_in_order() -> None:
    assert isinstance(FakeBackend(), InferenceBackend)  # the fake is a whole backend, nothing more
    backend, events, flagger, closed = run([load("jfk.flac")], AppConfig())
    check_session_events(events)
    kinds = [e["type"] for e in events]
    ended = [e["utterance_id"] for e in events if e["type"] == P.UTTERANCE_ENDED]
    assert len(ended) >= 2, kinds  # jfk: several utterances
    for uid in ended:  # ended -> transcript -> emotion -> the observer's alert, per utterance
        mine = [e["type"] for e in events if e.get("utterance_id") == uid]
        assert mine == [P.UTTERANCE_STARTED, P.UTTERANCE_ENDED, P.TRANSCRIPT, P.EMOTION, P.ALERT], mine
    assert backend.predicted == ended
    # the last utterance's decode was sent the transcripts before it, most recent first
    texts = [e["text"] for e in events if e["type"] == P.TRANSCRIPT]
    assert backend.contexts[0] == [] and backend.contexts[-1] == texts[-2::-1]
    assert kinds[-2:] == [P.CALL_SUMMARY, P.SESSION_ENDED]
    assert len(flagger.summaries) == 1 and flagger.summaries[0]["session_id"] == "s1"
    assert closed == ["s1"]  # the host is told once the session has ended


def test_unscored_side_is_transcribed_and_read_as_context_but_never_scored() -> None:
    config = replace(AppConfig(), calls=CallsConfig(score_sides=("customer",)))
    jfk = load("jfk.flac")
    silence = np.zeros_like(jfk)
    # the agent speaks first, then the customer: one dialogue, two channels
    backend, events, _, _ = run([np.concatenate([jfk, silence]), np.concatenate([silence, jfk])], config,
                                speakers=["agent", "customer"])
    assert [e["type"] for e in events][-2:] == [P.CALL_SUMMARY, P.SESSION_ENDED]
    said = {e["speaker"] for e in events if e["type"] == P.TRANSCRIPT}
    scored = {e["speaker"] for e in events if e["type"] == P.EMOTION}
    assert said == {"agent", "customer"} and scored == {"customer"}
    agent = [e["text"] for e in events if e["type"] == P.TRANSCRIPT and e["speaker"] == "agent"]
    assert agent and backend.contexts[-1][-1] == agent[0]  # the agent's words are the customer's context
    # the agent's decodes computed no features (speculative ones too); the customer's did
    call = {e["text"]: int(e["text"].split()[-1]) - 1 for e in events if e["type"] == P.TRANSCRIPT}
    assert all(not backend.encodes[call[t]] for t in agent)
    assert all(backend.encodes[call[e["text"]]] for e in events if e["type"] == P.TRANSCRIPT and e["speaker"] == "customer")
    assert backend.encodes.count(False) >= len(agent)


class BusyBackend(FakeBackend):
    """Decoders past the admission limit: busy 95 % of the last 10 s."""

    def load(self) -> float: return 0.95


def test_long_turns_are_split_only_while_the_service_has_room() -> None:
    """The segmenter's pause split of a long turn is allowed by the admission test (load and wait):
    with the decoders at capacity the turn stays whole, as splitting it would only add work."""
    noisy = load("noisy_pauses.flac")  # its last 10 s are one turn with a short pause past 8 s
    reasons = {}
    for name, backend in (("room", FakeBackend()), ("busy", BusyBackend())):
        _, events, _, _ = run([noisy], AppConfig(), backend=backend)
        reasons[name] = [e["reason"] for e in events if e["type"] == P.UTTERANCE_ENDED]
    assert "pause" in reasons["room"] and "pause" not in reasons["busy"]
    assert len(reasons["room"]) == len(reasons["busy"]) + reasons["room"].count("pause")


def test_no_module_below_the_server_imports_the_app() -> None:
    importers = []
    for f in sorted((ROOT / "streamer").rglob("*.py")):
        if f.name in ("server.py", "__main__.py", "__init__.py") and f.parent.name == "streamer":
            continue
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module == "streamer.server":
                importers.append(str(f.relative_to(ROOT)))
    assert not importers, importers
