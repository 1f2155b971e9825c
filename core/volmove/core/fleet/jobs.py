"""The job state machine of the control service, as a transition table (pure).

``step(job, event, timing)`` returns the new job and the effects to carry out
(messages to send). The service persists the new job *before* it carries out
the effects, so a crash can repeat an effect but never lose a transition;
workers are idempotent by job id and attempt, so a repeated message is harmless.

Phases: queued -> assigned (sent; ``accepted`` once the worker recorded it)
-> running -> succeeded | failed | cancelled. A failed attempt with a transient
error goes back to queued with the next attempt number while attempts remain.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from volmove.core.fleet.protocol import JobError, Outcome

JSON = dict[str, Any]


class Phase(StrEnum):
    QUEUED = "queued"
    ASSIGNED = "assigned"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL = frozenset({Phase.SUCCEEDED, Phase.FAILED, Phase.CANCELLED})
ACTIVE = frozenset({Phase.ASSIGNED, Phase.RUNNING})


@dataclass(frozen=True)
class Timing:
    ack_timeout: float = 5.0  # resend a job the worker has not confirmed after this long
    retry_delay: float = 2.0  # first retry after this long, doubling per attempt


@dataclass(frozen=True)
class Job:
    id: str
    kind: str
    host: str
    params: JSON
    created: float
    deadline: float
    phase: Phase = Phase.QUEUED
    updated: float = 0.0
    attempt: int = 1
    max_attempts: int = 1
    not_before: float = 0.0
    sent_at: float | None = None
    accepted: bool = False
    started_at: float | None = None
    finished_at: float | None = None
    cancel_requested: bool = False
    result: JSON = field(default_factory=dict)
    error: JSON | None = None
    progress: JSON = field(default_factory=dict)
    parent: str | None = None
    workflow: JSON = field(default_factory=dict)  # a workflow job's own state (migrate)

    @property
    def terminal(self) -> bool:
        return self.phase in TERMINAL

    def as_dict(self) -> JSON:
        return {k: (str(v) if isinstance(v, Phase) else v) for k, v in self.__dict__.items()}

    @classmethod
    def from_dict(cls, d: JSON) -> Job:
        fields = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**{**fields, "phase": Phase(d["phase"])})


# ---------------------------------------------------------------------- events


@dataclass(frozen=True)
class Tick:
    now: float
    online: bool


@dataclass(frozen=True)
class Reconnected:
    """The job's host came (back) online: resend what it may have missed."""

    now: float


@dataclass(frozen=True)
class Accepted:
    attempt: int
    now: float


@dataclass(frozen=True)
class Started:
    attempt: int
    now: float


@dataclass(frozen=True)
class Progressed:
    attempt: int
    progress: JSON
    now: float


@dataclass(frozen=True)
class Finished:
    attempt: int
    outcome: Outcome
    result: JSON
    error: JobError | None
    now: float


@dataclass(frozen=True)
class CancelRequested:
    now: float


Event = Tick | Reconnected | Accepted | Started | Progressed | Finished | CancelRequested


# --------------------------------------------------------------------- effects


@dataclass(frozen=True)
class SendRun:
    job: Job


@dataclass(frozen=True)
class SendCancel:
    job: Job


@dataclass(frozen=True)
class SendAck:
    job: Job
    attempt: int


Effect = SendRun | SendCancel | SendAck
Outcome_ = tuple[Job, list[Effect]]
Handler = Callable[[Job, Any, Timing], Outcome_]


# -------------------------------------------------------------------- handlers


def _keep(job: Job, _ev: object, _t: Timing) -> Outcome_:
    return job, []


def _assign(job: Job, now: float) -> Outcome_:
    job = replace(job, phase=Phase.ASSIGNED, sent_at=now, accepted=False, updated=now)
    return job, [SendRun(job)]


def _queued_tick(job: Job, ev: Tick, _t: Timing) -> Outcome_:
    if ev.now >= job.deadline:
        return _expire(job, ev.now)
    if ev.online and ev.now >= job.not_before:
        return _assign(job, ev.now)
    return job, []


def _queued_reconnected(job: Job, ev: Reconnected, t: Timing) -> Outcome_:
    return _queued_tick(job, Tick(ev.now, True), t)


def _cancel_now(job: Job, ev: CancelRequested, _t: Timing) -> Outcome_:
    return replace(job, phase=Phase.CANCELLED, cancel_requested=True, finished_at=ev.now, updated=ev.now,
                   error={"kind": "cancelled", "message": "cancelled before it started", "transient": False}), []


def _active_tick(job: Job, ev: Tick, t: Timing) -> Outcome_:
    if ev.now >= job.deadline:
        return _expire(job, ev.now)
    resend = job.phase is Phase.ASSIGNED and not job.accepted and ev.online
    if resend and job.sent_at is not None and ev.now - job.sent_at >= t.ack_timeout:
        job = replace(job, sent_at=ev.now)
        return job, [SendRun(job)]
    return job, []


def _active_reconnected(job: Job, ev: Reconnected, _t: Timing) -> Outcome_:
    effects: list[Effect] = []
    if job.phase is Phase.ASSIGNED and not job.accepted:
        job = replace(job, sent_at=ev.now)
        effects.append(SendRun(job))
    if job.cancel_requested:
        effects.append(SendCancel(job))
    return job, effects


def _expire(job: Job, now: float) -> Outcome_:
    was_sent = job.phase in ACTIVE
    message = f"deadline exceeded while {job.phase} on host {job.host} (attempt {job.attempt})"
    job = replace(job, phase=Phase.FAILED, finished_at=now, updated=now,
                  error={"kind": "deadline", "message": message, "transient": True})
    return job, [SendCancel(job)] if was_sent else []


def _accepted(job: Job, ev: Accepted, _t: Timing) -> Outcome_:
    if ev.attempt != job.attempt:
        return job, []
    return replace(job, accepted=True, updated=ev.now), []


def _started(job: Job, ev: Started, _t: Timing) -> Outcome_:
    if ev.attempt != job.attempt:
        return job, []
    return replace(job, phase=Phase.RUNNING, accepted=True, started_at=job.started_at or ev.now, updated=ev.now), []


def _progressed(job: Job, ev: Progressed, _t: Timing) -> Outcome_:
    if ev.attempt != job.attempt:
        return job, []
    started = job.started_at or ev.now
    return replace(job, phase=Phase.RUNNING, accepted=True, started_at=started, progress=ev.progress,
                   updated=ev.now), []


def _cancel_active(job: Job, ev: CancelRequested, _t: Timing) -> Outcome_:
    job = replace(job, cancel_requested=True, updated=ev.now)
    return job, [SendCancel(job)]


def _finished(job: Job, ev: Finished, t: Timing) -> Outcome_:
    ack: list[Effect] = [SendAck(job, ev.attempt)]
    if ev.attempt != job.attempt:
        return job, ack  # a stale attempt's result: acknowledged so the worker forgets it
    if ev.outcome == "failed" and _may_retry(job, ev):
        delay = t.retry_delay * 2 ** (job.attempt - 1)
        job = replace(job, phase=Phase.QUEUED, attempt=job.attempt + 1, not_before=ev.now + delay, sent_at=None,
                      accepted=False, progress={}, updated=ev.now, error=_error(ev.error))
        return job, ack
    phase = {"succeeded": Phase.SUCCEEDED, "failed": Phase.FAILED, "cancelled": Phase.CANCELLED}[ev.outcome]
    job = replace(job, phase=phase, result=ev.result, error=_error(ev.error), finished_at=ev.now, updated=ev.now)
    return job, ack


def _may_retry(job: Job, ev: Finished) -> bool:
    transient = ev.error is not None and ev.error.transient
    return transient and job.attempt < job.max_attempts and not job.cancel_requested and ev.now < job.deadline


def _error(error: JobError | None) -> JSON | None:
    return None if error is None else {"kind": error.kind, "message": error.message, "transient": error.transient}


def _ack_only(job: Job, ev: Finished, _t: Timing) -> Outcome_:
    return job, [SendAck(job, ev.attempt)]  # a duplicate: already recorded exactly once


TABLE: dict[tuple[Phase, type], Handler] = {
    (Phase.QUEUED, Tick): _queued_tick,
    (Phase.QUEUED, Reconnected): _queued_reconnected,
    (Phase.QUEUED, CancelRequested): _cancel_now,
    (Phase.QUEUED, Finished): _finished,
    (Phase.ASSIGNED, Tick): _active_tick,
    (Phase.ASSIGNED, Reconnected): _active_reconnected,
    (Phase.ASSIGNED, Accepted): _accepted,
    (Phase.ASSIGNED, Started): _started,
    (Phase.ASSIGNED, Progressed): _progressed,
    (Phase.ASSIGNED, Finished): _finished,
    (Phase.ASSIGNED, CancelRequested): _cancel_active,
    (Phase.RUNNING, Tick): _active_tick,
    (Phase.RUNNING, Reconnected): _active_reconnected,
    (Phase.RUNNING, Progressed): _progressed,
    (Phase.RUNNING, Finished): _finished,
    (Phase.RUNNING, CancelRequested): _cancel_active,
    **{(p, Finished): _ack_only for p in TERMINAL},
}


def step(job: Job, event: Event, timing: Timing = Timing()) -> Outcome_:
    """Apply one event; pairs missing from the table leave the job unchanged."""
    handler = TABLE.get((job.phase, type(event)), _keep)
    return handler(job, event, timing)
