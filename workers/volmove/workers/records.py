"""The worker's durable job records: one small JSON file per job id.

A record is written before the worker tells the service it accepted a job, so
a redelivered ``job.run`` (MQTT is at least once) finds it and never runs the
job twice; the result stays in it until the service acknowledged it.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from volmove.core.files import write_json_durably

log = logging.getLogger(__name__)

RECORD_VERSION = 1
KEEP_SECONDS = 7 * 24 * 3600.0
State = Literal["accepted", "running", "done"]


@dataclass(frozen=True)
class JobRecord:
    job: str
    attempt: int
    kind: str
    params: dict[str, Any]
    deadline: float
    state: State = "accepted"
    result: dict[str, Any] | None = None  # the JobResult body once done
    acked: bool = False
    cancelled: bool = False  # a cancel arrived (possibly before the job itself)
    updated: float = field(default_factory=time.time)
    version: int = RECORD_VERSION

    def evolve(self, **changes: Any) -> JobRecord:
        return replace(self, updated=time.time(), **changes)


class RecordStore:
    """Synchronous file IO; the agent calls it through ``asyncio.to_thread``."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)

    def _path(self, job: str) -> Path:
        return self.dir / f"{job}.json"  # job ids are validated ([a-z0-9-]) before they get here

    def save(self, rec: JobRecord) -> None:
        """Atomic and durable: a crash leaves the old record or the new one."""
        write_json_durably(self._path(rec.job), asdict(rec))

    def load_all(self) -> dict[str, JobRecord]:
        out = {}
        for path in self.dir.glob("*.json"):
            try:
                doc = json.loads(path.read_text())
                rec = JobRecord(**{k: v for k, v in doc.items() if k in JobRecord.__dataclass_fields__})
            except (OSError, ValueError, TypeError) as exc:
                log.warning("ignoring unreadable job record %s: %s", path, exc)
                continue
            out[rec.job] = rec
        return out

    def prune(self, records: dict[str, JobRecord], now: float, keep: float = KEEP_SECONDS) -> int:
        """Forget acknowledged results older than ``keep`` (redeliveries come within minutes)."""
        old = [r for r in records.values() if r.state == "done" and r.acked and now - r.updated > keep]
        for rec in old:
            self._path(rec.job).unlink(missing_ok=True)
            del records[rec.job]
        return len(old)
