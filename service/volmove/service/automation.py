"""Schedules, drills, retention, metrics and notifications, joined to the service.

The service creates one ``Automation`` next to its engine, runs its tasks in
its root TaskGroup and adds its routes to the HTTP API:

- ``scheduler``: starts scheduled backups and drills (scheduler.py);
- ``observer``: follows every job to its end and records it once — metrics,
  the size-drop alert, webhook events, retention after a scheduled backup;
- ``notifier``: delivers the webhook events (notify.py).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import time
import tomllib
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import web

from volmove.core.errors import UsageError, VolmoveError
from volmove.core.fleet import schedule as S
from volmove.core.fleet.jobs import Job, Phase
from volmove.service import metrics as M
from volmove.service.engine import Engine, Watch
from volmove.service.notify import Notifier, size_drop_event
from volmove.service.scheduler import Clock, Scheduler
from volmove.service.schedules_store import ScheduleStore, VolumeObs

log = logging.getLogger(__name__)
JSON = dict[str, Any]
CATCH_UP = 3600.0  # at start-up, jobs that ended this recently but were not recorded are recorded now


def utc_now() -> datetime:
    """The scheduler's clock: the one place it reads the time."""
    return datetime.now(UTC)


@dataclass(frozen=True)
class AutomationConfig:
    schedules_file: Path | None = None
    webhook: str | None = None
    notify_success: bool = False
    alerting: M.Alerting = field(default_factory=M.Alerting)
    interval: float = 15.0  # seconds between scheduler passes (cron has minutes; jitter spreads within)
    clock: Clock = utc_now  # tests pass a controlled one


def load_schedules_file(path: Path) -> list[S.ScheduleDef]:
    """``[[schedule]]`` tables of a TOML file, each a schedule definition (see docs/SCHEDULES.md)."""
    try:
        doc = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"cannot read the schedules file {path}: {exc}") from None
    entries = doc.get("schedule", [])
    if not isinstance(entries, list) or set(doc) - {"schedule"}:
        raise UsageError(f"{path}: expected only [[schedule]] tables")
    defs = [S.ScheduleDef.parse(e, "file") for e in entries]
    names = [d.name for d in defs]
    if len(set(names)) != len(names):
        raise UsageError(f"{path}: a schedule name is used twice")
    return defs


class Automation:
    def __init__(self, engine: Engine, db: Path, cfg: AutomationConfig,
                 broker_connected: Callable[[], bool]) -> None:
        self.engine = engine
        self.cfg = cfg
        self.broker_connected = broker_connected
        self.store = ScheduleStore(db)
        files = load_schedules_file(cfg.schedules_file) if cfg.schedules_file else []
        self.scheduler = Scheduler(engine, self.store, cfg.clock, cfg.interval, files)
        self.notifier = Notifier(self.store, cfg.webhook, cfg.notify_success)
        self.volumes: dict[tuple[str, str, str], VolumeObs] = {}
        self._watch = Watch()  # registered at load: no ending is missed between load and the first take

    async def load(self) -> None:
        self.volumes = {(o.kind, o.host, o.volume): o for o in await asyncio.to_thread(self.store.volumes)}
        self.engine.watches.add(self._watch)
        await self.scheduler.load()

    def close(self) -> None:
        self.engine.watches.discard(self._watch)
        self.store.close()

    def tasks(self) -> list[tuple[str, Coroutine[Any, Any, None]]]:
        return [("scheduler", self.scheduler.run()), ("observer", self._observe()),
                ("notifier", self.notifier.run())]

    # --------------------------------------------------------- job endings

    async def _observe(self) -> None:
        await self._catch_up()
        while True:
            for doc in await self._watch.take():
                if doc["phase"] in ("succeeded", "failed", "cancelled"):
                    await self._job_ended_logged(Job.from_dict(doc))

    async def _job_ended_logged(self, job: Job) -> None:
        try:
            await self.job_ended(job)
        except VolmoveError as exc:  # one unrecordable ending must not stop the recording of the next
            log.error("could not record the end of job %s: %s", job.id, exc)

    async def _catch_up(self) -> None:
        """Endings stored by the engine but not recorded here (the service stopped in between)."""
        since = self.engine.clock() - CATCH_UP
        ended = [j for j in self.engine.jobs.values() if j.terminal and (j.finished_at or 0) >= since]
        seen = await asyncio.to_thread(self.store.seen, [j.id for j in ended])
        for job in sorted(ended, key=lambda j: j.finished_at or 0):
            if job.id not in seen:
                await self._job_ended_logged(job)

    async def job_ended(self, job: Job) -> None:
        fired = await asyncio.to_thread(self.store.fired, job.id)
        schedule = fired.schedule if fired else None
        key = M.observed_volume(job)
        previous = self.volumes.get(key) if key else None
        outcome, dropped = M.outcome_of(job, previous, self.cfg.alerting)
        events = self.notifier.events_for(job, schedule)
        if dropped and previous is not None and outcome.volume is not None:
            log.warning("backup of %s on %s is much smaller than the previous one", key[2] if key else "?", job.host)
            events.append(size_drop_event(job, previous, outcome.volume, schedule))
        self.notifier.add(outcome, events)
        if fired is not None and job.phase is Phase.SUCCEEDED:
            await self._retention(fired.schedule, fired.target)  # before recording: a repeat is harmless
        if await asyncio.to_thread(self.store.record, outcome) and outcome.volume is not None and key:
            self.volumes[key] = outcome.volume
        self.notifier.wake()

    async def _retention(self, schedule: str, target_key: str) -> None:
        sched = self.scheduler.fired_schedule(schedule)
        schedule_, host, volume = target_key.split("|")
        sub = S.retention_job(sched, S.Target(schedule_, host, volume)) if sched else None
        if sub is not None:
            job = await self.scheduler.submit(sub)
            log.info("retention of %s on %s (schedule %s): job %s", volume, host, schedule, job)

    # ---------------------------------------------------------------- HTTP

    def register(self, app: web.Application) -> None:
        app.add_routes([
            web.get("/v1/schedules", self._list),
            web.post("/v1/schedules", self._add),
            web.delete("/v1/schedules/{name}", self._remove),
            web.post("/v1/schedules/{name}/run", self._run),
            web.get("/v1/drills", self._drills),
            web.get("/metrics", self._metrics),
            web.get("/healthz", self._health),
        ])

    async def _list(self, _request: web.Request) -> web.Response:
        return web.json_response({"schedules": self.scheduler.describe()})

    async def _add(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            raise UsageError("the request body is not JSON") from None
        sched = await self.scheduler.add(body)
        return web.json_response(sched.as_dict(), status=201)

    async def _remove(self, request: web.Request) -> web.Response:
        await self.scheduler.remove(request.match_info["name"])
        return web.json_response({"removed": request.match_info["name"]})

    async def _run(self, request: web.Request) -> web.Response:
        started = await self.scheduler.run_now(request.match_info["name"])
        return web.json_response({"targets": started}, status=202)

    async def _drills(self, _request: web.Request) -> web.Response:
        """The last drill of each volume, with its job's report (restored, compared, removed)."""
        docs = []
        for obs in (o for o in self.volumes.values() if o.kind == "drill"):
            job = self.engine.jobs.get(obs.job or "")
            docs.append({**obs.__dict__, "report": job.result if job else None,
                         "error": job.error if job else None})
        return web.json_response({"drills": docs})

    async def _metrics(self, _request: web.Request) -> web.Response:
        counters, pending = await asyncio.gather(asyncio.to_thread(self.store.counters),
                                                 asyncio.to_thread(self.store.pending_notifications))
        view, states = self.scheduler.view, {k: s for k, (_t, s) in self.scheduler.states.items()}
        families = [*M.volume_families(list(self.volumes.values())), *M.counter_families(counters),
                    *M.host_families(self.engine.hosts), *M.job_families(self.engine.jobs.values()),
                    *M.schedule_families(view.schedules, view.targets, states),
                    *M.service_families(self.broker_connected(), pending)]
        return web.Response(body=M.exposition(families).encode(), headers={"Content-Type": M.CONTENT_TYPE})

    async def _health(self, _request: web.Request) -> web.Response:
        last = self.scheduler.last_tick
        ticking = last is not None and time.monotonic() - last < 3 * self.scheduler.interval + 30
        doc = {"ok": ticking, "scheduler": {"ticking": ticking, "time": _iso(self.scheduler.view.time)},
               "broker": self.broker_connected(), "hosts_online": sum(h.online for h in self.engine.hosts.values()),
               "notifications_pending": await asyncio.to_thread(self.store.pending_notifications)}
        return web.json_response(doc, status=200 if ticking else 503)


def _iso(t: datetime | None) -> str | None:
    return t.isoformat() if t else None


# ----------------------------------------------------------- command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    env = os.environ.get
    p.add_argument("--schedules", default=env("VOLMOVE_SCHEDULES"),
                   help="TOML file of [[schedule]] tables [$VOLMOVE_SCHEDULES]")
    p.add_argument("--webhook", default=env("VOLMOVE_WEBHOOK"),
                   help="URL that receives a JSON POST when a job fails [$VOLMOVE_WEBHOOK]")
    p.add_argument("--webhook-on-success", action="store_true",
                   default=env("VOLMOVE_WEBHOOK_ON_SUCCESS", "") not in ("", "0", "false"),
                   help="also notify when a job succeeds [$VOLMOVE_WEBHOOK_ON_SUCCESS]")
    p.add_argument("--size-drop", type=float, default=float(env("VOLMOVE_SIZE_DROP") or 0.5),
                   help="alert when a backup is smaller than the previous one by this fraction; 0: never "
                        "[$VOLMOVE_SIZE_DROP, default 0.5]")
    p.add_argument("--schedule-interval", type=float, default=float(env("VOLMOVE_SCHEDULE_INTERVAL") or 15.0),
                   help="seconds between scheduler passes [$VOLMOVE_SCHEDULE_INTERVAL]")


def automation_config(args: argparse.Namespace) -> AutomationConfig:
    if not 0 <= args.size_drop < 1:
        raise UsageError(f"--size-drop must be a fraction in [0, 1), got {args.size_drop}")
    if args.schedule_interval <= 0:
        raise UsageError("--schedule-interval must be positive")
    return AutomationConfig(schedules_file=Path(args.schedules) if args.schedules else None,
                            webhook=args.webhook or None, notify_success=args.webhook_on_success,
                            alerting=M.Alerting(size_drop=args.size_drop), interval=args.schedule_interval)
