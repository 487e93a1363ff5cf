"""What a SessionRunner is given instead of the App: an inference backend, an event sink, the
observers of its events, and the few settings and hooks it uses. The App builds one RunnerParts
and every runner shares it; a test builds one from fakes and drives a runner with no server."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from streamer.config import AppConfig
from streamer.infer.backend import InferenceBackend
from streamer.metrics import Metrics

if TYPE_CHECKING:  # only its type: the voice model's module imports torch
    from streamer.infer.voice import VoiceEmbedder


class EventSink(Protocol):
    """Where a session's events go (events.fanout.Hub: subscribers, replay, the store, the bus)."""

    def publish(self, ev: dict[str, Any]) -> None:
        """A final event: kept for replay and stored."""
        ...

    def publish_interim(self, ev: dict[str, Any]) -> None:
        """An interim event (transcript.partial, emotion.partial): live subscribers only."""
        ...


class SessionObserver(Protocol):
    """Sees every final event of every session (calls.observers: alert rules, summary files, webhook)."""

    def on_event(self, ev: dict[str, Any]) -> Iterable[tuple[str, dict[str, Any]]]:
        """Events to publish in the same session in answer (type, fields), e.g. an alert."""
        ...

    def on_end(self, summary: dict[str, Any]) -> None:
        """The session ended with this call summary (calls.summary.CallSummary.to_dict)."""
        ...


@dataclass(frozen=True)
class RunnerParts:
    backend: InferenceBackend
    sink: EventSink
    metrics: Metrics
    config: AppConfig  # read: server (interim timing), segmenter (pre-roll), inference, calls, diarize
    observers: Sequence[SessionObserver] = ()
    voices: VoiceEmbedder | None = None  # speakers within one channel (start flag diarize)
    finals_imminent: Callable[[], bool] = lambda: False  # some session's utterance may end within ~0.25 s
    closed: Callable[[str], None] = field(default=lambda session_id: None)  # a session has ended
