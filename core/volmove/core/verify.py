"""Checking snapshots: structure, data, and a restored tree against its catalog."""

from __future__ import annotations

import json
import math
import os
import random
import threading
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from volmove.core.catalog import FILE, CatalogValidator, Entry, parse_entry
from volmove.core.chunker import StreamChunker
from volmove.core.errors import CancelledByUser, CorruptDataError, VolmoveError
from volmove.core.format import id_from_key, is_hex_id, pack_id_matches
from volmove.core.fswalk import FILE_FLAGS, Item, data_extents, walk
from volmove.core.progress import Progress, ProgressFn, no_progress
from volmove.core.repository import Repository, check_blob
from volmove.core.snapshot import Snapshot


@dataclass
class VerifyReport:
    snapshots: int = 0
    entries: int = 0
    blobs: int = 0
    packs_read: int = 0
    bytes_read: int = 0
    errors: list[str] = field(default_factory=list)
    passed: list[str] = field(default_factory=list)  # snapshots checked completely (every pack, with read_data)

    @property
    def ok(self) -> bool:
        return not self.errors


def verify(repo: Repository, snapshots: Iterable[Snapshot], *, read_data: bool = False,
           subset: float | None = None, seed: str = "", progress: ProgressFn = no_progress,
           cancel: threading.Event | None = None) -> VerifyReport:
    """Every catalog parses and validates and every blob it names is indexed;
    with ``read_data`` every referenced pack (or a ``subset`` percent of them,
    chosen by ``seed``) is downloaded and every blob checked."""
    report = VerifyReport()
    needed: set[str] = set()
    packs_of: dict[str, set[str]] = {}  # snapshots whose blobs are all indexed -> their packs
    for snap in snapshots:
        report.snapshots += 1
        try:
            blobs = _check_catalog(repo, snap, report)
        except VolmoveError as exc:
            report.errors.append(f"snapshot {snap.id[:8]}: {exc}")
            continue
        needed |= blobs
        if all(repo.has_blob(b) for b in blobs):
            packs_of[snap.id] = {repo.index[b].pack for b in blobs}
    missing = sorted(b for b in needed if not repo.has_blob(b))
    report.errors += [f"blob {b} is referenced but in no index" for b in missing[:20]]
    report.blobs = len(needed)
    good: set[str] | None = None  # packs read and found intact; None: data not read
    if read_data:
        present = needed - set(missing)
        chosen = choose_packs({repo.index[b].pack for b in present}, subset, seed)
        good = _read_packs(repo, {b for b in present if repo.index[b].pack in chosen}, report, progress,
                           cancel or threading.Event())
    report.passed = [sid for sid, packs in packs_of.items() if good is None or packs <= good]
    return report


def choose_packs(packs: set[str], subset: float | None, seed: str) -> set[str]:
    """A deterministic-random ``subset`` percent of ``packs`` (at least one); all when None."""
    if subset is None or not packs:
        return packs
    count = min(len(packs), max(1, math.ceil(len(packs) * subset / 100)))
    return set(random.Random(seed).sample(sorted(packs), count))


def _check_catalog(repo: Repository, snap: Snapshot, report: VerifyReport) -> set[str]:
    validator = CatalogValidator(allow_devices=True)
    blobs = set(snap.catalog)
    for line in repo.read_catalog(snap):
        entry = parse_entry(line)
        validator.check(entry)
        blobs.update(entry.chunks)
        report.entries += 1
    return blobs


def _read_packs(repo: Repository, blobs: set[str], report: VerifyReport, progress: ProgressFn,
                cancel: threading.Event) -> set[str]:
    """Check every blob pack by pack; returns the packs found intact."""
    good: set[str] = set()
    by_pack: dict[str, list[str]] = defaultdict(list)
    for bid in blobs:
        by_pack[repo.index[bid].pack].append(bid)
    state = Progress("verify", bytes_total=sum(repo.index[b].length for b in blobs))
    for pack_id, bids in sorted(by_pack.items()):
        if cancel.is_set():
            raise CancelledByUser("verify cancelled")
        try:
            data = repo.read_pack(pack_id)
            intact = pack_id_matches(pack_id, data)
            if not intact:
                report.errors.append(f"pack {pack_id} does not match its hash")
            for bid in bids:
                ref = repo.index[bid]
                check_blob(bid, ref, memoryview(data)[ref.offset : ref.offset + ref.length], repo.blob_id)
        except CorruptDataError as exc:
            report.errors.append(str(exc))
            continue
        if intact:
            good.add(pack_id)
        report.packs_read += 1
        report.bytes_read += len(data)
        state.bytes_done += sum(repo.index[b].length for b in bids)
        progress(state)
    return good


# ---------------------------------------------------------------- verified markers

VERIFIED_PREFIX = "verified/"


def verified_key(snapshot_id: str) -> str:
    return f"{VERIFIED_PREFIX}{snapshot_id}"


def record_verified(repo: Repository, snapshot_id: str, how: str, now: datetime) -> None:
    """Mark a snapshot as checked end to end (``how``: "read-data" or "restore-drill").
    Retention never removes the newest verified snapshot of a volume."""
    doc = {"v": 1, "snapshot": snapshot_id, "time": now.astimezone(UTC).isoformat(), "how": how}
    # Overwritten by each later verification: the marker says when it was last checked.
    repo.storage.put(verified_key(snapshot_id), json.dumps(doc).encode(), overwrite=True)


def verified_ids(repo: Repository) -> set[str]:
    return {sid for info in repo.storage.list(VERIFIED_PREFIX) if is_hex_id(sid := id_from_key(info.key))}


# ---------------------------------------------------------------- compare


@dataclass
class CompareReport:
    checked: int = 0
    differences: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.differences


def compare_tree(repo: Repository, snap: Snapshot, root_fd: int, *, limit: int = 50) -> CompareReport:
    """Compare a tree (a restored volume) with a snapshot's catalog: every entry's
    type, mode, owner, mtime, size, link target, xattrs and content."""
    expected = {e.path: e for e in (parse_entry(line) for line in repo.read_catalog(snap))}
    actual = _catalog_of_tree(repo, root_fd)
    # Hardlinks are compared as the walk sees them; inode numbers and ctimes always differ.
    report = CompareReport(checked=len(expected))
    for path in sorted(expected.keys() | actual.keys()):
        diff = _diff(expected.get(path), actual.get(path))
        if diff:
            report.differences.append(f"{path}: {diff}")
            if len(report.differences) >= limit:
                break
    return report


def _catalog_of_tree(repo: Repository, root_fd: int) -> dict[str, Entry]:
    """The tree's entries with content chunked exactly as a backup would chunk it."""
    out = {}
    for item in walk(root_fd):
        entry = item.entry
        if entry.type == FILE:
            entry.chunks = _chunk_ids(repo, item)
        out[entry.path] = entry
    return out


def _chunk_ids(repo: Repository, item: Item) -> list[str]:
    fd = os.open(item.name, FILE_FLAGS, dir_fd=item.dir_fd)
    try:
        sparse = item.st.st_blocks * 512 < item.entry.size
        extents = data_extents(fd, item.entry.size) if sparse else None
        item.entry.extents = extents
        chunker = StreamChunker(repo.config.chunker)
        ids: list[str] = []
        blob_id = repo.blob_id
        for start, length in extents if extents is not None else [(0, item.entry.size)]:
            pos, end = start, start + length
            while pos < end:
                data = os.pread(fd, min(4 << 20, end - pos), pos)
                if not data:
                    break
                pos += len(data)
                ids += [blob_id(c) for c in chunker.feed(data)]
        ids += [blob_id(c) for c in chunker.finish()]
        return ids
    finally:
        os.close(fd)


def _diff(want: Entry | None, got: Entry | None) -> str:
    if want is None:
        return "not in the snapshot"
    if got is None:
        return "missing"
    fields = ["type", "mode", "uid", "gid", "mtime_ns", "size", "target", "xattrs"]
    if want.type == FILE:
        fields.append("content_hash")
    bad = [f for f in fields if getattr(want, f) != getattr(got, f)]
    return ", ".join(f"{f} differs" for f in bad)
