"""Remote inference: the service sends `analyze` jobs (utterance audio) through Redis Streams to a
pool of `python -m streamer.infer.worker` processes that own Whisper and the text encoder, and keeps only
the emotion model's cheap head (Bi-GRU + fusion + classifier) and each session's dialogue context.

Wire format (Redis Streams, one consumer group, so N workers share the load and each batches jobs
from every front-end):
- jobs: `emostream:infer:jobs`, group `emostream:infer:workers`; fields j (job id), r (the
  front-end's reply stream), f ("s16" int16 PCM or "f32"), a (16 kHz mono audio), d (deadline, unix s),
  c (the session's earlier transcripts, most recent first: a JSON list of strings, bounded by
  inference.bounded_context; a job without it, from an older front-end, has no context),
  w ("1": time the transcript's words; absent, from an older front-end or when not wanted: don't),
  and e ("0": transcribe only, compute no features: a side that is never scored; absent: encode).
- replies: `emostream:infer:r:{instance}` per front-end; fields j, ok ("1"/"0"), and either the
  transcript (text, nsp, lp), the cached vectors (tv: 384-d sentence vector, sv: speech-CNN
  embedding, float32 bytes, empty when absent), timings (asr, enc) and the worker (w), or err.
  A job that asked for word timings gets wd too: a JSON list of [word, start_s, end_s, probability]
  (seconds from the utterance's start; [] when there is no text); without wd, Transcript.words is None.
- heartbeats: every worker writes `emostream:infer:hb:{worker}` (a JSON WorkerLoad: decoders, busy,
  jobs in hand, per-job decode time, load over the last 10 s, jobs done, ttl_s) with a TTL of a few
  beats and keeps its name in the set `emostream:infer:hb`; a clean exit deletes both. A key that
  expired is a worker that stopped beating (killed, hung, cut off).
A worker acknowledges (XACK) a job only in the transaction that writes its reply; a job whose
worker died stays pending and is taken over (XAUTOCLAIM) by another worker after `claim_idle_s`.
The front-end fails a job nobody answered within `remote_timeout_s` (the utterance gets an error
event, the session goes on) and bounds its outstanding jobs by `queue_size` (then Overloaded).
Every WATCH_S it reads the heartbeats and the job stream's length: admission (server.py) refuses
new sessions while no worker is alive, Redis is unreachable, or the queue is deeper than the live
workers clear within the admission bound; an utterance that would wait past max_queue_s is refused
with Overloaded, as in process; /healthz reports `degraded` while no worker is alive or Redis is down.
Shutting down while Redis is unreachable, outstanding jobs fail at once (begin_shutdown) and each
Redis call of the clean-up gets 2 s, so a dead or hung Redis never holds shutdown up.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch

from model import EmotionModel, EncodedUtterance, Prediction
from streamer.config import InferenceConfig
from streamer.pipeline.context import DialogueContext, Scored
from streamer.infer.backend import Analysis, Overloaded
from streamer.infer.engine import bounded_context
from streamer.infer.head import PredictionHead
from streamer.metrics import Metrics
from streamer.infer.transcriber import Transcript, Word

log = logging.getLogger(__name__)

JOBS = "emostream:infer:jobs"
GROUP = "emostream:infer:workers"
JOBS_MAXLEN = 100_000  # approximate cap on the job stream (workers delete what they finished)
WORKER_INDEX = "emostream:infer:hb"  # set: names of workers that have sent a heartbeat


def reply_key(instance: str) -> str:
    return f"emostream:infer:r:{instance}"


def heartbeat_key(worker: str) -> str:
    return f"{WORKER_INDEX}:{worker}"


class RemoteTimeout(RuntimeError):
    """No inference worker answered a job in time (none running, all busy, or one died with it)."""


class RemoteError(RuntimeError):
    """A worker answered a job with an error, or the job could not be sent."""


# ---- wire format ------------------------------------------------------------------------------
def encode_audio(audio: np.ndarray) -> tuple[bytes, bytes]:
    """(format, bytes): int16 PCM when that is exact (audio that arrived as pcm_s16le at 16 kHz),
    else float32, so a worker always sees exactly what the in-process engine would."""
    audio = np.asarray(audio, dtype=np.float32)
    pcm = np.clip(np.round(audio * 32768.0), -32768, 32767).astype("<i2")
    if np.array_equal(pcm.astype(np.float32) / 32768.0, audio):
        return b"s16", pcm.tobytes()
    return b"f32", audio.astype("<f4").tobytes()


def decode_audio(fmt: bytes, data: bytes) -> np.ndarray:
    if fmt == b"s16":
        return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
    if fmt == b"f32":
        return np.frombuffer(data, dtype="<f4").astype(np.float32)
    raise ValueError(f"unknown audio format {fmt!r}")


def _vec_bytes(v: torch.Tensor | None) -> bytes:
    return b"" if v is None else v.detach().float().cpu().numpy().astype("<f4").tobytes()


def _vec(data: bytes, device: torch.device) -> torch.Tensor | None:
    if not data:
        return None
    return torch.from_numpy(np.frombuffer(data, dtype="<f4").copy()).to(device)


def job_fields(job_id: str, reply_to: str, audio: np.ndarray, deadline: float,
               context: Sequence[str] | None = None, words: bool = False, encode: bool = True,
               interim: bool = False) -> dict[str, Any]:
    fmt, data = encode_audio(audio)
    fields: dict[str, Any] = {"j": job_id, "r": reply_to, "f": fmt, "a": data, "d": repr(deadline),
                              "c": json.dumps(bounded_context(context), ensure_ascii=False)}
    if words:
        fields["w"] = b"1"
    if not encode:
        fields["e"] = b"0"
    if interim:
        fields["i"] = b"1"
    return fields


def wants_words(fields: dict[bytes, bytes]) -> bool:
    """Whether a job asks for word timings (field w; absent from older front-ends)."""
    return fields.get(b"w") == b"1"


def is_interim(fields: dict[bytes, bytes]) -> bool:
    """Whether a job is an interim draft (field i; absent from older front-ends: no), whose
    repeating transcript is not decoded again."""
    return fields.get(b"i") == b"1"


def wants_encoding(fields: dict[bytes, bytes]) -> bool:
    """Whether a job wants the utterance's features (field e absent, as from older front-ends: yes)."""
    return fields.get(b"e") != b"0"


def decode_context(fields: dict[bytes, bytes]) -> list[str]:
    """A job's context (field c); none when the field is absent (a front-end from before it existed).
    Raises ValueError when it is not a JSON list of strings."""
    raw = fields.get(b"c")
    if not raw:
        return []
    value = json.loads(raw.decode())  # UnicodeDecodeError and JSONDecodeError are ValueErrors
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise ValueError("context must be a JSON list of strings")
    return bounded_context(value)


def encode_words(words: Sequence[Word]) -> str:
    return json.dumps([[w.word, w.start_s, w.end_s, w.probability] for w in words], ensure_ascii=False)


def decode_words(raw: bytes | None) -> tuple[Word, ...] | None:
    """A reply's word timings (field wd); None when absent. Raises ValueError when malformed."""
    if raw is None:
        return None
    value = json.loads(raw.decode())
    if not isinstance(value, list) or not all(isinstance(w, list) and len(w) == 4 and isinstance(w[0], str)
                                              for w in value):
        raise ValueError("word timings must be a JSON list of [word, start_s, end_s, probability]")
    return tuple(Word(w, float(start), float(end), float(p)) for w, start, end, p in value)


def reply_fields(job_id: bytes, transcript: Transcript, encoded: EncodedUtterance, asr_s: float, enc_s: float,
                 worker: str) -> dict[str, Any]:
    fields = {"j": job_id, "ok": "1", "text": transcript.text, "nsp": repr(transcript.no_speech_prob),
              "lp": repr(transcript.avg_logprob), "tv": _vec_bytes(encoded.text_vec), "sv": _vec_bytes(encoded.speech_vec),
              "asr": repr(asr_s), "enc": repr(enc_s), "w": worker}
    if transcript.words is not None:
        fields["wd"] = encode_words(transcript.words)
    if transcript.redecoded:
        fields["rd"] = "1"
    if encoded.speech_distance is not None:
        fields["sd"] = repr(encoded.speech_distance)
    return fields


def error_fields(job_id: bytes, message: str, worker: str) -> dict[str, Any]:
    return {"j": job_id, "ok": "0", "err": message[:2000], "w": worker}


@dataclass(frozen=True)
class WorkerLoad:
    """One worker's heartbeat: what it is doing now and how fast it decodes."""

    worker: str
    decoders: int = 1  # decoding threads (a worker process runs one)
    busy: int = 0  # decoders inside a batch now
    in_hand: int = 0  # jobs taken from the stream and not answered yet
    job_s: float = 0.3  # running mean of one job's decode + encode time (s)
    load: float = 0.0  # fraction of the last 10 s spent decoding (0..1)
    jobs: int = 0  # jobs answered since the worker started
    ttl_s: float = 5.0  # the heartbeat key's TTL as written
    age_s: float = 0.0  # front-end side: seconds since the heartbeat was written (from the key's TTL left)


_LOAD_FIELDS = {"decoders": int, "busy": int, "in_hand": int, "job_s": float, "load": float, "jobs": int,
                "ttl_s": float}


def encode_heartbeat(load: WorkerLoad) -> str:
    return json.dumps({"worker": load.worker, **{k: getattr(load, k) for k in _LOAD_FIELDS}})


def decode_heartbeat(raw: bytes, pttl_ms: int) -> WorkerLoad:
    """A heartbeat key's value and its remaining TTL (PTTL) as a WorkerLoad. Raises ValueError
    when malformed (TypeError and KeyError are turned into it)."""
    try:
        value = json.loads(raw.decode())
        fields = {k: cast(value[k]) for k, cast in _LOAD_FIELDS.items()}
        load = WorkerLoad(str(value["worker"]), **fields)  # type: ignore[arg-type]
    except (KeyError, TypeError) as e:
        raise ValueError(f"malformed heartbeat: {type(e).__name__}: {e}") from None
    if load.decoders < 1 or not 0 < load.job_s < math.inf:
        raise ValueError(f"heartbeat of {load.worker}: need decoders >= 1 and a finite job_s > 0")
    return replace(load, age_s=max(0.0, load.ttl_s - max(0, pttl_ms) / 1000))


@dataclass(frozen=True)
class WorkerView:
    """What the front-end last read from Redis: the live workers and the job stream's length."""

    workers: tuple[WorkerLoad, ...] = ()
    queue: int = 0  # entries in the job stream: waiting, or in some worker's hands
    error: str | None = None  # that read failed (Redis unreachable): why


def parse_reply(fields: dict[bytes, bytes], device: torch.device) -> tuple[str, Analysis | RemoteError]:
    """(job id, the Analysis or the worker's error) from a reply entry."""
    job_id = fields[b"j"].decode()
    if fields.get(b"ok") != b"1":
        worker = fields.get(b"w", b"?").decode(errors="replace")
        return job_id, RemoteError(f"inference worker {worker}: {fields.get(b'err', b'').decode(errors='replace')}")
    tr = Transcript(text=fields[b"text"].decode(), no_speech_prob=float(fields[b"nsp"]), avg_logprob=float(fields[b"lp"]),
                    words=decode_words(fields.get(b"wd")), redecoded=fields.get(b"rd") == b"1")
    sd = fields.get(b"sd")
    enc = EncodedUtterance(text_vec=_vec(fields[b"tv"], device), speech_vec=_vec(fields[b"sv"], device),
                           speech_distance=None if sd is None else float(sd))
    return job_id, Analysis(tr, enc, float(fields[b"asr"]), float(fields[b"enc"]))


# ---- front-end side ---------------------------------------------------------------------------
class WorkerWatch:
    """The front-end's view of the workers: every WATCH_S until stop(), their heartbeats and the job
    stream's length are read into `view`; load, wait and availability are computed from it."""

    WATCH_S = 1.0  # the workers' heartbeats and the job queue's depth are read this often

    def __init__(self, redis: Any, metrics: Metrics) -> None:
        self.redis, self.metrics = redis, metrics
        self.view: WorkerView | None = None  # the last read; None: not read yet
        self.looked = asyncio.Event()  # set once the first read has finished (or failed)
        self.stopped = False

    def stop(self) -> None:
        self.stopped = True

    def unavailable(self) -> str | None:
        """Why no remote inference can be counted on now (None: some worker is alive)."""
        view = self.view
        if view is None:
            return "the inference workers' heartbeats have not been read yet"
        if view.error is not None:
            return f"inference Redis unreachable ({view.error})"
        if not view.workers:
            return "no inference worker alive (no worker heartbeat in Redis)"
        return None

    def load(self) -> float:
        """Fraction of the live workers' decoders' time spent decoding over their last 10 s, as
        their heartbeats last said (0..1); 1.0 with no worker alive (no spare capacity)."""
        workers = self.view.workers if self.view else ()
        if not workers:
            return 1.0
        return min(1.0, sum(w.load * w.decoders for w in workers) / sum(w.decoders for w in workers))

    def wait_estimate_s(self, outstanding: int = 0) -> float:
        """How long a job sent now would wait before a worker starts on it: the jobs in the stream
        not in a worker's hands (at least this front-end's `outstanding` ones, newer than the
        last read), plus one when every decoder is busy, at the rate the live workers clear jobs
        (decoders / job_s each, from their heartbeats); inf with no worker alive."""
        view = self.view
        if view is None or not view.workers:
            return math.inf
        taken = sum(w.in_hand for w in view.workers)
        waiting = max(0, max(view.queue, outstanding) - taken)
        full = all(w.busy >= w.decoders for w in view.workers)
        return (waiting + full) / sum(w.decoders / w.job_s for w in view.workers)

    async def run(self) -> None:
        """Every WATCH_S until stop(): read the workers' heartbeats and the job queue's depth into `view`."""
        while not self.stopped:
            try:
                self.view = await self.look()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                if self.stopped:
                    return
                self.metrics.inc("emostream_remote_errors_total")
                if self.view is None or self.view.error is None:  # once per streak
                    log.error("inference: reading worker heartbeats: %s: %s", type(e).__name__, e)
                self.view = WorkerView(error=f"{type(e).__name__}: {e}")
            self.looked.set()
            await asyncio.sleep(self.WATCH_S)

    async def look(self) -> WorkerView:
        """One read: the workers in WORKER_INDEX whose heartbeat key is alive (the expired ones are
        dropped from the index) and the job stream's length."""
        names = sorted(await self.redis.smembers(WORKER_INDEX))
        pipe = self.redis.pipeline(transaction=False)
        pipe.xlen(JOBS)
        for name in names:
            pipe.get(heartbeat_key(name.decode()))
            pipe.pttl(heartbeat_key(name.decode()))
        queue, *beats = await pipe.execute()
        workers, gone = [], []
        for name, raw, pttl in zip(names, beats[::2], beats[1::2]):
            if raw is None:
                gone.append(name)
                continue
            try:
                workers.append(decode_heartbeat(raw, pttl))
            except ValueError as e:
                log.warning("inference: ignoring the heartbeat of %s: %s", name.decode(errors="replace"), e)
        if gone:
            await self.redis.srem(WORKER_INDEX, *gone)
        return WorkerView(tuple(workers), int(queue))


@dataclass(eq=False)
class RemoteJob:
    """An analyze job in flight, as SessionRunner sees it: `.future` gives an Analysis;
    setting `.abandoned` (speech resumed after a speculative decode) withdraws it."""

    engine: RemoteInferenceEngine
    job_id: str
    future: asyncio.Future[Any]
    sent_at: float
    timer: asyncio.TimerHandle | None = None
    entry_id: bytes | None = None  # the job stream entry, once written
    _abandoned: bool = field(default=False)

    @property
    def abandoned(self) -> bool:
        return self._abandoned

    @abandoned.setter
    def abandoned(self, value: bool) -> None:
        if value and not self._abandoned:
            self._abandoned = True
            self.engine._withdraw(self)
            self.future.cancel()


class RemoteInferenceEngine:
    """The InferenceBackend of `--inference`: analyze jobs served by remote workers through Redis,
    predictions on a PredictionHead here (the workers never see a dialogue), the workers' load
    from WorkerWatch. Over the ~250-line guide: the outstanding-job table, its timers, and the
    Redis writer and reader that fill and resolve it share that table and one connection state."""

    def __init__(self, model: EmotionModel, config: InferenceConfig, metrics: Metrics) -> None:
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import EqualJitterBackoff, NoBackoff

        assert config.remote is not None
        self.model = model
        self.config = config
        self.metrics = metrics
        self.head = PredictionHead(model, config, metrics)
        self.instance = uuid.uuid4().hex[:12]
        self.reply_key = reply_key(self.instance)
        opts: dict[str, Any] = {"socket_timeout": 5.0, "socket_connect_timeout": 5.0, "health_check_interval": 0,
                                "retry": Retry(NoBackoff(), 0)}  # our loops retry, with back-off
        self.redis = aioredis.from_url(config.remote, **opts)
        self.reader_redis = aioredis.from_url(config.remote, **{**opts, "socket_timeout": 5.0 + self.BLOCK_S})
        # between a loop's failed attempts: redis-py's exponential back-off with jitter
        self.backoff = EqualJitterBackoff(cap=self.BACKOFF_MAX_S, base=self.BACKOFF_MIN_S / 2)
        self._jobs: dict[str, RemoteJob] = {}  # outstanding: sent (or about to be), not yet answered
        self._outbox: asyncio.Queue[tuple[RemoteJob, dict[str, Any]]] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._side: set[asyncio.Task[Any]] = set()  # fire-and-forget XDELs
        self._n = 0
        self.connected = False
        self._closing = False  # begin_shutdown() was called
        # aclose() was called: the Redis loops end (the flag as well as the cancel: on Python 3.11 a
        # cancel that lands as a Redis read times out can surface as that TimeoutError instead)
        self._stopped = False
        self.watch = WorkerWatch(self.redis, metrics)
        metrics.gauge("emostream_remote_jobs_outstanding", "analyze jobs sent to inference workers, not yet answered",
                      lambda: len(self._jobs))
        metrics.gauge("emostream_remote_workers_alive", "inference workers with a live heartbeat in Redis",
                      lambda: len(self.watch.view.workers) if self.watch.view else 0)

    BLOCK_S = 1.0  # one XREAD on the reply stream waits this long
    BACKOFF_MIN_S, BACKOFF_MAX_S = 0.1, 5.0
    READY_S = 6.0  # ready() waits at most this for the first read (a hung Redis: one socket timeout)

    @property
    def depth(self) -> int:
        return self.head.depth + len(self._jobs)

    def start(self) -> None:
        """Start the head's thread and the Redis writer/reader tasks (call on the event loop)."""
        self.head.start()
        self._outbox = asyncio.Queue()
        self._tasks = [asyncio.create_task(self._write_loop(), name="inference-writer"),
                       asyncio.create_task(self._read_loop(), name="inference-reader"),
                       asyncio.create_task(self.watch.run(), name="inference-watch")]

    async def ready(self) -> None:
        """Return once the workers' heartbeats were read (or could not be: Redis down), so that
        admission never decides on a guess; bounded by READY_S."""
        try:
            await asyncio.wait_for(self.watch.looked.wait(), self.READY_S)
        except asyncio.TimeoutError:
            log.warning("inference: no answer from Redis within %g s; admitting nobody until it answers", self.READY_S)

    def warmup(self) -> float:
        """One prediction through the head (the workers warm up their own models)."""
        return self.head.warmup()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish queued predictions, end the head's thread (blocking; see aclose for Redis)."""
        self.head.stop(timeout)

    def begin_shutdown(self) -> None:
        """The service is shutting down: from now on, while Redis is unreachable, outstanding jobs
        fail at once instead of waiting out remote_timeout_s (no reply can arrive; the sessions'
        last utterances get their error events and shutdown goes on)."""
        self._closing = True
        if not self.connected:
            self._fail_outstanding("inference queue unreachable while shutting down")

    def _fail_outstanding(self, why: str) -> None:
        for job in list(self._jobs.values()):
            self._fail(job, RemoteError(why))

    async def aclose(self, timeout_s: float = 2.0) -> None:
        """Fail what is still outstanding, stop the Redis tasks, drop our reply stream, disconnect.
        Bounded: each Redis call here gets `timeout_s` (Redis may hang or be gone; the reply stream
        then expires on its own after the workers' reply_ttl_s)."""
        self._closing = self._stopped = True
        self.watch.stop()
        self._fail_outstanding("service shutting down")
        for t in (*self._tasks, *self._side):  # a pending withdrawal (XDEL) is moot: workers skip expired jobs
            t.cancel()
        tasks = [*self._tasks, *self._side]
        if tasks:
            _, stuck = await asyncio.wait(tasks, timeout=timeout_s)
            if stuck:
                log.warning("inference: %d Redis tasks did not stop within %g s", len(stuck), timeout_s)
        self._tasks = []
        try:
            await asyncio.wait_for(self.redis.delete(self.reply_key), timeout_s)
        except (Exception, asyncio.TimeoutError) as e:  # Redis down at shutdown: the stream expires on its own
            log.warning("inference: could not delete reply stream %s: %s", self.reply_key, str(e) or type(e).__name__)
        for r in (self.redis, self.reader_redis):
            try:
                await asyncio.wait_for(r.aclose(), timeout_s)
            except (Exception, asyncio.TimeoutError) as e:
                log.warning("inference: closing the Redis client failed: %s", str(e) or type(e).__name__)

    def new_context(self) -> DialogueContext:
        return self.head.new_context()

    def status(self) -> dict[str, Any]:
        """For /healthz: `ok` false with the `problem` while no worker is alive or Redis is unreachable."""
        view, problem, wait = self.watch.view or WorkerView(), self.unavailable(), self.wait_estimate_s()
        workers = {"alive": len(view.workers), "decoders": sum(w.decoders for w in view.workers),
                   "busy": sum(w.busy for w in view.workers),
                   "list": [{k: round(v, 3) if isinstance(v, float) else v for k, v in asdict(w).items()}
                            for w in view.workers]}
        return {"kind": "remote", "ok": problem is None, "problem": problem, "instance": self.instance,
                "redis": "unknown" if self.watch.view is None else "down" if view.error else "up",
                "connected": self.connected, "outstanding": len(self._jobs), "queue": view.queue,
                "wait_s": round(wait, 3) if math.isfinite(wait) else None, "workers": workers}

    def unavailable(self) -> str | None:
        """Why no remote inference can be counted on now (None: some worker is alive)."""
        return self.watch.unavailable()

    def load(self) -> float:
        return self.watch.load()

    def wait_estimate_s(self) -> float:
        return self.watch.wait_estimate_s(len(self._jobs))

    # ---- event-loop side ----
    def analyze(self, audio: np.ndarray, context: Sequence[str] | None = None, *, words: bool = False,
                max_wait_s: float | None = None, encode: bool = True, interim: bool = False) -> RemoteJob:
        """Queue an utterance for a remote worker; await job.future for an Analysis. `context`: the
        session's earlier transcripts, most recent first (sent with the job); `words`: the
        transcript should carry word timings (Transcript.words). Raises Overloaded when queue_size
        jobs are outstanding, or when live workers are more than `max_wait_s` (default max_queue_s)
        behind; with no worker alive the job is sent anyway (one may come back within
        remote_timeout_s, after which the job fails)."""
        if len(self._jobs) >= self.config.queue_size:
            raise Overloaded(f"{len(self._jobs)} inference jobs outstanding (limit {self.config.queue_size})")
        limit = self.config.max_queue_s if max_wait_s is None else max_wait_s
        wait = self.wait_estimate_s()
        if math.isfinite(wait) and wait > limit:
            raise Overloaded(f"inference workers are {wait:.1f} s behind (limit {limit:g} s)")
        assert self._outbox is not None, "start() first"
        loop = asyncio.get_running_loop()
        self._n += 1
        job = RemoteJob(self, f"{self.instance}:{self._n}", loop.create_future(), time.perf_counter())
        fields = job_fields(job.job_id, self.reply_key, audio, time.time() + self.config.remote_timeout_s, context,
                            words=words, encode=encode, interim=interim)
        job.timer = loop.call_later(self.config.remote_timeout_s, self._expire, job)
        self._jobs[job.job_id] = job
        self._outbox.put_nowait((job, fields))  # bounded by queue_size through _jobs
        if self._closing and not self.connected:
            self._fail(job, RemoteError("inference queue unreachable while shutting down"))
        return job

    async def predict(self, context: DialogueContext, utterance_id: int, encoded: EncodedUtterance) -> Scored:
        return await self.head.predict(context, utterance_id, encoded)

    async def peek(self, context: DialogueContext, encoded: EncodedUtterance) -> Prediction:
        return await self.head.peek(context, encoded)

    def interim(self, audio: np.ndarray, context: Sequence[str] | None = None, *,
                encode: bool = True) -> RemoteJob | None:
        """An interim analyze job, only while no job of this front-end is outstanding (the workers'
        heartbeats are too coarse to find an idle decoder; this keeps interim work from queueing
        ahead of finals)."""
        if self._jobs:
            return None
        try:
            return self.analyze(audio, context, encode=encode, interim=True)
        except Overloaded:
            return None

    def _finish(self, job: RemoteJob) -> bool:
        """Take `job` out of the outstanding set; False when it was already finished."""
        if self._jobs.pop(job.job_id, None) is None:
            return False
        if job.timer is not None:
            job.timer.cancel()
        return True

    def _fail(self, job: RemoteJob, error: BaseException) -> None:
        if self._finish(job) and not job.future.done():
            job.future.set_exception(error)

    def _expire(self, job: RemoteJob) -> None:
        if job.job_id not in self._jobs:
            return
        self.metrics.inc("emostream_remote_timeouts_total")
        log.error("inference job %s: no worker answered within %g s", job.job_id, self.config.remote_timeout_s)
        self._fail(job, RemoteTimeout(f"no inference worker answered within {self.config.remote_timeout_s:g} s"))
        self._delete_entry(job)

    def _withdraw(self, job: RemoteJob) -> None:
        if self._finish(job):
            self._delete_entry(job)  # not decoded yet: no worker will pick it up; decoding: its reply is ignored

    def _delete_entry(self, job: RemoteJob) -> None:
        if job.entry_id is None:
            return  # not written yet: the writer skips it
        task = asyncio.create_task(self._xdel(job.entry_id))
        self._side.add(task)
        task.add_done_callback(self._side.discard)

    async def _xdel(self, entry_id: bytes) -> None:
        try:
            await self.redis.xdel(JOBS, entry_id)
        except Exception as e:  # harmless: a worker then skips it as past its deadline
            log.warning("inference: could not withdraw job %s: %s", entry_id, e)

    async def _write_loop(self) -> None:
        """Jobs to the job stream, one pipeline per batch. A failed write fails its jobs at once
        (the utterances get error events); the next batch tries again after a back-off."""
        assert self._outbox is not None
        failures = 0
        while True:
            batch = [await self._outbox.get()]
            while not self._outbox.empty():
                batch.append(self._outbox.get_nowait())
            batch = [(j, f) for j, f in batch if j.job_id in self._jobs]  # skip withdrawn / expired
            if not batch:
                continue
            try:
                pipe = self.redis.pipeline(transaction=False)
                for _, f in batch:
                    pipe.xadd(JOBS, f, maxlen=JOBS_MAXLEN, approximate=True)
                ids = await pipe.execute()
                self.connected, failures = True, 0
            except asyncio.CancelledError:
                raise
            except Exception as e:
                if self._stopped:
                    return
                self._error(f"sending {len(batch)} jobs", e)
                for j, _ in batch:
                    self._fail(j, RemoteError(f"inference queue unavailable: {type(e).__name__}: {e}"))
                failures += 1
                await asyncio.sleep(self.backoff.compute(failures))
                continue
            for (j, _), entry_id in zip(batch, ids):
                j.entry_id = entry_id
                if j.job_id not in self._jobs:  # withdrawn or expired while the pipeline ran
                    self._delete_entry(j)

    async def _read_loop(self) -> None:
        """Follow our reply stream (a fresh key per instance: read from its start, no race)."""
        last = "0-0"
        failures = 0
        while True:
            try:
                replies = await self.reader_redis.xread({self.reply_key: last}, count=256, block=int(self.BLOCK_S * 1000))
                self.connected, failures = True, 0
            except asyncio.CancelledError:
                raise
            except Exception as e:
                if self._stopped:
                    return
                self._error("reading replies", e)
                failures += 1
                await asyncio.sleep(self.backoff.compute(failures))
                continue
            for _stream, entries in replies or ():
                for entry_id, fields in entries:
                    last = entry_id.decode()
                    self._reply(fields)

    def _reply(self, fields: dict[bytes, bytes]) -> None:
        try:
            job_id, result = parse_reply(fields, self.model.device)
        except (KeyError, ValueError, UnicodeDecodeError) as e:
            self._error("a malformed reply", e)
            return
        job = self._jobs.get(job_id)
        if job is None:
            return  # answered after its timeout, withdrawn, or a second worker's duplicate
        self._finish(job)
        self.metrics.remote_seconds.observe(time.perf_counter() - job.sent_at)
        if job.future.done():
            return
        if isinstance(result, Exception):
            self.metrics.inc("emostream_remote_errors_total")
            job.future.set_exception(result)
        else:
            self.metrics.asr_seconds.observe(result.asr_s)
            job.future.set_result(result)

    def _error(self, what: str, e: BaseException) -> None:
        self.metrics.inc("emostream_remote_errors_total")
        (log.error if self.connected else log.warning)("inference: %s: %s: %s", what, type(e).__name__, e)
        self.connected = False
        if self._closing:  # no reply will come before the service is gone: see begin_shutdown
            self._fail_outstanding(f"inference queue unreachable while shutting down: {type(e).__name__}: {e}")
