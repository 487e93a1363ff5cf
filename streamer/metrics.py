"""The service's numbers for GET /metrics, kept by prometheus_client in a registry of each App's
own (several Apps in one process, as in the tests, never share a count). prometheus_client is
thread-safe: the inference threads observe the histograms directly."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

LATENCY_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)

COUNTERS = (
    ("emostream_sessions_total", "sessions started"),
    ("emostream_utterances_total", "utterances ended"),
    ("emostream_events_total", "events published"),
    ("emostream_errors_total", "error events sent"),
    ("emostream_subscribers_dropped_total", "subscribers dropped for being too slow"),
    ("emostream_speculative_decodes_total", "decodes started before the silence wait ended"),
    ("emostream_speculative_wasted_total", "speculative decodes thrown away (speech resumed)"),
    ("emostream_asr_redecoded_total", "utterances whose transcript repeated itself and was decoded again in the 30 s window"),
    ("emostream_interim_total", "interim decodes run (transcript.partial, emotion.partial)"),
    ("emostream_interim_skipped_total", "interim decodes skipped because no decoder was idle"),
    ("emostream_overloaded_total", "utterances and sessions refused because the decoders were behind"),
    ("emostream_alerts_total", "alert rules fired (calls)"),
    ("emostream_store_errors_total", "events that could not be written to the event store (--store)"),
    ("emostream_auth_refused_total", "requests refused by token or origin checks"),
    ("emostream_throttled_total", "audio frames delayed for arriving faster than the real-time limit"),
    ("emostream_worker_restarts_total", "inference worker threads restarted after dying"),
    ("emostream_bus_errors_total", "event bus (Redis) failures: writes, reads, replays, events dropped"),
    ("emostream_remote_timeouts_total", "analyze jobs no remote inference worker answered in time (--inference)"),
    ("emostream_remote_errors_total", "remote inference failures: jobs not sent, worker errors, bad replies"),
)


class Metrics:
    """Counters by name (`inc`), gauges read when scraped (`gauge`), five histograms, and the
    exposition (`render`, served with `content_type`)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._counters = {name: Counter(name, help_, registry=self.registry) for name, help_ in COUNTERS}
        self._gauges: dict[str, Gauge] = {}

        def histogram(name: str, help_: str, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> Histogram:
            return Histogram(name, help_, buckets=buckets, registry=self.registry)

        self.asr_seconds = histogram("emostream_asr_seconds", "Whisper decode time per batch")
        self.model_seconds = histogram("emostream_model_seconds", "emotion model time per batch (encode or predict)")
        self.latency_seconds = histogram("emostream_emotion_latency_seconds", "end of speech to emotion event")
        self.batch_size = histogram("emostream_batch_size", "utterances per ASR batch", (1, 2, 4, 8, 16, 32))
        self.remote_seconds = histogram("emostream_remote_job_seconds",
                                        "analyze job sent to a remote inference worker -> its reply (--inference)")

    def inc(self, name: str, n: int = 1) -> None:
        self._counters[name].inc(n)

    def value(self, sample: str) -> float:
        """A sample as scraped now: a counter's `..._total`, a gauge, a histogram's `..._count` or
        `..._sum`. KeyError for a name the registry does not have."""
        v = self.registry.get_sample_value(sample)
        if v is None:
            raise KeyError(sample)
        return v

    def gauge(self, name: str, help_: str, fn: Callable[[], float]) -> None:
        """A gauge whose value is `fn()` at scrape time; registering a name again replaces it."""
        old = self._gauges.pop(name, None)
        if old is not None:
            self.registry.unregister(old)
        g = Gauge(name, help_, registry=self.registry)
        g.set_function(fn)
        self._gauges[name] = g

    def render(self) -> str:
        return generate_latest(self.registry).decode()
