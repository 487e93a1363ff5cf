"""Async Python client for protocol v1: stream audio as a source, or subscribe to sessions.

Only `streamer.protocol` (standard library only), `streamer.pcm` (numpy) and `websockets` are needed.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import numpy as np
import websockets
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from streamer import protocol as P
from streamer.pcm import pcm16

DEFAULT_URL = "ws://127.0.0.1:8765"


@dataclass(frozen=True)
class Event:
    """One server event. Every field the server sent is in `data`; the common ones are attributes."""

    type: str
    session_id: str
    seq: int
    data: dict[str, Any] = field(repr=False)

    @property
    def utterance_id(self) -> Any:
        return self.data.get("utterance_id")

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    @classmethod
    def from_json(cls, text: str | bytes) -> "Event":
        d = json.loads(text)
        if not isinstance(d, dict) or "type" not in d:
            raise ValueError(f"not a protocol event: {str(text)[:200]}")
        return cls(type=d["type"], session_id=str(d.get("session_id", "")), seq=int(d.get("seq", -1)), data=d)


def _base(url: str) -> str:
    return url.rstrip("/")


def _auth_headers(token: str | None) -> dict[str, str] | None:
    return {"Authorization": f"Bearer {token}"} if token else None


def _tls(url: str, ssl: Any) -> dict[str, Any]:
    """websockets' ssl argument: only for wss:// (None means its default, verified context)."""
    return {"ssl": ssl} if url.startswith("wss://") and ssl is not None else {}


class StreamClient:
    """A source session: `start`, binary PCM frames, `stop`; its own events come back on the socket.
    After a dropped connection, a new StreamClient with the same `session_id` and `after_seq` (the
    last seq received) resumes the session within the server's grace period, missing nothing.
    `interim=True` also brings transcript.partial / emotion.partial events while someone speaks (each
    superseded by its utterance's final transcript / emotion); `word_timestamps=True` gives every
    final transcript a `words` list (word, start_s, end_s, probability); `diarize=True` (one channel,
    several people) labels each utterance's `speaker` (S1, S2, ...; `speaker.revised` when an earlier
    one is re-attributed), at most `max_speakers` of them when given.

        async with StreamClient(url, sample_rate=16000) as c:
            await c.send_audio(pcm_bytes)
            await c.stop()
            async for ev in c.events():   # ends after session.ended
                ...
    """

    def __init__(self, url: str = DEFAULT_URL, *, sample_rate: int = 16_000, channels: int = 1,
                 session_id: str | None = None, language: str | None = None,
                 metadata: dict[str, Any] | None = None, speakers: list[str] | None = None,
                 token: str | None = None, ssl: Any = None, after_seq: int | None = None,
                 open_timeout: float = 10.0, interim: bool = False, word_timestamps: bool = False,
                 diarize: bool = False, max_speakers: int | None = None) -> None:
        self.url = _base(url) + P.STREAM_PATH
        self.start_message = P.StartMessage(sample_rate=sample_rate, channels=channels, session_id=session_id,
                                            language=language, metadata=metadata or {}, speakers=speakers,
                                            after_seq=after_seq, interim=interim, word_timestamps=word_timestamps,
                                            diarize=diarize, max_speakers=max_speakers)
        self.open_timeout = open_timeout
        self.headers = _auth_headers(token)
        self.ssl = ssl
        self.session_id: str | None = None
        self._ws: ClientConnection | None = None
        self._pending: list[Event] = []  # events read while waiting for session.started

    async def __aenter__(self) -> "StreamClient":
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def open(self) -> str:
        """Connect and start the session; returns the session id the server gave."""
        self._ws = await connect(self.url, open_timeout=self.open_timeout, max_size=P_MAX_EVENT_BYTES,
                                 additional_headers=self.headers, **_tls(self.url, self.ssl))
        await self._ws.send(self.start_message.to_json())
        while True:
            ev = Event.from_json(await asyncio.wait_for(self._ws.recv(), self.open_timeout))
            if ev.type in (P.SESSION_STARTED, P.SESSION_RESUMED):
                self.session_id = ev.session_id
                self._pending.append(ev)  # events() yields it first
                return ev.session_id
            if ev.type == P.ERROR:
                await self._ws.close()
                raise RuntimeError(f"server refused the session: {ev.get('code')}: {ev.get('message')}")
            self._pending.append(ev)

    async def send_audio(self, pcm: bytes | np.ndarray) -> None:
        if self._ws is None:
            raise RuntimeError("not connected: call open() first")
        await self._ws.send(pcm if isinstance(pcm, bytes) else pcm16(pcm))

    async def stop(self) -> None:
        """No more audio: the server finishes the open utterance, then sends session.ended."""
        if self._ws is not None:
            await self._ws.send(P.STOP_MESSAGE)

    async def events(self) -> AsyncIterator[Event]:
        """This session's events, ending after `session.ended` (or when the server closes)."""
        if self._ws is None:
            raise RuntimeError("not connected: call open() first")
        while self._pending:
            yield self._pending.pop(0)
        try:
            async for msg in self._ws:
                ev = Event.from_json(msg)
                yield ev
                if ev.type == P.SESSION_ENDED:
                    return
        except ConnectionClosed:
            return

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
            self._ws = None


P_MAX_EVENT_BYTES = 1 << 20


class Subscriber:
    """Watch one session (or `*`, all of them). Reconnects with back-off when the connection drops
    and never yields the same (session_id, seq) twice. `interim=True` asks for the partial events
    too (`&interim=1`); they are never replayed after a reconnect, only the final events are.

        async for ev in Subscriber(url, session="*"):
            ...
    """

    def __init__(self, url: str = DEFAULT_URL, session: str = P.ALL_SESSIONS, *, reconnect: bool = True,
                 max_retries: int = 10, backoff_s: float = 0.5, max_backoff_s: float = 10.0,
                 token: str | None = None, ssl: Any = None, open_timeout: float = 10.0,
                 interim: bool = False) -> None:
        self.session, self.interim = session, interim
        self.url = f"{_base(url)}{P.SUBSCRIBE_PATH}?session={quote(session, safe='*')}" + ("&interim=1" if interim else "")
        self.reconnect, self.max_retries = reconnect, max_retries
        self.backoff_s, self.max_backoff_s, self.open_timeout = backoff_s, max_backoff_s, open_timeout
        self.headers, self.ssl = _auth_headers(token), ssl
        self.last_seq: dict[str, int] = {}
        self.connected = asyncio.Event()  # set while a connection is open (tests wait on it)

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._run()

    def _resume_url(self) -> str:
        """After a reconnect to one session, ask for the events after the last one seen. That may be
        a partial's seq: partials are numbered like every event but never replayed, and the server
        replays the final events numbered after it, so nothing final is missed or repeated."""
        if self.session != P.ALL_SESSIONS and self.session in self.last_seq:
            return f"{self.url}&after_seq={self.last_seq[self.session]}"
        return self.url

    async def _run(self) -> AsyncIterator[Event]:
        failures, delay = 0, self.backoff_s
        while True:
            try:
                async with connect(self._resume_url(), open_timeout=self.open_timeout, max_size=P_MAX_EVENT_BYTES,
                                   additional_headers=self.headers, **_tls(self.url, self.ssl)) as ws:
                    self.connected.set()
                    failures, delay = 0, self.backoff_s
                    async for msg in ws:
                        ev = Event.from_json(msg)
                        if ev.seq <= self.last_seq.get(ev.session_id, -1) and ev.type != P.SESSION_STARTED:
                            continue  # already delivered before a reconnect
                        self.last_seq[ev.session_id] = ev.seq
                        yield ev
                    if ws.close_code in (P.CLOSE_NORMAL, P.CLOSE_GOING_AWAY) and not self.reconnect:
                        return
            except InvalidStatus:
                raise  # the server refused us (wrong path, auth): retrying will not help
            except (OSError, ConnectionClosed, asyncio.TimeoutError, websockets.InvalidHandshake):
                pass
            finally:
                self.connected.clear()
            if not self.reconnect:
                return
            failures += 1
            if failures > self.max_retries:
                raise ConnectionError(f"gave up after {self.max_retries} reconnect attempts to {self.url}")
            await asyncio.sleep(delay)  # back-off between reconnects, not a wait for a result
            delay = min(delay * 2, self.max_backoff_s)


async def run_source(client: StreamClient, chunks: AsyncIterator[bytes | np.ndarray],
                     on_event=None, stop_when: asyncio.Event | None = None) -> list[Event]:
    """Send `chunks` on an open StreamClient while reading its events; `stop` after the last chunk
    (or as soon as `stop_when` is set), then wait for session.ended. Returns every event."""
    events: list[Event] = []

    async def send() -> None:
        stopper = asyncio.ensure_future(stop_when.wait()) if stop_when else None
        try:
            async for chunk in chunks:
                await client.send_audio(chunk)
                if stopper is not None and stopper.done():
                    break
        finally:
            if stopper is not None:
                stopper.cancel()
        await client.stop()

    sender = asyncio.create_task(send())
    try:
        async for ev in client.events():
            events.append(ev)
            if on_event is not None:
                on_event(ev)
        await sender
    finally:
        sender.cancel()
    return events
