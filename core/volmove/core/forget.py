"""Forget: apply a retention policy to the repository's snapshots.

The decision is policy/retention.apply's, per (host, volume): it keeps the
newest snapshot and the newest verified one of every group and refuses an
empty policy.  Removing a snapshot deletes its manifest (and its verified
marker); the data it alone referenced goes with the next prune.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from volmove.core.errors import CancelledByUser
from volmove.core.format import snapshot_key
from volmove.core.locks import HeldLease, held_lease, utc_now
from volmove.core.policy.retention import (
    EMPTY_POLICY_MESSAGE,
    Decision,
    PolicyError,
    RetentionPolicy,
    SnapshotRef,
    apply,
)
from volmove.core.prune import DEFAULT_MIN_AGE, PruneReport, prune
from volmove.core.repository import Repository
from volmove.core.snapshot import Snapshot
from volmove.core.verify import verified_ids, verified_key


@dataclass(frozen=True)
class ForgetRequest:
    policy: RetentionPolicy
    volume: str | None = None  # only this volume's snapshots
    host: str | None = None  # only this host's
    dry_run: bool = False
    prune: bool = False  # prune right after, under the same lease
    min_age: timedelta = DEFAULT_MIN_AGE
    lock_wait: float | None = None


@dataclass(frozen=True)
class ForgetResult:
    decision: Decision
    snapshots: dict[str, Snapshot]  # every snapshot the policy looked at, by id
    removed: tuple[str, ...]  # deleted (nothing on a dry run)
    prune: PruneReport | None = None


def snapshot_refs(snaps: Sequence[Snapshot], verified: set[str]) -> list[SnapshotRef]:
    return [SnapshotRef(s.id, s.volume.name, s.host, s.time, frozenset(s.tags), s.id in verified) for s in snaps]


def decide(repo: Repository, req: ForgetRequest, now: datetime) -> tuple[Decision, dict[str, Snapshot]]:
    snaps = [s for s in repo.list_snapshots(req.volume) if req.host is None or s.host == req.host]
    decision = apply(snapshot_refs(snaps, verified_ids(repo)), req.policy, now)
    return decision, {s.id: s for s in snaps}


def remove_snapshots(repo: Repository, ids: Sequence[str], lease: HeldLease,
                     cancel: threading.Event | None = None) -> tuple[str, ...]:
    for sid in ids:
        if cancel is not None and cancel.is_set():
            raise CancelledByUser("forget cancelled; the snapshots not yet removed stay")
        lease.check()
        repo.storage.delete(snapshot_key(sid))  # the manifest first: a marker without one is harmless
        repo.storage.delete(verified_key(sid))
    return tuple(ids)


def run_forget(repo: Repository, req: ForgetRequest, *, clock: Callable[[], datetime] = utc_now,
               cancel: threading.Event | None = None) -> ForgetResult:
    """``volmove forget``: decide, remove (under the exclusive lease), and prune if asked."""
    if req.policy.is_empty:
        raise PolicyError(EMPTY_POLICY_MESSAGE)  # before waiting for any lock
    if req.dry_run:
        decision, snaps = decide(repo, req, clock())
        report = None
        if req.prune:  # what a prune would reclaim once these are gone
            report = prune(repo, now=clock(), min_age=req.min_age, dry_run=True,
                           ignore=frozenset(decision.remove_ids), cancel=cancel)
        return ForgetResult(decision, snaps, (), report)
    with held_lease(repo.storage, "exclusive", "forget", wait=req.lock_wait, clock=clock, cancel=cancel) as lease:
        decision, snaps = decide(repo, req, clock())
        removed = remove_snapshots(repo, decision.remove_ids, lease, cancel)
        report = prune(repo, now=clock(), min_age=req.min_age, lease=lease, cancel=cancel) if req.prune else None
    return ForgetResult(decision, snaps, removed, report)
