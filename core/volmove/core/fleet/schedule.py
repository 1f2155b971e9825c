"""Schedules as pure functions (no IO, no clock reads: ``now`` is passed in).

A schedule is a cron spec (with jitter) and a selection of volumes: names, a
label selector, or the ``volmove.schedule`` label on a volume or on a
container using it. A *target* is one (schedule, host, volume); its state is
``handled_until``: every scheduled time up to it has run or been passed over.

- due: the first cron time after ``handled_until``, plus the target's jitter,
  has come;
- a run missed while the service was down runs once: firing sets
  ``handled_until`` to now minus the jitter, which covers every missed time;
- never two at once: a due target whose volume has an active job of the same
  kind waits, and stays due until the volume is free;
- a host that is offline waits the same way (it runs once when it is back);
- a new target starts at now: its first run is the next scheduled time.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from functools import cached_property
from typing import Any, Literal

from volmove.core.errors import UsageError
from volmove.core.fleet.protocol import Inventory, ProtocolError, VolumeEntry
from volmove.core.fleet.protocol import name as volume_name
from volmove.core.policy.cron import Schedule as CronSchedule
from volmove.core.policy.cron import jitter as cron_jitter
from volmove.core.policy.cron import missed_runs, next_run
from volmove.core.policy.cron import parse as parse_cron
from volmove.core.policy.retention import RetentionPolicy, parse_duration

JSON = dict[str, Any]
SCHEDULE_LABEL = "volmove.schedule"
DRILL_LABEL = "volmove.drill"  # on a drill's scratch volume (value: the job id); never scheduled
LABEL_PREFIX = "label:"  # schedules made from a cron spec in a label are named label:<spec>
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
KEEP_RULES = ("last", "hourly", "daily", "weekly", "monthly", "yearly")
MAX_JITTER = 7 * 24 * 3600
Kind = Literal["backup", "drill"]
Action = Literal["start", "fire", "wait"]


class ScheduleError(UsageError):
    """A schedule definition is unusable; the message says which field and why."""


# ------------------------------------------------------------------ definitions


@dataclass(frozen=True)
class Retention:
    """A schedule's keep rules, applied to its volume on its host after each backup."""

    counts: tuple[tuple[str, int], ...] = ()  # (rule, count) for rules in KEEP_RULES
    within: str = ""  # restic's --keep-within, e.g. 30d

    @classmethod
    def parse(cls, doc: object) -> Retention | None:
        if doc is None:
            return None
        if not isinstance(doc, dict):
            raise ScheduleError("keep must be an object such as {\"daily\": 7, \"weekly\": 4}")
        counts = tuple((rule, _count(doc, rule)) for rule in KEEP_RULES if doc.get(rule))
        within = str(doc.get("within") or "")
        if within:
            parse_duration(within)  # checked now, not when the first backup ends
        unknown = set(doc) - {*KEEP_RULES, "within"}
        if unknown:
            raise ScheduleError(f"unknown keep rule(s) {', '.join(sorted(unknown))}; use {', '.join(KEEP_RULES)}, "
                                f"within")
        if not counts and not within:
            raise ScheduleError("keep needs at least one rule (a schedule never removes every snapshot)")
        return cls(counts, within)

    def as_dict(self) -> JSON:
        return {**dict(self.counts), **({"within": self.within} if self.within else {})}

    def policy(self) -> RetentionPolicy:
        return policy_of({f"keep_{r}": n for r, n in self.counts}, self.within)


def policy_of(counts: Mapping[str, int], within: str) -> RetentionPolicy:
    """A RetentionPolicy from ``keep_<rule>`` counts (0: off) and a keep-within duration."""
    def get(rule: str) -> int | None:
        return counts.get(f"keep_{rule}") or None
    return RetentionPolicy(keep_last=get("last"), keep_hourly=get("hourly"), keep_daily=get("daily"),
                           keep_weekly=get("weekly"), keep_monthly=get("monthly"), keep_yearly=get("yearly"),
                           keep_within=parse_duration(within) if within else None)


def _count(doc: Mapping[str, Any], rule: str) -> int:
    value = doc[rule]
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 100_000:
        raise ScheduleError(f"keep {rule} must be a count from 0 to 100000, got {value!r}")
    return value


@dataclass(frozen=True)
class ScheduleDef:
    name: str
    cron: str
    kind: Kind = "backup"
    jitter: int = 0  # seconds; each target gets its own fixed delay in [0, jitter]
    volumes: tuple[str, ...] = ()
    selector: tuple[tuple[str, str], ...] = ()  # every label must match; value "*": present
    hosts: tuple[str, ...] = ()  # () = every host
    on: str | None = None  # a drill's restoring host
    keep: Retention | None = None
    tags: tuple[str, ...] = ()
    stop: bool = False
    source: str = "api"  # api | file | label

    @cached_property
    def spec(self) -> CronSchedule:
        return parse_cron(self.cron)

    def as_dict(self) -> JSON:
        return {"name": self.name, "cron": self.cron, "kind": self.kind, "jitter": self.jitter,
                "volumes": list(self.volumes), "selector": dict(self.selector), "hosts": list(self.hosts),
                "on": self.on, "keep": self.keep.as_dict() if self.keep else None, "tags": list(self.tags),
                "stop": self.stop, "source": self.source}

    @classmethod
    def parse(cls, doc: object, source: str = "api") -> ScheduleDef:
        """Validate a definition (API body, file entry or stored row); ScheduleError says what is wrong."""
        if not isinstance(doc, dict):
            raise ScheduleError("a schedule must be an object")
        known = {"name", "cron", "kind", "jitter", "volumes", "selector", "hosts", "on", "keep", "tags", "stop",
                 "source"}
        if set(doc) - known:
            raise ScheduleError(f"unknown schedule field(s): {', '.join(sorted(set(doc) - known))}")
        name = schedule_name(doc.get("name"))
        try:
            return _build(doc, name, source)
        except ScheduleError as exc:
            raise ScheduleError(f"schedule {name}: {exc.message}") from None
        except UsageError as exc:  # cron and duration errors
            raise ScheduleError(f"schedule {name}: {exc.message}") from None


def _build(doc: Mapping[str, Any], name: str, source: str) -> ScheduleDef:
    kind = doc.get("kind", "backup")
    if kind not in ("backup", "drill"):
        raise ScheduleError(f"kind must be backup or drill, got {kind!r}")
    spec = doc.get("cron")
    if not isinstance(spec, str) or not spec.strip():
        raise ScheduleError("cron is required, e.g. \"0 3 * * *\" or \"@every 6h\"")
    parse_cron(spec)
    sched = ScheduleDef(
        name=name, cron=" ".join(spec.split()), kind=kind, jitter=parse_seconds(doc.get("jitter", 0)),
        volumes=tuple(_volume(v) for v in _list(doc, "volumes")),
        selector=_selector(doc.get("selector")), hosts=tuple(_host(h) for h in _list(doc, "hosts")),
        on=_host(doc["on"]) if doc.get("on") else None, keep=Retention.parse(doc.get("keep")),
        tags=tuple(_tag(t) for t in _list(doc, "tags")), stop=_bool(doc, "stop"), source=source,
    )
    _check_kind(sched)
    return sched


def _check_kind(s: ScheduleDef) -> None:
    if s.kind == "drill" and not s.on:
        raise ScheduleError("a drill needs 'on': the host that restores into a scratch volume")
    if s.kind == "drill" and (s.keep or s.stop):
        raise ScheduleError("keep and stop belong to backup schedules")
    if s.kind == "backup" and s.on:
        raise ScheduleError("'on' belongs to drills; a backup runs where its volume is (see 'hosts')")


def schedule_name(value: object) -> str:
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise ScheduleError(f"invalid schedule name {value!r}: use a-z, 0-9, '.', '_', '-' (63 at most)")
    return value


def _list(doc: Mapping[str, Any], key: str) -> list[Any]:
    value = doc.get(key) or []
    if not isinstance(value, list | tuple) or len(value) > 1000:
        raise ScheduleError(f"{key} must be a list")
    return list(value)


def _bool(doc: Mapping[str, Any], key: str) -> bool:
    value = doc.get(key, False)
    if not isinstance(value, bool):
        raise ScheduleError(f"{key} must be true or false")
    return value


def _volume(value: object) -> str:
    try:
        return volume_name(value, "volume")
    except ProtocolError as exc:
        raise ScheduleError(exc.message) from None


def _host(value: object) -> str:
    if not isinstance(value, str) or not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$", value):
        raise ScheduleError(f"invalid host name {value!r}")
    return value


def _tag(value: object) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= 100 or not value.isprintable():
        raise ScheduleError(f"invalid tag {value!r}")
    return value


def _selector(value: object) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ScheduleError("selector must map label names to values (\"*\": any value)")
    if any(not k for k in value):
        raise ScheduleError("selector label names must not be empty")
    return tuple(sorted(value.items()))


_SECONDS = re.compile(r"(?:[0-9]{1,7}[dhms])+")
_SECONDS_PART = re.compile(r"([0-9]{1,7})([dhms])")
_UNIT = {"d": 86400, "h": 3600, "m": 60, "s": 1}


def parse_seconds(value: object) -> int:
    """A jitter: whole seconds, or a duration such as 90s, 10m, 1h30m."""
    if isinstance(value, int) and not isinstance(value, bool):
        seconds = value
    elif isinstance(value, str) and value.isdigit():
        seconds = int(value)
    elif isinstance(value, str) and _SECONDS.fullmatch(value.strip()):
        seconds = sum(int(n) * _UNIT[u] for n, u in _SECONDS_PART.findall(value))
    else:
        raise ScheduleError(f"jitter must be seconds or a duration such as 10m, got {value!r}")
    if not 0 <= seconds <= MAX_JITTER:
        raise ScheduleError(f"jitter must be between 0 and {MAX_JITTER} seconds, got {seconds}")
    return seconds


# -------------------------------------------------------------------- selection


@dataclass(frozen=True, order=True)
class Target:
    schedule: str
    host: str  # where the volume is (a backup runs there; a drill restores its snapshots)
    volume: str

    @property
    def key(self) -> str:
        return f"{self.schedule}|{self.host}|{self.volume}"  # '|' occurs in no name and no cron spec

    def as_dict(self) -> JSON:
        return {"schedule": self.schedule, "host": self.host, "volume": self.volume}


def label_values(vol: VolumeEntry) -> list[str]:
    """The ``volmove.schedule`` values of a volume: its own label, then its containers'."""
    own = [vol.labels[SCHEDULE_LABEL]] if vol.labels.get(SCHEDULE_LABEL) else []
    return own + [v for v in vol.container_schedules if v]


def label_schedules(value: str) -> tuple[list[str], ScheduleDef | None]:
    """A label value names schedules (``nightly`` or ``nightly,weekly``) or is a cron spec itself."""
    try:
        parse_cron(value)
    except UsageError:
        return [n.strip() for n in value.split(",") if n.strip()], None
    spec = " ".join(value.split())
    return [], ScheduleDef(f"{LABEL_PREFIX}{spec}", spec, source="label")


def _selected(s: ScheduleDef, vol: VolumeEntry, named: set[str]) -> bool:
    if s.source == "label":
        return False  # a label schedule selects exactly the volumes that carry it (see select)
    by_selector = bool(s.selector) and all(
        key in vol.labels and want in ("*", vol.labels[key]) for key, want in s.selector)
    return vol.name in s.volumes or by_selector or s.name in named


def select(schedules: Iterable[ScheduleDef],
           inventories: Mapping[str, Inventory]) -> tuple[dict[str, ScheduleDef], list[Target]]:
    """Every schedule in force (defined ones and those cron-valued labels make) and its targets."""
    defined = {s.name: s for s in schedules}
    found: dict[str, ScheduleDef] = dict(defined)
    targets: set[Target] = set()
    for host in sorted(inventories):
        for vol in inventories[host].volumes:
            if DRILL_LABEL in vol.labels:
                continue
            named: set[str] = set()
            for value in label_values(vol):
                names, implicit = label_schedules(value)
                named.update(names)
                if implicit is not None:
                    found.setdefault(implicit.name, implicit)
                    targets.add(Target(implicit.name, host, vol.name))
            targets.update(Target(s.name, host, vol.name) for s in defined.values()
                           if (not s.hosts or host in s.hosts) and _selected(s, vol, named))
    return found, sorted(targets)


# ----------------------------------------------------------------------- timing


@dataclass(frozen=True)
class TargetState:
    handled_until: datetime  # every scheduled time up to here has run or been passed over
    last_fired: datetime | None = None
    last_job: str | None = None


def offset(s: ScheduleDef, target: Target) -> timedelta:
    """The target's own fixed delay: hosts sharing a schedule do not all start at once."""
    return timedelta(seconds=cron_jitter(target.key, s.jitter)) if s.jitter else timedelta(0)


def next_fire(s: ScheduleDef, target: Target, state: TargetState) -> datetime:
    return next_run(s.spec, state.handled_until) + offset(s, target)


def runs_on(s: ScheduleDef, target: Target) -> str:
    return s.on if s.kind == "drill" and s.on else target.host


def busy_key(kind: str, host: str, params: Mapping[str, Any]) -> tuple[str, str, str] | None:
    """What an active job occupies: a backup its volume on its host, a drill its volume's snapshots."""
    volume = params.get("volume")
    if not isinstance(volume, str):
        return None
    if kind == "backup":
        return ("backup", host, volume)
    if kind == "drill":
        return ("drill", str(params.get("from_host") or ""), volume)
    return None


def target_busy_key(s: ScheduleDef, target: Target) -> tuple[str, str, str]:
    return (s.kind, target.host, target.volume)


@dataclass(frozen=True)
class World:
    """What the scheduler sees at one instant, besides the time."""

    online: frozenset[str]
    busy: frozenset[tuple[str, str, str]] = frozenset()


@dataclass(frozen=True)
class Step:
    target: Target
    action: Action  # start: first seen; fire: submit a job now; wait: due but offline or busy
    state: TargetState  # the target's state after this step
    reason: str = ""
    missed: int = 0  # scheduled times covered by this one run (> 1 after a downtime)


def decide(schedules: Mapping[str, ScheduleDef], targets: Sequence[Target], states: Mapping[str, TargetState],
           world: World, now: datetime) -> list[Step]:
    """One scheduler pass: which targets start, fire or wait. Targets not due are left out.

    Targets are taken longest-waiting first, so of two schedules sharing a volume neither starves.
    """
    busy = set(world.busy)
    steps = []
    for target in sorted(targets, key=lambda t: _queue_order(schedules[t.schedule], t, states.get(t.key), now)):
        step = _step(schedules[target.schedule], target, states.get(target.key), world.online, busy, now)
        if step is not None:
            steps.append(step)
            if step.action == "fire":
                busy.add(target_busy_key(schedules[target.schedule], target))  # a second schedule waits
    return steps


_NEVER = datetime.min.replace(tzinfo=UTC)


def _queue_order(s: ScheduleDef, target: Target, state: TargetState | None,
                 now: datetime) -> tuple[datetime, datetime, str]:
    if state is None:
        return (now, _NEVER, target.key)
    return (next_fire(s, target, state), state.last_fired or _NEVER, target.key)


def _step(s: ScheduleDef, target: Target, state: TargetState | None, online: frozenset[str],
          busy: set[tuple[str, str, str]], now: datetime) -> Step | None:
    if state is None:
        return Step(target, "start", TargetState(now - offset(s, target)))
    if now < next_fire(s, target, state):
        return None
    if runs_on(s, target) not in online:
        return Step(target, "wait", state, f"host {runs_on(s, target)} is offline")
    if target_busy_key(s, target) in busy:
        return Step(target, "wait", state, f"a {s.kind} of {target.volume} is still running")
    missed = missed_runs(s.spec, state.handled_until, now - offset(s, target))
    return Step(target, "fire", replace(state, handled_until=now - offset(s, target), last_fired=now), "",
                max(1, missed))


def fire_now(s: ScheduleDef, target: Target, state: TargetState | None, now: datetime) -> TargetState:
    """A run asked for by hand: the next scheduled time is still the cron's."""
    base = state or TargetState(now - offset(s, target))
    return replace(base, last_fired=now)


# ------------------------------------------------------------------------- jobs


@dataclass(frozen=True)
class Submission:
    kind: str
    host: str
    params: JSON = field(default_factory=dict)


def job_for(s: ScheduleDef, target: Target) -> Submission:
    if s.kind == "drill":
        return Submission("drill", runs_on(s, target), {"volume": target.volume, "from_host": target.host})
    tags = [*s.tags, f"schedule={s.name}"]
    return Submission("backup", target.host, {"volume": target.volume, "tags": tags, "stop": s.stop})


def retention_job(s: ScheduleDef, target: Target) -> Submission | None:
    """After a successful scheduled backup: forget by the schedule's keep rules, if it has any."""
    if s.kind != "backup" or s.keep is None:
        return None
    return Submission("forget", target.host, {"volume": target.volume, "host": target.host, **_keep(s.keep)})


def _keep(keep: Retention) -> JSON:
    return {**{f"keep_{r}": n for r, n in keep.counts}, **({"keep_within": keep.within} if keep.within else {})}


def size_dropped(previous: int | None, current: int, drop: float, min_previous: int = 0) -> bool:
    """Whether a backup is much smaller than the previous one of the same volume (``drop``: 0.5 = half)."""
    if previous is None or drop <= 0 or previous <= 0 or previous < min_previous:
        return False
    return current < previous * (1.0 - drop)


def orphan_scratch_volumes(inventories: Mapping[str, Inventory], ended_drills: set[str]) -> list[tuple[str, str]]:
    """Scratch volumes of drills that are over (the worker died mid-drill): (host, volume) to remove.

    Only drills known to have ended: a volume of a drill some other service runs is not ours to remove.
    """
    return sorted((host, vol.name) for host, inv in inventories.items() for vol in inv.volumes
                  if vol.labels.get(DRILL_LABEL) in ended_drills and not vol.containers)
