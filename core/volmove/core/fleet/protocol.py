"""Versioned fleet messages and their validation (pure: no IO).

Every payload is a JSON object ``{"v": 1, "type": ..., ...}``. Parsing checks
the version, the type and every field a receiver acts on, and turns job
parameters into typed values: a worker never hands a message field to Docker
unchecked. Unknown extra fields are ignored, so a newer sender stays readable.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Literal, TypeVar

from volmove.core.errors import VolmoveError
from volmove.core.policy.retention import parse_duration

VERSION = 1
MAX_PAYLOAD = 4 << 20  # inventories of large hosts fit; anything bigger is refused
JSON = dict[str, Any]

# Docker's own rule for volume and container names (ids match it too).
NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,254}$")
JOB_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{5,63}$")
SNAPSHOT_RE = re.compile(r"^(latest|[0-9a-f]{4,64})$")
TAG_MAX, TAGS_MAX = 100, 16

T = TypeVar("T")


class ProtocolError(VolmoveError):
    """A fleet message is malformed, of an unknown type or of an unsupported version."""

    kind = "protocol"


# ----------------------------------------------------------------- field checks


def _get(doc: Mapping[str, Any], key: str, kind: type[T], default: T | None = None) -> T:
    value = doc.get(key, default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ProtocolError(f"field {key!r} must be {kind.__name__}, got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ProtocolError(f"field {key!r} must be finite")
    return value


def name(value: object, what: str = "name") -> str:
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise ProtocolError(f"invalid {what} {value!r}")
    return value


def job_id(value: object) -> str:
    if not isinstance(value, str) or not JOB_ID_RE.match(value):
        raise ProtocolError(f"invalid job id {value!r}")
    return value


def _snapshot(value: object) -> str:
    if not isinstance(value, str) or not SNAPSHOT_RE.match(value):
        raise ProtocolError(f"invalid snapshot reference {value!r}")
    return value


def _tags(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or len(value) > TAGS_MAX:
        raise ProtocolError(f"tags must be a list of at most {TAGS_MAX} strings")
    for tag in value:
        if not isinstance(tag, str) or not 0 < len(tag) <= TAG_MAX or not tag.isprintable():
            raise ProtocolError(f"invalid tag {tag!r}")
    return tuple(value)


def _opt_name(doc: Mapping[str, Any], key: str) -> str | None:
    value = doc.get(key)
    return None if value is None else name(value, key)


# ------------------------------------------------------------------- job params


@dataclass(frozen=True)
class BackupParams:
    kind: ClassVar[str] = "backup"
    volume: str
    tags: tuple[str, ...] = ()
    stop: bool = False

    @classmethod
    def parse(cls, d: Mapping[str, Any]) -> BackupParams:
        return cls(name(d.get("volume"), "volume"), _tags(d.get("tags", [])), _get(d, "stop", bool, False))


@dataclass(frozen=True)
class RestoreParams:
    kind: ClassVar[str] = "restore"
    volume: str
    snapshot: str = "latest"
    as_name: str | None = None
    force: bool = False  # restore into a non-empty volume
    create_only: bool = False  # refuse a volume that already exists (migrate)
    replace: bool = False  # remove an existing volume first (migrate --force)

    @classmethod
    def parse(cls, d: Mapping[str, Any]) -> RestoreParams:
        return cls(
            name(d.get("volume"), "volume"), _snapshot(d.get("snapshot", "latest")), _opt_name(d, "as_name"),
            _get(d, "force", bool, False), _get(d, "create_only", bool, False), _get(d, "replace", bool, False),
        )


@dataclass(frozen=True)
class VerifyParams:
    kind: ClassVar[str] = "verify"
    volume: str
    snapshot: str = "latest"
    of_volume: str | None = None  # whose snapshot; default the same name

    @classmethod
    def parse(cls, d: Mapping[str, Any]) -> VerifyParams:
        return cls(name(d.get("volume"), "volume"), _snapshot(d.get("snapshot", "latest")), _opt_name(d, "of_volume"))


@dataclass(frozen=True)
class RemoveVolumeParams:
    kind: ClassVar[str] = "remove-volume"
    volume: str

    @classmethod
    def parse(cls, d: Mapping[str, Any]) -> RemoveVolumeParams:
        return cls(name(d.get("volume"), "volume"))


@dataclass(frozen=True)
class StopContainersParams:
    kind: ClassVar[str] = "stop-containers"
    volume: str  # stop every running container that uses it

    @classmethod
    def parse(cls, d: Mapping[str, Any]) -> StopContainersParams:
        return cls(name(d.get("volume"), "volume"))


@dataclass(frozen=True)
class StartContainersParams:
    kind: ClassVar[str] = "start-containers"
    containers: tuple[str, ...] = ()

    @classmethod
    def parse(cls, d: Mapping[str, Any]) -> StartContainersParams:
        raw = d.get("containers", [])
        if not isinstance(raw, list) or len(raw) > 1000:
            raise ProtocolError("containers must be a list of container ids")
        return cls(tuple(name(c, "container") for c in raw))


@dataclass(frozen=True)
class DrillParams:
    """Restore the latest snapshot into a scratch volume, compare it with the catalog, remove it."""

    kind: ClassVar[str] = "drill"
    volume: str
    snapshot: str = "latest"
    from_host: str | None = None  # whose snapshots; default any host's

    @classmethod
    def parse(cls, d: Mapping[str, Any]) -> DrillParams:
        return cls(name(d.get("volume"), "volume"), _snapshot(d.get("snapshot", "latest")), _opt_name(d, "from_host"))


KEEP_COUNTS = ("keep_last", "keep_hourly", "keep_daily", "keep_weekly", "keep_monthly", "keep_yearly")


@dataclass(frozen=True)
class ForgetParams:
    """Apply retention to one volume's snapshots (of one host when given)."""

    kind: ClassVar[str] = "forget"
    volume: str
    host: str | None = None
    keep_last: int = 0
    keep_hourly: int = 0
    keep_daily: int = 0
    keep_weekly: int = 0
    keep_monthly: int = 0
    keep_yearly: int = 0
    keep_within: str = ""

    @classmethod
    def parse(cls, d: Mapping[str, Any]) -> ForgetParams:
        counts = {k: _get(d, k, int, 0) for k in KEEP_COUNTS}
        if any(not 0 <= n <= 100_000 for n in counts.values()):
            raise ProtocolError("keep counts must be between 0 and 100000")
        within = _get(d, "keep_within", str, "")
        try:
            _ = parse_duration(within) if within else None
        except VolmoveError as exc:
            raise ProtocolError(str(exc)) from None
        if not any(counts.values()) and not within:
            raise ProtocolError("forget needs at least one keep rule")
        return cls(name(d.get("volume"), "volume"), _opt_name(d, "host"), **counts, keep_within=within)


JobParams = (BackupParams | RestoreParams | VerifyParams | RemoveVolumeParams | StopContainersParams
             | StartContainersParams | DrillParams | ForgetParams)
PARAMS: dict[str, Any] = {
    p.kind: p for p in (BackupParams, RestoreParams, VerifyParams, RemoveVolumeParams, StopContainersParams,
                        StartContainersParams, DrillParams, ForgetParams)
}
WORKER_KINDS = frozenset(PARAMS)


def parse_params(kind: str, raw: object) -> JobParams:
    if kind not in PARAMS:
        raise ProtocolError(f"unknown job kind {kind!r}; known: {', '.join(sorted(PARAMS))}")
    if not isinstance(raw, dict):
        raise ProtocolError("params must be an object")
    params: JobParams = PARAMS[kind].parse(raw)
    return params


def params_dict(params: JobParams) -> JSON:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(params).items()}


# ------------------------------------------------------------- service → worker


@dataclass(frozen=True)
class RunJob:
    type: ClassVar[str] = "job.run"
    job: str
    attempt: int
    kind: str
    params: JobParams
    deadline: float  # seconds since the epoch: it crosses processes

    def body(self) -> JSON:
        return {"job": self.job, "attempt": self.attempt, "kind": self.kind, "params": params_dict(self.params),
                "deadline": self.deadline}

    @classmethod
    def parse(cls, d: Mapping[str, Any]) -> RunJob:
        kind = _get(d, "kind", str)
        return cls(job_id(d.get("job")), _attempt(d), kind, parse_params(kind, d.get("params")),
                   _get(d, "deadline", float))


@dataclass(frozen=True)
class CancelJob:
    type: ClassVar[str] = "job.cancel"
    job: str

    def body(self) -> JSON:
        return {"job": self.job}

    @classmethod
    def parse(cls, d: Mapping[str, Any]) -> CancelJob:
        return cls(job_id(d.get("job")))


@dataclass(frozen=True)
class AckResult:
    """The service stored a result: the worker may stop re-sending it."""

    type: ClassVar[str] = "job.ack"
    job: str
    attempt: int

    def body(self) -> JSON:
        return {"job": self.job, "attempt": self.attempt}

    @classmethod
    def parse(cls, d: Mapping[str, Any]) -> AckResult:
        return cls(job_id(d.get("job")), _attempt(d))


def _attempt(d: Mapping[str, Any]) -> int:
    attempt = _get(d, "attempt", int)
    if not 1 <= attempt <= 1000:
        raise ProtocolError(f"invalid attempt {attempt}")
    return attempt


# ------------------------------------------------------------- worker → service


@dataclass(frozen=True)
class Status:
    """Retained on the host's status topic; the Last Will is an offline Status."""

    type: ClassVar[str] = "status"
    host: str
    state: Literal["online", "offline"]
    session: str  # one per worker process: tells a stale Will from a current status
    time: float
    capacity: int = 0
    version: str = ""

    def body(self) -> JSON:
        return {"host": self.host, "state": self.state, "session": self.session, "time": self.time,
                "capacity": self.capacity, "version": self.version}

    @classmethod
    def parse(cls, d: Mapping[str, Any]) -> Status:
        state = _get(d, "state", str)
        if state not in ("online", "offline"):
            raise ProtocolError(f"invalid host state {state!r}")
        return cls(_get(d, "host", str), "online" if state == "online" else "offline", _get(d, "session", str),
                   _get(d, "time", float), _get(d, "capacity", int, 0), _get(d, "version", str, ""))


@dataclass(frozen=True)
class VolumeEntry:
    name: str
    driver: str
    size: int
    labels: dict[str, str]
    containers: tuple[str, ...]
    running: tuple[str, ...]
    container_schedules: tuple[str, ...] = ()  # volmove.schedule labels of the containers using it

    @classmethod
    def parse(cls, d: object) -> VolumeEntry:
        if not isinstance(d, dict):
            raise ProtocolError("a volume entry must be an object")
        labels = d.get("labels", {})
        if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
            raise ProtocolError("volume labels must map strings to strings")
        return cls(name(d.get("name"), "volume"), _get(d, "driver", str, ""), _get(d, "size", int, -1),
                   dict(labels), _names(d.get("containers", [])), _names(d.get("running", [])),
                   _label_values(d.get("container_schedules", [])))


def _label_values(raw: object) -> tuple[str, ...]:
    if not isinstance(raw, list) or len(raw) > 100 or not all(isinstance(v, str) and len(v) <= 200 for v in raw):
        raise ProtocolError("container_schedules must be a list of short strings")
    return tuple(raw)


def _names(raw: object) -> tuple[str, ...]:
    if not isinstance(raw, list):
        raise ProtocolError("expected a list of names")
    return tuple(name(n, "container") for n in raw)


@dataclass(frozen=True)
class Inventory:
    type: ClassVar[str] = "inventory"
    host: str
    time: float
    volumes: tuple[VolumeEntry, ...]

    def body(self) -> JSON:
        return {"host": self.host, "time": self.time,
                "volumes": [{**asdict(v), "containers": list(v.containers), "running": list(v.running)}
                            for v in self.volumes]}

    @classmethod
    def parse(cls, d: Mapping[str, Any]) -> Inventory:
        raw = d.get("volumes")
        if not isinstance(raw, list):
            raise ProtocolError("volumes must be a list")
        return cls(_get(d, "host", str), _get(d, "time", float), tuple(VolumeEntry.parse(v) for v in raw))

    def volume(self, volume: str) -> VolumeEntry | None:
        return next((v for v in self.volumes if v.name == volume), None)


@dataclass(frozen=True)
class JobAccepted:
    """The worker recorded the job durably; it runs when a slot is free."""

    type: ClassVar[str] = "job.accepted"
    job: str
    attempt: int

    def body(self) -> JSON:
        return {"job": self.job, "attempt": self.attempt}

    @classmethod
    def parse(cls, d: Mapping[str, Any]) -> JobAccepted:
        return cls(job_id(d.get("job")), _attempt(d))


@dataclass(frozen=True)
class JobStarted:
    type: ClassVar[str] = "job.started"
    job: str
    attempt: int

    def body(self) -> JSON:
        return {"job": self.job, "attempt": self.attempt}

    @classmethod
    def parse(cls, d: Mapping[str, Any]) -> JobStarted:
        return cls(job_id(d.get("job")), _attempt(d))


@dataclass(frozen=True)
class JobProgress:
    type: ClassVar[str] = "job.progress"
    job: str
    attempt: int
    progress: JSON

    def body(self) -> JSON:
        return {"job": self.job, "attempt": self.attempt, "progress": self.progress}

    @classmethod
    def parse(cls, d: Mapping[str, Any]) -> JobProgress:
        raw = _get(d, "progress", dict)
        progress = {k: raw[k] for k in PROGRESS_FIELDS if k in raw and isinstance(raw[k], str | int | float)}
        return cls(job_id(d.get("job")), _attempt(d), progress)


PROGRESS_FIELDS = ("phase", "bytes_done", "bytes_total", "files_done", "files_total", "rate", "eta")
Outcome = Literal["succeeded", "failed", "cancelled"]


@dataclass(frozen=True)
class JobError:
    kind: str
    message: str
    transient: bool = False

    @classmethod
    def parse(cls, d: object) -> JobError:
        if not isinstance(d, dict):
            raise ProtocolError("error must be an object")
        return cls(_get(d, "kind", str), _get(d, "message", str)[:2000], _get(d, "transient", bool, False))


@dataclass(frozen=True)
class JobResult:
    type: ClassVar[str] = "job.result"
    job: str
    attempt: int
    outcome: Outcome
    result: JSON = field(default_factory=dict)
    error: JobError | None = None

    def body(self) -> JSON:
        return {"job": self.job, "attempt": self.attempt, "outcome": self.outcome, "result": self.result,
                "error": asdict(self.error) if self.error else None}

    @classmethod
    def parse(cls, d: Mapping[str, Any]) -> JobResult:
        outcome = _get(d, "outcome", str)
        if outcome not in ("succeeded", "failed", "cancelled"):
            raise ProtocolError(f"invalid outcome {outcome!r}")
        error = JobError.parse(d["error"]) if d.get("error") is not None else None
        return cls(job_id(d.get("job")), _attempt(d), outcome, _get(d, "result", dict, {}), error)  # type: ignore[arg-type]


Message = (RunJob | CancelJob | AckResult | Status | Inventory | JobAccepted | JobStarted | JobProgress
           | JobResult)
_TYPES: dict[str, Any] = {
    m.type: m for m in (RunJob, CancelJob, AckResult, Status, Inventory, JobAccepted, JobStarted, JobProgress,
                        JobResult)
}


# -------------------------------------------------------------------- encoding


def encode(msg: Message) -> bytes:
    return json.dumps({"v": VERSION, "type": msg.type, **msg.body()}, separators=(",", ":")).encode()


def decode(payload: bytes | bytearray | str) -> Message:
    """Parse and validate one payload; ProtocolError says what is wrong."""
    if len(payload) > MAX_PAYLOAD:
        raise ProtocolError(f"message of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    try:
        doc = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"message is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ProtocolError("message is not a JSON object")
    if doc.get("v") != VERSION:
        raise ProtocolError(f"unsupported message version {doc.get('v')!r} (this side speaks {VERSION})")
    cls = _TYPES.get(doc.get("type"))  # type: ignore[arg-type]
    if cls is None:
        raise ProtocolError(f"unknown message type {doc.get('type')!r}")
    msg: Message = cls.parse(doc)
    return msg
