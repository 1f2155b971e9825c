"""Repository leases on storage: conflicts with clear messages, waiting, stale locks, renewal, loss."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import pytest

from tests.engine_helpers import Overlap
from volmove.core.errors import CancelledByUser, ConflictError, NotFoundError
from volmove.core.locks import (
    LOCK_PREFIX,
    RECORDS_AHEAD,
    HeldLease,
    acquire_lease,
    held_lease,
    next_step,
    read_records,
    repo_lease,
)
from volmove.core.policy.lease import Lease, LeaseExpiredError, LeaseKind, to_json
from volmove.core.repository import Repository, init_repository
from volmove.core.storage.base import ObjectInfo, Storage
from volmove.core.storage.memory import MemoryStorage

T0 = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
MIN = timedelta(minutes=1)


def lease(owner: str, kind: LeaseKind, acquired: datetime = T0, minutes: int = 5) -> Lease:
    return Lease(owner, 1, acquired, acquired + minutes * MIN, kind)


STEPS = [
    # (name, mine, others, expected step)
    ("alone", lease("a", "exclusive"), [], "hold"),
    ("shared beside shared", lease("a", "shared"), [lease("b", "shared")], "hold"),
    ("shared backs off from a prune", lease("a", "shared"), [lease("b", "exclusive")], "back_off"),
    ("prune waits for backups, keeping its place", lease("a", "exclusive"), [lease("b", "shared")], "wait"),
    ("the younger prune backs off", lease("a", "exclusive", T0 + MIN), [lease("b", "exclusive")], "back_off"),
    ("the older prune waits", lease("a", "exclusive"), [lease("b", "exclusive", T0 + MIN)], "wait"),
    ("expired leases do not count", lease("a", "exclusive", T0 + 10 * MIN), [lease("b", "exclusive")], "hold"),
]


@pytest.mark.parametrize(("mine", "others", "step"), [s[1:] for s in STEPS], ids=[s[0] for s in STEPS])
def test_next_step(mine: Lease, others: list[Lease], step: str) -> None:
    assert next_step(mine, others, mine.acquired) == step


def test_lock_held_gives_a_clear_conflict(any_storage: Storage) -> None:
    with held_lease(any_storage, "exclusive", "prune"):
        with pytest.raises(ConflictError, match=r"is locked by [^ ]+:\d+ prune \(exclusive\) until 20\d\d-"):
            acquire_lease(any_storage, "shared", "backup", wait=0)
        with pytest.raises(ConflictError, match="prune"):
            acquire_lease(any_storage, "exclusive", "forget", wait=0)
    assert list(any_storage.list(LOCK_PREFIX)) == []  # the refused takers left nothing behind
    with held_lease(any_storage, "exclusive", "prune"):  # and it is free again
        pass


def test_shared_leases_coexist_and_block_exclusive(any_storage: Storage) -> None:
    with held_lease(any_storage, "shared", "backup"), held_lease(any_storage, "shared", "backup"):
        assert len(read_records(any_storage)) == 2
        with pytest.raises(ConflictError, match=r"backup \(shared\) until .* \(and 1 more\)"):
            acquire_lease(any_storage, "exclusive", "prune", wait=0)
    assert list(any_storage.list(LOCK_PREFIX)) == []


def test_stale_lock_expires_and_the_next_taker_removes_it(any_storage: Storage) -> None:
    # What a killed prune leaves: its record, never renewed, expired a minute ago.
    now = datetime.now(UTC)
    dead = Lease("deadhost:99 prune #0000", 7, now - 6 * MIN, now - MIN, "exclusive")
    any_storage.put(f"{LOCK_PREFIX}dead", to_json(dead).encode())
    with held_lease(any_storage, "shared", "backup", wait=0) as held:
        assert not any_storage.exists(f"{LOCK_PREFIX}dead")
        assert held.lease.epoch == 1  # epochs are only for fencing; the repository lock does not need them


def test_expiry_by_the_clock_lets_another_in_and_the_holder_finds_out() -> None:
    storage = MemoryStorage()
    now = [T0]

    def clock() -> datetime:
        return now[0]

    holder = acquire_lease(storage, "exclusive", "prune", clock=clock, renew_every=3600)
    try:
        now[0] = T0 + 4 * MIN
        holder.renew_once()  # renewed in time: good for 5 more minutes
        now[0] = T0 + 8 * MIN
        with pytest.raises(ConflictError):
            acquire_lease(storage, "shared", "backup", wait=0, clock=clock)
        now[0] = T0 + 10 * MIN  # not renewed again: it lapsed
        other = acquire_lease(storage, "shared", "backup", wait=0, clock=clock)
        with pytest.raises(LeaseExpiredError):
            holder.check()
        with pytest.raises(LeaseExpiredError):
            holder.renew_once()
        other.release()
    finally:
        holder.release()


def test_a_holder_whose_record_was_removed_has_lost_it() -> None:
    storage = MemoryStorage()
    with held_lease(storage, "shared", "backup") as held:
        held.check()
        storage.delete(held.key)  # another host, with a clock far ahead, found it expired
        with pytest.raises(LeaseExpiredError, match="removed by another process"):
            held.renew_once()


def test_background_renewal_extends_the_record() -> None:
    storage = MemoryStorage()
    with held_lease(storage, "shared", "backup", renew_every=0.01) as held:
        first = held.lease.expires
        _wait_for(lambda: held.lease.expires > first)
        (record,) = read_records(storage)
        assert record.lease.expires >= first


def test_a_waiting_prune_keeps_new_backups_out_and_goes_when_backups_end() -> None:
    storage = MemoryStorage()
    backup = acquire_lease(storage, "shared", "backup")
    got: list[HeldLease] = []
    prune = threading.Thread(target=lambda: got.append(acquire_lease(storage, "exclusive", "prune", wait=30)))
    prune.start()
    try:
        _wait_for(lambda: any(r.lease.kind == "exclusive" for r in read_records(storage)))
        with pytest.raises(ConflictError, match=r"prune \(exclusive\)"):
            acquire_lease(storage, "shared", "backup", wait=0)  # a new backup does not overtake it
        assert not got
    finally:
        backup.release()
        prune.join()
    got[0].release()


def test_unreadable_lock_blocks_until_it_is_old() -> None:
    storage = MemoryStorage()
    storage.put(f"{LOCK_PREFIX}junk", b"{not json")
    with pytest.raises(ConflictError, match=f"unreadable {LOCK_PREFIX}junk"):
        acquire_lease(storage, "shared", "backup", wait=0)
    storage.set_mtime(f"{LOCK_PREFIX}junk", time.time() - 3600)
    with held_lease(storage, "shared", "backup", wait=0):
        assert not storage.exists(f"{LOCK_PREFIX}junk")


def test_cancel_while_waiting_leaves_nothing() -> None:
    storage = MemoryStorage()
    cancel = threading.Event()
    with held_lease(storage, "shared", "backup"):
        timer = threading.Timer(0.2, cancel.set)
        timer.start()
        with pytest.raises(CancelledByUser):
            acquire_lease(storage, "exclusive", "prune", wait=30, cancel=cancel)
        assert len(read_records(storage)) == 1
    assert read_records(storage) == []


async def test_async_lease_and_its_cancellation() -> None:
    storage = MemoryStorage()
    init_repository(storage)
    repo = Repository.open(storage)
    async with repo_lease(repo, "shared", "backup") as held:
        assert [r.key for r in read_records(storage)] == [held.key]
    assert read_records(storage) == []
    with held_lease(storage, "exclusive", "prune"):
        waiter = asyncio.ensure_future(_enter(repo))
        await asyncio.sleep(0.2)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert len(read_records(storage)) == 1  # only the prune's
    assert read_records(storage) == []


async def _enter(repo: Repository) -> None:
    async with repo_lease(repo, "shared", "backup", wait=30):
        raise AssertionError("must not get the lease while a prune holds it")


def _wait_for(pred: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_a_taker_reads_only_the_others_records() -> None:
    class Counting(MemoryStorage):
        def __init__(self) -> None:
            super().__init__()
            self.gets: list[str] = []

        def get(self, key: str) -> bytes:
            self.gets.append(key)
            return super().get(key)

    storage = Counting()
    with held_lease(storage, "shared", "backup") as first:
        assert storage.gets == []  # alone: it lists twice and reads nothing (a request each on S3)
        with held_lease(storage, "shared", "backup"):
            assert storage.gets == [first.key, first.key]  # before and after writing its own


class SlowStorage(MemoryStorage, Overlap):
    """Gets take a while and are counted at once; ``gone`` is listed but released before it is read."""

    def __init__(self, whole_objects: bool) -> None:
        MemoryStorage.__init__(self)
        Overlap.__init__(self)
        self.prefers_whole_objects = whole_objects
        self.gone = f"{LOCK_PREFIX}gone"

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        yield from super().list(prefix)
        if prefix == LOCK_PREFIX:
            yield ObjectInfo(self.gone, 10, time.time())

    def get(self, key: str) -> bytes:
        with self.call():
            time.sleep(0.02)
            if key == self.gone:
                raise NotFoundError(f"{key} is gone")
            return super().get(key)


@pytest.mark.parametrize(("whole_objects", "most"), [(True, RECORDS_AHEAD), (False, 1)], ids=["s3-like", "local"])
def test_records_are_read_a_few_at_once_where_requests_are_slow(whole_objects: bool, most: int) -> None:
    storage = SlowStorage(whole_objects)
    leases = [lease(f"host{i:02d}", "shared" if i % 3 else "exclusive", T0 + i * MIN) for i in range(12)]
    for i, one in enumerate(leases):
        storage.put(f"{LOCK_PREFIX}{i:02d}", to_json(one).encode())
    records = read_records(storage, skip=f"{LOCK_PREFIX}05")
    assert [(r.key, r.lease) for r in records] == [(f"{LOCK_PREFIX}{i:02d}", one) for i, one in enumerate(leases)
                                                   if i != 5]  # in listing order, the released one left out
    assert storage.most == most
