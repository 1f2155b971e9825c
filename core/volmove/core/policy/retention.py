"""Which snapshots to keep: restic's ``forget`` policy as a pure function.

Snapshots are grouped by (host, volume).  Inside a group, newest first, each
``keep_<unit>=N`` keeps the newest snapshot of each hour/day/ISO week/month/year
until N buckets are used; if the group runs out of snapshots first, the oldest
snapshot is kept as well (restic does this to keep the longest history the
counts allow).  Buckets are taken in UTC so every host agrees on what a day is.

On top of restic: the newest snapshot of a group and the newest verified one
are always kept, and a policy without any keep rule is refused instead of
being read as "remove everything".
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import NamedTuple

from volmove.core.errors import UsageError

EMPTY_POLICY_MESSAGE = "refusing to remove every snapshot: give at least one --keep option"
NO_RULE = "matches no keep rule"
NEWEST = "newest snapshot"
NEWEST_VERIFIED = "newest verified snapshot"


class PolicyError(UsageError, ValueError):
    """A retention policy, or the input it is applied to, is unusable."""


@dataclass(frozen=True)
class Duration:
    """A calendar duration as restic's ``--keep-within`` takes it, e.g. ``1y2m3d4h``.

    Months and years are calendar units, which a ``timedelta`` cannot express.
    """

    years: int = 0
    months: int = 0
    days: int = 0
    hours: int = 0

    def __post_init__(self) -> None:
        if min(self.years, self.months, self.days, self.hours) < 0:
            raise PolicyError(f"duration parts must not be negative: {self!r}")

    def __bool__(self) -> bool:
        return any((self.years, self.months, self.days, self.hours))

    def __str__(self) -> str:
        parts = ((self.years, "y"), (self.months, "m"), (self.days, "d"), (self.hours, "h"))
        return "".join(f"{n}{unit}" for n, unit in parts if n) or "0h"

    def before(self, t: datetime) -> datetime:
        """``t`` minus this duration, with Go's AddDate overflow (Mar 31 - 1m = Mar 3)."""
        months = t.year * 12 + t.month - 1 - self.years * 12 - self.months
        year, month0 = divmod(months, 12)
        try:
            first = t.replace(year=year, month=month0 + 1, day=1)
            return first + timedelta(days=t.day - 1 - self.days, hours=-self.hours)
        except (ValueError, OverflowError):
            return datetime.min.replace(tzinfo=UTC)  # reaches before year 1: everything is within


_DURATION = re.compile(r"(?:[0-9]{1,6}[ymdh])+")
_DURATION_PART = re.compile(r"([0-9]{1,6})([ymdh])")
_UNIT_FIELDS = {"y": "years", "m": "months", "d": "days", "h": "hours"}


def parse_duration(text: str) -> Duration:
    """Parse restic's ``--keep-within`` syntax: ``1y2m3d4h`` (m = months), any subset."""
    s = text.strip()
    if not _DURATION.fullmatch(s):
        raise PolicyError(f"bad duration {text!r}: use e.g. 7d, 36h, 1y6m (y, m=months, d, h)")
    values: dict[str, int] = {}
    for number, unit in _DURATION_PART.findall(s):
        if _UNIT_FIELDS[unit] in values:
            raise PolicyError(f"bad duration {text!r}: unit {unit!r} given twice")
        values[_UNIT_FIELDS[unit]] = int(number)
    if not any(values.values()):
        raise PolicyError(f"bad duration {text!r}: must be longer than zero")
    return Duration(**values)


Within = timedelta | Duration


def _cutoff(reference: datetime, within: Within) -> datetime:
    if isinstance(within, Duration):
        return within.before(reference)
    try:
        return reference - within
    except OverflowError:
        return datetime.min.replace(tzinfo=UTC)


def _format_within(within: Within) -> str:
    if isinstance(within, Duration):
        return str(within)
    days, rest = divmod(within, timedelta(days=1))
    hours, rest = divmod(rest, timedelta(hours=1))
    if rest:
        return str(within)
    return (f"{days}d" if days else "") + (f"{hours}h" if hours else "") or "0h"


@dataclass(frozen=True)
class RetentionPolicy:
    """restic's ``forget`` options; None or 0 means the rule is off."""

    keep_last: int | None = None
    keep_hourly: int | None = None
    keep_daily: int | None = None
    keep_weekly: int | None = None
    keep_monthly: int | None = None
    keep_yearly: int | None = None
    keep_within: Within | None = None
    keep_tags: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        for rule in _RULES:
            count = rule.setting(self)
            if count is not None and (isinstance(count, bool) or count < 0):
                raise PolicyError(f"keep_{rule.name} must be a count >= 0, got {count!r}")
        if isinstance(self.keep_within, timedelta) and self.keep_within < timedelta(0):
            raise PolicyError(f"keep_within must not be negative, got {self.keep_within}")

    @property
    def is_empty(self) -> bool:
        counts = any(rule.setting(self) for rule in _RULES)
        return not (counts or self.keep_within or self.keep_tags)


@dataclass(frozen=True)
class SnapshotRef:
    """What retention needs to know about one snapshot."""

    id: str
    volume: str
    host: str
    time: datetime
    tags: frozenset[str] = frozenset()
    verified: bool = False

    def __post_init__(self) -> None:
        if self.time.utcoffset() is None:
            raise PolicyError(f"snapshot {self.id}: time {self.time.isoformat()} has no timezone")

    @property
    def utc(self) -> datetime:
        return self.time.astimezone(UTC)


@dataclass(frozen=True)
class Verdict:
    snapshot: SnapshotRef
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class Decision:
    """Kept and removed snapshots, grouped by (host, volume), newest first in each group."""

    keep: tuple[Verdict, ...]
    remove: tuple[Verdict, ...]

    @property
    def keep_ids(self) -> tuple[str, ...]:
        return tuple(v.snapshot.id for v in self.keep)

    @property
    def remove_ids(self) -> tuple[str, ...]:
        return tuple(v.snapshot.id for v in self.remove)


class _Rule(NamedTuple):
    name: str
    setting: Callable[[RetentionPolicy], int | None]
    bucket: Callable[[datetime, int], str]  # (UTC time, position newest-first) -> bucket label


def _iso_week(t: datetime, _: int) -> str:
    year, week, _weekday = t.isocalendar()
    return f"{year}-W{week:02d}"


_RULES: tuple[_Rule, ...] = (
    _Rule("last", lambda p: p.keep_last, lambda _, nr: str(nr + 1)),
    _Rule("hourly", lambda p: p.keep_hourly, lambda t, _: t.strftime("%Y-%m-%dT%H")),
    _Rule("daily", lambda p: p.keep_daily, lambda t, _: t.strftime("%Y-%m-%d")),
    _Rule("weekly", lambda p: p.keep_weekly, _iso_week),
    _Rule("monthly", lambda p: p.keep_monthly, lambda t, _: t.strftime("%Y-%m")),
    _Rule("yearly", lambda p: p.keep_yearly, lambda t, _: f"{t.year:04d}"),
)


def apply(snapshots: Sequence[SnapshotRef], policy: RetentionPolicy, now: datetime) -> Decision:
    """Decide, per (host, volume) group, which snapshots to keep and which to remove."""
    if policy.is_empty:
        raise PolicyError(EMPTY_POLICY_MESSAGE)
    if now.utcoffset() is None:
        raise PolicyError("now must be timezone-aware")
    _reject_duplicate_ids(snapshots)
    keep: list[Verdict] = []
    remove: list[Verdict] = []
    for group in _groups(snapshots):
        kept, removed = _decide_group(group, policy, now)
        keep += kept
        remove += removed
    return Decision(tuple(keep), tuple(remove))


def _reject_duplicate_ids(snapshots: Sequence[SnapshotRef]) -> None:
    # A duplicate would be counted twice towards the buckets; it means the caller's listing is wrong.
    seen: set[str] = set()
    for snap in snapshots:
        if snap.id in seen:
            raise PolicyError(f"snapshot {snap.id} is listed twice")
        seen.add(snap.id)


def _groups(snapshots: Sequence[SnapshotRef]) -> list[list[SnapshotRef]]:
    by_key: dict[tuple[str, str], list[SnapshotRef]] = {}
    for snap in snapshots:
        by_key.setdefault((snap.host, snap.volume), []).append(snap)
    return [_newest_first(by_key[key]) for key in sorted(by_key)]


def _newest_first(group: list[SnapshotRef]) -> list[SnapshotRef]:
    by_id = sorted(group, key=lambda s: s.id)  # ties on time: stable, by id
    return sorted(by_id, key=lambda s: s.utc, reverse=True)


def _decide_group(
    group: list[SnapshotRef], policy: RetentionPolicy, now: datetime
) -> tuple[list[Verdict], list[Verdict]]:
    reasons: list[list[str]] = [[] for _ in group]
    _keep_tagged(group, policy.keep_tags, reasons)
    if policy.keep_within:
        _keep_within(group, policy.keep_within, now, reasons)
    for rule in _RULES:
        count = rule.setting(policy)
        if count:
            _keep_buckets(group, rule, count, reasons)
    _keep_safety_net(group, reasons)
    pairs = list(zip(group, reasons, strict=True))
    keep = [Verdict(snap, tuple(why)) for snap, why in pairs if why]
    remove = [Verdict(snap, (NO_RULE,)) for snap, why in pairs if not why]
    return keep, remove


def _keep_tagged(group: list[SnapshotRef], tags: frozenset[str], reasons: list[list[str]]) -> None:
    # Tags are not counted, as in restic: every snapshot carrying one is kept.
    for snap, why in zip(group, reasons, strict=True):
        why.extend(f"tag {tag}" for tag in sorted(tags & snap.tags))


def _keep_within(group: list[SnapshotRef], within: Within, now: datetime, reasons: list[list[str]]) -> None:
    # Measured back from the newest snapshot, not from now (restic): if backups stop,
    # the last ones do not age out.  Snapshots dated after now (clock skew) are no reference.
    reference = max((s.utc for s in group if s.utc <= now), default=now)
    cutoff = _cutoff(reference, within)
    label = f"within {_format_within(within)}"
    for snap, why in zip(group, reasons, strict=True):
        if snap.utc > cutoff:
            why.append(label)


def _keep_buckets(group: list[SnapshotRef], rule: _Rule, count: int, reasons: list[list[str]]) -> None:
    last_label: str | None = None
    oldest = len(group) - 1
    for nr, snap in enumerate(group):
        if count == 0:
            return
        label = rule.bucket(snap.utc, nr)
        if label != last_label:
            reasons[nr].append(f"{rule.name} {label}")
        elif nr == oldest:
            # Counts are left but snapshots are not: keep the oldest for the longest history.
            reasons[nr].append(f"oldest {rule.name} {label}")
        else:
            continue
        last_label = label
        count -= 1


def _keep_safety_net(group: list[SnapshotRef], reasons: list[list[str]]) -> None:
    verified = next((nr for nr, snap in enumerate(group) if snap.verified), None)
    if verified is not None:
        reasons[verified].append(NEWEST_VERIFIED)
    if group and not reasons[0]:
        reasons[0].append(NEWEST)
