"""Durable event log: every published event in SQLite (WAL), for GET /v1/sessions and the export.

`Hub.publish` calls `EventStore.append` on the event loop before an event is fanned out, so an event
a client has seen is already committed. WAL with synchronous=NORMAL makes a commit one write() into
the -wal file (no fsync): it survives `kill -9` of the process (the pages are in the OS cache), not
a power cut of the last moments. A background thread checkpoints the WAL into the database file, so
the fsync a checkpoint needs never runs on the event loop.

A write that fails (disk full: SQLITE_FULL / EFBIG, an I/O error) never stops the service: the
event is still delivered live; the failure is logged (once per streak), counted in
emostream_store_errors_total and shown by /health (store.ok false, status "degraded") until an
append succeeds again. Events published meanwhile are missing from the log: the guarantee above
is suspended for them, and holds again from the first event stored after the disk has room.

A session id may be used again once its session ended (the microphone's "mic" after a restart,
a client's own ids), and its seq restarts at 0. Each use is a *run* (sessions.run): queries by
session id read the newest run unless a run is named.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from streamer.metrics import Metrics

log = logging.getLogger("streamer.events.store")

SCHEMA_VERSION = 1
CHECKPOINT_INTERVAL_S = 1.0  # the background thread folds the WAL into the database this often
WRITER_CHECKPOINT_PAGES = 10_000  # ... and the writer itself once the WAL holds this many pages
_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    run INTEGER PRIMARY KEY,          -- one row per use of a session id
    session_id TEXT NOT NULL,
    first_at REAL NOT NULL,           -- wall-clock (Unix s) of its first stored event
    last_at REAL NOT NULL,            -- ... and of its last
    last_seq INTEGER NOT NULL,
    events INTEGER NOT NULL DEFAULT 0,
    utterances INTEGER NOT NULL DEFAULT 0,
    ended INTEGER NOT NULL DEFAULT 0,        -- session.ended was stored
    interrupted INTEGER NOT NULL DEFAULT 0,  -- the service stopped (crash, kill -9) before it ended
    metadata TEXT NOT NULL DEFAULT '{}'      -- session.started's metadata (JSON)
);
CREATE INDEX IF NOT EXISTS sessions_by_id ON sessions (session_id, run);
CREATE TABLE IF NOT EXISTS events (
    run INTEGER NOT NULL REFERENCES sessions (run),
    seq INTEGER NOT NULL,
    session_id TEXT NOT NULL,
    type TEXT NOT NULL,
    utterance_id INTEGER,
    published_at REAL NOT NULL,       -- wall-clock (Unix s) when it was published
    json TEXT NOT NULL,               -- the event exactly as sent on the wire
    UNIQUE (run, seq)
);
"""
_SESSION_COLUMNS = "run, session_id, first_at, last_at, last_seq, events, utterances, ended, interrupted, metadata"


class StoreError(RuntimeError):
    """The store cannot be opened (not a database, a newer schema, no permission)."""


class EventStore:
    """One SQLite connection, used by one thread at a time (the event loop; the export CLI)."""

    def __init__(self, path: Path | str, *, readonly: bool = False, metrics: Metrics | None = None,
                 clock: Callable[[], float] = time.time, checkpoint_interval_s: float | None = CHECKPOINT_INTERVAL_S) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self.metrics = metrics
        self.clock = clock
        self.errors = 0  # failed appends (also emostream_store_errors_total)
        self.last_error: str | None = None  # the last failed append's error (status(), /health)
        self._failing = False  # the last append failed: events are delivered but not stored
        self._live: dict[str, int] = {}  # session id -> its open run, for sessions of this process
        self._lock = threading.Lock()  # created on one thread, used on the loop's: never at once
        self._stop = threading.Event()
        self._checkpointer: threading.Thread | None = None
        if readonly and not self.path.is_file():
            raise StoreError(f"no event store at {self.path}")
        try:
            if readonly:
                db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None,
                                     check_same_thread=False)
            else:
                db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._db = db
        except sqlite3.Error as e:
            raise StoreError(f"cannot open event store {self.path}: {e}") from e
        try:
            self._init_schema(checkpoint_thread=bool(checkpoint_interval_s))
        except (sqlite3.Error, StoreError) as e:
            db.close()
            if isinstance(e, StoreError):
                raise
            raise StoreError(f"cannot open event store {self.path}: {e}") from e
        if not readonly and checkpoint_interval_s:
            self._checkpointer = threading.Thread(target=self._checkpoint_loop, args=(checkpoint_interval_s,),
                                                  name="store-checkpoint", daemon=True)
            self._checkpointer.start()

    def _init_schema(self, checkpoint_thread: bool) -> None:
        db = self._db
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(f"{self.path} has event store schema {version}; this version reads {SCHEMA_VERSION}")
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if version == 0 and tables:
            raise StoreError(f"{self.path} is an SQLite database but not an emostream event store")
        if self.readonly:
            if version == 0:
                raise StoreError(f"{self.path} is empty, not an emostream event store")
            return
        if db.execute("PRAGMA journal_mode = WAL").fetchone()[0].lower() != "wal":
            raise StoreError(f"{self.path}: cannot switch to WAL mode")
        db.execute("PRAGMA synchronous = NORMAL")
        # the background thread checkpoints, off the loop; under a flood of events it may never catch
        # up with the writer (then the WAL cannot restart), so the writer checkpoints past ~40 MB
        db.execute(f"PRAGMA wal_autocheckpoint = {WRITER_CHECKPOINT_PAGES if checkpoint_thread else 1000}")
        db.execute("PRAGMA journal_size_limit = 67108864")  # a restarted WAL is truncated to 64 MB
        db.execute("PRAGMA busy_timeout = 100")  # ms; only another writer can make us wait
        if version == 0:
            db.executescript(f"BEGIN; {_SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")
        # sessions a previous process left open will never continue: the service died mid-session
        db.execute("UPDATE sessions SET interrupted = 1 WHERE ended = 0 AND interrupted = 0")

    # ---- writing (event loop) ----
    @property
    def failing(self) -> bool:
        """The last append failed (disk full, I/O error): events go out live but are not stored."""
        return self._failing

    def status(self) -> dict[str, Any]:
        """For /health: whether events are being stored now, and the failures so far."""
        return {"path": str(self.path), "ok": not self._failing, "errors": self.errors, "last_error": self.last_error}

    def append(self, ev: dict[str, Any], text: str) -> None:
        """Commit one event (its wire text `text`). A failure (disk full: SQLITE_FULL, EFBIG; an I/O
        error) is logged, counted and shown in status(), never raised: the event is still published
        live, only its durable copy is missing. The next append that succeeds clears the failure."""
        try:
            with self._lock:
                self._append(ev, text)
        except sqlite3.Error as e:
            self.errors += 1
            self.last_error = f"{type(e).__name__}: {e}"
            if self.metrics is not None:
                self.metrics.inc("emostream_store_errors_total")
            if not self._failing or self.errors % 1000 == 0:  # a full disk fails every event: don't flood the log
                log.error("event store %s: could not store %s seq %s of session %s (%d failed appends so far): %s: %s",
                          self.path, ev.get("type"), ev.get("seq"), ev.get("session_id"), self.errors,
                          type(e).__name__, e)
            self._failing = True
            return
        if self._failing:
            self._failing = False
            log.warning("event store %s: storing events again after %d failed appends", self.path, self.errors)

    def _append(self, ev: dict[str, Any], text: str) -> None:
        db = self._db
        sid, seq, type_ = ev["session_id"], ev["seq"], ev["type"]
        if sid is None:
            return  # an error on a socket before any session: not part of the log
        now = self.clock()
        if db.in_transaction:  # a failed write whose ROLLBACK failed too (disk full): start clean
            db.execute("ROLLBACK")
        db.execute("BEGIN IMMEDIATE")
        try:
            run = self._live.get(sid)
            if run is None or (type_ == "session.started" and seq == 0):  # a new use of this id
                meta = ev.get("metadata") if type_ == "session.started" else None
                run = db.execute(
                    "INSERT INTO sessions (session_id, first_at, last_at, last_seq, metadata) VALUES (?, ?, ?, ?, ?)",
                    (sid, now, now, seq, json.dumps(meta if isinstance(meta, dict) else {})),
                ).lastrowid
            db.execute(
                "INSERT INTO events (run, seq, session_id, type, utterance_id, published_at, json) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (run, seq, sid, type_, ev.get("utterance_id"), now, text),
            )
            ended = type_ == "session.ended"
            db.execute(
                "UPDATE sessions SET last_at = ?, last_seq = ?, events = events + 1, ended = ended OR ?, "
                "utterances = CASE WHEN ? THEN coalesce(?, utterances) WHEN ? THEN utterances + 1 ELSE utterances END "
                "WHERE run = ?",
                (now, seq, ended, ended, ev.get("utterances"), type_ == "utterance.ended", run),
            )
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        if ended:
            self._live.pop(sid, None)
        else:
            self._live[sid] = run

    def _checkpoint_loop(self, interval_s: float) -> None:
        """Fold the WAL into the database (PASSIVE: never blocks the writer) until close()."""
        try:
            db = sqlite3.connect(self.path, isolation_level=None)
        except sqlite3.Error:
            log.exception("event store %s: checkpoint thread cannot open the database", self.path)
            return
        failed = 0
        try:
            while not self._stop.wait(interval_s):
                try:
                    db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                except sqlite3.Error as e:
                    failed += 1
                    if failed == 1 or failed % 600 == 0:  # a full disk fails every second: don't flood the log
                        log.warning("event store %s: checkpoint failed %d times (will retry): %s", self.path, failed, e)
                    continue
                if failed:
                    log.warning("event store %s: checkpoint works again after %d failures", self.path, failed)
                    failed = 0
        finally:
            db.close()

    # ---- reading ----
    def sessions(self, limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
        """Runs of sessions, newest first."""
        with self._lock:
            rows = self._db.execute(f"SELECT {_SESSION_COLUMNS} FROM sessions ORDER BY run DESC LIMIT ? OFFSET ?",
                                    (limit, offset)).fetchall()
        return [_session_dict(r) for r in rows]

    def session(self, session_id: str, run: int | None = None) -> dict[str, Any] | None:
        """The newest run of `session_id` (or run `run` of it); None if it was never stored."""
        with self._lock:
            if run is None:
                row = self._db.execute(f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE session_id = ? "
                                       "ORDER BY run DESC LIMIT 1", (session_id,)).fetchone()
            else:
                row = self._db.execute(f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE session_id = ? AND run = ?",
                                       (session_id, run)).fetchone()
        return _session_dict(row) if row is not None else None

    def event_texts(self, session_id: str, after_seq: int | None = None, limit: int | None = None,
                    run: int | None = None) -> list[str]:
        """The events of a session (newest run unless `run`) as sent on the wire, by seq."""
        if run is None:
            found = self.session(session_id)
            if found is None:
                return []
            run = found["run"]
        with self._lock:
            rows = self._db.execute(
                "SELECT json FROM events WHERE run = ? AND session_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                (run, session_id, -1 if after_seq is None else after_seq, -1 if limit is None else limit),
            ).fetchall()
        return [r[0] for r in rows]

    def events(self, session_id: str, after_seq: int | None = None, limit: int | None = None,
               run: int | None = None) -> list[dict[str, Any]]:
        """The events of a session (newest run unless `run`) with seq > after_seq, by seq."""
        return [json.loads(t) for t in self.event_texts(session_id, after_seq, limit, run)]

    def iter_export(self, session_id: str | None = None, after_seq: int | None = None,
                    run: int | None = None) -> Iterator[str]:
        """Event texts of one session (newest run unless `run`) or of all, in (run, seq) order, from
        one consistent snapshot (a read transaction: a live writer goes on). For the export CLI, on
        a store object of its own (it holds a transaction open while iterated)."""
        db = self._db
        db.execute("BEGIN")  # one snapshot for the whole export
        try:
            floor = -1 if after_seq is None else after_seq
            if session_id is not None:
                row = db.execute("SELECT run FROM sessions WHERE session_id = ? AND (? IS NULL OR run = ?) "
                                 "ORDER BY run DESC LIMIT 1", (session_id, run, run)).fetchone()
                if row is None:
                    return
                cur = db.execute("SELECT json FROM events WHERE run = ? AND seq > ? ORDER BY seq", (row[0], floor))
            else:
                cur = db.execute("SELECT json FROM events WHERE seq > ? ORDER BY run, seq", (floor,))
            while rows := cur.fetchmany(1000):
                for (text,) in rows:
                    yield text
        finally:
            db.execute("COMMIT")

    def close(self) -> None:
        """Stop the checkpoint thread, checkpoint what is left and close. Idempotent."""
        self._stop.set()
        if self._checkpointer is not None:
            self._checkpointer.join()
            self._checkpointer = None
        with self._lock:
            try:
                self._db.close()  # the last connection to close checkpoints and removes the WAL
            except sqlite3.Error:
                log.exception("event store %s: close failed", self.path)


def _session_dict(row: tuple[Any, ...]) -> dict[str, Any]:
    run, sid, first_at, last_at, last_seq, events, utterances, ended, interrupted, metadata = row
    return {
        "id": sid, "run": run, "first_at": round(first_at, 3), "last_at": round(last_at, 3), "last_seq": last_seq,
        "events": events, "utterances": utterances, "ended": bool(ended), "interrupted": bool(interrupted),
        "metadata": json.loads(metadata),
    }
