"""Durable service state in SQLite (stdlib sqlite3; the engine calls it through
``asyncio.to_thread``). Jobs and hosts are JSON documents keyed by id, with the
columns the queries need alongside."""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from volmove.core.errors import StorageError
from volmove.core.fleet.hosts import HostState
from volmove.core.fleet.jobs import TERMINAL, Job
from volmove.core.fleet.protocol import Inventory, ProtocolError

SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, parent TEXT, host TEXT NOT NULL, kind TEXT NOT NULL, phase TEXT NOT NULL,
    created REAL NOT NULL, updated REAL NOT NULL, doc TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS jobs_phase ON jobs (phase);
CREATE INDEX IF NOT EXISTS jobs_created ON jobs (created);
CREATE TABLE IF NOT EXISTS hosts (name TEXT PRIMARY KEY, doc TEXT NOT NULL);
"""
_TERMINAL = tuple(str(p) for p in TERMINAL)


class Store:
    def __init__(self, path: Path | str) -> None:
        try:
            self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
            self._db.executescript(SCHEMA)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across a process crash
            self._check_version()
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open the service database {path}: {exc}") from None
        self._lock = threading.Lock()

    def _check_version(self) -> None:
        row = self._db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        if row is None:
            self._db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        elif int(row[0]) != SCHEMA_VERSION:
            raise StorageError(f"service database has schema {row[0]}, this version reads {SCHEMA_VERSION}")

    def close(self) -> None:
        with self._lock:  # never while a thread is inside a statement: sqlite3 would crash the process
            self._db.close()

    def save(self, jobs: Iterable[Job], hosts: Iterable[HostState]) -> None:
        """One transaction: a batch of transitions is stored whole or not at all."""
        job_rows = [(j.id, j.parent, j.host, j.kind, str(j.phase), j.created, j.updated, json.dumps(j.as_dict()))
                    for j in jobs]
        host_rows = [(h.name, json.dumps(_host_doc(h))) for h in hosts]
        with self._lock:
            try:
                self._db.execute("BEGIN")
                self._db.executemany("INSERT OR REPLACE INTO jobs VALUES (?,?,?,?,?,?,?,?)", job_rows)
                self._db.executemany("INSERT OR REPLACE INTO hosts VALUES (?,?)", host_rows)
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._db.execute("ROLLBACK")
                raise StorageError(f"cannot write the service database: {exc}") from None

    def load_jobs(self, recent: int = 2000) -> list[Job]:
        """Every job not finished, and the most recent finished ones."""
        marks = ",".join("?" * len(_TERMINAL))
        with self._lock:
            active = self._db.execute(f"SELECT doc FROM jobs WHERE phase NOT IN ({marks})", _TERMINAL).fetchall()
            done = self._db.execute(f"SELECT doc FROM jobs WHERE phase IN ({marks}) ORDER BY updated DESC LIMIT ?",
                                    (*_TERMINAL, recent)).fetchall()
        return [Job.from_dict(json.loads(row[0])) for row in active + done]

    def get_job(self, job_id: str) -> Job | None:
        with self._lock:
            row = self._db.execute("SELECT doc FROM jobs WHERE id=?", (job_id,)).fetchone()
        return Job.from_dict(json.loads(row[0])) if row else None

    def load_hosts(self) -> list[HostState]:
        with self._lock:
            rows = self._db.execute("SELECT doc FROM hosts").fetchall()
        return [_host_from_doc(json.loads(r[0])) for r in rows]


def _host_doc(h: HostState) -> dict[str, Any]:
    return {"name": h.name, "state": h.state, "since": h.since, "session": h.session, "capacity": h.capacity,
            "version": h.version, "inventory": h.inventory.body() if h.inventory else None}


def _host_from_doc(d: dict[str, Any]) -> HostState:
    try:
        inventory = Inventory.parse(d["inventory"]) if d.get("inventory") else None
    except ProtocolError:
        inventory = None
    return HostState(d["name"], d["state"], d["since"], d["session"], d["capacity"], d["version"], inventory)
