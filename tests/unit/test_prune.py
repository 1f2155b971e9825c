"""Prune: the pure plan, and pruning real repositories on every backend (memory, local, S3)."""

from __future__ import annotations

import random
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

import volmove.core.prune as prune_mod
from tests.engine_helpers import backup_dir, new_repo, restore_dir, tree_state
from volmove.core.errors import CorruptDataError, UsageError
from volmove.core.format import pack_key, snapshot_key
from volmove.core.prune import PackFacts, index_batches, parse_age, plan_prune, prune
from volmove.core.repository import BlobRow, Repository
from volmove.core.snapshot import Snapshot
from volmove.core.storage.base import Storage
from volmove.core.storage.memory import MemoryStorage
from volmove.core.verify import record_verified, verified_ids, verify

HOUR = 3600.0
TreeState = dict[bytes, tuple[object, ...]]


# ------------------------------------------------------------------ helpers (also used by the integration tests)


def later() -> datetime:
    """A ``now`` that makes every object in a fresh repository two hours old."""
    return datetime.now(UTC) + timedelta(hours=2)


def fill(root: Path, seed: int, files: int = 4, size: int = 150_000, common: bool = True) -> None:
    """Content unique to ``seed``, plus (if ``common``) one file every such tree shares."""
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(files):
        (root / f"f{i}").write_bytes(rng.randbytes(size))
    if common:
        (root / "common").write_bytes(random.Random(-1).randbytes(size))


def open_fresh(storage: Storage) -> Repository:
    repo = Repository.open(storage)
    repo.load_index()
    return repo


def check_repository(storage: Storage, expected: Mapping[str, TreeState], scratch: Path) -> None:
    """Every snapshot verifies with --read-data, and those in ``expected`` restore exactly."""
    repo = open_fresh(storage)
    snaps = repo.list_snapshots()
    report = verify(repo, snaps, read_data=True)
    assert report.ok, report.errors
    assert sorted(report.passed) == sorted(s.id for s in snaps)
    by_id = {s.id: s for s in snaps}
    for n, (sid, state) in enumerate(expected.items()):
        dst = scratch / f"restore-{n}"
        scratch.mkdir(parents=True, exist_ok=True)
        restore_dir(repo, by_id[sid], dst)
        assert tree_state(dst) == state


def data_bytes(storage: Storage) -> int:
    return sum(info.size for info in storage.list("data/"))


def backed_up(repo: Repository, root: Path, volume: str) -> tuple[Snapshot, TreeState]:
    return backup_dir(repo, root, volume), tree_state(root)


# ------------------------------------------------------------------ the plan


def rows(*blobs: str) -> tuple[BlobRow, ...]:
    return tuple((b * 64, "d", n * 10, 10, 20) for n, b in enumerate(blobs))


def facts(pid: str, blobs: tuple[BlobRow, ...] | None, age: float = 2 * HOUR, indexed: bool = True,
          size: int = 100) -> PackFacts:
    return PackFacts(pid * 64, size, age, blobs, indexed)


REF = {"a" * 64, "c" * 64}
PLANS = [
    # (name, pack, deleted, kept, extra checks)
    ("used pack stays", facts("1", rows("a", "b")), False, True, {"unused_bytes": 10}),
    ("unused old pack goes", facts("1", rows("b")), True, False, {}),
    ("unused young pack stays", facts("1", rows("b"), age=60), False, True, {"young_packs": 1}),
    ("young orphan is left to adoption", facts("1", rows("b"), age=60, indexed=False), False, False,
     {"young_packs": 1}),
    ("orphan with used blobs is adopted", facts("1", rows("c"), indexed=False), False, True, {"adopted": 1}),
    ("old unreadable object goes", facts("1", None, indexed=False), True, False, {}),
    ("young unreadable object stays", facts("1", None, age=60, indexed=False), False, False, {}),
    ("indexed but absent is dropped", facts("1", rows("b"), size=-1), False, False, {"dropped": ["1" * 64]}),
]


@pytest.mark.parametrize(("pack", "deleted", "kept", "extra"), [p[1:] for p in PLANS], ids=[p[0] for p in PLANS])
def test_plan(pack: PackFacts, deleted: bool, kept: bool, extra: dict[str, object]) -> None:
    full = [pack, facts("9", rows("a", "c"))]  # holds what REF needs
    plan = plan_prune(full, REF, min_age=HOUR)
    assert (pack.id in plan.delete) is deleted
    assert (pack.id in plan.keep) is kept
    for name, value in extra.items():
        assert getattr(plan, name) == value
    assert plan.missing_blobs == []


def test_plan_finds_referenced_blobs_in_no_pack() -> None:
    plan = plan_prune([facts("1", rows("a")), facts("2", rows("c"), size=-1)], REF, min_age=HOUR)
    assert plan.missing_blobs == ["c" * 64]


def test_index_batches_never_split_a_pack() -> None:
    keep = {str(n) * 64: list(rows(*"abc"[: n % 3 + 1])) for n in range(1, 8)}
    batches = list(index_batches(keep, limit=4))
    assert sorted(p for b in batches for p in b) == sorted(keep)
    assert all(sum(len(r) for r in b.values()) <= 4 for b in batches)


@pytest.mark.parametrize(("text", "age"), [("1h", timedelta(hours=1)), ("90m", timedelta(minutes=90)),
                                           ("2d12h", timedelta(days=2, hours=12)), ("0", timedelta(0)),
                                           ("30s", timedelta(seconds=30))])
def test_parse_age(text: str, age: timedelta) -> None:
    assert parse_age(text) == age


@pytest.mark.parametrize("text", ["", "1", "h", "-1h", "1w", "1.5h"])
def test_parse_age_refuses(text: str) -> None:
    with pytest.raises(UsageError, match="bad age"):
        parse_age(text)


# ------------------------------------------------------------------ pruning repositories


def test_prune_reclaims_what_no_snapshot_uses(any_storage: Storage, tmp_path: Path) -> None:
    repo = new_repo(any_storage)
    fill(tmp_path / "a", 1)
    fill(tmp_path / "b", 2, common=False)
    fill(tmp_path / "c", 3)
    (sa, state_a), (sb, _), (sc, state_c) = (backed_up(repo, tmp_path / v, v) for v in "abc")
    record_verified(repo, sb.id, "read-data", datetime.now(UTC))
    any_storage.delete(snapshot_key(sb.id))  # forgotten
    before = data_bytes(any_storage)
    report = prune(open_fresh(any_storage), now=later())
    assert report.snapshots == 2 and report.packs == 3
    assert report.packs_deleted == 1 and report.bytes_deleted == before - data_bytes(any_storage) > 0
    assert report.indexes_written == 1 and report.indexes_deleted == 3
    assert report.other_deleted == 1 and verified_ids(repo) == set()  # the forgotten one's marker
    assert len(list(any_storage.list("index/"))) == 1
    check_repository(any_storage, {sa.id: state_a, sc.id: state_c}, tmp_path)
    again = prune(open_fresh(any_storage), now=later())
    assert (again.packs_deleted, again.indexes_written, again.indexes_deleted) == (0, 0, 0)


def test_min_age_keeps_young_unreferenced_packs(tmp_path: Path) -> None:
    storage = MemoryStorage()
    repo = new_repo(storage)
    snaps = []
    for n in range(3):
        fill(tmp_path / f"d{n}", n, common=False)
        snaps.append(backup_dir(repo, tmp_path / f"d{n}", f"v{n}"))
    for snap in snaps[1:]:
        storage.delete(snapshot_key(snap.id))
    now = datetime.now(UTC)
    packs = [info.key for info in storage.list("data/")]
    old = next(k for k in packs if _pack_holds(repo, k, snaps[1]))
    storage.set_mtime(old, now.timestamp() - 2 * HOUR)
    report = prune(open_fresh(storage), now=now, min_age=timedelta(hours=1))
    assert report.packs_deleted == 1 and not storage.exists(old)
    assert report.young_packs == 1 and report.young_bytes > 0
    dry = prune(open_fresh(storage), now=now + timedelta(hours=2), dry_run=True)
    assert dry.packs_deleted == 1 and len(list(storage.list("data/"))) == 2  # a dry run deletes nothing


def _pack_holds(repo: Repository, key: str, snap: Snapshot) -> bool:
    return repo.index[snap.catalog[0]].pack == key.rsplit("/", 1)[1]


def test_prune_refuses_to_act_on_a_damaged_repository(any_storage: Storage, tmp_path: Path) -> None:
    repo = new_repo(any_storage)
    fill(tmp_path / "a", 1)
    fill(tmp_path / "b", 2)
    sa = backup_dir(repo, tmp_path / "a", "a")
    sb = backup_dir(repo, tmp_path / "b", "b")
    any_storage.delete(snapshot_key(sb.id))
    any_storage.delete(pack_key(repo.index[sa.catalog[0]].pack))  # damage: data a snapshot needs is gone
    keys = sorted(info.key for info in any_storage.list(""))
    with pytest.raises(CorruptDataError, match="prune stopped before deleting anything"):
        prune(open_fresh(any_storage), now=later())
    assert sorted(info.key for info in any_storage.list("")) == keys


def test_lost_indexes_are_rebuilt_from_pack_headers(tmp_path: Path) -> None:
    storage = MemoryStorage()
    repo = new_repo(storage)
    fill(tmp_path / "a", 1)
    fill(tmp_path / "b", 2, common=False)
    sa, state_a = backed_up(repo, tmp_path / "a", "a")
    sb = backup_dir(repo, tmp_path / "b", "b")
    storage.delete(snapshot_key(sb.id))
    for info in list(storage.list("index/")):
        storage.delete(info.key)
    report = prune(open_fresh(storage), now=later())
    assert report.adopted_packs == 1 and report.packs_deleted == 1
    check_repository(storage, {sa.id: state_a}, tmp_path)


def test_large_repositories_get_several_indexes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = MemoryStorage()
    repo = new_repo(storage)
    states = {}
    for n in range(3):
        fill(tmp_path / f"d{n}", n, common=False)
        snap, state = backed_up(repo, tmp_path / f"d{n}", f"v{n}")
        states[snap.id] = state
    monkeypatch.setattr(prune_mod, "MAX_INDEX_ROWS", 3)
    fill(tmp_path / "x", 9, common=False)
    storage.delete(snapshot_key(backup_dir(repo, tmp_path / "x", "x").id))
    report = prune(open_fresh(storage), now=later())
    assert report.indexes_written == len(list(storage.list("index/"))) >= 2
    check_repository(storage, states, tmp_path)


def test_a_backup_must_not_use_an_index_loaded_before_a_prune(tmp_path: Path) -> None:
    """Why a backup reloads the index under its lease: deduplicating against blobs a prune
    deleted in the meantime gives a snapshot that looks fine and is not."""
    storage = MemoryStorage()
    repo = new_repo(storage)
    fill(tmp_path / "g", 7)
    storage.delete(snapshot_key(backup_dir(repo, tmp_path / "g", "g").id))  # garbage, for now
    stale = open_fresh(storage)
    prune(open_fresh(storage), now=later())
    lost = backup_dir(stale, tmp_path / "g", "g")
    assert not verify(open_fresh(storage), [lost], read_data=True).ok
    stale.load_index()
    good = backup_dir(stale, tmp_path / "g", "g")
    assert verify(open_fresh(storage), [good], read_data=True).ok


def test_reload_reads_only_new_index_files_until_one_is_gone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = MemoryStorage()
    repo = new_repo(storage)
    fill(tmp_path / "a", 1)
    backup_dir(repo, tmp_path / "a", "a")
    mine = open_fresh(storage)
    fill(tmp_path / "b", 2, common=False)
    other = backup_dir(open_fresh(storage), tmp_path / "b", "b")  # another writer adds an index
    read: list[str] = []
    real_get = storage.get
    monkeypatch.setattr(storage, "get", lambda key: read.append(key) or real_get(key))
    mine.load_index()
    assert len([k for k in read if k.startswith("index/")]) == 1  # only the new one
    assert all(mine.has_blob(b) for b in other.catalog)
    read.clear()
    prune(open_fresh(storage), now=later())  # replaces every index file
    read.clear()
    mine.load_index()
    assert {k for k in read if k.startswith("index/")} == {i.key for i in storage.list("index/")}
    assert mine.index == open_fresh(storage).index
