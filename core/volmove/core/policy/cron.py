"""Cron schedules as pure functions: parse a spec, find the next run after a time.

Standard 5-field cron (minute hour day-of-month month day-of-week) with
ranges, lists, steps and JAN..DEC / SUN..SAT names; day of week 7 is Sunday
too.  Day of month and day of week follow cron's rule: when both are
restricted (neither starts with ``*``) a day matches if *either* does.
``N/step`` means ``N-max/step``.  Macros: @yearly @annually @monthly @weekly
@daily @midnight @hourly, and ``@every 15m`` (units d h m s), whose runs are
aligned to the Unix epoch so they do not drift with restarts.  All times UTC.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import MAXYEAR, UTC, datetime, timedelta
from typing import NamedTuple

from volmove.core.errors import UsageError


class CronError(UsageError, ValueError):
    """A schedule spec (or a time given with it) is unusable."""


@dataclass(frozen=True)
class CronSpec:
    source: str
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]  # day of month, 1-31
    months: frozenset[int]  # 1-12
    weekdays: frozenset[int]  # 0-6, Sunday = 0
    days_restricted: bool
    weekdays_restricted: bool

    def day_matches(self, t: datetime) -> bool:
        day = t.day in self.days
        weekday = (t.isoweekday() % 7) in self.weekdays
        if self.days_restricted and self.weekdays_restricted:
            return day or weekday  # cron's OR rule
        return day and weekday


@dataclass(frozen=True)
class Every:
    source: str
    interval: timedelta


Schedule = CronSpec | Every

MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
_MONTH_NAMES = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
_DAY_NAMES = ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT")
_DAYS_IN_MONTH = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)  # Feb 29 exists in some years
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_SEARCH_YEARS = 400  # the Gregorian calendar repeats every 400 years


_Fail = Callable[[str], CronError]  # builds the one-line error for the field being parsed


class _Field(NamedTuple):
    name: str
    low: int
    high: int
    names: dict[str, int]


_FIELDS = (
    _Field("minute", 0, 59, {}),
    _Field("hour", 0, 23, {}),
    _Field("day of month", 1, 31, {}),
    _Field("month", 1, 12, {n: i + 1 for i, n in enumerate(_MONTH_NAMES)}),
    _Field("day of week", 0, 7, {n: i for i, n in enumerate(_DAY_NAMES)}),
)


def parse(text: str) -> Schedule:
    """Parse a cron line, a macro or ``@every <duration>``; CronError if it is wrong."""
    spec = " ".join(text.split())
    if spec.lower().startswith("@every"):
        return Every(spec, _parse_interval(spec, spec[len("@every") :].strip()))
    if spec.startswith("@") and spec.lower() not in MACROS:
        raise CronError(f"bad cron spec {text!r}: unknown macro; use one of {', '.join(MACROS)}, @every")
    fields = MACROS.get(spec.lower(), spec).split(" ")
    if len(fields) != 5:
        raise CronError(
            f"bad cron spec {text!r}: expected 5 fields (minute hour day-of-month month day-of-week), "
            f"got {len(fields) if spec else 0}"
        )
    return _build(spec, fields)


def _build(spec: str, fields: list[str]) -> CronSpec:
    minutes, hours, days, months, weekdays = (
        _parse_field(spec, text, field) for text, field in zip(fields, _FIELDS, strict=True)
    )
    cron = CronSpec(
        source=spec,
        minutes=minutes,
        hours=hours,
        days=days,
        months=months,
        weekdays=frozenset(d % 7 for d in weekdays),  # 7 is Sunday too
        days_restricted=not fields[2].startswith("*"),
        weekdays_restricted=not fields[4].startswith("*"),
    )
    _check_day_exists(cron)
    return cron


def _check_day_exists(cron: CronSpec) -> None:
    # "0 0 31 4 *" never runs; say so now rather than search forever.  With the OR
    # rule some weekday always matches, and any weekday occurs on any date over the years.
    if cron.days_restricted and cron.weekdays_restricted:
        return
    if not any(day <= _DAYS_IN_MONTH[m - 1] for m in cron.months for day in cron.days):
        raise CronError(f"bad cron spec {cron.source!r}: that day of the month never occurs in those months")


def _parse_field(spec: str, text: str, field: _Field) -> frozenset[int]:
    values: set[int] = set()
    for item in text.split(","):
        values.update(_parse_item(spec, item, field))
    return frozenset(values)


_ITEM = re.compile(r"(?P<range>\*|[0-9A-Za-z]+(?:-[0-9A-Za-z]+)?)(?:/(?P<step>[0-9]{1,4}))?")


def _parse_item(spec: str, item: str, field: _Field) -> range:
    def fail(why: str) -> CronError:
        return CronError(f"bad cron spec {spec!r}: {field.name} {why}")

    match = _ITEM.fullmatch(item)
    if not match:
        raise fail(f"{item!r} is not a number, name, range or step")
    low, high = _parse_range(match["range"], field, fail)
    step = int(match["step"]) if match["step"] else 1
    if step == 0:
        raise fail(f"{item!r} has a step of 0")
    if match["step"] and "-" not in match["range"]:
        high = field.high  # "*/15" and "5/15" run to the end of the field
    return range(low, high + 1, step)


def _parse_range(text: str, field: _Field, fail: _Fail) -> tuple[int, int]:
    if text == "*":
        return field.low, field.high
    first, _, last = text.partition("-")
    low = _parse_value(first, field, fail)
    high = _parse_value(last, field, fail) if last else low
    if low > high:
        raise fail(f"range {text!r} runs backwards")
    return low, high


def _parse_value(text: str, field: _Field, fail: _Fail) -> int:
    if text.isdigit():  # ASCII only: _ITEM allows no other digits
        value = int(text) if len(text) <= 4 else field.high + 1
    elif text.upper() in field.names:
        value = field.names[text.upper()]
    else:
        raise fail(f"{text!r} is not a number{' or name' if field.names else ''}")
    if not field.low <= value <= field.high:
        raise fail(f"{text} is out of range {field.low}-{field.high}")
    return value


_INTERVAL = re.compile(r"(?:[0-9]{1,9}[dhms])+")
_INTERVAL_PART = re.compile(r"([0-9]{1,9})([dhms])")
_INTERVAL_UNITS = {"d": "days", "h": "hours", "m": "minutes", "s": "seconds"}


def _parse_interval(spec: str, text: str) -> timedelta:
    if not _INTERVAL.fullmatch(text):
        raise CronError(f"bad cron spec {spec!r}: @every needs a duration such as 15m, 1h30m, 90s or 1d")
    parts: dict[str, int] = {}
    for number, unit in _INTERVAL_PART.findall(text):
        if _INTERVAL_UNITS[unit] in parts:
            raise CronError(f"bad cron spec {spec!r}: unit {unit!r} given twice")
        parts[_INTERVAL_UNITS[unit]] = int(number)
    interval = timedelta(**parts)
    if interval <= timedelta(0):
        raise CronError(f"bad cron spec {spec!r}: @every needs a duration longer than zero")
    return interval


def _as_schedule(spec: Schedule | str) -> Schedule:
    return parse(spec) if isinstance(spec, str) else spec


def _utc(t: datetime, what: str) -> datetime:
    if t.utcoffset() is None:
        raise CronError(f"{what} must be a timezone-aware datetime, got naive {t.isoformat()}")
    return t.astimezone(UTC)


def next_run(spec: Schedule | str, after: datetime) -> datetime:
    """The first run strictly after ``after``, in UTC."""
    schedule = _as_schedule(spec)
    start = _utc(after, "after")
    if isinstance(schedule, Every):
        periods = (start - _EPOCH) // schedule.interval + 1
        return _EPOCH + periods * schedule.interval
    try:
        return _next_cron(schedule, start)
    except OverflowError:
        raise CronError(f"cron spec {schedule.source!r}: no run before the year 9999") from None


def _next_cron(cron: CronSpec, start: datetime) -> datetime:
    # Move field by field, largest first, resetting the smaller fields at each jump.
    t = start.replace(second=0, microsecond=0) + timedelta(minutes=1)
    give_up = t.year + _SEARCH_YEARS
    while t.year <= give_up:
        if t.month not in cron.months:
            t = _first_of_next_month(t)
        elif not cron.day_matches(t):
            t = t.replace(hour=0, minute=0) + timedelta(days=1)
        elif t.hour not in cron.hours:
            t = t.replace(minute=0) + timedelta(hours=1)
        elif t.minute not in cron.minutes:
            t += timedelta(minutes=1)
        else:
            return t
    raise CronError(f"cron spec {cron.source!r}: no run within {_SEARCH_YEARS} years")  # pragma: no cover


def _first_of_next_month(t: datetime) -> datetime:
    if (t.year, t.month) == (MAXYEAR, 12):
        raise OverflowError("past the last datetime")
    year, month = (t.year + 1, 1) if t.month == 12 else (t.year, t.month + 1)
    return t.replace(year=year, month=month, day=1, hour=0, minute=0)


def missed_runs(spec: Schedule | str, last_run: datetime, now: datetime, *, limit: int = 1000) -> int:
    """How many runs fell in (last_run, now], counting at most ``limit``.

    The scheduler runs a job once when this is > 0 after being down, not once per miss.
    """
    schedule = _as_schedule(spec)
    t, end = _utc(last_run, "last_run"), _utc(now, "now")
    count = 0
    while count < limit:
        t = next_run(schedule, t)
        if t > end:
            break
        count += 1
    return count


def jitter(spec_key: str, max_seconds: int) -> int:
    """A delay in [0, max_seconds], the same for a key on every run and every host.

    A hash of the key (e.g. host + schedule) spreads hosts sharing a schedule
    without coordination; sha256 because Python's ``hash()`` changes per process.
    """
    if max_seconds < 0:
        raise CronError(f"jitter must be >= 0 seconds, got {max_seconds}")
    digest = hashlib.sha256(spec_key.encode()).digest()
    return int.from_bytes(digest[:8], "big") % (max_seconds + 1)
