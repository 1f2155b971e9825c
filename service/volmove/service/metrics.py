"""Prometheus metrics: what a job's ending records, and the text exposition
format (version 0.0.4) served on ``GET /metrics``.

Per volume and host: the last successful backup's time, duration, new and
total bytes, the last failure; the same for restore drills; counters of
finished and failed jobs and of size-drop alerts (kept in the database, so
they only grow); hosts up; active jobs; each schedule target's next run.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from volmove.core.fleet import schedule as S
from volmove.core.fleet.hosts import HostState
from volmove.core.fleet.jobs import Job, Phase
from volmove.service.schedules_store import Outcome, VolumeObs

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
Labels = dict[str, str]
JSON = dict[str, Any]


# ------------------------------------------------------------------ recording


@dataclass(frozen=True)
class Alerting:
    size_drop: float = 0.5  # alert when a backup holds less than (1 - this) of the previous one's bytes; 0: off
    size_drop_min: int = 0  # ... and the previous one held at least this many bytes


def observed_volume(job: Job) -> tuple[str, str, str] | None:
    """(kind, host, volume) a backup or drill reports on; the drill's host is where the snapshots came from."""
    volume = job.params.get("volume")
    if job.kind not in ("backup", "drill") or not isinstance(volume, str):
        return None
    host = job.host if job.kind == "backup" else str(job.params.get("from_host") or job.result.get("from_host")
                                                     or job.host)
    return job.kind, host, volume


def outcome_of(job: Job, previous: VolumeObs | None, alerting: Alerting) -> tuple[Outcome, bool]:
    """What the job's ending changes, and whether the backup is much smaller than the previous one."""
    at = job.finished_at or job.updated
    outcome = Outcome(job.id, at, counters=[("volmove_jobs_finished_total", {"kind": job.kind,
                                                                              "outcome": str(job.phase)}, 1)])
    if job.phase is Phase.FAILED:
        outcome.counters.append(("volmove_jobs_failed_total", {"kind": job.kind, "host": job.host}, 1))
    key = observed_volume(job)
    if key is None or job.phase is Phase.CANCELLED:
        return outcome, False
    base = previous or VolumeObs(*key)
    if job.phase is Phase.FAILED:
        outcome.volume = replace(base, last_failure=at, job=job.id)
        return outcome, False
    outcome.volume = _success(base, job, at)
    dropped = job.kind == "backup" and S.size_dropped(base.bytes, outcome.volume.bytes or 0, alerting.size_drop,
                                                      alerting.size_drop_min)
    if dropped:
        outcome.counters.append(("volmove_backup_size_drop_alerts_total", {"host": key[1], "volume": key[2]}, 1))
    return outcome, dropped


def _success(base: VolumeObs, job: Job, at: float) -> VolumeObs:
    stats = job.result.get("stats") or {}
    duration = at - job.started_at if job.started_at else float(stats.get("duration") or 0.0)
    total = stats.get("bytes") if job.kind == "backup" else job.result.get("bytes")
    return replace(base, last_success=at, duration=duration, new_bytes=int(stats.get("new_bytes") or 0),
                   bytes=int(total or 0), snapshot=job.result.get("snapshot"), job=job.id)


# ------------------------------------------------------------------ exposition


@dataclass
class Family:
    name: str
    type: str  # gauge | counter
    help: str
    samples: list[tuple[Labels, float]] = field(default_factory=list)

    def add(self, labels: Labels, value: float | None) -> None:
        if value is not None:
            self.samples.append((labels, value))


def escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


def exposition(families: Iterable[Family]) -> str:
    lines = []
    for fam in families:
        lines += [f"# HELP {fam.name} {fam.help}", f"# TYPE {fam.name} {fam.type}"]
        for labels, value in fam.samples:
            inner = ",".join(f'{k}="{escape(v)}"' for k, v in labels.items())
            lines.append(f"{fam.name}{{{inner}}} {_number(value)}" if inner else f"{fam.name} {_number(value)}")
    return "\n".join(lines) + "\n"


VOLUME_GAUGES = (
    ("backup", "volmove_backup_last_success_timestamp_seconds", "last_success",
     "When the last successful backup of the volume ended (Unix time)."),
    ("backup", "volmove_backup_last_failure_timestamp_seconds", "last_failure",
     "When the last failed backup of the volume ended (Unix time)."),
    ("backup", "volmove_backup_last_duration_seconds", "duration", "How long the last successful backup took."),
    ("backup", "volmove_backup_last_new_bytes", "new_bytes", "Bytes of new data the last backup stored."),
    ("backup", "volmove_backup_last_bytes", "bytes", "Bytes of files in the last backup (the volume's size)."),
    ("drill", "volmove_drill_last_success_timestamp_seconds", "last_success",
     "When the last successful restore drill of the volume ended (Unix time)."),
    ("drill", "volmove_drill_last_failure_timestamp_seconds", "last_failure",
     "When the last failed restore drill of the volume ended (Unix time)."),
)


def volume_families(obs: Sequence[VolumeObs]) -> list[Family]:
    fams = []
    for kind, name, attr, text in VOLUME_GAUGES:
        fam = Family(name, "gauge", text)
        for o in obs:
            if o.kind == kind:
                fam.add({"host": o.host, "volume": o.volume}, getattr(o, attr))
        fams.append(fam)
    return fams


COUNTER_HELP = {
    "volmove_jobs_finished_total": "Jobs that ended, by kind and outcome.",
    "volmove_jobs_failed_total": "Jobs that failed, by kind and host.",
    "volmove_backup_size_drop_alerts_total": "Backups much smaller than the previous one of the same volume.",
    "volmove_notifications_failed_total": "Webhook notifications given up after every retry.",
}


def counter_families(counters: Sequence[tuple[str, Labels, float]]) -> list[Family]:
    fams = {name: Family(name, "counter", text) for name, text in COUNTER_HELP.items()}
    for name, labels, value in counters:
        if name in fams:
            fams[name].add(labels, value)
    return list(fams.values())


def host_families(hosts: Mapping[str, HostState]) -> list[Family]:
    up = Family("volmove_host_up", "gauge", "1 if the host's worker is online, else 0.")
    for name in sorted(hosts):
        up.add({"host": name}, 1.0 if hosts[name].online else 0.0)
    count = Family("volmove_hosts_up", "gauge", "Hosts whose worker is online.")
    count.add({}, float(sum(h.online for h in hosts.values())))
    return [up, count]


def job_families(jobs: Iterable[Job]) -> list[Family]:
    active: dict[tuple[str, str], int] = {}
    for job in jobs:
        if not job.terminal:
            active[(job.kind, str(job.phase))] = active.get((job.kind, str(job.phase)), 0) + 1
    fam = Family("volmove_jobs_active", "gauge", "Jobs not finished, by kind and phase.")
    for (kind, phase), n in sorted(active.items()):
        fam.add({"kind": kind, "phase": phase}, float(n))
    return [fam]


def schedule_families(schedules: Mapping[str, S.ScheduleDef], targets: Sequence[S.Target],
                      states: Mapping[str, S.TargetState]) -> list[Family]:
    nxt = Family("volmove_schedule_next_run_timestamp_seconds", "gauge", "When a schedule next runs for a volume.")
    last = Family("volmove_schedule_last_run_timestamp_seconds", "gauge", "When a schedule last ran for a volume.")
    for t in targets:
        state, sched = states.get(t.key), schedules.get(t.schedule)
        if state is None or sched is None:
            continue
        labels = {"schedule": t.schedule, "host": t.host, "volume": t.volume}
        nxt.add(labels, S.next_fire(sched, t, state).timestamp())
        last.add(labels, state.last_fired.timestamp() if state.last_fired else None)
    return [nxt, last]


def service_families(broker: bool, pending_notifications: int) -> list[Family]:
    up = Family("volmove_broker_connected", "gauge", "1 if the service is connected to the MQTT broker.")
    up.add({}, 1.0 if broker else 0.0)
    pending = Family("volmove_notifications_pending", "gauge", "Webhook notifications waiting to be delivered.")
    pending.add({}, float(pending_notifications))
    return [up, pending]
