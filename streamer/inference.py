"""One inference thread that owns Whisper and the emotion model, fed by a micro-batching queue.

Sessions submit two kinds of jobs from the event loop and await asyncio futures:
- analyze(audio, context): Whisper transcript + the model's cached utterance features (text +
  speech), encoded with the session's earlier transcripts and Whisper's pooled encoder states;
- predict(context, utterance_id, encoded): append to the session's dialogue, predict it (and
  re-score the previous utterance).
The thread takes the first job, waits at most `max_wait_ms` for company, then runs the batch:
predictions first (cheap, and someone is waiting on them), then all analyses in one ASR call and
one encoder call. Jobs abandoned before they run (speech resumed after a speculative decode)
are skipped.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from model import EmotionModel, EncodedUtterance
from streamer.config import SAMPLE_RATE, InferenceConfig
from streamer.context import DialogueContext, Scored
from streamer.metrics import Metrics
from streamer.transcriber import Transcript

log = logging.getLogger(__name__)

CONTEXT_TRANSCRIPTS = 8  # earlier transcripts a session sends with each utterance (the model reads its text_context)
CONTEXT_CHARS = 1000  # each one cut to this many characters (a 15 s utterance is ~300): bounds the remote job too


def bounded_context(context: Sequence[str] | None) -> list[str]:
    """An utterance's earlier transcripts (most recent first) within the limits above; the
    in-process engine and the remote job both use this, so workers see what the thread would."""
    return [str(t)[:CONTEXT_CHARS] for t in list(context or ())[:CONTEXT_TRANSCRIPTS]]


def whisper_inputs(model: EmotionModel, asr: object,
                   transcripts: Sequence[Transcript]) -> list[np.ndarray | None] | None:
    """Each transcript's pooled Whisper states where the model's speech branch takes them (same
    ASR model, same size), else None per utterance; None when none fits (or the ASR gave none)."""
    name = getattr(asr, "name", None)
    out: list[np.ndarray | None] = []
    for t in transcripts:
        st = getattr(t, "whisper_states", None)
        ok = st is not None and np.ndim(st) == 1 and model.accepts_whisper(name, int(np.shape(st)[0]))
        out.append(st if ok else None)
    return out if any(s is not None for s in out) else None


def transcribe_and_encode(model: EmotionModel, asr: SpeechToText, audios: list[np.ndarray],
                          contexts: Sequence[Sequence[str]], words: Sequence[bool] | None = None,
                          ) -> tuple[list[Transcript], list[EncodedUtterance], float, float]:
    """Whisper, then the model's utterance features from the transcripts, Whisper's pooled states and
    each utterance's context: (transcripts, encoded, ASR seconds, encoding seconds). The inference
    thread and remote workers both call this, so an utterance is encoded the same way in either.
    `words`: per utterance, whether its transcript should carry word timings (Transcript.words)."""
    t0 = time.perf_counter()
    if words is not None and any(words):
        transcripts = asr.transcribe(audios, words=list(words))
    else:
        transcripts = asr.transcribe(audios)
    t1 = time.perf_counter()
    encoded = model.encode_utterances([t.text for t in transcripts], audios,
                                      whisper=whisper_inputs(model, asr, transcripts), contexts=[list(c) for c in contexts])
    return transcripts, encoded, t1 - t0, time.perf_counter() - t1


class Overloaded(RuntimeError):
    """The inference queue is full: the service is behind and refuses new work."""


class SpeechToText(Protocol):
    def transcribe(self, audios: list[np.ndarray]) -> list[Transcript]:
        """One Transcript per utterance. An ASR that can time words also takes `words=[bool, ...]`
        (per utterance); it is only passed when some utterance asks for them."""
        ...


@dataclass(frozen=True)
class Analysis:
    transcript: Transcript
    encoded: EncodedUtterance
    asr_s: float  # the batch's ASR time
    encode_s: float


@dataclass(eq=False)
class _Job:
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    abandoned: bool = field(default=False)

    def resolve(self, result: Any = None, error: BaseException | None = None) -> None:
        def _set() -> None:
            if self.future.done():
                return
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(result)

        self.loop.call_soon_threadsafe(_set)


@dataclass(eq=False)
class _AnalyzeJob(_Job):
    audio: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    context: list[str] = field(default_factory=list)  # earlier transcripts of the session, most recent first


@dataclass(eq=False)
class _PredictJob(_Job):
    context: DialogueContext | None = None
    utterance_id: int = 0
    encoded: EncodedUtterance | None = None


class InferenceEngine:
    """Owns the models; everything that touches them runs on its single worker thread."""

    def __init__(self, model: EmotionModel, asr: SpeechToText, config: InferenceConfig, metrics: Metrics) -> None:
        self.model = model
        self.asr = asr
        self.config = config
        self.metrics = metrics
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=config.queue_size)
        self._thread = threading.Thread(target=self._run, name="emostream-inference", daemon=True)
        self._started = False
        self._stopping = False
        self.batches = 0
        self.restarts = 0

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    def start(self) -> None:
        if not self._started:
            if self.config.torch_threads > 0:
                import torch

                torch.set_num_threads(self.config.torch_threads)
            self._thread.start()
            self._started = True

    def warmup(self) -> float:
        """Run one tiny utterance through Whisper and the model before serving, so the first real
        utterance does not pay for lazy initialisation (~0.5 s on CPU). Call before start()."""
        t0 = time.perf_counter()
        audio = np.zeros(SAMPLE_RATE, dtype=np.float32)
        _, encoded, _, _ = transcribe_and_encode(self.model, self.asr, [audio], [["warm up"]])
        dialogue = self.model.new_dialogue()
        self.model.predict([(dialogue, dialogue.append(encoded[0]))])
        return time.perf_counter() - t0

    def stop(self, timeout: float = 30.0) -> None:
        """Finish queued jobs, then end the thread."""
        self._stopping = True
        if self._started and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout)

    def new_context(self) -> DialogueContext:
        return DialogueContext(self.model, revise=self.config.revise, modalities=self.config.modalities)

    # ---- event-loop side ----
    def analyze(self, audio: np.ndarray, context: Sequence[str] | None = None) -> _AnalyzeJob:
        """Queue an utterance for ASR + encoding; await job.future for an Analysis. `context`: the
        session's earlier transcripts, most recent first (copied: the caller's list may change)."""
        loop = asyncio.get_running_loop()
        job = _AnalyzeJob(loop, loop.create_future(), audio=audio, context=bounded_context(context))
        self._put(job)
        return job

    async def predict(self, context: DialogueContext, utterance_id: int, encoded: EncodedUtterance) -> Scored:
        loop = asyncio.get_running_loop()
        job = _PredictJob(loop, loop.create_future(), context=context, utterance_id=utterance_id, encoded=encoded)
        self._put(job)
        return await job.future

    def _ensure_worker(self) -> None:
        """Restart the worker thread if something killed it (it serves every session)."""
        if self._started and not self._thread.is_alive():
            self._replace_worker()

    def _replace_worker(self) -> None:
        if self._stopping:
            return
        log.error("inference worker thread died; starting a new one")
        self.restarts += 1
        self.metrics.inc("emostream_worker_restarts_total")
        self._thread = threading.Thread(target=self._run, name="emostream-inference", daemon=True)
        self._thread.start()

    def _put(self, job: _Job) -> None:
        self._ensure_worker()
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise Overloaded(f"inference queue full ({self.config.queue_size} jobs)") from None

    # ---- worker thread ----
    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch: list[_Job] = [first]
            stop = False
            deadline = time.monotonic() + self.config.max_wait_ms / 1000
            while len(batch) < self.config.max_batch:
                remaining = deadline - time.monotonic()
                try:
                    job = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stop = True
                    break
                batch.append(job)
            try:
                self._process(batch)
            except BaseException as e:  # a bug in the worker itself: fail this batch, never hang it
                for j in batch:
                    j.resolve(error=RuntimeError(f"inference worker failed: {type(e).__name__}: {e}"))
                if not isinstance(e, Exception):
                    self._replace_worker()  # queued jobs go on at once on a fresh thread
                    raise
                log.exception("inference batch failed")
            self.batches += 1
            if stop:
                self._drain()
                return

    def _drain(self) -> None:
        rest: list[_Job] = []
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                rest.append(job)
        if rest:
            self._process(rest)

    def _process(self, batch: list[_Job]) -> None:
        predicts = [j for j in batch if isinstance(j, _PredictJob)]
        analyses = [j for j in batch if isinstance(j, _AnalyzeJob) and not j.abandoned]
        for j in batch:
            if isinstance(j, _AnalyzeJob) and j.abandoned:
                j.loop.call_soon_threadsafe(j.future.cancel)
        if predicts:
            self._predict(predicts)
        if analyses:
            self._analyze(analyses)

    def _predict(self, jobs: list[_PredictJob]) -> None:
        t0 = time.perf_counter()
        per_job: list[list[Any]] = []
        for j in jobs:
            assert j.context is not None and j.encoded is not None
            per_job.append(j.context.add(j.utterance_id, j.encoded))
        try:
            preds = self.model.predict([r for reqs in per_job for r in reqs])
        except Exception:  # one bad request must not fail the other sessions' jobs: retry each alone
            log.exception("batched predict failed; retrying job by job")
            for j, reqs in zip(jobs, per_job):
                try:
                    assert j.context is not None
                    j.resolve(j.context.scored(self.model.predict(reqs)))
                except Exception as e:
                    j.resolve(error=e)
            return
        self.metrics.model_seconds.observe(time.perf_counter() - t0)
        k = 0
        for j, reqs in zip(jobs, per_job):
            assert j.context is not None
            j.resolve(j.context.scored(preds[k : k + len(reqs)]))
            k += len(reqs)

    def _analyze(self, jobs: list[_AnalyzeJob]) -> None:
        step = max(1, int(getattr(self.asr, "batch_size", len(jobs))))
        if len(jobs) > step:  # decode in slices and publish each slice as soon as it is done
            for s in range(0, len(jobs), step):
                self._analyze(jobs[s : s + step])
            return
        try:
            transcripts, encoded, asr_s, enc_s = transcribe_and_encode(
                self.model, self.asr, [j.audio for j in jobs], [j.context for j in jobs])
        except Exception as e:  # see _predict: only the utterance that fails gets an error
            if len(jobs) == 1:
                log.exception("analyze failed")
                jobs[0].resolve(error=e)
                return
            log.exception("batched analyze failed; retrying job by job")
            for j in jobs:
                self._analyze([j])
            return
        self.metrics.asr_seconds.observe(asr_s)
        self.metrics.model_seconds.observe(enc_s)
        self.metrics.batch_size.observe(len(jobs))
        for j, tr, enc in zip(jobs, transcripts, encoded):
            j.resolve(Analysis(tr, enc, asr_s, enc_s))
