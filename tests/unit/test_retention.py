"""Retention: restic ``forget`` semantics plus volmove's safety rules."""

from __future__ import annotations

import random
from datetime import UTC, date, datetime, timedelta

import pytest

from volmove.core.policy.retention import (
    Decision,
    Duration,
    PolicyError,
    RetentionPolicy,
    SnapshotRef,
    apply,
    parse_duration,
)

NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)


def snap(
    sid: str, when: str, *, host: str = "h1", volume: str = "v1", tags: tuple[str, ...] = (),
    verified: bool = False,
) -> SnapshotRef:
    t = datetime.fromisoformat(when)
    t = t if t.tzinfo else t.replace(tzinfo=UTC)
    return SnapshotRef(sid, volume, host, t, frozenset(tags), verified)


def kept_reasons(decision: Decision) -> dict[str, tuple[str, ...]]:
    return {v.snapshot.id: v.reasons for v in decision.keep}


# --- parse_duration ---------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1y2m3d4h", Duration(1, 2, 3, 4)),
        ("7d", Duration(days=7)),
        ("36h", Duration(hours=36)),
        (" 2m ", Duration(months=2)),
        ("3d1y", Duration(years=1, days=3)),
        ("0y5d", Duration(days=5)),
    ],
)
def test_parse_duration(text: str, expected: Duration) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize(
    "text", ["", "7", "d", "7w", "-1d", "1d1d", "0d", "1.5d", "7 d", "7D", "1234567d", "٣d"]
)
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(PolicyError, match="duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("duration", "start", "expected"),
    [
        (Duration(months=1), datetime(2026, 3, 31, tzinfo=UTC), datetime(2026, 3, 3, tzinfo=UTC)),
        (Duration(months=1), datetime(2024, 3, 31, tzinfo=UTC), datetime(2024, 3, 2, tzinfo=UTC)),
        (Duration(years=1), datetime(2028, 2, 29, tzinfo=UTC), datetime(2027, 3, 1, tzinfo=UTC)),
        (Duration(1, 2, 3, 4), datetime(2026, 11, 20, 2, tzinfo=UTC), datetime(2025, 9, 16, 22, tzinfo=UTC)),
        (Duration(months=13), datetime(2026, 1, 15, tzinfo=UTC), datetime(2024, 12, 15, tzinfo=UTC)),
        (Duration(years=5000), datetime(2026, 1, 1, tzinfo=UTC), datetime.min.replace(tzinfo=UTC)),
    ],
)
def test_duration_before_is_calendar_arithmetic(duration: Duration, start: datetime, expected: datetime) -> None:
    assert duration.before(start) == expected


# --- policy validation ------------------------------------------------------------------------

@pytest.mark.parametrize(
    "policy",
    [RetentionPolicy(), RetentionPolicy(keep_daily=0, keep_last=0), RetentionPolicy(keep_within=timedelta(0))],
)
def test_empty_policy_is_refused(policy: RetentionPolicy) -> None:
    with pytest.raises(PolicyError, match="refusing to remove every snapshot: give at least one --keep"):
        apply([snap("a", "2026-11-20T02:00")], policy, NOW)
    with pytest.raises(ValueError):
        apply([], policy, NOW)


@pytest.mark.parametrize(
    "kwargs",
    [{"keep_last": -1}, {"keep_daily": True}, {"keep_within": timedelta(days=-1)}],
)
def test_bad_policy_values(kwargs: dict[str, object]) -> None:
    with pytest.raises(PolicyError):
        RetentionPolicy(**kwargs)  # type: ignore[arg-type]


def test_naive_snapshot_time_is_refused() -> None:
    with pytest.raises(PolicyError, match="no timezone"):
        SnapshotRef("a", "v1", "h1", datetime(2026, 1, 1))


def test_naive_now_is_refused() -> None:
    with pytest.raises(PolicyError, match="timezone"):
        apply([snap("a", "2026-11-20T02:00")], RetentionPolicy(keep_last=1), datetime(2026, 11, 21))


def test_duplicate_ids_are_refused() -> None:
    snaps = [snap("a", "2026-11-20T02:00"), snap("a", "2026-11-19T02:00")]
    with pytest.raises(PolicyError, match="listed twice"):
        apply(snaps, RetentionPolicy(keep_last=1), NOW)


# --- apply: table ---------------------------------------------------------------------------

CASES: list[tuple[str, list[SnapshotRef], RetentionPolicy, dict[str, tuple[str, ...]]]] = [
    (
        "keep_last counts snapshots, newest first",
        [snap(f"s{i}", f"2026-11-{10 + i}T02:00") for i in range(5)],
        RetentionPolicy(keep_last=3),
        {"s4": ("last 1",), "s3": ("last 2",), "s2": ("last 3",)},
    ),
    (
        "daily keeps the newest snapshot of each day",
        [snap("d1a", "2026-11-18T01:00"), snap("d1b", "2026-11-18T23:00"),
         snap("d2a", "2026-11-19T01:00"), snap("d2b", "2026-11-19T23:59"),
         snap("d3a", "2026-11-20T00:00"), snap("d3b", "2026-11-20T03:00")],
        RetentionPolicy(keep_daily=2),
        {"d3b": ("daily 2026-11-20",), "d2b": ("daily 2026-11-19",)},
    ),
    (
        "counts left over keep the oldest snapshot too",
        [snap("a", "2026-11-19T01:00"), snap("b", "2026-11-19T05:00"), snap("c", "2026-11-20T05:00")],
        RetentionPolicy(keep_daily=5),
        {"c": ("daily 2026-11-20",), "b": ("daily 2026-11-19",), "a": ("oldest daily 2026-11-19",)},
    ),
    (
        "hourly buckets",
        [snap("a", "2026-11-20T10:05"), snap("b", "2026-11-20T10:55"), snap("c", "2026-11-20T11:00")],
        RetentionPolicy(keep_hourly=1),
        {"c": ("hourly 2026-11-20T11",)},
    ),
    (
        "buckets are UTC: 01:00+02:00 is the previous UTC day",
        [snap("a", "2026-11-20T01:00+02:00"), snap("b", "2026-11-20T03:00+02:00")],
        RetentionPolicy(keep_daily=1),
        {"b": ("daily 2026-11-20",)},
    ),
    (
        "ISO weeks: 2025-12-31 and 2026-01-01 share week 2026-W01, Sunday closes a week",
        [snap("sun", "2025-12-28T02:00"), snap("mon", "2025-12-29T02:00"),
         snap("wed", "2025-12-31T02:00"), snap("thu", "2026-01-01T02:00")],
        RetentionPolicy(keep_weekly=2),
        {"thu": ("weekly 2026-W01",), "sun": ("weekly 2025-W52",)},
    ),
    (
        "monthly and yearly",
        [snap("nov", "2025-11-30T02:00"), snap("dec", "2025-12-31T02:00"),
         snap("jan", "2026-01-31T02:00"), snap("feb", "2026-02-28T02:00")],
        RetentionPolicy(keep_monthly=2, keep_yearly=1),
        {"feb": ("monthly 2026-02", "yearly 2026"), "jan": ("monthly 2026-01",)},
    ),
    (
        "within is measured from the newest snapshot, strictly after the cutoff",
        [snap("edge", "2026-11-13T02:00"), snap("in", "2026-11-13T02:01"), snap("new", "2026-11-20T02:00")],
        RetentionPolicy(keep_within=timedelta(days=7)),
        {"new": ("within 7d",), "in": ("within 7d",)},
    ),
    (
        "within uses calendar months from parse_duration",
        [snap("out", "2026-10-19T23:00"), snap("in", "2026-10-20T03:00"), snap("new", "2026-11-20T02:00")],
        RetentionPolicy(keep_within=parse_duration("1m")),
        {"new": ("within 1m",), "in": ("within 1m",)},
    ),
    (
        "a snapshot dated after now is not the within reference",
        [snap("old", "2026-11-01T02:00"), snap("new", "2026-11-19T02:00"), snap("skew", "2031-01-01T00:00")],
        RetentionPolicy(keep_within=timedelta(days=1, hours=12)),
        {"skew": ("within 1d12h",), "new": ("within 1d12h",)},
    ),
    (
        "tags keep every tagged snapshot and are not counted",
        [snap("t1", "2026-01-01T02:00", tags=("keep",)), snap("t2", "2026-02-01T02:00", tags=("keep", "x")),
         snap("u", "2026-03-01T02:00", tags=("x",)), snap("new", "2026-11-20T02:00")],
        RetentionPolicy(keep_last=1, keep_tags=frozenset({"keep"})),
        {"new": ("last 1",), "t2": ("tag keep",), "t1": ("tag keep",)},
    ),
    (
        "the newest verified snapshot survives, older verified ones do not",
        [snap("v-old", "2026-11-17T02:00", verified=True), snap("v", "2026-11-18T02:00", verified=True),
         snap("n1", "2026-11-19T02:00"), snap("n2", "2026-11-20T02:00")],
        RetentionPolicy(keep_last=1),
        {"n2": ("last 1",), "v": ("newest verified snapshot",)},
    ),
    (
        "the newest snapshot survives a policy that would remove it",
        [snap("a", "2026-11-19T02:00"), snap("b", "2026-11-20T02:00")],
        RetentionPolicy(keep_tags=frozenset({"keep"})),
        {"b": ("newest snapshot",)},
    ),
    (
        "groups are (host, volume): each keeps its own newest",
        [snap("h1v1", "2026-11-19T02:00"), snap("h1v1-new", "2026-11-20T02:00"),
         snap("h2v1", "2026-11-18T02:00", host="h2"), snap("h1v2", "2026-11-17T02:00", volume="v2")],
        RetentionPolicy(keep_last=1),
        {"h1v1-new": ("last 1",), "h1v2": ("last 1",), "h2v1": ("last 1",)},
    ),
    (
        "same time: ties are broken by id",
        [snap("b", "2026-11-20T02:00"), snap("a", "2026-11-20T02:00")],
        RetentionPolicy(keep_last=1),
        {"a": ("last 1",)},
    ),
]


@pytest.mark.parametrize(("snapshots", "policy", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_apply(snapshots: list[SnapshotRef], policy: RetentionPolicy, expected: dict[str, tuple[str, ...]]) -> None:
    decision = apply(snapshots, policy, NOW)
    assert kept_reasons(decision) == expected
    removed = {s.id for s in snapshots} - set(expected)
    assert set(decision.remove_ids) == removed
    assert all(v.reasons == ("matches no keep rule",) for v in decision.remove)


def test_decision_order_is_group_then_newest_first() -> None:
    snaps = [snap("b-old", "2026-11-01T00:00", host="b"), snap("a-old", "2026-11-01T00:00", host="a"),
             snap("a-new", "2026-11-02T00:00", host="a"), snap("b-new", "2026-11-02T00:00", host="b")]
    decision = apply(snaps, RetentionPolicy(keep_last=5), NOW)
    assert decision.keep_ids == ("a-new", "a-old", "b-new", "b-old")


def test_empty_input_gives_empty_decision() -> None:
    assert apply([], RetentionPolicy(keep_last=1), NOW) == Decision((), ())


# --- a simulated year -----------------------------------------------------------------------

def _days(start: date, count: int) -> list[date]:
    return [start + timedelta(days=i) for i in range(count)]


YEAR_CASES = [
    (
        "calendar year 2025: a yearly count is left, so the oldest (Jan 1) is kept too",
        date(2025, 1, 1),
        # daily: the last 7 days
        [date(2025, 12, d) for d in range(25, 32)]
        # weekly (ISO; Dec 31 is in 2026-W01): Dec 31, 28 (both above), 21, 14
        + [date(2025, 12, 21), date(2025, 12, 14)]
        # monthly: last day of Jan..Nov (Dec 31 above)
        + [date(2025, 1, 31), date(2025, 2, 28), date(2025, 3, 31), date(2025, 4, 30), date(2025, 5, 31),
           date(2025, 6, 30), date(2025, 7, 31), date(2025, 8, 31), date(2025, 9, 30), date(2025, 10, 31),
           date(2025, 11, 30)]
        # yearly: Dec 31 (above), then the oldest snapshot with the second count
        + [date(2025, 1, 1)],
    ),
    (
        "365 days up to Fri 2026-11-20: two years, every count used up",
        date(2025, 11, 21),
        [date(2026, 11, d) for d in range(14, 21)]
        # weekly: Nov 20 (W47), Sundays Nov 15 (above), Nov 8, Nov 1
        + [date(2026, 11, 8), date(2026, 11, 1)]
        # monthly: Nov 20 (above), Oct 31 back to Dec 31 2025 (also yearly 2025)
        + [date(2026, 10, 31), date(2026, 9, 30), date(2026, 8, 31), date(2026, 7, 31), date(2026, 6, 30),
           date(2026, 5, 31), date(2026, 4, 30), date(2026, 3, 31), date(2026, 2, 28), date(2026, 1, 31),
           date(2025, 12, 31)],
    ),
]


@pytest.mark.parametrize(("start", "expected"), [c[1:] for c in YEAR_CASES], ids=[c[0] for c in YEAR_CASES])
def test_a_simulated_year_of_daily_backups(start: date, expected: list[date]) -> None:
    days = _days(start, 365)
    snaps = [snap(d.isoformat(), f"{d.isoformat()}T02:00") for d in days]
    policy = RetentionPolicy(keep_daily=7, keep_weekly=4, keep_monthly=12, keep_yearly=2)
    decision = apply(snaps, policy, datetime.combine(days[-1], datetime.min.time(), UTC) + timedelta(days=1))
    assert len(expected) == len(set(expected))
    assert sorted(decision.keep_ids) == sorted(d.isoformat() for d in expected)
    assert len(decision.keep) + len(decision.remove) == 365


def test_year_reasons_name_every_rule_that_kept_the_newest() -> None:
    snaps = [snap(d.isoformat(), f"{d.isoformat()}T02:00") for d in _days(date(2025, 1, 1), 365)]
    policy = RetentionPolicy(keep_daily=7, keep_weekly=4, keep_monthly=12, keep_yearly=2)
    reasons = kept_reasons(apply(snaps, policy, NOW))
    assert reasons["2025-12-31"] == ("daily 2025-12-31", "weekly 2026-W01", "monthly 2025-12", "yearly 2025")
    assert reasons["2025-01-01"] == ("oldest yearly 2025",)


# --- safety invariants over random inputs ----------------------------------------------------

def _random_case(rng: random.Random) -> tuple[list[SnapshotRef], RetentionPolicy]:
    base = datetime(2026, 1, 1, tzinfo=UTC)
    snaps = [
        snap(f"s{i}", (base + timedelta(hours=rng.randrange(24 * 400))).isoformat(),
             host=rng.choice("ab"), volume=rng.choice("xy"), verified=rng.random() < 0.2,
             tags=("keep",) if rng.random() < 0.05 else ())
        for i in range(rng.randrange(1, 60))
    ]
    policy = RetentionPolicy(
        keep_last=rng.choice([None, 0, 1, 3]), keep_daily=rng.choice([None, 2, 7]),
        keep_monthly=rng.choice([None, 1, 6]), keep_tags=frozenset({"keep"}),
    )
    return snaps, policy


@pytest.mark.parametrize("seed", range(200))
def test_every_group_keeps_its_newest_and_newest_verified(seed: int) -> None:
    snaps, policy = _random_case(random.Random(seed))
    decision = apply(snaps, policy, NOW)
    kept = set(decision.keep_ids)
    assert kept | set(decision.remove_ids) == {s.id for s in snaps}
    assert not kept & set(decision.remove_ids)
    for key in {(s.host, s.volume) for s in snaps}:
        group = [s for s in snaps if (s.host, s.volume) == key]
        assert _newest(group) in kept
        verified = [s for s in group if s.verified]
        if verified:
            assert _newest(verified) in kept


def _newest(snaps: list[SnapshotRef]) -> str:
    """Newest by time; on a tie the smallest id, as apply documents."""
    latest = max(s.time for s in snaps)
    return min(s.id for s in snaps if s.time == latest)
