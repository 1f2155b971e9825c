"""Prune: delete the packs no snapshot references, safely.

Runs under the repository's exclusive lease, so no backup runs meanwhile, and
deletes in an order that leaves a consistent repository wherever it stops:

1. write new indexes naming every pack that stays,
2. delete the old indexes,
3. delete the packs nothing references.

No index ever names a deleted pack: a backup dedups against the index, and an
entry for a deleted pack would make its snapshot silently incomplete.  Killed
after 1, the repository has duplicate index entries; after 2 or during 3, it
has unindexed packs, which the next prune deletes (or a backup adopts again
and the next prune deletes then).  Unreferenced packs younger than
``min_age`` stay: they may be a backup's whose lease lapsed.

``plan_prune`` decides and does no IO; ``prune`` surveys, plans and acts.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterable, Iterator, Set
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

from volmove.core.catalog import parse_entry
from volmove.core.errors import CancelledByUser, CorruptDataError, UsageError, VolmoveError
from volmove.core.format import BlobRef, id_from_key, index_key, is_hex_id, pack_key
from volmove.core.locks import HeldLease, held_lease, utc_now
from volmove.core.repository import BlobRow, Repository
from volmove.core.snapshot import Snapshot
from volmove.core.verify import VERIFIED_PREFIX

DEFAULT_MIN_AGE = timedelta(hours=1)
MAX_INDEX_ROWS = 200_000  # blobs per new index: stays far below what a reader accepts


# ------------------------------------------------------------------ the plan (pure)


@dataclass(frozen=True)
class PackFacts:
    """One pack as prune finds it."""

    id: str
    size: int  # -1: named by an index, absent from storage
    age: float  # seconds since it was written
    rows: tuple[BlobRow, ...] | None  # None: an unindexed object without a valid header
    indexed: bool


@dataclass
class PrunePlan:
    keep: dict[str, list[BlobRow]] = field(default_factory=dict)  # what the new indexes name
    delete: dict[str, int] = field(default_factory=dict)  # pack id -> size
    kept_bytes: int = 0
    unused_bytes: int = 0  # unreferenced blobs in packs kept for their referenced ones
    young_packs: int = 0
    young_bytes: int = 0
    adopted: int = 0  # unindexed packs holding referenced blobs
    dropped: list[str] = field(default_factory=list)  # indexed but absent packs
    missing_blobs: list[str] = field(default_factory=list)  # referenced, in no pack: damage


def plan_prune(packs: Iterable[PackFacts], referenced: Set[str], min_age: float) -> PrunePlan:
    plan = PrunePlan()
    present: set[str] = set()
    for pack in packs:
        _decide(plan, pack, referenced, min_age)
        if pack.size >= 0 and pack.rows:
            present.update(row[0] for row in pack.rows)
    plan.missing_blobs = sorted(referenced - present)
    return plan


def _decide(plan: PrunePlan, pack: PackFacts, referenced: Set[str], min_age: float) -> None:
    if pack.size < 0:
        plan.dropped.append(pack.id)
        return
    old = pack.age >= min_age
    if pack.rows is None:
        if old:  # torn or foreign: nothing can use it
            plan.delete[pack.id] = pack.size
        return
    unused = [row for row in pack.rows if row[0] not in referenced]
    if len(unused) == len(pack.rows):
        if old:
            plan.delete[pack.id] = pack.size
            return
        plan.young_packs += 1
        plan.young_bytes += pack.size
        if not pack.indexed:
            return  # an interrupted backup's: adoption or a later prune deals with it
    else:
        plan.unused_bytes += sum(row[3] for row in unused)
        plan.adopted += not pack.indexed
    plan.keep[pack.id] = list(pack.rows)
    plan.kept_bytes += pack.size


def index_batches(keep: dict[str, list[BlobRow]], limit: int | None = None) -> Iterator[dict[str, list[BlobRow]]]:
    """The kept packs cut into indexes of at most ``limit`` blobs (a pack is never split)."""
    limit = limit or MAX_INDEX_ROWS
    batch: dict[str, list[BlobRow]] = {}
    rows = 0
    for pack_id in sorted(keep):
        if batch and rows + len(keep[pack_id]) > limit:
            yield batch
            batch, rows = {}, 0
        batch[pack_id] = keep[pack_id]
        rows += len(keep[pack_id])
    if batch:
        yield batch


_AGE = re.compile(r"(?:[0-9]{1,6}[dhms])+|0")
_AGE_PART = re.compile(r"([0-9]{1,6})([dhms])")
_AGE_UNITS = {"d": "days", "h": "hours", "m": "minutes", "s": "seconds"}


def parse_age(text: str) -> timedelta:
    """``--min-age``: e.g. ``1h``, ``90m``, ``2d12h``, ``0`` (m = minutes here)."""
    s = text.strip()
    if not _AGE.fullmatch(s):
        raise UsageError(f"bad age {text!r}: use e.g. 1h, 30m, 2d, 0 (d, h, m=minutes, s)")
    age = timedelta()
    for number, unit in _AGE_PART.findall(s):
        age += timedelta(**{_AGE_UNITS[unit]: int(number)})
    return age


# ------------------------------------------------------------------ acting on a repository


@dataclass
class PruneReport:
    dry_run: bool
    snapshots: int = 0
    packs: int = 0
    packs_deleted: int = 0
    bytes_deleted: int = 0  # space reclaimed
    packs_kept: int = 0
    bytes_kept: int = 0
    unused_bytes: int = 0  # wasted inside kept packs (no repacking yet)
    young_packs: int = 0
    young_bytes: int = 0
    adopted_packs: int = 0
    indexes_written: int = 0
    indexes_deleted: int = 0
    other_deleted: int = 0  # verified markers of snapshots that are gone

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Survey:
    packs: list[PackFacts]
    index_keys: list[str]


def prune(repo: Repository, *, now: datetime, min_age: timedelta = DEFAULT_MIN_AGE, dry_run: bool = False,
          lease: HeldLease | None = None, ignore: Set[str] = frozenset(),
          cancel: threading.Event | None = None) -> PruneReport:
    """Delete what no snapshot (other than those in ``ignore``) references; the caller holds the
    exclusive lease unless ``dry_run``."""
    step = _Checkpoint(lease, cancel)
    survey = _survey(repo, now)
    snaps = [s for s in _snapshots(repo) if s.id not in ignore]
    referenced = _referenced(_reader(repo, survey.packs), snaps)
    plan = plan_prune(survey.packs, referenced, min_age.total_seconds())
    if plan.missing_blobs:
        raise CorruptDataError(
            f"prune stopped before deleting anything: {len(plan.missing_blobs)} blobs that snapshots reference "
            f"are in no pack (e.g. {plan.missing_blobs[0]}); run 'volmove verify'")
    report = _report(plan, survey, len(snaps), dry_run)
    if not dry_run:
        _execute(repo, plan, survey, report, step)
        report.other_deleted = _delete_stale_markers(repo, {s.id for s in snaps} | set(ignore), step)
    return report


def _survey(repo: Repository, now: datetime) -> _Survey:
    index_keys = [info.key for info in repo.storage.list("index/")]
    with ThreadPoolExecutor(8) as pool:
        indexes = list(pool.map(repo.read_index_file, index_keys))
    indexed: dict[str, dict[str, BlobRow]] = {}
    for rows in indexes:
        for bid, ref in rows:  # a pack named by several indexes (a killed prune) is counted once
            indexed.setdefault(ref.pack, {})[bid] = (bid, ref.type, ref.offset, ref.length, ref.raw_length)
    stored = {id_from_key(i.key): i for i in repo.storage.list("data/") if i.key == pack_key(id_from_key(i.key))}
    facts = [
        PackFacts(pid, stored[pid].size if pid in stored else -1,
                  now.timestamp() - stored[pid].mtime if pid in stored else 0.0, tuple(rows.values()), True)
        for pid, rows in indexed.items()
    ]
    for pid, info in stored.items():
        if pid not in indexed and is_hex_id(pid):
            header = repo.read_pack_header(pid, info.size)
            found = None if header is None else tuple(_row(b, ref) for b, ref in header)
            facts.append(PackFacts(pid, info.size, now.timestamp() - info.mtime, found, False))
    return _Survey(facts, index_keys)


def _row(bid: str, ref: BlobRef) -> BlobRow:
    return bid, ref.type, ref.offset, ref.length, ref.raw_length


def _snapshots(repo: Repository) -> list[Snapshot]:
    try:
        return repo.list_snapshots()
    except VolmoveError as exc:
        raise CorruptDataError(f"prune stopped before deleting anything: {exc}") from None


def _reader(repo: Repository, packs: list[PackFacts]) -> Repository:
    """A view of the repository whose index is every pack present, indexed or not."""
    reader = Repository(repo.storage, repo.config)
    for pack in packs:
        if pack.size >= 0 and pack.rows:
            for bid, btype, offset, length, raw in pack.rows:
                reader.index.setdefault(bid, BlobRef(pack.id, offset, length, raw, btype))
    return reader


def _referenced(reader: Repository, snaps: list[Snapshot]) -> set[str]:
    """Every blob a snapshot needs: its catalog's and its files' chunks."""
    out: set[str] = set()
    for snap in snaps:
        out.update(snap.catalog)
        try:
            for line in reader.read_catalog(snap):
                out.update(parse_entry(line).chunks)
        except VolmoveError as exc:
            raise CorruptDataError(
                f"prune stopped before deleting anything: snapshot {snap.id[:8]}: {exc}") from None
    return out


def _report(plan: PrunePlan, survey: _Survey, snapshots: int, dry_run: bool) -> PruneReport:
    return PruneReport(
        dry_run=dry_run, snapshots=snapshots, packs=sum(p.size >= 0 for p in survey.packs),
        packs_deleted=len(plan.delete), bytes_deleted=sum(plan.delete.values()), packs_kept=len(plan.keep),
        bytes_kept=plan.kept_bytes, unused_bytes=plan.unused_bytes, young_packs=plan.young_packs,
        young_bytes=plan.young_bytes, adopted_packs=plan.adopted,
    )


class _Checkpoint:
    """Between irreversible steps: stop if cancelled or if the lease was lost."""

    def __init__(self, lease: HeldLease | None, cancel: threading.Event | None) -> None:
        self.lease, self.cancel = lease, cancel

    def __call__(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise CancelledByUser("prune cancelled; the next prune completes it")
        if self.lease is not None:
            self.lease.check()


def _execute(repo: Repository, plan: PrunePlan, survey: _Survey, report: PruneReport,
             step: Callable[[], None]) -> None:
    indexed = {p.id for p in survey.packs if p.indexed}
    if len(survey.index_keys) > 1 or set(plan.keep) != indexed:
        step()
        written = {index_key(i) for batch in index_batches(plan.keep) if (i := repo.write_index(batch))}  # 1
        report.indexes_written = len(written)
        for key in survey.index_keys:  # 2
            if key not in written:
                step()
                repo.storage.delete(key)
                report.indexes_deleted += 1
    for pack_id in sorted(plan.delete):  # 3
        step()
        repo.storage.delete(pack_key(pack_id))


def _delete_stale_markers(repo: Repository, snapshot_ids: set[str], step: Callable[[], None]) -> int:
    stale = [i.key for i in repo.storage.list(VERIFIED_PREFIX) if id_from_key(i.key) not in snapshot_ids]
    for key in stale:
        step()
        repo.storage.delete(key)
    return len(stale)


# ------------------------------------------------------------------ the command


@dataclass(frozen=True)
class PruneOptions:
    min_age: timedelta = DEFAULT_MIN_AGE
    dry_run: bool = False
    lock_wait: float | None = None  # seconds; None: the default (or $VOLMOVE_LOCK_WAIT)


def run_prune(repo: Repository, opts: PruneOptions, *, clock: Callable[[], datetime] = utc_now,
              cancel: threading.Event | None = None) -> PruneReport:
    """``volmove prune``: under the exclusive lease unless it is a dry run."""
    if opts.dry_run:
        return prune(repo, now=clock(), min_age=opts.min_age, dry_run=True, cancel=cancel)
    with held_lease(repo.storage, "exclusive", "prune", wait=opts.lock_wait, clock=clock, cancel=cancel) as lease:
        return prune(repo, now=clock(), min_age=opts.min_age, lease=lease, cancel=cancel)

