"""The inference threads that own Whisper and the emotion model, fed by micro-batching queues.

Sessions submit jobs from the event loop and await asyncio futures:
- analyze(audio, context, words=...): Whisper transcript + the model's cached utterance features
  (text + speech), encoded with the session's earlier transcripts and Whisper's pooled encoder states;
- interim(audio, context): the same for the speech so far of an utterance still being spoken, only
  when a decoder is idle (None otherwise): interim work never makes a final wait in a queue;
- predict(context, utterance_id, encoded): append to the session's dialogue, predict it (and
  re-score the previous utterance); peek(context, encoded): predict an unfinished utterance
  without adding it.
Analyses run on `workers` decoding threads (AsrConfig.workers; each its own CTranslate2 replica):
a thread takes the first job, waits at most `max_wait_ms` for company up to the ASR's batch size,
then runs one ASR call and one encoder call. Predictions run on the PredictionHead's thread
(head.py), so they never queue behind a decode. Jobs abandoned before they run (speech resumed
after a speculative decode) are skipped.

Load: the engine keeps how long a decode takes per utterance and how busy the decoders were over
the last LOAD_WINDOW_S; wait_estimate_s(), load() and unavailable() feed the admission policy
(server.py), status() /healthz, and wait_estimate_s() the per-utterance bound `max_queue_s` (beyond
it a new utterance is refused with Overloaded). Both engines implement backend.InferenceBackend;
RemoteInferenceEngine's load comes from the remote workers' heartbeats.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from collections.abc import Sequence
from typing import Any

import numpy as np

from model import EmotionModel, EncodedUtterance, Prediction
from streamer.config import SAMPLE_RATE, InferenceConfig
from streamer.infer.backend import Analysis, Overloaded, SpeechToText
from streamer.infer.head import PredictionHead, ThreadJob, collect, put_or_refuse, report_restart
from streamer.infer.load import LOAD_WINDOW_S, DecoderLoad
from streamer.pipeline.context import DialogueContext, Scored
from streamer.metrics import Metrics
from streamer.infer.transcriber import Transcript

__all__ = ["Analysis", "CONTEXT_CHARS", "CONTEXT_TRANSCRIPTS", "InferenceEngine", "LOAD_WINDOW_S", "Overloaded",
           "SpeechToText", "bounded_context", "transcribe_and_encode", "whisper_inputs"]

log = logging.getLogger(__name__)

CONTEXT_TRANSCRIPTS = 8  # earlier transcripts a session sends with each utterance (the model reads its text_context)
CONTEXT_CHARS = 1000  # each one cut to this many characters (a 15 s utterance is ~300): bounds the remote job too


def bounded_context(context: Sequence[str] | None) -> list[str]:
    """An utterance's earlier transcripts (most recent first) within the limits above; the
    in-process engine and the remote job both use this, so workers see what the thread would."""
    return [str(t)[:CONTEXT_CHARS] for t in list(context or ())[:CONTEXT_TRANSCRIPTS]]


def whisper_inputs(model: EmotionModel, asr: SpeechToText,
                   transcripts: Sequence[Transcript]) -> list[np.ndarray | None] | None:
    """Each transcript's pooled Whisper states where the model's speech branch takes them (same
    ASR model, same size), else None per utterance; None when none fits (or the ASR gave none)."""
    name = asr.name
    out: list[np.ndarray | None] = []
    for t in transcripts:
        st = t.whisper_states
        ok = st is not None and np.ndim(st) == 1 and model.accepts_whisper(name, int(np.shape(st)[0]))
        out.append(st if ok else None)
    return out if any(s is not None for s in out) else None


def transcribe_and_encode(model: EmotionModel, asr: SpeechToText, audios: list[np.ndarray],
                          contexts: Sequence[Sequence[str]], words: Sequence[bool] | None = None,
                          encode: Sequence[bool] | None = None, redecode: Sequence[bool] | None = None,
                          ) -> tuple[list[Transcript], list[EncodedUtterance], float, float]:
    """Whisper, then the model's utterance features from the transcripts, Whisper's pooled states and
    each utterance's context: (transcripts, encoded, ASR seconds, encoding seconds). The inference
    thread and remote workers both call this, so an utterance is encoded the same way in either.
    `words`: per utterance, whether its transcript should carry word timings (Transcript.words).
    `encode`: per utterance, False for transcription only (a side that is never scored,
    --score-sides): no feature of its voice or words is computed, its EncodedUtterance is empty.
    `redecode`: per utterance, False for an interim draft (SpeechToText.transcribe)."""
    t0 = time.perf_counter()
    extra: dict[str, list[bool]] = {}
    if words is not None and any(words):
        extra["words"] = list(words)
    if redecode is not None and not all(redecode):
        extra["redecode"] = list(redecode)
    transcripts = asr.transcribe(audios, **extra)
    t1 = time.perf_counter()
    keep = [i for i in range(len(audios)) if encode is None or encode[i]]
    encoded = [EncodedUtterance(None, None) for _ in audios]
    if keep:
        states = whisper_inputs(model, asr, [transcripts[i] for i in keep])
        done = model.encode_utterances([transcripts[i].text for i in keep], [audios[i] for i in keep], whisper=states,
                                       contexts=[list(contexts[i]) for i in keep])
        for i, e in zip(keep, done):
            encoded[i] = e
    return transcripts, encoded, t1 - t0, time.perf_counter() - t1


@dataclass(eq=False)
class _AnalyzeJob(ThreadJob):
    audio: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    context: list[str] = field(default_factory=list)  # earlier transcripts of the session, most recent first
    words: bool = False  # the transcript should carry word timings
    encode: bool = True  # False: transcription only (an unscored side)
    interim: bool = False  # an unfinished utterance's speech so far (not counted as load)



class InferenceEngine:
    """The in-process InferenceBackend: Whisper and the encoders run on `workers` decoding
    threads, predictions on a PredictionHead's thread."""

    def __init__(self, model: EmotionModel, asr: SpeechToText, config: InferenceConfig, metrics: Metrics) -> None:
        self.model = model
        self.asr = asr
        self.config = config
        self.metrics = metrics
        if not isinstance(asr, SpeechToText):
            raise TypeError(f"{type(asr).__name__} is not a SpeechToText (transcribe(), name, workers, batch_size)")
        self.workers = max(1, int(asr.workers))
        self.head = PredictionHead(model, config, metrics, restarted=self._restarted)
        self._queue: queue.Queue[_AnalyzeJob | None] = queue.Queue(maxsize=config.queue_size)
        self._threads = [self._analysis_thread(i) for i in range(self.workers)]
        self.meter = DecoderLoad(self.workers)
        self._restart_lock = threading.Lock()
        self._interim_after = 0.0  # no interim decode starts before this (monotonic s): see interim_share
        self._started = False
        self._stopping = False
        self.batches = 0
        self.restarts = 0

    def _analysis_thread(self, i: int) -> threading.Thread:
        return threading.Thread(target=self._run, name=f"emostream-inference-{i}", daemon=True)

    @property
    def depth(self) -> int:
        return self._queue.qsize() + self.head.depth

    def start(self) -> None:
        if not self._started:
            threads = self.config.torch_threads or (max(1, (os.cpu_count() or 1) // self.workers) if self.workers > 1 else 0)
            if threads > 0:  # several decoding threads each run the encoders: one core's worth each
                import torch

                torch.set_num_threads(threads)
            for t in self._threads:
                t.start()
            self.head.start()
            self._started = True

    def warmup(self) -> float:
        """Run one tiny utterance per decoder through Whisper and the model before serving, so the
        first real utterances do not pay for lazy initialisation (~0.5 s on CPU). Call before start()."""
        t0 = time.perf_counter()
        audio = np.zeros(SAMPLE_RATE, dtype=np.float32)

        def one() -> None:
            transcribe_and_encode(self.model, self.asr, [audio], [["warm up"]])

        helpers = [threading.Thread(target=one) for _ in range(self.workers - 1)]
        for t in helpers:
            t.start()
        _, encoded, _, _ = transcribe_and_encode(self.model, self.asr, [audio], [["warm up"]])
        for t in helpers:
            t.join()
        dialogue = self.model.new_dialogue()
        self.model.predict([(dialogue, dialogue.append(encoded[0]))])
        return time.perf_counter() - t0

    def stop(self, timeout: float = 30.0) -> None:
        """Finish queued jobs, then end the threads."""
        self._stopping = True
        if not self._started:
            return
        for t in self._threads:
            if t.is_alive():
                self._queue.put(None)
        for t in self._threads:
            t.join(timeout)
        self.head.stop(timeout)

    def begin_shutdown(self) -> None:
        """Nothing to fail early: every queued job will be answered by stop()."""

    async def aclose(self, timeout_s: float = 2.0) -> None:
        """Nothing lives on the event loop."""

    def new_context(self) -> DialogueContext:
        return self.head.new_context()

    # ---- load ----
    async def ready(self) -> None:
        """Admission can be decided at once: the decoders are in this process (RemoteInferenceEngine waits)."""

    def unavailable(self) -> str | None:
        """Never: the decoders are in this process, and a dead thread is replaced."""
        return None

    def status(self) -> dict[str, Any]:
        """For /healthz: the decoders, how busy they were lately, how long a new utterance would wait."""
        return {"kind": "local", "ok": True, "problem": None, "decoders": self.workers,
                "load": round(self.load(), 3), "wait_s": round(self.wait_estimate_s(), 3)}

    def wait_estimate_s(self) -> float:
        """How long an utterance queued now would wait before a decoder starts on it."""
        ahead = self._queue.qsize() + max(0, self.meter.busy - self.workers + 1)
        return ahead * self.meter.job_s / self.workers

    def idle(self) -> bool:
        """Nothing queued and a decoder free: an interim decode may run without delaying a final
        (with several decoders one is always left free for finals)."""
        spare = self.workers - self.meter.busy
        return self._queue.empty() and (spare >= 2 or (self.workers == 1 and spare == 1))

    def load(self) -> float:
        """Fraction of the decoders' time spent decoding over the last LOAD_WINDOW_S (0..1)."""
        return self.meter.load()

    # ---- event-loop side ----
    def analyze(self, audio: np.ndarray, context: Sequence[str] | None = None, *, words: bool = False,
                max_wait_s: float | None = None, encode: bool = True, interim: bool = False) -> _AnalyzeJob:
        """Queue an utterance for ASR + encoding; await job.future for an Analysis. `context`: the
        session's earlier transcripts, most recent first (copied: the caller's list may change).
        Raises Overloaded when the queue is full or the wait would exceed `max_wait_s` (default
        InferenceConfig.max_queue_s)."""
        limit = self.config.max_queue_s if max_wait_s is None else max_wait_s
        wait = self.wait_estimate_s()
        if wait > limit:
            raise Overloaded(f"decoders are {wait:.1f} s behind (limit {limit:g} s)")
        loop = asyncio.get_running_loop()
        job = _AnalyzeJob(loop, loop.create_future(), audio=audio, context=bounded_context(context), words=words,
                          encode=encode,
                          interim=interim)
        self._put(job)
        return job

    def interim(self, audio: np.ndarray, context: Sequence[str] | None = None, *,
                encode: bool = True) -> _AnalyzeJob | None:
        """analyze() for the speech so far of an unfinished utterance, or None when no decoder is
        idle or interim work has used its share of one decoder's time (InferenceConfig.interim_share)
        lately: interim results are skipped, never queued behind or ahead of final ones."""
        if time.monotonic() < self._interim_after or not self.idle():
            return None
        try:
            return self.analyze(audio, context, encode=encode, interim=True)
        except Overloaded:
            return None

    async def predict(self, context: DialogueContext, utterance_id: int, encoded: EncodedUtterance) -> Scored:
        return await self.head.predict(context, utterance_id, encoded)

    async def peek(self, context: DialogueContext, encoded: EncodedUtterance) -> Prediction:
        """The prediction `encoded` would get as the session's next utterance; the dialogue is unchanged."""
        return await self.head.peek(context, encoded)

    def _ensure_workers(self) -> None:
        """Restart any thread something killed (they serve every session; called on every put)."""
        if not self._started or self._stopping:
            return
        with self._restart_lock:
            self._restart_dead()

    def _restart_dead(self) -> None:
        for i, t in enumerate(self._threads):
            if not t.is_alive():
                self._restarted(t.name)
                self._threads[i] = self._analysis_thread(i)
                self._threads[i].start()
        self.head.ensure_alive()

    def _restarted(self, name: str) -> None:
        report_restart(self.metrics, name)
        self.restarts += 1

    def _put(self, job: _AnalyzeJob) -> None:
        self._ensure_workers()
        put_or_refuse(self._queue, job)

    # ---- decoding threads ----
    def _run(self) -> None:
        size = max(1, min(self.config.max_batch, int(self.asr.batch_size)))
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch, stop = collect(self._queue, first, size, self.config.max_wait_ms / 1000,
                                   live=lambda b: sum(not j.abandoned for j in b))
            t0 = self.meter.begin(len(batch))
            try:
                self._process(batch)
            except BaseException as e:  # a bug in the worker itself: fail this batch, never hang it
                for j in batch:
                    j.resolve(error=RuntimeError(f"inference worker failed: {type(e).__name__}: {e}"))
                if not isinstance(e, Exception):
                    self._end_batch(t0, batch)
                    self._ensure_workers_soon()
                    raise
                log.exception("inference batch failed")
            self._end_batch(t0, batch)
            if stop:
                return

    def _ensure_workers_soon(self) -> None:
        """From a dying thread: start its replacement once it has ended (queued jobs go on)."""
        me = threading.current_thread()

        def replace() -> None:
            me.join()
            self._ensure_workers()

        threading.Thread(target=replace, daemon=True).start()

    def _end_batch(self, t0: float, batch: list[_AnalyzeJob]) -> None:
        """Load bookkeeping: interim decodes only fill idle time, so they count as neither load nor cost."""
        interim = all(j.interim for j in batch)
        t1 = self.meter.end(t0, sum(not j.abandoned for j in batch), counted=not interim)
        if interim:  # rest so that interim work keeps within its share
            share = self.config.interim_share
            self._interim_after = t1 + (t1 - t0) * (1 - share) / share
        self.batches += 1

    def _process(self, batch: list[_AnalyzeJob]) -> None:
        analyses = [j for j in batch if not j.abandoned]
        for j in batch:
            if j.abandoned:
                j.loop.call_soon_threadsafe(j.future.cancel)
        if analyses:
            self._analyze(analyses)

    def _analyze(self, jobs: list[_AnalyzeJob]) -> None:
        step = max(1, int(self.asr.batch_size))
        if len(jobs) > step:  # decode in slices and publish each slice as soon as it is done
            for s in range(0, len(jobs), step):
                self._analyze(jobs[s : s + step])
            return
        try:
            transcripts, encoded, asr_s, enc_s = transcribe_and_encode(
                self.model, self.asr, [j.audio for j in jobs], [j.context for j in jobs], [j.words for j in jobs],
                [j.encode for j in jobs], [not j.interim for j in jobs])
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
