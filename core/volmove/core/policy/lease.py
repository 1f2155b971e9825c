"""Leases for the repository's exclusive prune lock and for host-ownership fencing.

A lease names its owner, expires by itself (a crashed holder's lock goes
away without an operator: stale locks are restic's classic support burden)
and carries an epoch that grows with every new acquisition, so a holder that
lost its lease (partitioned, paused) can be told apart from the new one.

Epochs only grow if the adapter keeps the newest lease record, expired or
not, when computing the next one.  ``owner`` must be unique per process
(e.g. host + pid + random): leases of the same owner never conflict.
Lease records come from shared storage, so ``from_json`` treats them as
untrusted input.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, NamedTuple

from volmove.core.errors import ConflictError, CorruptDataError

LeaseKind = Literal["exclusive", "shared"]
KINDS: tuple[LeaseKind, ...] = ("exclusive", "shared")
FORMAT_VERSION = 1
MAX_JSON_BYTES = 64 * 1024
MAX_OWNER_CHARS = 256
MAX_EPOCH = 2**63 - 1  # fits the signed 64-bit fields other tools will store it in
_FIELDS = frozenset({"version", "owner", "epoch", "acquired", "expires", "kind"})


class LeaseError(CorruptDataError, ValueError):
    """A lease record or value is malformed."""


class LeaseExpiredError(ConflictError):
    """The lease ran out before it was renewed: the holder must stand down and acquire again."""


@dataclass(frozen=True)
class Lease:
    owner: str
    epoch: int
    acquired: datetime
    expires: datetime
    kind: LeaseKind

    def __post_init__(self) -> None:
        _check_owner(self.owner)
        _check_epoch(self.epoch)
        _check_time("acquired", self.acquired)
        _check_time("expires", self.expires)
        if self.expires <= self.acquired:
            raise LeaseError(f"lease of {self.owner}: expires {_iso(self.expires)} is not after acquired")
        if self.kind not in KINDS:
            raise LeaseError(f"lease kind must be exclusive or shared, got {_show(self.kind)}")


class Check(NamedTuple):
    ok: bool
    reason: str


def _show(value: object) -> str:
    # Values may come from a forged record: keep messages one short line.
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat()


def _check_owner(owner: object) -> None:
    if not isinstance(owner, str) or not 0 < len(owner) <= MAX_OWNER_CHARS or not owner.isprintable():
        raise LeaseError(f"lease owner must be 1-{MAX_OWNER_CHARS} printable characters, got {_show(owner)}")


def _check_epoch(epoch: object) -> None:
    if isinstance(epoch, bool) or not isinstance(epoch, int) or not 0 <= epoch <= MAX_EPOCH:
        raise LeaseError(f"lease epoch must be an integer 0-{MAX_EPOCH}, got {_show(epoch)}")


def _check_time(name: str, t: object) -> None:
    if not isinstance(t, datetime) or t.utcoffset() is None:
        raise LeaseError(f"lease {name} must be a timezone-aware datetime, got {_show(t)}")


def is_expired(lease: Lease, now: datetime) -> bool:
    return now >= lease.expires


def can_acquire(existing: Sequence[Lease], want_kind: LeaseKind, owner: str, now: datetime) -> Check:
    """Whether ``owner`` may take a ``want_kind`` lease next to ``existing`` ones.

    Exclusive conflicts with any live lease of another owner; shared only with
    another owner's live exclusive lease.  Expired leases are ignored.
    """
    if want_kind not in KINDS:
        raise LeaseError(f"lease kind must be exclusive or shared, got {_show(want_kind)}")
    conflicts = [
        lease for lease in existing
        if lease.owner != owner and not is_expired(lease, now)
        and (want_kind == "exclusive" or lease.kind == "exclusive")
    ]
    if not conflicts:
        return Check(True, "no live conflicting lease")
    last = max(conflicts, key=lambda lease: lease.expires)
    more = f" (and {len(conflicts) - 1} more)" if len(conflicts) > 1 else ""
    return Check(False, f"{last.kind} lease held by {last.owner} until {_iso(last.expires)}{more}")


def next_epoch(existing: Sequence[Lease]) -> int:
    """One more than any epoch seen, expired leases included, so epochs never go back."""
    return max((lease.epoch for lease in existing), default=0) + 1


def acquire(
    existing: Sequence[Lease], want_kind: LeaseKind, owner: str, now: datetime, ttl: timedelta
) -> Lease:
    """A new lease, or ConflictError saying who holds the conflicting one."""
    check = can_acquire(existing, want_kind, owner, now)
    if not check.ok:
        raise ConflictError(f"cannot take the {want_kind} lease: {check.reason}")
    _check_ttl(ttl)
    return Lease(owner, next_epoch(existing), now, now + ttl, want_kind)


def renew(lease: Lease, now: datetime, ttl: timedelta) -> Lease:
    """The same lease (owner, epoch) expiring ``ttl`` from now.

    An expired lease is not revived: someone else may have taken it meanwhile.
    """
    _check_ttl(ttl)
    if is_expired(lease, now):
        raise LeaseExpiredError(
            f"lease of {lease.owner} (epoch {lease.epoch}) expired at {_iso(lease.expires)}; acquire it again"
        )
    return replace(lease, expires=now + ttl)


def _check_ttl(ttl: timedelta) -> None:
    if ttl <= timedelta(0):
        raise LeaseError(f"lease ttl must be positive, got {ttl}")


def to_json(lease: Lease) -> str:
    record = {
        "version": FORMAT_VERSION,
        "owner": lease.owner,
        "epoch": lease.epoch,
        "acquired": _iso(lease.acquired),
        "expires": _iso(lease.expires),
        "kind": lease.kind,
    }
    return json.dumps(record, sort_keys=True, separators=(",", ":"))


def from_json(data: str | bytes) -> Lease:
    """Parse and validate a lease record; LeaseError for anything unexpected."""
    record = _load_object(data)
    if set(record) != _FIELDS:
        missing, extra = sorted(_FIELDS - set(record)), sorted(set(record) - _FIELDS)
        raise LeaseError(f"lease record fields: missing {_show(missing)}, unexpected {_show(extra)}")
    version = record["version"]
    if isinstance(version, bool) or version != FORMAT_VERSION:
        raise LeaseError(f"unsupported lease record version {_show(version)}")
    return Lease(
        owner=record["owner"],
        epoch=record["epoch"],
        acquired=_parse_time("acquired", record["acquired"]),
        expires=_parse_time("expires", record["expires"]),
        kind=_parse_kind(record["kind"]),
    )


def _load_object(data: str | bytes) -> dict[str, Any]:
    if len(data) > MAX_JSON_BYTES:
        raise LeaseError(f"lease record is {len(data)} long, more than {MAX_JSON_BYTES}")
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        loaded = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except LeaseError:
        raise
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, huge ints
        raise LeaseError(f"lease record is not valid JSON: {_show(str(e))}") from None
    if not isinstance(loaded, dict):
        raise LeaseError(f"lease record must be a JSON object, got {type(loaded).__name__}")
    return loaded


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # A duplicated key lets two readers see two different records in the same bytes.
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise LeaseError(f"lease record repeats the field {_show(key)}")
        result[key] = value
    return result


def _no_constant(name: str) -> None:
    raise LeaseError(f"lease record contains {name}, which is not JSON")


def _parse_time(name: str, value: object) -> datetime:
    if not isinstance(value, str) or len(value) > 64:
        raise LeaseError(f"lease {name} must be an ISO 8601 time string, got {_show(value)}")
    try:
        t = datetime.fromisoformat(value)
    except ValueError:
        raise LeaseError(f"lease {name} is not an ISO 8601 time: {_show(value)}") from None
    _check_time(name, t)
    return t


def _parse_kind(value: object) -> LeaseKind:
    for kind in KINDS:
        if value == kind:
            return kind
    raise LeaseError(f"lease kind must be exclusive or shared, got {_show(value)}")
