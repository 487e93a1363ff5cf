"""Counters, gauges and histograms rendered as Prometheus text. Touched only from the event loop,
except Histogram.observe, which the inference threads call (guarded by a lock)."""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections.abc import Callable

LATENCY_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)


class Histogram:
    def __init__(self, name: str, help_: str, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.name, self.help, self.buckets = name, help_, buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.count = 0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            self.counts[bisect_left(self.buckets, value)] += 1
            self.sum += value
            self.count += 1

    def render(self) -> list[str]:
        with self._lock:
            counts, total, n = list(self.counts), self.sum, self.count
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        acc = 0
        for b, c in zip(self.buckets, counts):
            acc += c
            lines.append(f'{self.name}_bucket{{le="{b}"}} {acc}')
        lines.append(f'{self.name}_bucket{{le="+Inf"}} {n}')
        lines += [f"{self.name}_sum {total:.6f}", f"{self.name}_count {n}"]
        return lines


class Metrics:
    """The service's numbers for GET /metrics."""

    def __init__(self) -> None:
        self.counters: dict[str, tuple[str, int]] = {}
        self.gauges: dict[str, tuple[str, Callable[[], float]]] = {}
        self.asr_seconds = Histogram("emostream_asr_seconds", "Whisper decode time per batch")
        self.model_seconds = Histogram("emostream_model_seconds", "emotion model time per batch (encode or predict)")
        self.latency_seconds = Histogram("emostream_emotion_latency_seconds", "end of speech to emotion event")
        self.batch_size = Histogram("emostream_batch_size", "utterances per ASR batch", (1, 2, 4, 8, 16, 32))
        self.remote_seconds = Histogram("emostream_remote_job_seconds",
                                        "analyze job sent to a remote inference worker -> its reply (--inference)")
        for name, help_ in [
            ("emostream_sessions_total", "sessions started"),
            ("emostream_utterances_total", "utterances ended"),
            ("emostream_events_total", "events published"),
            ("emostream_errors_total", "error events sent"),
            ("emostream_subscribers_dropped_total", "subscribers dropped for being too slow"),
            ("emostream_speculative_decodes_total", "decodes started before the silence wait ended"),
            ("emostream_speculative_wasted_total", "speculative decodes thrown away (speech resumed)"),
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
        ]:
            self.counters[name] = (help_, 0)

    def inc(self, name: str, n: int = 1) -> None:
        help_, v = self.counters[name]
        self.counters[name] = (help_, v + n)

    def value(self, name: str) -> int:
        return self.counters[name][1]

    def gauge(self, name: str, help_: str, fn: Callable[[], float]) -> None:
        self.gauges[name] = (help_, fn)

    def render(self) -> str:
        lines: list[str] = []
        for name, (help_, v) in self.counters.items():
            lines += [f"# HELP {name} {help_}", f"# TYPE {name} counter", f"{name} {v}"]
        for name, (help_, fn) in self.gauges.items():
            lines += [f"# HELP {name} {help_}", f"# TYPE {name} gauge", f"{name} {fn()}"]
        for h in (self.asr_seconds, self.model_seconds, self.latency_seconds, self.batch_size, self.remote_seconds):
            lines += h.render()
        return "\n".join(lines) + "\n"
