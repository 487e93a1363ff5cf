"""What the routes need of the service: the SessionHost protocol. server.App implements it; no
route imports the App, and a route test can hand a route any object with these members."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from streamer.config import AppConfig
from streamer.events.bus import LocalBus, RedisBus
from streamer.events.fanout import Hub, Subscriber
from streamer.metrics import Metrics

if TYPE_CHECKING:
    from streamer.events.store import EventStore
    from streamer.pipeline.runner import SessionRunner
    from streamer.pipeline.session import SeqCounter


def refusal_close_reason(problem: str) -> str:
    """The close reason (with code 1013) of a session that SessionHost.admission_problem refused."""
    return "too many sessions" if "sessions live" in problem else "overloaded"


class SessionHost(Protocol):
    config: AppConfig
    metrics: Metrics
    clock: Callable[[], float]
    hub: Hub  # subscribers, replay and publishing
    bus: LocalBus | RedisBus  # other instances (replay of a session one of them runs)
    store: EventStore | None  # the durable event log (/v1/sessions), when --store is given
    sessions: dict[str, SessionRunner]  # live sessions by id (read-only for routes)
    connections: set[Subscriber]  # open WebSocket connections, each added by its route while served

    @property
    def shutting_down(self) -> bool: ...

    def admission_problem(self) -> str | None:
        """Why a new session is refused now (None: admitted)."""
        ...

    def new_runner(self, sid: str, seq: SeqCounter, source: str,
                   speakers: list[str] | None = None) -> SessionRunner:
        """A new live session (registered in `sessions` until it ends)."""
        ...

    def health(self) -> dict[str, Any]:
        """The /healthz document."""
        ...
