"""What a session needs of inference, whichever engine serves it: the InferenceBackend protocol
that the in-process engine (engine.InferenceEngine) and the --inference front-end
(remote.RemoteInferenceEngine) both implement, the SpeechToText protocol of an ASR, and the
values that cross between them (Analysis, Overloaded). Nothing here imports a model."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from model import EncodedUtterance, Prediction
from streamer.infer.transcriber import Transcript
from streamer.pipeline.context import DialogueContext, Scored


class Overloaded(RuntimeError):
    """The inference queue is full: the service is behind and refuses new work."""


@dataclass(frozen=True)
class Analysis:
    """One utterance through ASR and the encoders: what predict() needs, and the transcript."""

    transcript: Transcript
    encoded: EncodedUtterance
    asr_s: float  # the batch's ASR time
    encode_s: float


@runtime_checkable
class SpeechToText(Protocol):
    """An ASR as the decoding threads use it (streamer.infer.transcriber.Transcriber is the real one)."""

    name: str | None  # the Whisper model's name, for model.accepts_whisper (None: not a Whisper; no pooled states)
    workers: int  # decoding threads it serves at once (each its own replica)
    batch_size: int  # the most utterances one transcribe() call should get

    def transcribe(self, audios: list[np.ndarray], words: Sequence[bool] | None = None,
                   redecode: Sequence[bool] | None = None) -> list[Transcript]:
        """One Transcript per utterance; `words` (per utterance) asks for word timings
        (Transcript.words). The engines pass it only when some utterance asks. `redecode` (per
        utterance, None: all) allows a transcript that repeats itself to be decoded again
        (Transcript.redecoded); the engines pass it only when some utterance is an interim draft,
        which is not worth a second decode."""
        ...


class AnalyzeJob(Protocol):
    """An analyze job in flight: `future` gives an Analysis; setting `abandoned` (speech resumed
    after a speculative decode) withdraws it, and the future is then cancelled."""

    future: asyncio.Future[Any]
    abandoned: bool


@runtime_checkable
class InferenceBackend(Protocol):
    """The inference a SessionRunner and the App use. Analyses (ASR + encoders) may run anywhere;
    predictions run on a PredictionHead in this process, which owns the dialogue contexts."""

    @property
    def depth(self) -> int:
        """Jobs queued or outstanding (the queue-depth gauge)."""
        ...

    # lifecycle, in the order the App calls it
    def warmup(self) -> float:
        """Run the models once before serving (blocking, before start); seconds it took."""
        ...

    def start(self) -> None:
        """Start the threads (and, remote, the Redis tasks: call on the event loop)."""
        ...

    async def ready(self) -> None:
        """Return once admission can be decided on facts, not a guess (remote: heartbeats read)."""
        ...

    def begin_shutdown(self) -> None:
        """The service is shutting down: jobs that cannot be answered fail now rather than later."""
        ...

    def stop(self, timeout: float = 30.0) -> None:
        """Finish queued work and end the threads (blocking: run it off the event loop)."""
        ...

    async def aclose(self, timeout_s: float = 2.0) -> None:
        """Release what lives on the event loop (remote: Redis), after stop()."""
        ...

    # sessions
    def new_context(self) -> DialogueContext: ...

    def analyze(self, audio: np.ndarray, context: Sequence[str] | None = None, *, words: bool = False,
                max_wait_s: float | None = None, encode: bool = True) -> AnalyzeJob:
        """Queue an utterance for ASR + encoding (`encode` False: ASR only, for a side that is never
        scored). Raises Overloaded when it would wait past `max_wait_s`."""
        ...

    def interim(self, audio: np.ndarray, context: Sequence[str] | None = None, *,
                encode: bool = True) -> AnalyzeJob | None:
        """analyze() for an unfinished utterance, or None when it would delay a final one."""
        ...

    async def predict(self, context: DialogueContext, utterance_id: int, encoded: EncodedUtterance) -> Scored: ...

    async def peek(self, context: DialogueContext, encoded: EncodedUtterance) -> Prediction: ...

    # load, for admission and /healthz
    def load(self) -> float: ...

    def wait_estimate_s(self) -> float: ...

    def unavailable(self) -> str | None: ...

    def status(self) -> dict[str, Any]: ...
