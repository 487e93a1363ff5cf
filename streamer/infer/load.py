"""How busy a set of decoders is, kept the same way by the in-process engine (for admission and
/healthz) and by a remote worker (for its heartbeat): decoders inside a batch, the jobs they hold,
a running mean of one job's decode + encode time, and the share of the last LOAD_WINDOW_S spent
decoding. Thread-safe: decoding threads write it, the event loop or a heartbeat thread reads it."""

from __future__ import annotations

import threading
import time
from collections import deque

LOAD_WINDOW_S = 10.0  # load() looks this far back


class DecoderLoad:
    def __init__(self, decoders: int = 1, job_s: float = 0.3) -> None:
        self.decoders = decoders
        self._lock = threading.Lock()
        self._job_s = job_s  # running mean of one job's decode + encode time on one decoder (s)
        self._running: list[tuple[float, int]] = []  # (start, jobs) of the batches being decoded now
        self._spans: deque[tuple[float, float]] = deque()  # (start, end) of recent counted batches

    def begin(self, jobs: int) -> float:
        """A decoder starts a batch of `jobs`; returns its start (pass it to end())."""
        t0 = time.monotonic()
        with self._lock:
            self._running.append((t0, jobs))
        return t0

    def end(self, t0: float, jobs: int, counted: bool = True) -> float:
        """The batch begun at `t0` is done, `jobs` of it decoded. `counted` False: it was idle-time
        work (interim decodes) that counts as neither load nor per-job time. Returns its end."""
        t1 = time.monotonic()
        with self._lock:
            for i, (start, _) in enumerate(self._running):
                if start == t0:
                    del self._running[i]
                    break
            if counted:
                self._spans.append((t0, t1))
                if jobs:
                    self._job_s = 0.8 * self._job_s + 0.2 * (t1 - t0) / jobs
        return t1

    @property
    def busy(self) -> int:
        """Decoders inside a batch now."""
        return len(self._running)

    @property
    def in_hand(self) -> int:
        """Jobs in the batches being decoded now."""
        with self._lock:
            return sum(n for _, n in self._running)

    @property
    def job_s(self) -> float:
        return self._job_s

    def load(self, running: bool = False) -> float:
        """Fraction of the decoders' time spent decoding over the last LOAD_WINDOW_S (0..1);
        `running`: the batches in hand count up to now (a heartbeat's view)."""
        now = time.monotonic()
        lo = now - LOAD_WINDOW_S
        with self._lock:
            while self._spans and self._spans[0][1] < lo:
                self._spans.popleft()
            spans = [*self._spans, *([(t0, now) for t0, _ in self._running] if running else [])]
        used = sum(end - max(start, lo) for start, end in spans)
        return min(1.0, used / (LOAD_WINDOW_S * self.decoders))
