"""Lease logic: conflicts, expiry, renewal, epochs and untrusted JSON records."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

import pytest

from volmove.core.errors import ConflictError, CorruptDataError
from volmove.core.policy.lease import (
    Lease,
    LeaseError,
    LeaseExpiredError,
    LeaseKind,
    acquire,
    can_acquire,
    from_json,
    is_expired,
    next_epoch,
    renew,
    to_json,
)

T0 = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
MIN = timedelta(minutes=1)


def lease(owner: str, kind: LeaseKind = "exclusive", *, epoch: int = 1, minutes: int = 10) -> Lease:
    """A lease taken at T0 that expires ``minutes`` later."""
    return Lease(owner, epoch, T0, T0 + minutes * MIN, kind)


@pytest.mark.parametrize(
    ("now", "expired"), [(T0, False), (T0 + 10 * MIN - timedelta(microseconds=1), False),
                         (T0 + 10 * MIN, True), (T0 + 11 * MIN, True)],
)
def test_is_expired(now: datetime, expired: bool) -> None:
    assert is_expired(lease("a"), now) is expired


CAN_ACQUIRE = [
    # (name, existing, want, now, ok, reason fragment)
    ("nothing held", [], "exclusive", T0, True, "no live conflicting lease"),
    ("shared next to shared", [lease("b", "shared")], "shared", T0, True, "no live"),
    ("shared blocked by exclusive", [lease("b")], "shared", T0, False, "exclusive lease held by b until"),
    ("exclusive blocked by shared", [lease("b", "shared")], "exclusive", T0, False, "shared lease held by b"),
    ("exclusive blocked by exclusive", [lease("b")], "exclusive", T0, False, "held by b"),
    ("expired leases are ignored", [lease("b", minutes=1)], "exclusive", T0 + MIN, True, "no live"),
    ("own leases do not conflict", [lease("a"), lease("a", "shared")], "exclusive", T0, True, "no live"),
    ("own shared does not hide another's", [lease("a", "shared"), lease("b", "shared")], "exclusive", T0,
     False, "held by b"),
    ("names the lease that lasts longest", [lease("b", "shared", minutes=5), lease("c", "shared", minutes=9)],
     "exclusive", T0, False, "held by c until 2026-11-20T12:09:00+00:00 (and 1 more)"),
]


@pytest.mark.parametrize(
    ("existing", "want", "now", "ok", "reason"), [c[1:] for c in CAN_ACQUIRE], ids=[c[0] for c in CAN_ACQUIRE]
)
def test_can_acquire(existing: list[Lease], want: LeaseKind, now: datetime, ok: bool, reason: str) -> None:
    check = can_acquire(existing, want, "a", now)
    assert check.ok is ok
    assert reason in check.reason
    assert tuple(check) == (ok, check.reason)


def test_can_acquire_refuses_an_unknown_kind() -> None:
    with pytest.raises(LeaseError):
        can_acquire([], "mine", "a", T0)  # type: ignore[arg-type]


def test_acquire_takes_the_next_epoch_even_over_expired_leases() -> None:
    old = lease("b", epoch=7, minutes=1)
    new = acquire([old], "exclusive", "a", T0 + 5 * MIN, 10 * MIN)
    assert new == Lease("a", 8, T0 + 5 * MIN, T0 + 15 * MIN, "exclusive")
    assert next_epoch([]) == 1


def test_acquire_conflict_is_a_conflict_error() -> None:
    with pytest.raises(ConflictError, match="cannot take the exclusive lease: exclusive lease held by b"):
        acquire([lease("b")], "exclusive", "a", T0, MIN)


def test_renew_extends_and_keeps_identity() -> None:
    renewed = renew(lease("a", epoch=3), T0 + 9 * MIN, 10 * MIN)
    assert renewed == Lease("a", 3, T0, T0 + 19 * MIN, "exclusive")


def test_renew_refuses_an_expired_lease() -> None:
    with pytest.raises(LeaseExpiredError, match=r"lease of a \(epoch 1\) expired at 2026-11-20T12:10:00\+00:00"):
        renew(lease("a"), T0 + 10 * MIN, 10 * MIN)


@pytest.mark.parametrize("ttl", [timedelta(0), -MIN])
def test_ttl_must_be_positive(ttl: timedelta) -> None:
    with pytest.raises(LeaseError, match="ttl"):
        renew(lease("a"), T0, ttl)
    with pytest.raises(LeaseError, match="ttl"):
        acquire([], "shared", "a", T0, ttl)


def test_json_round_trip() -> None:
    original = Lease("host-a/123/f00d", 42, T0, T0 + MIN, "shared")
    text = to_json(original)
    assert json.loads(text) == {
        "version": 1, "owner": "host-a/123/f00d", "epoch": 42, "acquired": "2026-11-20T12:00:00+00:00",
        "expires": "2026-11-20T12:01:00+00:00", "kind": "shared",
    }
    assert from_json(text) == original
    assert from_json(text.encode()) == original


def test_json_is_written_in_utc() -> None:
    tz = timezone(timedelta(hours=2))
    local = Lease("a", 1, T0.astimezone(tz), (T0 + MIN).astimezone(tz), "exclusive")
    assert '"acquired":"2026-11-20T12:00:00+00:00"' in to_json(local)


GOOD = {"version": 1, "owner": "a", "epoch": 1, "acquired": "2026-11-20T12:00:00Z",
        "expires": "2026-11-20T12:10:00Z", "kind": "exclusive"}


def with_(**changes: object) -> str:
    return json.dumps(GOOD | changes)


BAD_RECORDS = [
    ("not JSON", "{", "not valid JSON"),
    ("not UTF-8", b'{"owner": "\xff"}', "not valid JSON"),
    ("an array", "[1, 2]", "must be a JSON object"),
    ("a string", '"lease"', "must be a JSON object"),
    ("missing field", json.dumps({k: v for k, v in GOOD.items() if k != "epoch"}), "missing ['epoch']"),
    ("extra field", with_(admin=True), "unexpected ['admin']"),
    ("repeated field", '{"owner": "a", "owner": "b"}', "repeats the field 'owner'"),
    ("newer version", with_(version=2), "unsupported lease record version 2"),
    ("version true", with_(version=True), "unsupported lease record version True"),
    ("empty owner", with_(owner=""), "lease owner must be"),
    ("owner with a newline", with_(owner="a\nb"), "lease owner must be"),
    ("owner too long", with_(owner="a" * 300), "lease owner must be"),
    ("owner not a string", with_(owner=["a"]), "lease owner must be"),
    ("negative epoch", with_(epoch=-1), "lease epoch must be"),
    ("epoch true", with_(epoch=True), "lease epoch must be"),
    ("fractional epoch", with_(epoch=1.5), "lease epoch must be"),
    ("epoch past 64 bits", with_(epoch=2**63), "lease epoch must be"),
    ("epoch of 5000 digits", with_(epoch=0).replace('"epoch": 0', '"epoch": ' + "9" * 5000), "not valid JSON"),
    ("NaN", with_(epoch=0).replace('"epoch": 0', '"epoch": NaN'), "contains NaN"),
    ("naive time", with_(acquired="2026-11-20T12:00:00"), "timezone-aware"),
    ("not a time", with_(expires="tomorrow"), "not an ISO 8601 time"),
    ("time not a string", with_(expires=1763640000), "must be an ISO 8601 time string"),
    ("expires before acquired", with_(expires="2026-11-20T11:00:00Z"), "is not after acquired"),
    ("unknown kind", with_(kind="weird"), "lease kind must be exclusive or shared, got 'weird'"),
    ("too big", " " * 70_000 + with_(), "more than 65536"),
    ("deeply nested", "[" * 60_000, "not valid JSON"),
]


@pytest.mark.parametrize(("data", "message"), [c[1:] for c in BAD_RECORDS], ids=[c[0] for c in BAD_RECORDS])
def test_from_json_rejects(data: str | bytes, message: str) -> None:
    with pytest.raises(LeaseError) as info:
        from_json(data)
    assert message in str(info.value)
    assert "\n" not in str(info.value) and len(str(info.value)) < 200
    assert isinstance(info.value, CorruptDataError) and isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    "kwargs",
    [{"owner": ""}, {"epoch": -1}, {"acquired": datetime(2026, 1, 1)}, {"expires": T0}, {"kind": "both"}],
)
def test_lease_values_are_checked_on_construction(kwargs: dict[str, object]) -> None:
    fields: dict[str, object] = {"owner": "a", "epoch": 1, "acquired": T0, "expires": T0 + MIN, "kind": "shared"}
    with pytest.raises(LeaseError):
        Lease(**(fields | kwargs))  # type: ignore[arg-type]
