"""Fan-out: every published event goes to the subscribers of its session and of `*`, to the
durable store first (when there is one), to other instances over the bus, and into a per-session
replay buffer for resume. Publishing never waits on a socket: each subscriber has a bounded queue
drained by its own writer task, and one that overflows is dropped (1008)."""

from __future__ import annotations

import asyncio
import json
from collections import deque
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from streamer import protocol as P
from streamer.events.bus import LocalBus, RedisBus
from streamer.metrics import Metrics
from streamer.events.store import EventStore


class Subscriber:
    """One socket's outgoing events: a bounded queue drained by a writer task. Overflow drops it."""

    def __init__(self, ws: ServerConnection, maxsize: int, metrics: Metrics) -> None:
        self.ws = ws
        self.queue: asyncio.Queue[str | tuple[int, str]] = asyncio.Queue(maxsize)
        self.metrics = metrics
        self.dropped = False
        self.closing = False  # finish() was called: the first close wins, later ones are no-ops
        self.interim = False  # also wants transcript.partial / emotion.partial (start flag, ?interim=1)
        self.source = False  # the socket of a /v1/stream or /v1/twilio source: not counted as a subscriber
        self.held: list[str | tuple[int, str]] | None = None  # live events wait here during a bus replay
        self.after: int | None = None  # then: live events with seq <= this were replayed already
        self.task = asyncio.create_task(self._write())

    def offer(self, text: str) -> None:
        if self.dropped:
            return
        if self.held is not None:
            self.held.append(text)
            return
        if self.after is not None:  # only after a replay from the bus (one session, seq in order)
            if json.loads(text)["seq"] <= self.after:
                return
            self.after = None
        try:
            self.queue.put_nowait(text)
        except asyncio.QueueFull:
            self.dropped = True
            self.metrics.inc("emostream_subscribers_dropped_total")
            self.task.cancel()
            asyncio.create_task(self.ws.close(P.CLOSE_POLICY, "subscriber too slow: event queue overflowed"))

    def finish(self, code: int = P.CLOSE_NORMAL, reason: str = "") -> None:
        """Send what is queued, then close with `code`; only the first call closes (a refused start
        is closed by admission, and its route need not know whether it was)."""
        if self.dropped or self.closing:
            return
        self.closing = True
        if self.held is not None:
            self.held.append((code, reason))
            return
        try:
            self.queue.put_nowait((code, reason))
        except asyncio.QueueFull:
            self.task.cancel()
            asyncio.create_task(self.ws.close(code, reason))

    async def _write(self) -> None:
        try:
            while True:
                item = await self.queue.get()
                if isinstance(item, tuple):
                    await self.ws.close(*item)
                    return
                await self.ws.send(item)
        except ConnectionClosed:
            return


class Hub:
    """session id (or '*') -> subscribers. Publishing never waits on a socket."""

    def __init__(self, metrics: Metrics, store: EventStore | None = None, replay_events: int = 4096,
                 replay_sessions: int = 256, bus: LocalBus | RedisBus | None = None) -> None:
        self.subs: dict[str, set[Subscriber]] = {}
        self.bus = bus or LocalBus()  # other instances: our events go out, theirs come in via deliver()
        self.end_close: tuple[int, str] = (P.CLOSE_NORMAL, "session ended")  # 1001 once shutting down
        self.metrics = metrics
        self.store = store
        self.replay_events = replay_events
        self.replay_sessions = replay_sessions
        self.buffers: dict[str, deque[tuple[int, str]]] = {}  # session -> recent (seq, json) for resume
        self._ended: deque[str] = deque()  # ended sessions whose buffers are still kept, oldest first

    def is_over(self, session_id: str) -> bool:
        """The session ended (or, per the durable log, ended or was cut off by a crash)."""
        if session_id in self._ended:
            return True
        if self.store is not None and session_id not in self.buffers:
            found = self.store.session(session_id)
            return found is not None and (found["ended"] or found["interrupted"])
        return False

    def replay(self, session_id: str, after_seq: int) -> tuple[list[str], bool]:
        """Events of `session_id` with seq > after_seq, oldest first, and whether that is all of
        them (False: some were already dropped from the buffer and the store has none either)."""
        buf = self.buffers.get(session_id)
        if buf and buf[0][0] <= after_seq + 1:
            return [text for seq, text in buf if seq > after_seq], True
        if self.store is not None:
            stored = self.store.event_texts(session_id, after_seq=after_seq)
            if stored:  # the durable log has every event (appended before each publish)
                return list(stored), True
        if buf is None:
            return [], True  # unknown (or not yet started) session: everything is still to come
        return [text for seq, text in buf if seq > after_seq], False

    def covers(self, session_id: str, after_seq: int) -> bool:
        """This instance alone (buffer or durable log) can replay every event after `after_seq`."""
        buf = self.buffers.get(session_id)
        if buf and buf[0][0] <= after_seq + 1:
            return True
        return self.store is not None and bool(self.store.event_texts(session_id, after_seq=after_seq))

    def subscriber_count(self) -> int:
        """/v1/subscribe connections registered now (a source's own socket is not one)."""
        return sum(not sub.source for group in self.subs.values() for sub in group)

    def add(self, key: str, sub: Subscriber) -> None:
        self.subs.setdefault(key, set()).add(sub)

    def remove(self, key: str, sub: Subscriber) -> None:
        group = self.subs.get(key)
        if group is not None:
            group.discard(sub)
            if not group:
                del self.subs[key]

    def publish(self, ev: dict[str, Any]) -> None:
        text = json.dumps(ev)
        if self.store is not None:
            self.store.append(ev, text)  # durable before anyone sees it
        self.metrics.inc("emostream_events_total")
        self.bus.publish(ev, text)  # to other instances; never waits
        self.deliver(ev, text)

    def publish_interim(self, ev: dict[str, Any]) -> None:
        """An interim event: to this instance's subscribers that asked for them, now; not stored,
        not kept for resume, not sent over the bus (the final events supersede it)."""
        text = json.dumps(ev)
        for key in (ev["session_id"], P.ALL_SESSIONS):
            for sub in list(self.subs.get(key, ())):
                if sub.interim:
                    sub.offer(text)

    def deliver(self, ev: dict[str, Any], text: str) -> None:
        """Keep for resume and fan out locally: this instance's events, and other instances' (bus)."""
        sid = ev["session_id"]
        if sid is not None:
            buf = self.buffers.get(sid)
            if buf is None or ev["type"] == P.SESSION_STARTED:  # a reused id starts a fresh history
                buf = self.buffers[sid] = deque(maxlen=self.replay_events)
                if sid in self._ended:
                    self._ended.remove(sid)
            buf.append((ev["seq"], text))
            if ev["type"] == P.SESSION_ENDED:
                self._ended.append(sid)
                while len(self._ended) > self.replay_sessions:
                    self.buffers.pop(self._ended.popleft(), None)
        for key in (ev["session_id"], P.ALL_SESSIONS):
            for sub in list(self.subs.get(key, ())):
                sub.offer(text)
        if ev["type"] == P.SESSION_ENDED:  # a session's own subscribers are done
            for sub in list(self.subs.get(ev["session_id"], ())):
                sub.finish(*self.end_close)
