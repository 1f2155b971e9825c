"""Cron parsing, next_run, missed_runs and jitter."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from volmove.core.errors import UsageError
from volmove.core.policy.cron import CronError, CronSpec, Every, jitter, missed_runs, next_run, parse


def at(text: str) -> datetime:
    t = datetime.fromisoformat(text)
    return t if t.tzinfo else t.replace(tzinfo=UTC)


NEXT_RUN_CASES = [
    # (spec, after, expected); 2026-11-20 is a Friday
    ("* * * * *", "2026-11-20T10:00:00", "2026-11-20T10:01"),  # strictly after
    ("* * * * *", "2026-11-20T10:00:30", "2026-11-20T10:01"),
    ("0 * * * *", "2026-11-20T10:00", "2026-11-20T11:00"),
    ("*/15 * * * *", "2026-11-20T10:14:59", "2026-11-20T10:15"),
    ("*/15 * * * *", "2026-11-20T10:45", "2026-11-20T11:00"),
    ("5/15 * * * *", "2026-11-20T10:50", "2026-11-20T11:05"),
    ("10-50/20 * * * *", "2026-11-20T10:50", "2026-11-20T11:10"),
    ("0 0-23/6 * * *", "2026-11-20T10:00", "2026-11-20T12:00"),
    ("0,30 9,17 * * *", "2026-11-20T09:30", "2026-11-20T17:00"),
    ("0-30/10 9-17 * * MON-FRI", "2026-11-20T17:30", "2026-11-23T09:00"),  # over the weekend
    # month and year rollover
    ("0 0 1 * *", "2026-01-31T12:00", "2026-02-01T00:00"),
    ("0 0 31 * *", "2026-04-01T00:00", "2026-05-31T00:00"),  # April has no 31st
    ("0 0 1 1 *", "2026-06-01T00:00", "2027-01-01T00:00"),
    ("59 23 31 12 *", "2026-12-31T23:59", "2027-12-31T23:59"),
    ("* * * * *", "2026-12-31T23:59:59", "2027-01-01T00:00"),
    # Feb 29: leap years only, and 2100 is not one
    ("0 0 29 2 *", "2026-03-01T00:00", "2028-02-29T00:00"),
    ("0 0 29 2 *", "2096-03-01T00:00", "2104-02-29T00:00"),
    # day of week: 0 and 7 are Sunday, names are case-insensitive
    ("0 12 * * 7", "2026-11-20T00:00", "2026-11-22T12:00"),
    ("0 12 * * 0", "2026-11-20T00:00", "2026-11-22T12:00"),
    ("0 12 * * sun", "2026-11-20T00:00", "2026-11-22T12:00"),
    ("0 12 * * 5-7", "2026-11-21T13:00", "2026-11-22T12:00"),
    ("0 0 1 JAN,jul *", "2026-02-01T00:00", "2026-07-01T00:00"),
    ("0 0 * * MON/2", "2026-11-20T01:00", "2026-11-22T00:00"),  # MON/2 = MON,WED,FRI,SUN
    # both day fields restricted: either matches (Sat 21st before Mon 23rd)
    ("0 0 21 * MON", "2026-11-20T00:00", "2026-11-21T00:00"),
    ("0 0 1 * MON", "2026-11-24T00:00", "2026-11-30T00:00"),
    # a field starting with * is unrestricted: both must match (odd day AND Monday)
    ("0 0 */2 * MON", "2026-11-24T00:00", "2026-12-07T00:00"),
    # macros
    ("@hourly", "2026-11-20T10:30", "2026-11-20T11:00"),
    ("@daily", "2026-11-20T10:30", "2026-11-21T00:00"),
    ("@midnight", "2026-11-20T00:00", "2026-11-21T00:00"),
    ("@weekly", "2026-11-20T10:30", "2026-11-22T00:00"),
    ("@monthly", "2026-11-20T10:30", "2026-12-01T00:00"),
    ("@yearly", "2026-11-20T10:30", "2027-01-01T00:00"),
    ("@ANNUALLY", "2026-11-20T10:30", "2027-01-01T00:00"),
    # @every is aligned to the Unix epoch
    ("@every 15m", "2026-11-20T10:14:59", "2026-11-20T10:15"),
    ("@every 15m", "2026-11-20T10:15", "2026-11-20T10:30"),
    ("@every 1h30m", "2026-11-20T10:00", "2026-11-20T10:30"),
    ("@every 1d", "2026-11-20T10:00", "2026-11-21T00:00"),
    ("@every 90s", "2026-11-20T10:00", "2026-11-20T10:01:30"),
    # input in another zone, answer in UTC
    ("0 * * * *", "2026-11-20T12:00+02:00", "2026-11-20T11:00"),
    ("  0   3 *  * *  ", "2026-11-20T10:00", "2026-11-21T03:00"),
]


@pytest.mark.parametrize(("spec", "after", "expected"), NEXT_RUN_CASES)
def test_next_run(spec: str, after: str, expected: str) -> None:
    result = next_run(spec, at(after))
    assert result == at(expected)
    assert result.tzinfo is UTC


@pytest.mark.parametrize(
    "spec", ["*/7 */5 * * *", "0 0 13 * FRI", "0 0 */2 * MON", "15 3 1-7 * 1", "0 12 31 * *", "@every 37m"]
)
def test_next_run_agrees_with_checking_every_minute(spec: str) -> None:
    schedule = parse(spec)
    t = at("2026-01-29T00:00")
    while t < at("2026-03-05T00:00"):
        expected = t + timedelta(minutes=1)
        while not _fires(schedule, expected):
            expected += timedelta(minutes=1)
        assert next_run(schedule, t) == expected
        t = expected


def _fires(schedule: CronSpec | Every, t: datetime) -> bool:
    if isinstance(schedule, Every):
        return (t - datetime(1970, 1, 1, tzinfo=UTC)) % schedule.interval == timedelta(0)
    dom, dow = t.day in schedule.days, t.isoweekday() % 7 in schedule.weekdays
    either = schedule.days_restricted and schedule.weekdays_restricted
    day = (dom or dow) if either else (dom and dow)
    return day and t.month in schedule.months and t.hour in schedule.hours and t.minute in schedule.minutes


def test_next_run_accepts_a_parsed_spec() -> None:
    spec = parse("30 2 * * *")
    assert isinstance(spec, CronSpec)
    assert next_run(spec, at("2026-11-20T02:30")) == at("2026-11-21T02:30")


def test_parse_every() -> None:
    assert parse("@every 1h30m") == Every("@every 1h30m", timedelta(hours=1, minutes=30))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "expected 5 fields"),
        ("* * * *", "expected 5 fields"),
        ("0 * * * * *", "expected 5 fields"),
        ("60 * * * *", "minute 60 is out of range 0-59"),
        ("* 24 * * *", "hour 24 is out of range 0-23"),
        ("* * 0 * *", "day of month 0 is out of range 1-31"),
        ("* * 32 * *", "day of month 32 is out of range"),
        ("* * * 13 *", "month 13 is out of range 1-12"),
        ("* * * * 8", "day of week 8 is out of range 0-7"),
        ("99999 * * * *", "minute 99999 is out of range"),
        ("*/0 * * * *", "step of 0"),
        ("5-3 * * * *", "runs backwards"),
        ("* * * * SAT-SUN", "runs backwards"),
        ("FOO * * * *", "'FOO' is not a number"),
        ("* * * JANUARY *", "'JANUARY' is not a number or name"),
        ("* * * * */MON", "not a number, name, range or step"),
        ("1,,2 * * * *", "'' is not a number"),
        ("L * * * *", "is not a number"),
        ("* * ? * *", "is not a number, name, range or step"),
        ("* * * * ١", "is not a number, name, range or step"),
        ("0 0 30 2 *", "never occurs"),
        ("0 0 31 4,6,9,11 *", "never occurs"),
        ("@reboot", "unknown macro"),
        ("@every", "@every needs a duration"),
        ("@every 0m", "longer than zero"),
        ("@every 5x", "@every needs a duration"),
        ("@every 1m1m", "given twice"),
    ],
)
def test_bad_specs(spec: str, message: str) -> None:
    with pytest.raises(CronError) as info:
        parse(spec)
    text = str(info.value)
    assert message in text
    assert "\n" not in text
    assert isinstance(info.value, ValueError) and isinstance(info.value, UsageError)


def test_both_day_fields_restricted_never_fails_the_day_check() -> None:
    # Feb 30 can never match, but Mondays in February can.
    assert next_run("0 0 30 2 MON", at("2026-11-20T00:00")) == at("2027-02-01T00:00")


def test_naive_datetimes_are_refused() -> None:
    with pytest.raises(CronError, match="timezone-aware"):
        next_run("@daily", datetime(2026, 11, 20))


def test_no_run_before_year_9999() -> None:
    with pytest.raises(CronError, match="9999"):
        next_run("0 0 1 1 *", datetime(9999, 6, 1, tzinfo=UTC))


@pytest.mark.parametrize(
    ("spec", "last_run", "now", "expected"),
    [
        ("@hourly", "2026-11-20T10:00", "2026-11-20T10:59", 0),
        ("@hourly", "2026-11-20T10:00", "2026-11-20T11:00", 1),  # a run due exactly now counts
        ("@hourly", "2026-11-20T10:00", "2026-11-20T13:30", 3),
        ("@hourly", "2026-11-20T10:00", "2026-11-20T10:00", 0),
        ("@hourly", "2026-11-20T12:00", "2026-11-20T10:00", 0),  # clock went backwards
        ("0 2 * * *", "2026-11-17T02:00", "2026-11-20T09:00", 3),
        ("@every 15m", "2026-11-20T10:00", "2026-11-20T11:00", 4),
        ("0 0 * * *", "2026-11-19T00:00+01:00", "2026-11-20T00:30", 2),  # last run was 23:00 UTC
    ],
)
def test_missed_runs(spec: str, last_run: str, now: str, expected: int) -> None:
    assert missed_runs(spec, at(last_run), at(now)) == expected


def test_missed_runs_stops_counting_at_the_limit() -> None:
    assert missed_runs("* * * * *", at("2025-01-01T00:00"), at("2026-01-01T00:00"), limit=5) == 5


def test_jitter_is_deterministic_and_bounded() -> None:
    # Pinned: a per-process hash() would give other values in another process.
    assert jitter("host-a/@daily", 3600) == 2186
    assert jitter("host-a/@daily", 3600) == jitter("host-a/@daily", 3600)
    values = [jitter(f"host-{i}", 3600) for i in range(2000)]
    assert all(0 <= v <= 3600 for v in values)
    assert len(set(values)) > 1000  # hosts spread out
    assert jitter("anything", 0) == 0


def test_jitter_refuses_a_negative_bound() -> None:
    with pytest.raises(CronError):
        jitter("k", -1)


def test_other_offsets_compare_in_utc() -> None:
    tz = timezone(timedelta(hours=-5))
    assert next_run("@daily", datetime(2026, 11, 20, 20, 0, tzinfo=tz)) == at("2026-11-22T00:00")
