"""The service's engine: one task applies every input to the state, in order.

Inputs are MQTT messages, API commands and clock ticks. A batch of inputs is
applied through the pure state machines (``fleet.jobs``, ``fleet.migrate``,
``fleet.hosts``), the changed jobs and hosts are written to SQLite in one
transaction, and only then are API callers answered and messages sent: a
crash can repeat a message but never lose a transition.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from volmove.core.errors import ConflictError, NotFoundError, UnreachableError, UsageError
from volmove.core.fleet import jobs as J
from volmove.core.fleet import migrate as M
from volmove.core.fleet import protocol as P
from volmove.core.fleet.hosts import HostState, apply_inventory, apply_status
from volmove.core.fleet.topics import Topics
from volmove.service.store import Store

log = logging.getLogger(__name__)

JSON = dict[str, Any]
BATCH = 1000
KEEP_IN_MEMORY = 5000  # finished jobs kept for the API; older ones are read from the database
OUTBOX_MAX = 20000
DEFAULT_DEADLINE = 6 * 3600.0
MIGRATE_DEADLINE = 7 * 24 * 3600.0
PHASE_OF = {"succeeded": J.Phase.SUCCEEDED, "failed": J.Phase.FAILED, "cancelled": J.Phase.CANCELLED}


def new_id() -> str:
    return f"j{secrets.token_hex(5)}"


@dataclass
class Command:
    """An API call, run inside the engine; answered once its changes are stored."""

    fn: Callable[[float], Any]
    future: asyncio.Future[Any]


@dataclass
class Incoming:
    topic: str
    payload: bytes


@dataclass
class Tick:
    pass


@dataclass(eq=False)  # kept in a set: identity, not value
class Watch:
    """A subscriber to job changes: the latest document per job, and a wake-up."""

    job: str | None = None
    pending: dict[str, JSON] = field(default_factory=dict)
    event: asyncio.Event = field(default_factory=asyncio.Event)

    def push(self, job: J.Job) -> None:
        if self.job is None or job.id == self.job or job.parent == self.job:
            self.pending[job.id] = job.as_dict()
            self.event.set()

    async def take(self) -> list[JSON]:
        await self.event.wait()
        self.event.clear()
        items, self.pending = list(self.pending.values()), {}
        return items


class Engine:
    def __init__(self, store: Store, topics: Topics, timing: J.Timing | None = None,
                 defaults: M.Defaults | None = None, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.topics = topics
        self.timing = timing or J.Timing()
        self.defaults = defaults or M.Defaults()
        self.clock = clock
        self.jobs: dict[str, J.Job] = {}
        self.hosts: dict[str, HostState] = {}
        self.inbox: asyncio.Queue[Command | Incoming | Tick] = asyncio.Queue()
        self.outbox: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue(OUTBOX_MAX)
        self.watches: set[Watch] = set()
        self._dirty_jobs: dict[str, J.Job] = {}
        self._dirty_hosts: dict[str, HostState] = {}
        self._effects: list[J.Effect] = []
        self._answers: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []

    # ------------------------------------------------------------- start-up

    async def load(self) -> None:
        """Read the stored state and reconcile the jobs that were in flight."""
        for host in await asyncio.to_thread(self.store.load_hosts):
            self.hosts[host.name] = host
        for job in await asyncio.to_thread(self.store.load_jobs):
            self.jobs[job.id] = job
        now = self.clock()
        for job in list(self.jobs.values()):
            if job.phase in J.ACTIVE and job.kind != "migrate":
                self._effects.append(J.SendRun(job))  # the worker answers with where the job is
            if job.kind == "migrate" and not job.terminal:
                self._resume_workflow(job, now)
        await self._commit()

    def _resume_workflow(self, parent: J.Job, now: float) -> None:
        child = self.jobs.get(M.Migration.from_dict(parent.workflow).child or "")
        if child is not None and child.terminal:
            self._child_done(child, now)  # the service stopped between the child's end and the next step

    # ----------------------------------------------------------------- loop

    async def run(self) -> None:
        while True:
            batch = [await self.inbox.get()]
            while not self.inbox.empty() and len(batch) < BATCH:
                batch.append(self.inbox.get_nowait())
            now = self.clock()
            for item in batch:
                self._handle(item, now)
            await self._commit()

    async def call(self, fn: Callable[[float], Any]) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        await self.inbox.put(Command(fn, future))
        return await future

    def _handle(self, item: Command | Incoming | Tick, now: float) -> None:
        if isinstance(item, Command):
            try:
                self._answers.append((item.future, item.fn(now), None))
            except Exception as exc:
                self._answers.append((item.future, None, exc))
        elif isinstance(item, Incoming):
            self._on_message(item.topic, item.payload, now)
        else:
            self._on_tick(now)

    async def _commit(self) -> None:
        if self._dirty_jobs or self._dirty_hosts:
            jobs, hosts = list(self._dirty_jobs.values()), list(self._dirty_hosts.values())
            self._dirty_jobs, self._dirty_hosts = {}, {}
            await asyncio.to_thread(self.store.save, jobs, hosts)
        answers, self._answers = self._answers, []
        for future, value, exc in answers:
            if future.done():
                continue
            if exc is not None:
                future.set_exception(exc)
            else:
                future.set_result(value)
        effects, self._effects = self._effects, []
        for effect in effects:
            self._send(effect)

    # -------------------------------------------------------------- effects

    def _send(self, effect: J.Effect) -> None:
        job = effect.job
        msg: P.Message
        if isinstance(effect, J.SendRun):
            msg = P.RunJob(job.id, job.attempt, job.kind, P.parse_params(job.kind, job.params), job.deadline)
        elif isinstance(effect, J.SendCancel):
            msg = P.CancelJob(job.id)
        else:
            msg = P.AckResult(job.id, effect.attempt)
        try:
            self.outbox.put_nowait((self.topics.cmd(job.host), P.encode(msg)))
        except asyncio.QueueFull:
            log.warning("outbox full; dropped %s for job %s (it is sent again later)", msg.type, job.id)

    # ---------------------------------------------------------------- state

    def _put(self, job: J.Job) -> J.Job:
        self.jobs[job.id] = job
        self._dirty_jobs[job.id] = job
        for watch in self.watches:
            watch.push(job)
        return job

    def _apply(self, job: J.Job, event: J.Event) -> J.Job:
        new, effects = J.step(job, event, self.timing)
        self._effects += effects
        if new == job:
            return job
        self._put(new)
        if new.parent is not None:
            self._child_changed(job, new, event.now)
        return new

    def _child_changed(self, old: J.Job, new: J.Job, now: float) -> None:
        if new.terminal and not old.terminal:
            self._child_done(new, now)
        elif new.progress != old.progress:
            parent = self.jobs.get(new.parent or "")
            if parent is not None and not parent.terminal:
                step = parent.workflow.get("step", "")
                self._put(replace(parent, progress={"step": step, **new.progress}, updated=now))

    # ------------------------------------------------------------ messages

    def _on_message(self, topic: str, payload: bytes, now: float) -> None:
        parsed = self.topics.parse_host_topic(topic)
        if parsed is None or not payload:
            return
        host, kind = parsed
        try:
            msg = P.decode(payload)
        except P.ProtocolError as exc:
            log.warning("ignored a message on %s: %s", topic, exc)
            return
        if isinstance(msg, P.Status) and kind == "status" and msg.host == host:
            self._on_status(host, msg, now)
        elif isinstance(msg, P.Inventory) and kind == "inventory" and msg.host == host:
            self._set_host(apply_inventory(self._host(host), msg))
        elif kind == "events":
            self._on_job_event(host, msg, now)

    def _host(self, name: str) -> HostState:
        return self.hosts.get(name) or HostState(name)

    def _set_host(self, host: HostState) -> None:
        if self.hosts.get(host.name) != host:
            self.hosts[host.name] = host
            self._dirty_hosts[host.name] = host

    def _on_status(self, name: str, status: P.Status, now: float) -> None:
        host, came_online = apply_status(self._host(name), status, now)
        self._set_host(host)
        if came_online:
            log.info("host %s is online", name)
            for job in self._jobs_on(name):
                self._apply(job, J.Reconnected(now))
        elif not host.online:
            log.info("host %s is offline", name)

    def _jobs_on(self, host: str) -> list[J.Job]:
        return [j for j in self.jobs.values() if j.host == host and not j.terminal and j.kind != "migrate"]

    def _on_job_event(self, host: str, msg: P.Message, now: float) -> None:
        if not isinstance(msg, P.JobAccepted | P.JobStarted | P.JobProgress | P.JobResult):
            return
        job = self.jobs.get(msg.job)
        if job is None or job.host != host:  # unknown here: acknowledge a result so it is not re-sent forever
            if isinstance(msg, P.JobResult):
                self._effects.append(J.SendAck(J.Job(msg.job, "", host, {}, 0.0, 0.0), msg.attempt))
            return
        self._apply(job, _event(msg, now))

    def _on_tick(self, now: float) -> None:
        for job in list(self.jobs.values()):
            if not job.terminal and job.kind != "migrate":
                self._apply(job, J.Tick(now, self._host(job.host).online))
        self._evict()

    def _evict(self) -> None:
        if len(self.jobs) <= KEEP_IN_MEMORY:
            return
        done = sorted((j for j in self.jobs.values() if j.terminal), key=lambda j: j.updated)
        for job in done[: len(self.jobs) - KEEP_IN_MEMORY]:
            del self.jobs[job.id]

    # ------------------------------------------------------------- commands

    def submit(self, kind: str, host: str, params: JSON, now: float, *, deadline_s: float | None = None,
               max_attempts: int | None = None, parent: str | None = None, job_id: str | None = None) -> J.Job:
        if host not in self.hosts:
            raise NotFoundError(f"unknown host {host!r} (known hosts: {', '.join(sorted(self.hosts)) or 'none'})")
        try:
            typed = P.parse_params(kind, params)
        except P.ProtocolError as exc:
            raise UsageError(str(exc)) from None
        deadline = deadline_s or self.defaults.deadlines.get(kind, DEFAULT_DEADLINE)
        attempts = max_attempts or self.defaults.attempts.get(kind, 1)
        job = J.Job(job_id or new_id(), kind, host, P.params_dict(typed), created=now, deadline=now + deadline,
                    updated=now, max_attempts=max(1, min(attempts, 100)), parent=parent)
        self._put(job)
        return self._apply(job, J.Tick(now, self._host(host).online))  # dispatch now, not at the next tick

    def cancel(self, job_id: str, now: float) -> J.Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise NotFoundError(f"no job {job_id}")
        if job.terminal:
            return job
        if job.kind == "migrate":
            return self._cancel_migration(job, now)
        return self._apply(job, J.CancelRequested(now))

    def migrate(self, volume: str, target: str, source: str | None, now: float, *, force: bool = False,
                remove_source: bool = False) -> J.Job:
        views = {n: M.HostView(h.online, h.inventory) for n, h in self.hosts.items()}
        plan, running = M.plan(P.name(volume, "volume"), target, source, views, force=force,
                               remove_source=remove_source)
        self._refuse_concurrent_migration(plan)
        migration, spawns = M.begin(new_id(), plan, running, now)
        parent = J.Job(migration.id, "migrate", plan.target, dict(plan.__dict__), created=now,
                       deadline=now + MIGRATE_DEADLINE, phase=J.Phase.RUNNING, updated=now, started_at=now,
                       workflow=migration.as_dict(), progress={"step": str(migration.step)})
        self._put(parent)
        self._spawn(parent, spawns, now)
        return self.jobs[parent.id]

    def _refuse_concurrent_migration(self, plan: M.Plan) -> None:
        for job in self.jobs.values():
            if job.kind == "migrate" and not job.terminal and job.params.get("volume") == plan.volume:
                raise ConflictError(f"volume {plan.volume} is already being migrated by job {job.id}")

    def _spawn(self, parent: J.Job, spawns: Iterable[M.Spawn], now: float) -> None:
        for s in spawns:
            self.submit(s.kind, s.host, s.params, now, deadline_s=self.defaults.deadlines.get(s.kind),
                        max_attempts=self.defaults.attempts.get(s.kind), parent=parent.id, job_id=s.id)

    def _cancel_migration(self, parent: J.Job, now: float) -> J.Job:
        migration, child = M.cancel(M.Migration.from_dict(parent.workflow))
        if child is None:
            raise ConflictError(f"migration {parent.id} is at step {migration.step}: it can no longer be cancelled")
        self._put(replace(parent, workflow=migration.as_dict(), cancel_requested=True, updated=now))
        if child in self.jobs:
            self._apply(self.jobs[child], J.CancelRequested(now))
        return self.jobs[parent.id]

    def _child_done(self, child: J.Job, now: float) -> None:
        parent = self.jobs.get(child.parent or "")
        if parent is None or parent.terminal or parent.kind != "migrate":
            return
        error = P.JobError(**child.error) if child.error else None
        outcome: P.Outcome = "succeeded" if child.phase is J.Phase.SUCCEEDED else (
            "cancelled" if child.phase is J.Phase.CANCELLED else "failed")
        migration, spawns = M.on_child(M.Migration.from_dict(parent.workflow), child.id, outcome, child.result,
                                       error, now)
        parent = replace(parent, workflow=migration.as_dict(), progress={"step": str(migration.step)}, updated=now,
                         result=migration.report())
        if migration.step is M.Step.DONE:
            parent = replace(parent, phase=PHASE_OF[migration.outcome or "failed"], error=migration.error,
                             finished_at=now)
        self._put(parent)
        self._spawn(parent, spawns, now)

    # ---------------------------------------------------------------- reads

    def job(self, job_id: str) -> J.Job:
        job = self.jobs.get(job_id) or self.store.get_job(job_id)
        if job is None:
            raise NotFoundError(f"no job {job_id}")
        return job

    def children(self, job_id: str) -> list[J.Job]:
        return sorted((j for j in self.jobs.values() if j.parent == job_id), key=lambda j: j.created)

    def host(self, name: str) -> HostState:
        if name not in self.hosts:
            raise NotFoundError(f"unknown host {name!r} (known hosts: {', '.join(sorted(self.hosts)) or 'none'})")
        return self.hosts[name]

    def require_online(self, name: str) -> None:
        if not self.host(name).online:
            raise UnreachableError(f"host {name} is offline")


def _event(msg: P.JobAccepted | P.JobStarted | P.JobProgress | P.JobResult, now: float) -> J.Event:
    if isinstance(msg, P.JobAccepted):
        return J.Accepted(msg.attempt, now)
    if isinstance(msg, P.JobStarted):
        return J.Started(msg.attempt, now)
    if isinstance(msg, P.JobProgress):
        return J.Progressed(msg.attempt, msg.progress, now)
    return J.Finished(msg.attempt, msg.outcome, msg.result, msg.error, now)
