"""The migrate workflow as a pure state machine over child jobs.

stop (source) -> backup (source) -> restore (target) -> verify (target)
-> [remove-source] -> done. Any failure or a cancel before the target is
verified rolls back: start again the containers that were stopped, then remove
the target volume if this migration created it. The source volume is touched
only by remove-source, which runs only after the target verified.

Child job ids are derived (``{migration}-{seq}``), so the state needs no ids
handed in and a restarted service finds the child it was waiting for.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from volmove.core.errors import ConflictError, NotFoundError, UnreachableError, UsageError
from volmove.core.fleet.protocol import Inventory, JobError, Outcome

JSON = dict[str, Any]


class Step(StrEnum):
    STOP = "stop"
    BACKUP = "backup"
    RESTORE = "restore"
    VERIFY = "verify"
    REMOVE_SOURCE = "remove-source"
    ROLLBACK_START = "rollback-start"
    ROLLBACK_TARGET = "rollback-target"
    DONE = "done"


FORWARD = (Step.STOP, Step.BACKUP, Step.RESTORE, Step.VERIFY)


@dataclass(frozen=True)
class Plan:
    volume: str
    source: str
    target: str
    force: bool = False
    remove_source: bool = False


@dataclass(frozen=True)
class Spawn:
    """A child job to create and run."""

    id: str
    step: Step
    kind: str
    host: str
    params: JSON


@dataclass(frozen=True)
class Migration:
    id: str
    plan: Plan
    started_at: float
    step: Step = Step.STOP
    seq: int = 0
    child: str | None = None
    expected_running: tuple[str, ...] = ()  # the source's running users when planned
    stopped: tuple[str, ...] = ()
    containers: tuple[JSON, ...] = ()  # inspect data of the volume's containers, for recreating them
    snapshot: str | None = None
    target_created: bool = False
    stopped_at: float | None = None
    verified_at: float | None = None
    restarted_at: float | None = None
    finished_at: float | None = None
    outcome: Outcome | None = None
    error: JSON | None = None
    warnings: tuple[str, ...] = ()
    cancel: bool = False
    source_removed: bool = False

    def as_dict(self) -> JSON:
        d = dict(self.__dict__)
        d.update(plan=dict(self.plan.__dict__), step=str(self.step), expected_running=list(self.expected_running),
                 stopped=list(self.stopped), containers=list(self.containers), warnings=list(self.warnings))
        return d

    @classmethod
    def from_dict(cls, d: JSON) -> Migration:
        return cls(**{**d, "plan": Plan(**d["plan"]), "step": Step(d["step"]),
                      "expected_running": tuple(d["expected_running"]), "stopped": tuple(d["stopped"]),
                      "containers": tuple(d["containers"]), "warnings": tuple(d["warnings"])})

    def downtime(self) -> float | None:
        """Seconds the source's containers were down: until the target verified, or until they ran again."""
        if not self.stopped or self.stopped_at is None:
            return 0.0
        end = self.verified_at if self.outcome == "succeeded" else (self.restarted_at or self.finished_at)
        return None if end is None else round(end - self.stopped_at, 3)

    def report(self) -> JSON:
        """What the user is told: times, downtime, what moved and what was kept."""
        total = None if self.finished_at is None else round(self.finished_at - self.started_at, 3)
        return {
            "volume": self.plan.volume, "source": self.plan.source, "target": self.plan.target,
            "step": str(self.step), "snapshot": self.snapshot, "stopped": list(self.stopped),
            "downtime_s": self.downtime(), "total_s": total, "source_removed": self.source_removed,
            "target_created": self.target_created, "containers": list(self.containers),
            "warnings": list(self.warnings),
        }


@dataclass(frozen=True)
class HostView:
    """What the service knows of a host when a migration is planned."""

    online: bool
    inventory: Inventory | None = None


# ----------------------------------------------------------------------- plan


def plan(volume: str, target: str, source: str | None, hosts: Mapping[str, HostView], *, force: bool = False,
         remove_source: bool = False) -> tuple[Plan, tuple[str, ...]]:
    """Check a migration can start; returns the plan and the running users on the source.

    Refuses before anything is touched: unknown or offline hosts, a volume that
    is not on the source (or on several hosts when no source is given), and a
    target volume that exists without ``force``.
    """
    _known(target, hosts)
    source = source or _find_source(volume, target, hosts)
    _known(source, hosts)
    if source == target:
        raise UsageError(f"volume {volume} is already on host {target}")
    for host in (source, target):
        if not hosts[host].online:
            raise UnreachableError(f"host {host} is offline")
    entry = _inventory(source, hosts).volume(volume)
    if entry is None:
        raise NotFoundError(f"volume {volume} does not exist on host {source}")
    if _inventory(target, hosts).volume(volume) is not None and not force:
        raise ConflictError(f"volume {volume} already exists on host {target}; use --force to replace it")
    return Plan(volume, source, target, force, remove_source), entry.running


def _known(host: str, hosts: Mapping[str, HostView]) -> None:
    if host not in hosts:
        known = ", ".join(sorted(hosts)) or "none"
        raise NotFoundError(f"unknown host {host!r} (known hosts: {known})")


def _inventory(host: str, hosts: Mapping[str, HostView]) -> Inventory:
    inv = hosts[host].inventory
    if inv is None:
        raise UnreachableError(f"host {host} has not reported its volumes yet")
    return inv


def _find_source(volume: str, target: str, hosts: Mapping[str, HostView]) -> str:
    found = sorted(h for h, v in hosts.items() if h != target and v.inventory and v.inventory.volume(volume))
    if not found:
        raise NotFoundError(f"volume {volume} is on no known host other than {target}")
    if len(found) > 1:
        raise UsageError(f"volume {volume} is on several hosts ({', '.join(found)}): name one with --from")
    return found[0]


# ---------------------------------------------------------------------- steps


def begin(mid: str, p: Plan, expected_running: tuple[str, ...], now: float) -> tuple[Migration, list[Spawn]]:
    m = Migration(mid, p, started_at=now, expected_running=expected_running)
    return _spawn(m, Step.STOP, "stop-containers", p.source, {"volume": p.volume})


def _spawn(m: Migration, step: Step, kind: str, host: str, params: JSON) -> tuple[Migration, list[Spawn]]:
    child = f"{m.id}-{m.seq + 1}"
    m = replace(m, step=step, seq=m.seq + 1, child=child)
    return m, [Spawn(child, step, kind, host, params)]


def on_child(m: Migration, child: str, outcome: Outcome, result: JSON, error: JobError | None,
             now: float) -> tuple[Migration, list[Spawn]]:
    """A child job ended; returns the next state and the next child to run, if any."""
    if child != m.child or m.step is Step.DONE:
        return m, []  # not the child we wait for (a duplicate, or an abandoned one)
    if m.step in FORWARD:
        return _forward(m, outcome, result, error, now)
    if m.step is Step.REMOVE_SOURCE:
        return _after_remove(m, outcome, error, now)
    return _after_rollback_step(m, outcome, error, now)


def cancel(m: Migration) -> tuple[Migration, str | None]:
    """Ask to cancel; returns the child to cancel. Too late once the target verified."""
    if m.step not in FORWARD:
        return m, None
    return replace(m, cancel=True), m.child


def _forward(m: Migration, outcome: Outcome, result: JSON, error: JobError | None,
             now: float) -> tuple[Migration, list[Spawn]]:
    if m.step is Step.STOP and outcome == "succeeded":
        m = _record_stop(m, result, now)  # even if cancelled meanwhile: they must be started again
    if m.cancel:
        return _rollback(m, {"kind": "cancelled", "message": "migration cancelled", "transient": False}, now,
                         "cancelled")
    if outcome != "succeeded":
        return _rollback(m, _step_error(m, error, outcome), now, "failed")
    return _advance(m, result, now)


def _advance(m: Migration, result: JSON, now: float) -> tuple[Migration, list[Spawn]]:
    p = m.plan
    if m.step is Step.STOP:
        return _spawn(m, Step.BACKUP, "backup", p.source, {"volume": p.volume, "tags": [f"migrate={m.id}"]})
    if m.step is Step.BACKUP:
        snapshot = result.get("snapshot")
        if not isinstance(snapshot, str) or not snapshot:
            return _rollback(m, {"kind": "protocol", "message": "the backup reported no snapshot id",
                                 "transient": False}, now, "failed")
        m = replace(m, snapshot=snapshot)
        return _spawn(m, Step.RESTORE, "restore", p.target, {
            "volume": p.volume, "snapshot": m.snapshot, "create_only": not p.force, "replace": p.force})
    if m.step is Step.RESTORE:
        m = replace(m, target_created=bool(result.get("created", False)))
        return _spawn(m, Step.VERIFY, "verify", p.target, {"volume": p.volume, "snapshot": m.snapshot})
    return _after_verify(m, result, now)


def _after_verify(m: Migration, result: JSON, now: float) -> tuple[Migration, list[Spawn]]:
    if result.get("ok") is not True:
        diffs = result.get("differences") or []
        message = f"the restored volume on {m.plan.target} differs from the snapshot: {'; '.join(map(str, diffs[:5]))}"
        return _rollback(m, {"kind": "corrupt", "message": message, "transient": False}, now, "failed")
    m = replace(m, verified_at=now)
    if m.plan.remove_source:
        return _spawn(m, Step.REMOVE_SOURCE, "remove-volume", m.plan.source, {"volume": m.plan.volume})
    return _finish(m, "succeeded", None, now), []


def _after_remove(m: Migration, outcome: Outcome, error: JobError | None,
                  now: float) -> tuple[Migration, list[Spawn]]:
    if outcome == "succeeded":
        return _finish(replace(m, source_removed=True), "succeeded", None, now), []
    why = error.message if error else outcome
    warning = f"the target verified, but the source volume on {m.plan.source} was kept: {why}"
    return _finish(replace(m, warnings=(*m.warnings, warning)), "succeeded", None, now), []


def _record_stop(m: Migration, result: JSON, now: float) -> Migration:
    stopped = tuple(str(c) for c in result.get("stopped", []) if isinstance(c, str))
    containers = tuple(c for c in result.get("containers", []) if isinstance(c, dict))
    return replace(m, stopped=stopped, containers=containers, stopped_at=now)


def _step_error(m: Migration, error: JobError | None, outcome: Outcome) -> JSON:
    host = m.plan.source if m.step in (Step.STOP, Step.BACKUP) else m.plan.target
    message = f"{m.step} on {host} {outcome}: {error.message if error else outcome}"
    return {"kind": error.kind if error else outcome, "message": message,
            "transient": bool(error and error.transient)}


# ------------------------------------------------------------------- rollback


def _rollback(m: Migration, error: JSON, now: float, outcome: Outcome) -> tuple[Migration, list[Spawn]]:
    m = replace(m, error=error, outcome=outcome)
    # Stopped ones are known once the stop job reported; if it never did, start
    # those that ran when the migration was planned (starting a running one is a no-op).
    to_start = m.stopped if m.stopped_at is not None else m.expected_running
    if to_start:
        return _spawn(m, Step.ROLLBACK_START, "start-containers", m.plan.source, {"containers": list(to_start)})
    return _rollback_target(m, now)


def _rollback_target(m: Migration, now: float) -> tuple[Migration, list[Spawn]]:
    if m.target_created:
        return _spawn(m, Step.ROLLBACK_TARGET, "remove-volume", m.plan.target, {"volume": m.plan.volume})
    return _finish(m, m.outcome or "failed", m.error, now), []


def _after_rollback_step(m: Migration, outcome: Outcome, error: JobError | None,
                         now: float) -> tuple[Migration, list[Spawn]]:
    if outcome != "succeeded":
        what = "restart the containers" if m.step is Step.ROLLBACK_START else "remove the target volume"
        host = m.plan.source if m.step is Step.ROLLBACK_START else m.plan.target
        m = replace(m, warnings=(*m.warnings, f"rollback could not {what} on {host}: "
                                              f"{error.message if error else outcome}"))
    if m.step is Step.ROLLBACK_START:
        m = replace(m, restarted_at=now)
        return _rollback_target(m, now)
    return _finish(m, m.outcome or "failed", m.error, now), []


def _finish(m: Migration, outcome: Outcome, error: JSON | None, now: float) -> Migration:
    return replace(m, step=Step.DONE, child=None, outcome=outcome, error=error, finished_at=now)


@dataclass(frozen=True)
class Defaults:
    """Deadlines (seconds) and attempts of the children, by kind."""

    deadlines: Mapping[str, float] = field(default_factory=lambda: {
        "stop-containers": 300.0, "backup": 6 * 3600.0, "restore": 6 * 3600.0, "verify": 6 * 3600.0,
        "remove-volume": 300.0, "start-containers": 24 * 3600.0})
    attempts: Mapping[str, int] = field(default_factory=lambda: {"start-containers": 20, "remove-volume": 3})
