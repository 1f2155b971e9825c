"""The scheduler: the thin IO side of ``fleet.schedule``.

Each tick reads the clock once, takes the hosts' inventories and the active
jobs from the engine, asks the pure ``decide`` what to start, stores the new
target states together with the jobs about to be submitted, then submits them
through the engine. A job stored but not submitted (the service died in
between) is submitted by the next pass with the same id, so it runs exactly once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from volmove.core.errors import ConflictError, NotFoundError, VolmoveError
from volmove.core.fleet import schedule as S
from volmove.core.fleet.protocol import Inventory
from volmove.service.engine import Engine, new_id
from volmove.service.schedules_store import Fired, ScheduleStore

log = logging.getLogger(__name__)
JSON = dict[str, Any]
Clock = Callable[[], datetime]
GIVE_UP = 24 * 3600.0  # a stored job not submittable for this long is dropped (its host is gone)


@dataclass
class View:
    """The last tick's picture, for the API and the metrics."""

    schedules: dict[str, S.ScheduleDef] = field(default_factory=dict)
    targets: list[S.Target] = field(default_factory=list)
    waiting: dict[str, str] = field(default_factory=dict)  # target key -> why a due run waits
    time: datetime | None = None


class Scheduler:
    def __init__(self, engine: Engine, store: ScheduleStore, clock: Clock, interval: float,
                 file_schedules: Sequence[S.ScheduleDef] = ()) -> None:
        self.engine = engine
        self.store = store
        self.clock = clock
        self.interval = interval
        self.file_schedules = {s.name: s for s in file_schedules}
        self.defined: dict[str, S.ScheduleDef] = {}
        self.states: dict[str, tuple[S.Target, S.TargetState]] = {}
        self.view = View()
        self.last_tick: float | None = None  # monotonic: for the health check, not for scheduling
        self._lock = asyncio.Lock()

    # ------------------------------------------------------------- start-up

    async def load(self) -> None:
        docs = await asyncio.to_thread(self.store.definitions)
        self.defined = {d["name"]: S.ScheduleDef.parse(d, "api") for d in docs}
        clash = set(self.defined) & set(self.file_schedules)
        if clash:
            log.warning("schedule(s) %s defined in the file and through the API: the file's win", sorted(clash))
        self.states = await asyncio.to_thread(self.store.targets)

    # ----------------------------------------------------------------- loop

    async def run(self) -> None:
        while True:
            try:
                await self.tick()
            except VolmoveError as exc:  # a database hiccup must not stop scheduling for good
                log.error("scheduler tick failed: %s", exc)
            await asyncio.sleep(self.interval)

    async def tick(self) -> list[S.Step]:
        async with self._lock:
            now = self.clock()  # the one clock read of a pass
            await self._submit_left_over(now)
            schedules, targets = S.select(self.all_definitions(), self._inventories())
            steps = S.decide(schedules, targets, self._states(), self._world(), now)
            fired = {s.target.key: self._fired(schedules[s.target.schedule], s, now)
                     for s in steps if s.action == "fire"}
            steps = [replace(s, state=_with_job(s.state, fired[s.target.key].job)) if s.target.key in fired else s
                     for s in steps]
            await self._save(steps, list(fired.values()), self._vanished(targets))
            self.view = View(schedules, targets, {s.target.key: s.reason for s in steps if s.action == "wait"}, now)
            await self._submit(list(fired.values()))
            await self._remove_orphans()
            self.last_tick = time.monotonic()
            return steps

    def all_definitions(self) -> list[S.ScheduleDef]:
        return list({**self.defined, **self.file_schedules}.values())

    def _inventories(self) -> dict[str, Inventory]:
        return {n: h.inventory for n, h in self.engine.hosts.items() if h.inventory is not None}

    def _states(self) -> dict[str, S.TargetState]:
        return {key: state for key, (_t, state) in self.states.items()}

    def _world(self) -> S.World:
        online = frozenset(n for n, h in self.engine.hosts.items() if h.online)
        keys = (S.busy_key(j.kind, j.host, j.params) for j in self.engine.jobs.values() if not j.terminal)
        return S.World(online, frozenset(k for k in keys if k is not None))

    def _vanished(self, targets: Iterable[S.Target]) -> list[str]:
        """States of targets no longer selected (volume removed, schedule changed) are dropped."""
        current = {t.key for t in targets}
        return [key for key in self.states if key not in current]

    def _fired(self, sched: S.ScheduleDef, step: S.Step, now: datetime) -> Fired:
        job = new_id()
        sub = S.job_for(sched, step.target)
        if step.missed > 1:
            log.info("%s: %d runs were missed; running once", step.target.key, step.missed)
        return Fired(job, sched.name, step.target.key, sub.kind, sub.host, sub.params, now.timestamp())

    async def _save(self, steps: Sequence[S.Step], fired: Sequence[Fired], vanished: Sequence[str]) -> None:
        changed = [(s.target, s.state) for s in steps if s.action != "wait"]
        if not (changed or vanished):
            return
        await asyncio.to_thread(self.store.save_targets, changed, fired, vanished)
        for key in vanished:
            self.states.pop(key, None)
        self.states.update({t.key: (t, state) for t, state in changed})

    # ----------------------------------------------------------- submission

    async def _submit(self, fired: Sequence[Fired]) -> None:
        done = []
        for f in fired:
            if await self._submit_one(f.job, f.kind, f.host, f.params):
                done.append(f.job)
        if done:
            await asyncio.to_thread(self.store.mark_submitted, done)

    async def _submit_left_over(self, now: datetime) -> None:
        """Jobs stored but not submitted: the process died in between, or the host was not known yet."""
        left = await asyncio.to_thread(self.store.unsubmitted)
        stale = [f for f in left if now.timestamp() - f.fired > GIVE_UP]
        for f in stale:
            log.warning("scheduled %s %s of %s on %s dropped: not submitted for a day", f.kind, f.job,
                        f.params.get("volume"), f.host)
        if stale:
            await asyncio.to_thread(self.store.mark_submitted, [f.job for f in stale])
        await self._submit([f for f in left if f not in stale])

    async def _submit_one(self, job: str, kind: str, host: str, params: JSON) -> bool:
        """Submit a job unless the engine has it already (a restart between the two writes)."""
        if job in self.engine.jobs or await asyncio.to_thread(self.engine.store.get_job, job) is not None:
            return True
        try:
            await self.engine.call(lambda now: self.engine.submit(kind, host, params, now, job_id=job))
        except VolmoveError as exc:
            log.warning("scheduled %s of %s on %s not submitted: %s", kind, params.get("volume"), host, exc)
            return not isinstance(exc, NotFoundError)  # an unknown host may yet be heard of: tried each tick
        log.info("scheduled %s %s of %s on %s", kind, job, params.get("volume"), host)
        return True

    async def submit(self, sub: S.Submission) -> str | None:
        """Submit a follow-up job (retention); its id, or None if the engine refused it."""
        job = new_id()
        return job if await self._submit_one(job, sub.kind, sub.host, sub.params) else None

    async def _remove_orphans(self) -> None:
        ended = {j.id for j in self.engine.jobs.values() if j.terminal and j.kind == "drill"}
        removing = {(j.host, j.params.get("volume")) for j in self.engine.jobs.values()
                    if not j.terminal and j.kind == "remove-volume"}
        for host, volume in S.orphan_scratch_volumes(self._inventories(), ended):
            if (host, volume) not in removing and self.engine.hosts[host].online:
                await self._submit_one(new_id(), "remove-volume", host, {"volume": volume})

    # ------------------------------------------------------------ the API

    async def add(self, doc: JSON) -> S.ScheduleDef:
        sched = S.ScheduleDef.parse(doc, "api")
        if sched.name in self.file_schedules:
            raise ConflictError(f"schedule {sched.name} is defined in the schedules file; change it there")
        async with self._lock:
            if not await asyncio.to_thread(self.store.add_definition, sched.name, sched.as_dict(), time.time()):
                raise ConflictError(f"schedule {sched.name} exists; remove it first to change it")
            self.defined[sched.name] = sched
        return sched

    async def remove(self, name: str) -> None:
        if name in self.file_schedules:
            raise ConflictError(f"schedule {name} is defined in the schedules file; remove it there")
        async with self._lock:
            if not await asyncio.to_thread(self.store.remove_definition, name):
                raise NotFoundError(f"no schedule {name}")
            self.defined.pop(name, None)
            self.states = {k: v for k, v in self.states.items() if v[0].schedule != name}

    async def run_now(self, name: str) -> list[JSON]:
        """Fire every target of a schedule now (busy or offline ones are reported, not started)."""
        async with self._lock:
            now = self.clock()
            schedules, targets = S.select(self.all_definitions(), self._inventories())
            if name not in schedules:
                raise NotFoundError(f"no schedule {name}")
            return await self._fire_by_hand(schedules[name], [t for t in targets if t.schedule == name], now)

    async def _fire_by_hand(self, sched: S.ScheduleDef, targets: Sequence[S.Target], now: datetime) -> list[JSON]:
        world, out, fired, states = self._world(), [], [], []
        for target in targets:
            why = _refusal(sched, target, world)
            if why:
                out.append({**target.as_dict(), "job": None, "reason": why})
                continue
            sub, job = S.job_for(sched, target), new_id()
            fired.append(Fired(job, sched.name, target.key, sub.kind, sub.host, sub.params, now.timestamp()))
            old = self.states.get(target.key)
            states.append((target, _with_job(S.fire_now(sched, target, old[1] if old else None, now), job)))
            out.append({**target.as_dict(), "job": job, "reason": ""})
        await asyncio.to_thread(self.store.save_targets, states, fired)
        self.states.update({t.key: (t, s) for t, s in states})
        await self._submit(fired)
        return out

    def describe(self) -> list[JSON]:
        docs = []
        for sched in sorted(self._known().values(), key=lambda s: s.name):
            targets = [t for t in self.view.targets if t.schedule == sched.name]
            docs.append({**sched.as_dict(), "targets": [self._describe_target(sched, t) for t in targets]})
        return docs

    def _known(self) -> dict[str, S.ScheduleDef]:
        return {**self.view.schedules, **self.defined, **self.file_schedules}

    def _describe_target(self, sched: S.ScheduleDef, target: S.Target) -> JSON:
        state = self.states.get(target.key)
        doc: JSON = {**target.as_dict(), "runs_on": S.runs_on(sched, target),
                     "waiting": self.view.waiting.get(target.key)}
        if state is not None:
            doc |= {"next_run": S.next_fire(sched, target, state[1]).isoformat(),
                    "last_run": state[1].last_fired.isoformat() if state[1].last_fired else None,
                    "last_job": state[1].last_job}
        return doc

    def fired_schedule(self, name: str) -> S.ScheduleDef | None:
        return self._known().get(name)


def _with_job(state: S.TargetState, job: str | None) -> S.TargetState:
    return state if job is None else S.TargetState(state.handled_until, state.last_fired, job)


def _refusal(sched: S.ScheduleDef, target: S.Target, world: S.World) -> str:
    if S.runs_on(sched, target) not in world.online:
        return f"host {S.runs_on(sched, target)} is offline"
    if S.target_busy_key(sched, target) in world.busy:
        return f"a {sched.kind} of {target.volume} is still running"
    return ""
