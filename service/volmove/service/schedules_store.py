"""Durable state of schedules, observations and notifications, in the service's
SQLite file (tables of their own, next to the job store's; stdlib sqlite3,
called through ``asyncio.to_thread``).

- ``sched_defs``: schedules added through the API;
- ``sched_targets``: per (schedule, host, volume), what has been run;
- ``sched_fired``: each job a schedule started, written *before* it is
  submitted, so a crash in between is finished at start-up, never repeated;
- ``obs_*``: the last backup and drill of each volume, counters, and the jobs
  already accounted for (each ending is counted once, also across restarts);
- ``notify_outbox``: webhook deliveries not yet acknowledged.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from volmove.core.errors import StorageError
from volmove.core.fleet.schedule import Target, TargetState

JSON = dict[str, Any]
SCHEMA = """
CREATE TABLE IF NOT EXISTS sched_defs (name TEXT PRIMARY KEY, doc TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS sched_targets (
    key TEXT PRIMARY KEY, schedule TEXT NOT NULL, host TEXT NOT NULL, volume TEXT NOT NULL,
    handled_until REAL NOT NULL, last_fired REAL, last_job TEXT);
CREATE TABLE IF NOT EXISTS sched_fired (
    job TEXT PRIMARY KEY, schedule TEXT NOT NULL, target TEXT NOT NULL, kind TEXT NOT NULL, host TEXT NOT NULL,
    params TEXT NOT NULL, fired REAL NOT NULL, submitted INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS sched_fired_pending ON sched_fired (submitted);
CREATE TABLE IF NOT EXISTS obs_volumes (
    kind TEXT NOT NULL, host TEXT NOT NULL, volume TEXT NOT NULL, last_success REAL, last_failure REAL,
    duration REAL, new_bytes INTEGER, bytes INTEGER, snapshot TEXT, job TEXT, PRIMARY KEY (kind, host, volume));
CREATE TABLE IF NOT EXISTS obs_counters (
    name TEXT NOT NULL, labels TEXT NOT NULL, value REAL NOT NULL, PRIMARY KEY (name, labels));
CREATE TABLE IF NOT EXISTS obs_seen (job TEXT PRIMARY KEY, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS notify_outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT, body TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
    next_try REAL NOT NULL);
"""
SEEN_KEEP = 30 * 24 * 3600.0  # an ending is re-delivered within minutes; a month is plenty


def _ts(t: datetime | None) -> float | None:
    return None if t is None else t.timestamp()


def _dt(t: float | None) -> datetime | None:
    return None if t is None else datetime.fromtimestamp(t, UTC)


@dataclass(frozen=True)
class Fired:
    job: str
    schedule: str
    target: str  # the target's key
    kind: str
    host: str
    params: JSON
    fired: float
    submitted: bool = False


@dataclass(frozen=True)
class VolumeObs:
    """The last outcome of one kind of job (backup, drill) for a volume on a host."""

    kind: str
    host: str
    volume: str
    last_success: float | None = None
    last_failure: float | None = None
    duration: float | None = None
    new_bytes: int | None = None
    bytes: int | None = None
    snapshot: str | None = None
    job: str | None = None


@dataclass
class Outcome:
    """Everything one job's ending changes, written in one transaction."""

    job: str
    at: float
    volume: VolumeObs | None = None
    counters: list[tuple[str, dict[str, str], float]] = field(default_factory=list)
    notifications: list[JSON] = field(default_factory=list)


class ScheduleStore:
    def __init__(self, path: Path | str) -> None:
        try:
            self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30.0)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(SCHEMA)
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open the service database {path}: {exc}") from None
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:  # never while a thread is inside a statement: sqlite3 would crash the process
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                yield self._db
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._db.execute("ROLLBACK")
                raise StorageError(f"cannot write the service database: {exc}") from None

    def _rows(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.Error as exc:
                raise StorageError(f"cannot read the service database: {exc}") from None

    # ------------------------------------------------------------ schedules

    def definitions(self) -> list[JSON]:
        return [json.loads(doc) for (doc,) in self._rows("SELECT doc FROM sched_defs ORDER BY name")]

    def add_definition(self, name: str, doc: JSON, now: float) -> bool:
        """False if the name is taken."""
        with self._tx() as db:
            if db.execute("SELECT 1 FROM sched_defs WHERE name=?", (name,)).fetchone():
                return False
            db.execute("INSERT INTO sched_defs VALUES (?,?,?)", (name, json.dumps(doc), now))
        return True

    def remove_definition(self, name: str) -> bool:
        with self._tx() as db:
            gone = db.execute("DELETE FROM sched_defs WHERE name=?", (name,)).rowcount
            db.execute("DELETE FROM sched_targets WHERE schedule=?", (name,))
        return bool(gone)

    def targets(self) -> dict[str, tuple[Target, TargetState]]:
        rows = self._rows("SELECT schedule, host, volume, handled_until, last_fired, last_job FROM sched_targets")
        out = {}
        for schedule, host, volume, until, fired, job in rows:
            target = Target(schedule, host, volume)
            out[target.key] = (target, TargetState(_dt(until) or datetime.min, _dt(fired), job))
        return out

    def save_targets(self, states: Iterable[tuple[Target, TargetState]], fired: Iterable[Fired] = (),
                     forget: Iterable[str] = ()) -> None:
        """New target states and the jobs they start, together: a fired job is never lost nor repeated."""
        rows = [(t.key, t.schedule, t.host, t.volume, _ts(s.handled_until), _ts(s.last_fired), s.last_job)
                for t, s in states]
        jobs = [(f.job, f.schedule, f.target, f.kind, f.host, json.dumps(f.params), f.fired, int(f.submitted))
                for f in fired]
        with self._tx() as db:
            db.executemany("INSERT OR REPLACE INTO sched_targets VALUES (?,?,?,?,?,?,?)", rows)
            db.executemany("INSERT OR REPLACE INTO sched_fired VALUES (?,?,?,?,?,?,?,?)", jobs)
            db.executemany("DELETE FROM sched_targets WHERE key=?", [(k,) for k in forget])

    def unsubmitted(self) -> list[Fired]:
        return [self._fired(r) for r in self._rows("SELECT * FROM sched_fired WHERE submitted=0 ORDER BY fired")]

    def mark_submitted(self, jobs: Iterable[str]) -> None:
        with self._tx() as db:
            db.executemany("UPDATE sched_fired SET submitted=1 WHERE job=?", [(j,) for j in jobs])

    def fired(self, job: str) -> Fired | None:
        rows = self._rows("SELECT * FROM sched_fired WHERE job=?", (job,))
        return self._fired(rows[0]) if rows else None

    @staticmethod
    def _fired(row: Sequence[Any]) -> Fired:
        job, schedule, target, kind, host, params, fired, submitted = row
        return Fired(job, schedule, target, kind, host, json.loads(params), fired, bool(submitted))

    # --------------------------------------------------------- observations

    def volumes(self) -> list[VolumeObs]:
        return [VolumeObs(*r) for r in self._rows("SELECT * FROM obs_volumes ORDER BY kind, host, volume")]

    def counters(self) -> list[tuple[str, dict[str, str], float]]:
        return [(n, json.loads(labels), v) for n, labels, v in
                self._rows("SELECT name, labels, value FROM obs_counters ORDER BY name, labels")]

    def seen(self, jobs: Iterable[str]) -> set[str]:
        ids = list(jobs)
        out: set[str] = set()
        for i in range(0, len(ids), 500):
            part = ids[i:i + 500]
            marks = ",".join("?" * len(part))
            out |= {r[0] for r in self._rows(f"SELECT job FROM obs_seen WHERE job IN ({marks})", part)}
        return out

    def record(self, outcome: Outcome) -> bool:
        """Apply one job's ending once; False (and nothing written) if it was already recorded."""
        with self._tx() as db:
            if db.execute("SELECT 1 FROM obs_seen WHERE job=?", (outcome.job,)).fetchone():
                return False
            db.execute("INSERT INTO obs_seen VALUES (?,?)", (outcome.job, outcome.at))
            if outcome.volume is not None:
                db.execute("INSERT OR REPLACE INTO obs_volumes VALUES (?,?,?,?,?,?,?,?,?,?)",
                           tuple(outcome.volume.__dict__.values()))
            for name, labels, delta in outcome.counters:
                _bump(db, name, labels, delta)
            db.executemany("INSERT INTO notify_outbox (body, next_try) VALUES (?, ?)",
                           [(json.dumps(n, default=str), outcome.at) for n in outcome.notifications])
            db.execute("DELETE FROM obs_seen WHERE at < ?", (outcome.at - SEEN_KEEP,))
        return True

    def bump(self, name: str, labels: dict[str, str], delta: float) -> None:
        with self._tx() as db:
            _bump(db, name, labels, delta)

    # -------------------------------------------------------- notifications

    def due_notifications(self, now: float, limit: int = 50) -> list[tuple[int, JSON, int]]:
        rows = self._rows("SELECT id, body, attempts FROM notify_outbox WHERE next_try <= ? ORDER BY id LIMIT ?",
                          (now, limit))
        return [(i, json.loads(body), attempts) for i, body, attempts in rows]

    def next_notification_time(self) -> float | None:
        rows = self._rows("SELECT MIN(next_try) FROM notify_outbox")
        return rows[0][0] if rows else None

    def pending_notifications(self) -> int:
        return int(self._rows("SELECT COUNT(*) FROM notify_outbox")[0][0])

    def notification_done(self, nid: int) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM notify_outbox WHERE id=?", (nid,))

    def notification_retry(self, nid: int, attempts: int, next_try: float) -> None:
        with self._tx() as db:
            db.execute("UPDATE notify_outbox SET attempts=?, next_try=? WHERE id=?", (attempts, next_try, nid))


def _bump(db: sqlite3.Connection, name: str, labels: dict[str, str], delta: float) -> None:
    db.execute("INSERT INTO obs_counters VALUES (?,?,?) ON CONFLICT (name, labels) "
               "DO UPDATE SET value = value + excluded.value", (name, json.dumps(labels, sort_keys=True), delta))
