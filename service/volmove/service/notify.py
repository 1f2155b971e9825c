"""Webhook notifications: a JSON body POSTed on a failed job (and on success
when asked), on a backup much smaller than the previous one, on a drill.

Events wait in a table (written in the same transaction that records the
job's ending), so a service restart delivers them late rather than never.
A delivery that fails is retried with exponential backoff, then given up.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from volmove.core.fleet.jobs import Job
from volmove.service.schedules_store import Outcome, ScheduleStore, VolumeObs

log = logging.getLogger(__name__)
JSON = dict[str, Any]
TIMEOUT = 10.0
MAX_ATTEMPTS = 12  # about 5 hours of retries with the backoff below
FIRST_RETRY, MAX_RETRY = 5.0, 3600.0


def _iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, UTC).isoformat()


def job_event(job: Job, schedule: str | None) -> JSON:
    volume = job.params.get("volume")
    error = (job.error or {}).get("message")
    what = f"{job.kind} of {volume}" if volume else job.kind
    summary = f"{what} on {job.host} {job.phase}" + (f": {error}" if error else "")
    return {"event": f"job.{job.phase}", "time": _iso(job.finished_at or job.updated), "summary": summary,
            "host": job.host, "volume": volume, "schedule": schedule,
            "job": {"id": job.id, "kind": job.kind, "phase": str(job.phase), "params": job.params,
                    "attempt": job.attempt, "started": _iso(job.started_at), "finished": _iso(job.finished_at),
                    "error": job.error, "result": job.result}}


def size_drop_event(job: Job, previous: VolumeObs, current: VolumeObs, schedule: str | None) -> JSON:
    ratio = (current.bytes or 0) / previous.bytes if previous.bytes else 0.0
    summary = (f"backup of {current.volume} on {current.host} holds {current.bytes} bytes, "
               f"{ratio:.0%} of the previous backup's {previous.bytes}")
    return {"event": "backup.size_drop", "time": _iso(current.last_success), "summary": summary,
            "host": current.host, "volume": current.volume, "schedule": schedule, "bytes": current.bytes,
            "previous_bytes": previous.bytes, "ratio": round(ratio, 4), "snapshot": current.snapshot,
            "previous_snapshot": previous.snapshot, "job": {"id": job.id, "kind": job.kind}}


def retry_delay(attempts: int) -> float:
    return float(min(MAX_RETRY, FIRST_RETRY * 2 ** max(0, attempts - 1)))


class Notifier:
    """Delivers the outbox to one webhook URL, oldest first."""

    def __init__(self, store: ScheduleStore, url: str | None, on_success: bool = False,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.url = url
        self.on_success = on_success
        self.clock = clock  # wall time of retries (Unix seconds): backoff, not scheduling
        self.delivered = 0
        self._wake = asyncio.Event()

    @property
    def enabled(self) -> bool:
        return bool(self.url)

    def events_for(self, job: Job, schedule: str | None) -> list[JSON]:
        if not self.enabled:
            return []
        if str(job.phase) == "failed" or (self.on_success and str(job.phase) == "succeeded"):
            return [job_event(job, schedule)]
        return []

    def add(self, outcome: Outcome, events: list[JSON]) -> None:
        if self.enabled:
            outcome.notifications += events

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        if not self.enabled:
            await asyncio.Event().wait()  # nothing to deliver, ever
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as session:
            while True:
                await self._deliver_due(session)
                await self._sleep_until_next()

    async def _sleep_until_next(self) -> None:
        nxt = await asyncio.to_thread(self.store.next_notification_time)
        wait = None if nxt is None else max(0.0, nxt - self.clock())
        try:
            async with asyncio.timeout(wait):
                await self._wake.wait()
        except TimeoutError:
            pass
        self._wake.clear()

    async def _deliver_due(self, session: aiohttp.ClientSession) -> None:
        for nid, body, attempts in await asyncio.to_thread(self.store.due_notifications, self.clock()):
            if await self._post(session, body):
                self.delivered += 1
                await asyncio.to_thread(self.store.notification_done, nid)
            elif attempts + 1 >= MAX_ATTEMPTS:
                log.error("webhook: gave up on %s after %d attempts", body.get("event"), attempts + 1)
                await asyncio.to_thread(self.store.notification_done, nid)
                await asyncio.to_thread(self.store.bump, "volmove_notifications_failed_total", {}, 1)
            else:
                next_try = self.clock() + retry_delay(attempts + 1)
                await asyncio.to_thread(self.store.notification_retry, nid, attempts + 1, next_try)

    async def _post(self, session: aiohttp.ClientSession, body: JSON) -> bool:
        assert self.url is not None
        try:
            async with session.post(self.url, json=body) as resp:
                if resp.status < 300:
                    return True
                log.warning("webhook %s answered HTTP %d to %s", _where(self.url), resp.status, body.get("event"))
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            log.warning("webhook %s unreachable for %s: %s", _where(self.url), body.get("event"), exc or "timed out")
        return False


def _where(url: str) -> str:
    """The webhook's scheme and host for logs: its path and query often hold a secret."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or '?'}"
