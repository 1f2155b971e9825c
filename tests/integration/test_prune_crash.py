"""A prune killed at any step leaves a repository that verifies, and the next prune completes it.

The kill is simulated in the style of kopia's faulty storage: a wrapper passes
calls through until a chosen one, where it raises an exception nothing catches.
Runs on memory, a local directory and the real S3 server.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.engine_helpers import new_repo
from tests.unit.test_prune import TreeState, backed_up, check_repository, fill, later, open_fresh
from volmove.core.errors import ConflictError
from volmove.core.format import snapshot_key
from volmove.core.locks import DEFAULT_TTL
from volmove.core.policy.lease import Lease, to_json
from volmove.core.prune import PruneOptions, prune, run_prune
from volmove.core.storage.base import ObjectInfo, Storage
from volmove.core.storage.memory import MemoryStorage


class Killed(BaseException):
    """Stands for kill -9: no handler sees it, no cleanup is owed."""


class FaultyStorage:
    """Passes every call to ``inner`` until the ``after``-th ``op`` on a key under ``prefix``
    has gone through; the next one raises Killed instead."""

    def __init__(self, inner: Storage, op: str, prefix: str, after: int) -> None:
        self.inner, self.op, self.prefix, self.left = inner, op, prefix, after
        self.url = inner.url
        self.prefers_whole_objects = inner.prefers_whole_objects
        self.fired = False

    def _call(self, op: str, key: str) -> None:
        if op == self.op and key.startswith(self.prefix):
            if self.left == 0:
                self.fired = True
                raise Killed(f"killed at {op} {key}")
            self.left -= 1

    def put(self, key: str, data: bytes, *, overwrite: bool = False) -> None:
        self._call("put", key)
        self.inner.put(key, data, overwrite=overwrite)

    def put_parts(self, key: str, parts: Sequence[bytes | memoryview], *, overwrite: bool = False) -> None:
        self._call("put", key)
        self.inner.put_parts(key, parts, overwrite=overwrite)

    def get(self, key: str) -> bytes:
        self._call("get", key)
        return self.inner.get(key)

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        self._call("get", key)
        return self.inner.get_range(key, offset, length)

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def stat(self, key: str) -> ObjectInfo:
        return self.inner.stat(key)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        return self.inner.list(prefix)

    def delete(self, key: str) -> None:
        self._call("delete", key)
        self.inner.delete(key)

    def cleanup_incomplete(self, older_than: float) -> int:
        return self.inner.cleanup_incomplete(older_than)

    def close(self) -> None:
        pass


KILLS = [
    # (name, op, prefix, after)
    ("while writing the new index", "put", "index/", 0),
    ("after the new index, before deleting old ones", "delete", "index/", 0),
    ("after deleting some old indexes", "delete", "index/", 2),
    ("after all old indexes, before any pack", "delete", "data/", 0),
    ("after deleting some packs", "delete", "data/", 2),
]


def populated(storage: Storage, tmp_path: Path) -> dict[str, TreeState]:
    """Six snapshots (six packs, six indexes); four of them forgotten."""
    repo = new_repo(storage)
    kept: dict[str, TreeState] = {}
    for n in range(6):
        fill(tmp_path / f"src{n}", n, common=False)
        snap, state = backed_up(repo, tmp_path / f"src{n}", f"v{n}")
        if n in (1, 4):
            kept[snap.id] = state
        else:
            storage.delete(snapshot_key(snap.id))
    return kept


@pytest.mark.parametrize(("op", "prefix", "after"), [k[1:] for k in KILLS], ids=[k[0] for k in KILLS])
@pytest.mark.parametrize("adopt_between", [False, True], ids=["prune-again", "backup-then-prune"])
def test_killed_prune_leaves_a_repository_that_verifies_and_the_next_completes_it(
        any_storage: Storage, tmp_path: Path, op: str, prefix: str, after: int, adopt_between: bool) -> None:
    kept = populated(any_storage, tmp_path)
    faulty = FaultyStorage(any_storage, op, prefix, after)
    with pytest.raises(Killed):
        prune(open_fresh(faulty), now=later())
    assert faulty.fired
    check_repository(any_storage, kept, tmp_path / "after-kill")
    if adopt_between:  # what the next backup's start does with the packs the kill left unindexed
        repo = open_fresh(any_storage)
        repo.adopt_orphan_packs()
        fill(tmp_path / "new", 99, common=False)
        snap, state = backed_up(repo, tmp_path / "new", "new")
        kept[snap.id] = state
    run_prune(open_fresh(any_storage), PruneOptions(), clock=later)
    check_repository(any_storage, kept, tmp_path / "after-next")
    _assert_complete(any_storage, kept)


def _assert_complete(storage: Storage, kept: dict[str, TreeState]) -> None:
    """Nothing is left to prune: one index, and every pack is used by a snapshot."""
    report = prune(open_fresh(storage), now=later(), dry_run=True)
    assert report.packs_deleted == 0 and report.young_packs == 0
    assert report.packs == report.packs_kept == len(kept)  # each snapshot here has its own single pack
    assert len(list(storage.list("index/"))) == 1
    assert list(storage.list("locks/")) == []


def test_a_killed_prune_s_lock_blocks_until_it_expires(tmp_path: Path) -> None:
    storage = MemoryStorage()
    kept = populated(storage, tmp_path)
    now = datetime.now(UTC)  # the record a prune killed just now leaves behind
    record = Lease("db1:4242 prune #00ff", 1, now, now + DEFAULT_TTL, "exclusive")
    storage.put("locks/killed", to_json(record).encode())
    with pytest.raises(ConflictError, match=r"locked by db1:4242 prune \(exclusive\) until"):
        run_prune(open_fresh(storage), PruneOptions(lock_wait=0))
    two_hours_on = now + timedelta(hours=2)  # the record has expired, and the garbage is old enough
    report = run_prune(open_fresh(storage), PruneOptions(lock_wait=0), clock=lambda: two_hours_on)
    assert report.packs_deleted == 4 and list(storage.list("locks/")) == []
    check_repository(storage, kept, tmp_path)
