"""The emotion model's head (Bi-GRU over the dialogue, fusion, classifier) on a thread of its own.

Sessions submit predict/peek jobs from the event loop and await asyncio futures; the thread takes
whatever is queued (up to max_batch) and runs one model.predict over it, so predictions never queue
behind a decode. It alone touches the sessions' dialogue contexts. The in-process engine and the
--inference front-end each own one (the front-end's workers only transcribe and encode).

Also here: ThreadJob and collect(), the job and the batching that every inference thread uses.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from model import EmotionModel, EncodedUtterance, Prediction
from streamer.config import InferenceConfig
from streamer.infer.backend import Overloaded
from streamer.metrics import Metrics
from streamer.pipeline.context import DialogueContext, Scored

log = logging.getLogger(__name__)


@dataclass(eq=False)
class ThreadJob:
    """A job for an inference thread, answered on the event loop that submitted it."""

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


def put_or_refuse(q: queue.Queue[Any], job: ThreadJob) -> None:
    """Queue `job`, or raise Overloaded when the (bounded) queue is full."""
    try:
        q.put_nowait(job)
    except queue.Full:
        raise Overloaded(f"inference queue full ({q.maxsize} jobs)") from None


def collect(q: queue.Queue[Any], first: Any, size: int, wait_s: float,
            live: Callable[[list[Any]], int] = len) -> tuple[list[Any], bool]:
    """A batch: `first`, then what arrives within `wait_s` until `live(batch)` reaches `size`; and
    whether the stop sentinel (None) was taken meanwhile (the thread ends after this batch)."""
    batch = [first]
    deadline = time.monotonic() + wait_s
    while live(batch) < size:
        remaining = deadline - time.monotonic()
        try:
            job = q.get(timeout=remaining) if remaining > 0 else q.get_nowait()
        except queue.Empty:
            break
        if job is None:
            return batch, True
        batch.append(job)
    return batch, False


def report_restart(metrics: Metrics, name: str) -> None:
    """An inference thread died and is being replaced: logged and counted."""
    log.error("inference thread %s died; starting a new one", name)
    metrics.inc("emostream_worker_restarts_total")


@dataclass(eq=False)
class _PredictJob(ThreadJob):
    context: DialogueContext | None = None
    utterance_id: int = 0
    encoded: EncodedUtterance | None = None
    peek: bool = False  # predict `encoded` as the next utterance without adding it (interim)


class PredictionHead:
    """predict()/peek() for every session, micro-batched on the thread `emostream-head`. A thread
    that something killed is replaced on the next job (`restarted` is told its name)."""

    NAME = "emostream-head"

    def __init__(self, model: EmotionModel, config: InferenceConfig, metrics: Metrics,
                 restarted: Callable[[str], None] | None = None) -> None:
        self.model = model
        self.config = config
        self.metrics = metrics
        self._restarted = restarted
        self._queue: queue.Queue[_PredictJob | None] = queue.Queue(maxsize=config.queue_size)
        self._thread = threading.Thread(target=self._run, name=self.NAME, daemon=True)
        self._lock = threading.Lock()
        self._started = self._stopping = False

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    def new_context(self) -> DialogueContext:
        return DialogueContext(self.model, revise=self.config.revise, modalities=self.config.modalities)

    def warmup(self) -> float:
        """One prediction of an all-zero utterance (lazy initialisation paid before serving)."""
        t0 = time.perf_counter()
        cfg, dev = self.model.config, self.model.device
        dialogue = self.model.new_dialogue()
        utt = EncodedUtterance(torch.zeros(cfg.encoder_dim, device=dev), torch.zeros(cfg.speech_dim, device=dev))
        self.model.predict([(dialogue, dialogue.append(utt))])
        return time.perf_counter() - t0

    def start(self) -> None:
        if not self._started:
            self._thread.start()
            self._started = True

    def stop(self, timeout: float = 30.0) -> None:
        """Answer what is queued, then end the thread."""
        self._stopping = True
        if self._started and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout)

    async def predict(self, context: DialogueContext, utterance_id: int, encoded: EncodedUtterance) -> Scored:
        """Append `encoded` to the session's dialogue and predict it (re-scoring the previous utterance)."""
        loop = asyncio.get_running_loop()
        job = _PredictJob(loop, loop.create_future(), context=context, utterance_id=utterance_id, encoded=encoded)
        self._put(job)
        return await job.future

    async def peek(self, context: DialogueContext, encoded: EncodedUtterance) -> Prediction:
        """The prediction `encoded` would get as the session's next utterance; the dialogue is unchanged."""
        loop = asyncio.get_running_loop()
        job = _PredictJob(loop, loop.create_future(), context=context, encoded=encoded, peek=True)
        self._put(job)
        return await job.future

    def ensure_alive(self) -> None:
        """Replace the thread if something killed it (it serves every session)."""
        if not self._started or self._stopping:
            return
        with self._lock:
            if not self._thread.is_alive():
                if self._restarted is not None:
                    self._restarted(self._thread.name)
                else:
                    report_restart(self.metrics, self._thread.name)
                self._thread = threading.Thread(target=self._run, name=self.NAME, daemon=True)
                self._thread.start()

    def _put(self, job: _PredictJob) -> None:
        self.ensure_alive()
        put_or_refuse(self._queue, job)

    # ---- the thread ----
    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch, stop = collect(self._queue, first, self.config.max_batch, 0.0)
            try:
                self._predict(batch)
            except Exception as e:  # a bug: fail this batch, keep serving
                log.exception("predict batch failed")
                for j in batch:
                    j.resolve(error=RuntimeError(f"inference head failed: {type(e).__name__}: {e}"))
            if stop:
                return

    def _predict(self, jobs: list[_PredictJob]) -> None:
        t0 = time.perf_counter()
        threshold = self.config.low_confidence  # None: the checkpoint's confidence_threshold
        per_job: list[list[Any]] = []
        for j in jobs:
            assert j.context is not None and j.encoded is not None
            per_job.append(j.context.peek(j.encoded) if j.peek else j.context.add(j.utterance_id, j.encoded))
        try:
            preds = self.model.predict([r for reqs in per_job for r in reqs], threshold)
        except Exception:  # one bad request must not fail the other sessions' jobs: retry each alone
            log.exception("batched predict failed; retrying job by job")
            for j, reqs in zip(jobs, per_job):
                try:
                    j.resolve(self._result(j, self.model.predict(reqs, threshold)))
                except Exception as e:
                    j.resolve(error=e)
            return
        self.metrics.model_seconds.observe(time.perf_counter() - t0)
        k = 0
        for j, reqs in zip(jobs, per_job):
            j.resolve(self._result(j, preds[k : k + len(reqs)]))
            k += len(reqs)

    @staticmethod
    def _result(job: _PredictJob, preds: list[Prediction]) -> Scored | Prediction:
        assert job.context is not None
        return preds[0] if job.peek else job.context.scored(preds)
