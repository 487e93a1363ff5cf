"""Helpers for the streaming-service tests: a WER, shared models, and an app served on port 0."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

SPEECH = Path(__file__).resolve().parent / "fixtures" / "speech"
WAIT_S = 60.0  # upper bound on any single wait in these tests (never a fixed sleep)


def words(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9' ]+", " ", text.lower().replace("-", " ")).split()


def wer(reference: str, hypothesis: str) -> float:
    """Word error rate: word-level Levenshtein distance / reference length (case, punctuation ignored)."""
    ref, hyp = words(reference), words(hypothesis)
    d = list(range(len(hyp) + 1))
    for i in range(1, len(ref) + 1):
        prev, d[0] = d[0], i
        for j in range(1, len(hyp) + 1):
            cur = min(d[j] + 1, d[j - 1] + 1, prev + (ref[i - 1] != hyp[j - 1]))
            prev, d[j] = d[j], cur
    return d[len(hyp)] / max(1, len(ref))


def load(name: str, sr: int = 16_000) -> np.ndarray:
    from model.features import load_audio

    return load_audio(str(SPEECH / name), sr=sr)


@pytest.fixture(scope="session")
def whisper():  # type: ignore[no-untyped-def]
    """The packaged Whisper tiny.en, loaded once for every service test."""
    from streamer.config import AsrConfig
    from streamer.transcriber import Transcriber

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
    """A started App on port 0 with the shared models; shut down (gracefully) on exit."""
    from streamer.server import create_app

    app = create_app(app_config(**server), model=model, asr=asr)
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
        if e["type"] == P.EMOTION:
            assert 0.0 <= e["latency_ms"] < 60_000
        if e["type"] == P.EMOTION_REVISED:
            assert e["utterance_id"] < e["revised_with"]
