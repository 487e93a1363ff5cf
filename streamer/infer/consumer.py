"""The remote inference worker's job loop (`python -m streamer.infer.worker`, whose command line is
streamer/infer/worker.py): claim or read jobs from the Redis stream, batch them, transcribe and
encode, reply and acknowledge; a heartbeat thread publishes the worker's load. Kept apart from the
command line so that `--help` and argument errors never import torch."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

import numpy as np

from model import EmotionModel
from streamer.config import SAMPLE_RATE, WorkerConfig
from streamer.infer.engine import SpeechToText, transcribe_and_encode
from streamer.infer.load import DecoderLoad
from streamer.infer.remote import (GROUP, JOBS, WORKER_INDEX, WorkerLoad, decode_audio, decode_context, encode_heartbeat,
                                   error_fields, heartbeat_key, is_interim, reply_fields, wants_encoding,
                                   wants_words)

log = logging.getLogger("streamer.infer.worker")

Entry = tuple[bytes, dict[bytes, bytes]]
# (entry id, job id, reply stream, audio, context, word timings wanted, features wanted, interim draft)
Live = tuple[bytes, bytes, bytes, np.ndarray, list[str], bool, bool, bool]


class Worker:
    """The job loop: claim or read -> batch -> ASR + encode -> reply and acknowledge."""

    def __init__(self, config: WorkerConfig, model: EmotionModel, asr: SpeechToText, name: str | None = None) -> None:
        import redis

        self.config = config
        self.model = model
        self.asr = asr
        self.name = name or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.redis = redis.Redis.from_url(config.url, socket_timeout=config.timeout_s + config.block_s,
                                          socket_connect_timeout=config.timeout_s)
        self.stopping = threading.Event()
        self.jobs = self.batches = self.expired = self.failed = 0
        self._last_claim = 0.0
        self.meter = DecoderLoad()  # kept as the in-process engine keeps it (the heartbeat thread reads it)
        self._beats: threading.Thread | None = None
        self._quiet = threading.Event()  # set when run() ends: no more heartbeats
        self._beat_failing = False

    def warmup(self) -> float:
        """One tiny utterance through both models, so the first real job pays no lazy init."""
        t0 = time.perf_counter()
        transcribe_and_encode(self.model, self.asr, [np.zeros(SAMPLE_RATE, dtype=np.float32)], [["warm up"]])
        return time.perf_counter() - t0

    def ensure_group(self) -> None:
        """Create the consumer group (from the stream's start: jobs sent before any worker ran count)."""
        import redis

        try:
            self.redis.xgroup_create(JOBS, GROUP, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    def run(self) -> None:
        """Serve until stop(); Redis outages are logged and retried with back-off."""
        import redis

        backoff = 0.1
        self.start_heartbeat()
        try:
            while not self.stopping.is_set():
                try:
                    self.ensure_group()
                    while not self.stopping.is_set():
                        batch = self._next_batch()
                        if batch:
                            self.process(batch)
                        backoff = 0.1
                except (redis.ConnectionError, redis.TimeoutError) as e:
                    log.error("worker %s: Redis: %s: %s (retrying in %.1f s)", self.name, type(e).__name__, e, backoff)
                    self.stopping.wait(backoff)
                    backoff = min(backoff * 2, 5.0)
        finally:  # a worker that stopped serving, for whatever reason, must not look alive
            self._stop_heartbeat()
        try:  # leave the group tidy: a consumer with nothing pending is forgotten
            pending = self.redis.xpending_range(JOBS, GROUP, min="-", max="+", count=1, consumername=self.name)
            if not pending:
                self.redis.xgroup_delconsumer(JOBS, GROUP, self.name)
        except redis.RedisError as e:
            log.warning("worker %s: could not leave the consumer group: %s", self.name, e)

    def stop(self) -> None:
        self.stopping.set()

    # ---- heartbeat ----
    def load_now(self) -> WorkerLoad:
        """What the heartbeat says: in a batch or not, its jobs, one job's decode time, and the share
        of the last LOAD_WINDOW_S spent decoding (the batch in hand included)."""
        m = self.meter
        return WorkerLoad(self.name, busy=m.busy, in_hand=m.in_hand, job_s=m.job_s, load=m.load(running=True),
                          jobs=self.jobs, ttl_s=self.config.heartbeat_ttl_s)

    def beat(self) -> bool:
        """Write one heartbeat (the key with its TTL and the index entry, in one transaction);
        False when Redis failed (logged once per streak; the next beat tries again)."""
        import redis

        try:
            pipe = self.redis.pipeline(transaction=True)
            pipe.set(heartbeat_key(self.name), encode_heartbeat(self.load_now()),
                     px=int(self.config.heartbeat_ttl_s * 1000))
            pipe.sadd(WORKER_INDEX, self.name)
            pipe.execute()
        except redis.RedisError as e:
            if not self._beat_failing:
                log.error("worker %s: heartbeat: %s: %s (retrying every %g s)", self.name, type(e).__name__, e,
                          self.config.heartbeat_s)
            self._beat_failing = True
            return False
        self._beat_failing = False
        return True

    def start_heartbeat(self) -> None:
        """One heartbeat now, then one every heartbeat_s on a thread of its own (a long batch must not
        look like a dead worker) until run() ends. Idempotent."""
        if self._beats is not None:
            return
        self.beat()
        self._beats = threading.Thread(target=self._beat_loop, name="emostream-heartbeat", daemon=True)
        self._beats.start()

    def _beat_loop(self) -> None:
        while not self._quiet.wait(self.config.heartbeat_s):
            self.beat()

    def _stop_heartbeat(self) -> None:
        """No more beats, and the heartbeat deleted: front-ends see this worker gone at once, not after its TTL."""
        import redis

        self._quiet.set()
        if self._beats is not None:
            self._beats.join(self.config.timeout_s)  # a beat in flight must not bring the key back
        try:
            pipe = self.redis.pipeline(transaction=True)
            pipe.delete(heartbeat_key(self.name))
            pipe.srem(WORKER_INDEX, self.name)
            pipe.execute()
        except redis.RedisError as e:
            log.warning("worker %s: could not delete its heartbeat (it expires by itself): %s", self.name, e)

    # ---- taking jobs ----
    def _read(self, count: int, block_ms: int) -> list[Entry]:
        got = self.redis.xreadgroup(GROUP, self.name, {JOBS: ">"}, count=count, block=max(1, block_ms))
        return [(eid, fields) for _stream, entries in got or () for eid, fields in entries]

    def _claim(self) -> list[Entry]:
        """Jobs delivered to some worker claim_idle_s ago and never acknowledged (it died)."""
        cfg = self.config
        _next, entries, *_deleted = self.redis.xautoclaim(
            JOBS, GROUP, self.name, min_idle_time=int(cfg.claim_idle_s * 1000), start_id="0-0", count=cfg.max_batch)
        if entries:
            log.warning("worker %s: took over %d jobs of a worker that stopped answering", self.name, len(entries))
        return [(eid, fields) for eid, fields in entries]

    def _next_batch(self) -> list[Entry]:
        cfg = self.config
        batch: list[Entry] = []
        now = time.monotonic()
        if now - self._last_claim >= cfg.claim_idle_s / 2:
            self._last_claim = now
            batch = self._claim()
        if not batch:
            batch = self._read(cfg.max_batch, int(cfg.block_s * 1000))
        if not batch:
            return []
        deadline = time.monotonic() + cfg.max_wait_ms / 1000  # dynamic batching: wait briefly for company
        while len(batch) < cfg.max_batch:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            more = self._read(cfg.max_batch - len(batch), int(remaining * 1000))
            if not more:
                break
            batch += more
        return batch

    # ---- doing them ----
    def process(self, entries: list[Entry]) -> None:
        """Decode + encode the live jobs, in ASR-sized slices; each slice's replies go out as soon
        as it is done. Dead entries (withdrawn, past their deadline, malformed) are just acknowledged.
        The batch counts in the heartbeat's load and per-job time."""
        t0 = self.meter.begin(len(entries))
        decoded = 0
        try:
            decoded = self._process(entries)
        finally:
            self.meter.end(t0, decoded)
        self.batches += 1

    def _process(self, entries: list[Entry]) -> int:
        """process() without the bookkeeping; returns how many live jobs were decoded."""
        live: list[Live] = []
        dead: list[bytes] = []
        errors: list[tuple[bytes, bytes, dict[str, Any]]] = []
        now = time.time()
        for eid, f in entries:
            if not f:  # deleted (withdrawn) after it was delivered
                dead.append(eid)
                continue
            try:
                job_id, reply_to = f[b"j"], f[b"r"]
            except KeyError:
                log.error("worker %s: job %s has no id or reply stream; dropped", self.name, eid)
                dead.append(eid)
                continue
            try:
                if float(f[b"d"]) < now:
                    self.expired += 1
                    dead.append(eid)
                    continue
                live.append((eid, job_id, reply_to, decode_audio(f[b"f"], f[b"a"]), decode_context(f), wants_words(f),
                             wants_encoding(f), is_interim(f)))
            except (KeyError, ValueError) as e:
                errors.append((eid, reply_to, error_fields(job_id, f"malformed job: {type(e).__name__}: {e}", self.name)))
        if dead or errors:
            self._answer(errors, dead)
        step = max(1, int(self.asr.batch_size))
        for s in range(0, len(live), step):
            self._answer(self._analyze(live[s : s + step]), [])
        return len(live)

    def _analyze(self, jobs: list[Live]) -> list[tuple[bytes, bytes, dict[str, Any]]]:
        """Replies for a slice of jobs; a failing batch is retried job by job (only the bad one errs).
        Encoded as the in-process engine does: with each job's context and Whisper's pooled states;
        word timings for the jobs that asked."""
        try:
            transcripts, encoded, asr_s, enc_s = transcribe_and_encode(
                self.model, self.asr, [j[3] for j in jobs], [j[4] for j in jobs], words=[j[5] for j in jobs],
                encode=[j[6] for j in jobs], redecode=[not j[7] for j in jobs])
        except Exception as e:
            if len(jobs) > 1:
                log.exception("worker %s: batch of %d failed; retrying job by job", self.name, len(jobs))
                return [r for j in jobs for r in self._analyze([j])]
            log.exception("worker %s: job %s failed", self.name, jobs[0][1])
            self.failed += 1
            eid, job_id, reply_to, *_ = jobs[0]
            return [(eid, reply_to, error_fields(job_id, f"{type(e).__name__}: {e}", self.name))]
        self.jobs += len(jobs)
        return [(eid, reply_to, reply_fields(job_id, tr, enc, asr_s, enc_s, self.name))
                for (eid, job_id, reply_to, *_), tr, enc in zip(jobs, transcripts, encoded)]

    def _answer(self, replies: list[tuple[bytes, bytes, dict[str, Any]]], dead: list[bytes]) -> None:
        """Replies, then XACK + XDEL of their jobs, in one transaction: a job is acknowledged only
        together with its reply, so a crash before this leaves it pending for another worker."""
        cfg = self.config
        pipe = self.redis.pipeline(transaction=True)
        for _eid, reply_to, fields in replies:
            pipe.xadd(reply_to, fields, maxlen=cfg.reply_maxlen, approximate=True)
            pipe.expire(reply_to, int(cfg.reply_ttl_s))
        ids = [eid for eid, _, _ in replies] + dead
        if ids:
            pipe.xack(JOBS, GROUP, *ids)
            pipe.xdel(JOBS, *ids)
        pipe.execute()
