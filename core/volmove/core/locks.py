"""Repository leases: prune and forget delete under an exclusive one, backups add under a shared one.

A lease is an object ``locks/<random>`` holding a lease record (policy/lease.py).
To take one, a process writes its record, then lists every record, and holds
the lease only if that listing shows no live conflicting record.  Each taker
writes before it lists, so of two takers at least one sees the other: they
never both proceed.  An exclusive taker that sees only shared records keeps
its own while it waits, so new backups back off and a stream of overlapping
backups cannot starve a prune; of two exclusive takers the younger backs off.

A holder renews its record every ttl/3 in a background thread.  A crashed
holder's record expires and the next taker deletes it.  A holder that could
not renew in time (partitioned, paused) has lost the lease, and ``check()``
says so before anything irreversible.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import secrets
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

from volmove.core.errors import CancelledByUser, ConflictError, NotFoundError, UsageError, VolmoveError
from volmove.core.policy.lease import (
    Lease,
    LeaseError,
    LeaseExpiredError,
    LeaseKind,
    can_acquire,
    from_json,
    is_expired,
    next_epoch,
    renew,
    to_json,
)
from volmove.core.repository import Repository, fetched_ahead
from volmove.core.storage.base import ObjectInfo, Storage

log = logging.getLogger(__name__)

LOCK_PREFIX = "locks/"
DEFAULT_TTL = timedelta(minutes=5)
DEFAULT_WAIT = 600.0  # seconds a taker waits for conflicting leases to go
WAIT_ENV = "VOLMOVE_LOCK_WAIT"
UNREADABLE_TTL = 2 * DEFAULT_TTL
MAX_BACKOFF = 5.0
RECORDS_AHEAD = 8  # lock records read at once where requests are slow (S3)
Clock = Callable[[], datetime]
Step = Literal["hold", "wait", "back_off"]


def utc_now() -> datetime:
    return datetime.now(UTC)


def default_wait() -> float:
    raw = os.environ.get(WAIT_ENV)
    if raw is None:
        return DEFAULT_WAIT
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise UsageError(f"{WAIT_ENV} must be a number of seconds >= 0, got {raw!r}")
    return value


def make_owner(purpose: str) -> str:
    # Unique per taker; the part before " #" is what messages show.
    label = f" {purpose}" if purpose else ""
    return f"{socket.gethostname()}:{os.getpid()}{label} #{secrets.token_hex(4)}"


def describe(lease: Lease) -> str:
    return lease.owner.rsplit(" #", 1)[0]


# ------------------------------------------------------------------ pure decisions


def next_step(mine: Lease, others: Sequence[Lease], now: datetime) -> Step:
    """After writing ``mine`` and listing ``others``: hold it, keep waiting with it, or withdraw it."""
    if can_acquire(others, mine.kind, mine.owner, now).ok:
        return "hold"
    live = [other for other in others if other.owner != mine.owner and not is_expired(other, now)]
    if mine.kind == "exclusive" and not any(o.kind == "exclusive" and _precedes(o, mine) for o in live):
        return "wait"  # only shared holders, or younger exclusive takers, are in the way: keep our place
    return "back_off"


def _precedes(a: Lease, b: Lease) -> bool:
    return (a.acquired, a.owner) < (b.acquired, b.owner)


def conflicts(mine: Lease, others: Sequence[Lease], now: datetime) -> list[Lease]:
    return [
        o for o in others
        if o.owner != mine.owner and not is_expired(o, now) and "exclusive" in (mine.kind, o.kind)
    ]


def locked_message(url: str, blocking: Sequence[Lease]) -> str:
    last = max(blocking, key=lambda lease: lease.expires)
    more = f" (and {len(blocking) - 1} more)" if len(blocking) > 1 else ""
    until = last.expires.astimezone(UTC).isoformat(timespec="seconds")
    return f"repository {url} is locked by {describe(last)} ({last.kind}) until {until}{more}"


# ------------------------------------------------------------------ records in storage


@dataclass(frozen=True)
class LockRecord:
    key: str
    lease: Lease


def read_records(storage: Storage, skip: str | None = None) -> list[LockRecord]:
    """Every lock record but the one at ``skip`` (a taker's own: it knows what it wrote).  On S3 a few
    are read at once: a fleet's scheduled backups start together, and each taker reads all the others'."""
    infos = [info for info in storage.list(LOCK_PREFIX) if info.key != skip]
    ahead = RECORDS_AHEAD if storage.prefers_whole_objects else 0
    raws = fetched_ahead(lambda key: _get_record(storage, key), [info.key for info in infos], ahead)
    return [LockRecord(info.key, _parse(info, raw)) for info, raw in zip(infos, raws, strict=True) if raw is not None]


def _get_record(storage: Storage, key: str) -> bytes | None:
    try:
        return storage.get(key)
    except NotFoundError:
        return None  # released meanwhile


def _parse(info: ObjectInfo, raw: bytes) -> Lease:
    try:
        return from_json(raw)
    except LeaseError as exc:
        # Perhaps a newer volmove's: treat it as an exclusive lease until it is as old as one could be.
        log.warning("unreadable lock %s: %s", info.key, exc)
        since = datetime.fromtimestamp(info.mtime, UTC)
        return Lease(f"unreadable {info.key}", 0, since, since + UNREADABLE_TTL, "exclusive")


class _Attempt:
    """One taker's record while it tries to take the lease."""

    def __init__(self, storage: Storage, kind: LeaseKind, owner: str, ttl: timedelta, clock: Clock) -> None:
        self.storage, self.kind, self.owner, self.ttl, self.clock = storage, kind, owner, ttl, clock
        self.key = f"{LOCK_PREFIX}{secrets.token_hex(16)}"
        self.lease: Lease | None = None

    def try_once(self) -> list[Lease]:
        """Write or refresh our record and look; returns what blocks us (empty: we hold it)."""
        now = self.clock()
        others = self._others(now)
        mine = self._mine(others, now)
        if next_step(mine, others, now) == "back_off":
            self.withdraw()  # not worth writing: one who goes first is there
            return conflicts(mine, others, now)
        self._write(mine)
        now = self.clock()
        others = self._others(now)
        step = next_step(mine, others, now)
        if step == "hold":
            return []
        if step == "back_off":
            self.withdraw()
        return conflicts(mine, others, now)

    def _mine(self, others: list[Lease], now: datetime) -> Lease:
        """Our record as it should be now: renewed while we wait (keeping our place), else new."""
        if self.lease is not None and not is_expired(self.lease, now):
            return renew(self.lease, now, self.ttl)
        return Lease(self.owner, next_epoch(others), now, now + self.ttl, self.kind)

    def _others(self, now: datetime) -> list[Lease]:
        live = []
        for record in read_records(self.storage, skip=self.key):
            if not is_expired(record.lease, now):
                live.append(record.lease)
                continue
            log.info("removing expired lock of %s (%s)", describe(record.lease), record.key)
            try:
                self.storage.delete(record.key)
            except VolmoveError as exc:  # ignoring it is what matters; removing it is tidying
                log.warning("could not remove expired lock %s: %s", record.key, exc)
        return live

    def _write(self, mine: Lease) -> None:
        # Overwrite: the key is ours alone, and a write-once put that S3 retried after
        # a first attempt succeeded would come back as a conflict.
        self.storage.put(self.key, to_json(mine).encode(), overwrite=True)
        self.lease = mine

    def withdraw(self) -> None:
        if self.lease is None:
            return
        self.lease = None
        try:
            self.storage.delete(self.key)
        except VolmoveError as exc:
            log.warning("could not remove lock %s (it expires by itself): %s", self.key, exc)


# ------------------------------------------------------------------ holding


class HeldLease:
    """A lease this process holds, renewed in the background until ``release``."""

    def __init__(self, storage: Storage, key: str, lease: Lease, ttl: timedelta, clock: Clock,
                 renew_every: float | None = None) -> None:
        self.storage, self.key, self.ttl, self.clock = storage, key, ttl, clock
        self._lease = lease
        self._lost: LeaseExpiredError | None = None
        self._stop = threading.Event()
        interval = ttl.total_seconds() / 3 if renew_every is None else renew_every
        self._thread = threading.Thread(target=self._renew_loop, args=(interval,), name="lease-renew", daemon=True)
        self._thread.start()

    @property
    def lease(self) -> Lease:
        return self._lease

    def check(self) -> None:
        """Raise LeaseExpiredError unless the lease still holds: call before anything irreversible."""
        if self._lost is not None:
            raise self._lost
        if is_expired(self._lease, self.clock()):
            raise LeaseExpiredError(f"the repository lease ({self.key}) expired before it could be renewed")

    def renew_once(self) -> None:
        lease = renew(self._lease, self.clock(), self.ttl)  # LeaseExpiredError when too late
        if not self.storage.exists(self.key):
            raise LeaseExpiredError(f"lock {self.key} was removed by another process that found it expired")
        self.storage.put(self.key, to_json(lease).encode(), overwrite=True)
        self._lease = lease

    def _renew_loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.renew_once()
            except LeaseExpiredError as exc:
                log.error("lost the repository lease: %s", exc)
                self._lost = exc
                return
            except VolmoveError as exc:  # transient, most likely: the next tick tries again
                log.warning("could not renew the repository lease: %s", exc)

    def release(self) -> None:
        self._stop.set()
        self._thread.join()
        try:
            self.storage.delete(self.key)
        except VolmoveError as exc:
            log.warning("could not remove lock %s (it expires by itself): %s", self.key, exc)


def acquire_lease(storage: Storage, kind: LeaseKind, purpose: str = "", *, ttl: timedelta = DEFAULT_TTL,
                  wait: float | None = None, clock: Clock = utc_now, cancel: threading.Event | None = None,
                  renew_every: float | None = None) -> HeldLease:
    """Take the lease, waiting with backoff up to ``wait`` seconds, else ConflictError naming the holder."""
    wait = default_wait() if wait is None else wait
    cancel = cancel or threading.Event()
    attempt = _Attempt(storage, kind, make_owner(purpose), ttl, clock)
    started = time.monotonic()
    delay, warned = 0.05, False
    try:
        while blocking := attempt.try_once():
            waited = time.monotonic() - started
            if waited >= wait:
                raise ConflictError(f"{locked_message(storage.url, blocking)}; gave up after {waited:.0f} s")
            if not warned:
                log.warning("%s; waiting up to %.0f s", locked_message(storage.url, blocking), wait)
                warned = True
            if cancel.wait(min(delay, wait - waited)):
                raise CancelledByUser("cancelled while waiting for the repository lock")
            delay = min(delay * 2, MAX_BACKOFF) * random.uniform(0.75, 1.25)  # jitter: takers do not collide again
    except BaseException:
        attempt.withdraw()
        raise
    assert attempt.lease is not None
    return HeldLease(storage, attempt.key, attempt.lease, ttl, clock, renew_every)


@contextmanager
def held_lease(storage: Storage, kind: LeaseKind, purpose: str = "", *, ttl: timedelta = DEFAULT_TTL,
               wait: float | None = None, clock: Clock = utc_now, cancel: threading.Event | None = None,
               renew_every: float | None = None) -> Iterator[HeldLease]:
    held = acquire_lease(storage, kind, purpose, ttl=ttl, wait=wait, clock=clock, cancel=cancel,
                         renew_every=renew_every)
    try:
        yield held
    finally:
        held.release()


@asynccontextmanager
async def repo_lease(repo: Repository, kind: LeaseKind, purpose: str = "", *, ttl: timedelta = DEFAULT_TTL,
                     wait: float | None = None) -> AsyncIterator[HeldLease]:
    """``held_lease`` for async callers: waiting runs in a thread, and cancelling stops it."""
    cancel = threading.Event()
    task = asyncio.ensure_future(
        asyncio.to_thread(acquire_lease, repo.storage, kind, purpose, ttl=ttl, wait=wait, cancel=cancel))
    try:
        held = await asyncio.shield(task)
    except asyncio.CancelledError:
        cancel.set()
        await asyncio.wait([task])
        if not task.cancelled() and task.exception() is None:
            await asyncio.to_thread(task.result().release)
        raise
    try:
        yield held
    finally:
        await asyncio.shield(asyncio.to_thread(held.release))
