"""The event bus between service instances: in-process (the default, one instance) or Redis.

With Redis every instance writes each event it publishes to two Redis streams: the session's own
(`emostream:s:{session_id}`, trimmed to about `replay_events`, for resume on any instance) and one
all-sessions stream (`emostream:all`, for fan-out). One reader task per instance follows the
all-sessions stream and hands events that *other* instances published to the local Hub, in order,
so subscribers anywhere see every session. Redis being down never stops the local service: events
wait in a bounded queue (overflow is dropped and counted), errors are logged and counted in
`emostream_bus_errors_total`, and both tasks reconnect with back-off.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from streamer import protocol as P
from streamer.config import BusConfig
from streamer.metrics import Metrics

log = logging.getLogger(__name__)

Deliver = Callable[[dict[str, Any], str], None]  # (event, its JSON text) -> local fan-out


class BusError(RuntimeError):
    """The bus could not answer (Redis unreachable or failing)."""


class LocalBus:
    """One instance: the Hub's own in-process fan-out is the whole bus; nothing leaves the process."""

    remote = False

    async def start(self, deliver: Deliver) -> None:
        return None

    def publish(self, ev: dict[str, Any], text: str) -> None:
        return None

    async def history(self, session_id: str, after_seq: int) -> tuple[list[tuple[int, str]], bool]:
        return [], True

    def status(self) -> dict[str, Any]:
        return {"kind": "local"}

    async def close(self) -> None:
        return None


class RedisBus:
    """Events to and from other instances through Redis Streams (redis-py's asyncio client)."""

    remote = True
    ALL = "emostream:all"

    def __init__(self, config: BusConfig, metrics: Metrics, replay_events: int = 4096) -> None:
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import EqualJitterBackoff, NoBackoff

        assert config.url is not None
        self.config = config
        self.metrics = metrics
        self.replay_events = replay_events
        self.instance = uuid.uuid4().hex[:12]
        self._iid = self.instance.encode()
        opts = {"socket_timeout": config.timeout_s, "socket_connect_timeout": config.timeout_s,
                "health_check_interval": 0, "retry": Retry(NoBackoff(), 0)}  # our loops retry, with back-off
        # between a loop's failed attempts: redis-py's exponential back-off with jitter (instances that
        # lost the same Redis do not all come back at once), from backoff_min_s up to backoff_max_s
        self.backoff = EqualJitterBackoff(cap=config.backoff_max_s, base=config.backoff_min_s / 2)
        self.redis = aioredis.from_url(config.url, **opts)
        # the reader blocks in XREAD: its own connection, with a timeout longer than the block
        self.reader_redis = aioredis.from_url(config.url, **{**opts, "socket_timeout": config.timeout_s + config.block_s})
        self.queue: asyncio.Queue[tuple[int, str, int, str, str]] = asyncio.Queue(config.queue_size)
        self.connected = False
        self.reading = asyncio.Event()  # set once the reader knows where "now" is: later events reach us
        self.dropped = 0  # events never written to Redis (queue overflow)
        self._deliver: Deliver | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._sent = 0  # this instance's events numbered in publish order (field "n"): readers drop repeats
        self._seen: OrderedDict[bytes, int] = OrderedDict()  # other instance -> last "n" delivered
        metrics.gauge("emostream_bus_queue_depth", "events waiting to be written to Redis", lambda: self.queue.qsize())

    @staticmethod
    def session_key(session_id: str) -> str:
        return f"emostream:s:{session_id}"

    # ---- lifecycle ----
    async def start(self, deliver: Deliver) -> None:
        """Start the writer and the reader; never waits for Redis (it may be down, see module doc)."""
        self._deliver = deliver
        self._tasks = [asyncio.create_task(self._write_loop(), name="bus-writer"),
                       asyncio.create_task(self._read_loop(), name="bus-reader")]

    async def close(self, drain_s: float | None = None) -> None:
        """Write what is queued (bounded by `drain_s`), then stop both tasks and disconnect."""
        if not self._tasks:
            return
        try:
            await asyncio.wait_for(self.queue.join(), self.config.drain_s if drain_s is None else drain_s)
        except asyncio.TimeoutError:
            log.warning("bus: %d events not written to Redis at shutdown", self.queue.qsize())
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        for r in (self.redis, self.reader_redis):
            try:
                await r.aclose()
            except Exception as e:  # closing a broken connection: nothing left to do but say so
                log.warning("bus: closing the Redis client failed: %s", e)

    def status(self) -> dict[str, Any]:
        return {"kind": "redis", "instance": self.instance, "connected": self.connected,
                "queue": self.queue.qsize(), "dropped": self.dropped}

    def _error(self, what: str, e: BaseException) -> None:
        self.metrics.inc("emostream_bus_errors_total")
        if self.connected:
            log.error("bus: %s: %s: %s (local subscribers are unaffected; retrying)", what, type(e).__name__, e)
        else:
            log.warning("bus: %s: %s: %s", what, type(e).__name__, e)
        self.connected = False
        self.reading = asyncio.Event()  # set once the reader knows where "now" is: later events reach us

    # ---- out: this instance's events ----
    def publish(self, ev: dict[str, Any], text: str) -> None:
        """Queue an event for Redis; never waits. A full queue (Redis down too long) drops it."""
        sid = ev.get("session_id")
        if sid is None:
            return
        try:
            self.queue.put_nowait((self._sent + 1, sid, int(ev["seq"]), ev["type"], text))
            self._sent += 1
        except asyncio.QueueFull:
            self.dropped += 1
            self.metrics.inc("emostream_bus_errors_total")
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.error("bus: outgoing queue full (%d events): %d events not sent to other instances",
                          self.config.queue_size, self.dropped)

    async def _write_loop(self) -> None:
        """Batches of queued events, one pipeline each, in publish order; a failed batch is retried
        (readers drop the duplicates by seq) with exponential back-off."""
        failures = 0
        while True:
            batch = [await self.queue.get()]
            while len(batch) < self.config.write_batch and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            while True:
                try:
                    await self._write(batch)
                    self.connected, failures = True, 0
                    break
                except asyncio.CancelledError:
                    raise
                except Exception as e:
                    self._error(f"writing {len(batch)} events", e)
                    failures += 1
                    await asyncio.sleep(self.backoff.compute(failures))
            for _ in batch:
                self.queue.task_done()

    async def _write(self, batch: list[tuple[int, str, int, str, str]]) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for n, sid, seq, type_, text in batch:
            key = self.session_key(sid)
            if type_ == P.SESSION_STARTED:
                pipe.delete(key)  # a session id used again starts a fresh history
            fields = {"i": self._iid, "n": n, "q": seq, "e": text}
            pipe.xadd(key, fields, maxlen=self.replay_events, approximate=True)
            pipe.xadd(self.ALL, fields, maxlen=self.config.all_maxlen, approximate=True)
            if type_ == P.SESSION_ENDED:
                pipe.expire(key, int(self.config.ended_ttl_s))
        await pipe.execute()

    # ---- in: other instances' events ----
    async def _read_loop(self) -> None:
        """Follow the all-sessions stream from now on; deliver other instances' events locally."""
        last: str | None = None
        failures = 0
        while True:
            try:
                if last is None:  # where "now" is: read from an explicit id, never "$" in a loop
                    newest = await self.reader_redis.xrevrange(self.ALL, count=1)
                    last = newest[0][0].decode() if newest else "0-0"
                    self.connected = True
                    self.reading.set()
                replies = await self.reader_redis.xread({self.ALL: last}, count=self.config.read_batch,
                                                        block=int(self.config.block_s * 1000))
                self.connected, failures = True, 0
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self._error("reading", e)
                failures += 1
                await asyncio.sleep(self.backoff.compute(failures))
                continue
            for _stream, entries in replies or ():
                for entry_id, fields in entries:
                    last = entry_id.decode()
                    if fields.get(b"i") != self._iid:
                        self._incoming(fields)

    def _incoming(self, fields: dict[bytes, bytes]) -> None:
        try:
            text = fields[b"e"].decode()
            ev = json.loads(text)
            sid, seq, origin, n = ev["session_id"], int(ev["seq"]), fields[b"i"], int(fields[b"n"])
        except (KeyError, ValueError, UnicodeDecodeError) as e:
            self._error("a malformed entry in the all-sessions stream", e)
            return
        if self._seen.get(origin, 0) >= n:
            return  # a retried write (the first try reached Redis after all): delivered already
        self._seen[origin] = n
        self._seen.move_to_end(origin)
        while len(self._seen) > 1024:  # instances come and go (each start is a new id)
            self._seen.popitem(last=False)
        assert self._deliver is not None
        try:
            self._deliver(ev, text)
        except Exception:  # one bad event must not stop the reader (it serves every session)
            self.metrics.inc("emostream_bus_errors_total")
            log.exception("bus: delivering %s %s of %s failed", ev.get("type"), seq, sid)

    # ---- resume on any instance ----
    async def history(self, session_id: str, after_seq: int) -> tuple[list[tuple[int, str]], bool]:
        """(seq, text) of `session_id` after `after_seq` from its Redis stream, oldest first, and
        whether that is all of them. Raises BusError when Redis cannot answer."""
        try:
            entries = await self.redis.xrange(self.session_key(session_id))
        except Exception as e:
            self._error(f"replaying {session_id}", e)
            raise BusError(f"event bus unavailable: {e}") from e
        events: list[tuple[int, str]] = []
        for _, f in entries:
            seq = int(f[b"q"])
            if not events or seq > events[-1][0]:  # a retried write may have added one twice
                events.append((seq, f[b"e"].decode()))
        if not events:
            return [], True  # unknown (or not yet started) session: everything is still to come
        first_seq, first_text = events[0]
        complete = first_seq <= after_seq + 1 or json.loads(first_text)["type"] == P.SESSION_STARTED
        return [(s, t) for s, t in events if s > after_seq], complete


def make_bus(config: BusConfig, metrics: Metrics, replay_events: int = 4096) -> LocalBus | RedisBus:
    return RedisBus(config, metrics, replay_events) if config.url else LocalBus()
