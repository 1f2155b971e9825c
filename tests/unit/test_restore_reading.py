"""How restore reads packs: segments, read-ahead, eviction and the decode budget.

Every read layout must give back the exact tree, whatever the segment size,
cache size or budget; memory stays bounded by the budget, not the file size.
"""

from __future__ import annotations

import os
import threading
import tracemalloc
from pathlib import Path

import pytest

from tests.engine_helpers import backup_dir, new_repo, restore_dir, tree_state
from volmove.core import restore
from volmove.core.catalog import parse_entry
from volmove.core.errors import CancelledByUser, CorruptDataError
from volmove.core.format import pack_key
from volmove.core.restore import ReadLayout
from volmove.core.storage.memory import MemoryStorage

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="restoring owners needs root")


class WholeObjectStorage(MemoryStorage):
    """Memory storage that asks for whole-object reads, as S3 does."""

    prefers_whole_objects = True


def make_tree(root: Path, files: int = 300) -> None:
    for i in range(files):
        d = root / f"d{i % 7}"
        d.mkdir(exist_ok=True)
        (d / f"f{i:04d}").write_bytes(os.urandom(i * 37 % 5000) + b"text " * (i % 300))
    (root / "big").write_bytes(os.urandom(3 << 20))
    (root / "zeros").write_bytes(bytes(2 << 20))  # compresses to almost nothing: a large chunk, a small blob
    os.link(root / "d3/f0003", root / "hard")
    with open(root / "sparse", "wb") as f:
        f.truncate(50 << 20)
        f.seek(10 << 20)
        f.write(os.urandom(300_000))


LAYOUTS = {
    "default": None,
    "tiny segments": ReadLayout(segment=4096, alone=1024, cache=1),
    "small cache": ReadLayout(segment=64 << 10, alone=16 << 10, cache=2),
    "everything alone": ReadLayout(segment=1 << 20, alone=1, cache=4),
    "whole packs": ReadLayout(segment=16 << 20, alone=16 << 20, cache=1),
}


@pytest.mark.parametrize("storage", ["local-layout", "whole-object"])
@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_every_layout_restores_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       storage: str, layout: ReadLayout | None) -> None:
    if layout is not None:
        monkeypatch.setattr(restore, "WHOLE_LAYOUT" if storage == "whole-object" else "LOCAL_LAYOUT", layout)
    monkeypatch.setattr(restore, "AHEAD_ENTRIES", 50)  # fewer than the catalog's entries
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    make_tree(src)
    repo = new_repo(WholeObjectStorage() if storage == "whole-object" else MemoryStorage())
    snap = backup_dir(repo, src)
    result = restore_dir(repo, snap, dst)
    assert tree_state(dst) == tree_state(src)
    assert result.files == 303 and result.bytes == snap.stats.bytes


def test_a_large_file_is_decoded_within_the_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(restore, "BUDGET_BYTES", 1 << 20)
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "big").write_bytes(os.urandom(40 << 20))
    repo = new_repo(MemoryStorage())
    snap = backup_dir(repo, src)
    tracemalloc.start()
    try:
        restore_dir(repo, snap, dst)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 24 << 20  # segments and a few chunks, not the 40 MiB file
    assert tree_state(dst) == tree_state(src)


def test_cancel_stops_the_restore(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    make_tree(src, files=50)
    repo = new_repo(MemoryStorage())
    snap = backup_dir(repo, src)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(CancelledByUser):
        restore_dir(repo, snap, tmp_path / "dst", cancel=cancel)


def test_progress_reaches_the_totals(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    make_tree(src, files=20)
    repo = new_repo(MemoryStorage())
    snap = backup_dir(repo, src)
    seen: list[tuple[str, int, int]] = []
    restore_dir(repo, snap, tmp_path / "dst", progress=lambda p: seen.append((p.phase, p.bytes_done, p.files_done)))
    assert seen[-1] == ("done", snap.stats.bytes, snap.stats.files)


@pytest.mark.parametrize("run_bytes", [1, 200_000, 1 << 20, 64 << 20])
def test_every_run_size_restores_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_bytes: int) -> None:
    monkeypatch.setattr(restore, "RUN_BYTES", run_bytes)
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    make_tree(src, files=30)
    (src / "mixed").write_bytes(b"".join(os.urandom(150_000) + bytes(300_000) for _ in range(8)))
    repo = new_repo(MemoryStorage())
    snap = backup_dir(repo, src)
    restore_dir(repo, snap, dst)
    assert tree_state(dst) == tree_state(src)


class CountingStorage(MemoryStorage):
    def __init__(self) -> None:
        super().__init__()
        self.ranges: list[tuple[str, int, int]] = []

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        self.ranges.append((key, offset, length))
        return super().get_range(key, offset, length)


def test_a_run_of_adjacent_blobs_is_one_read_and_a_bad_blob_in_it_is_named(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "big").write_bytes(os.urandom(3 << 20))
    storage = CountingStorage()
    repo = new_repo(storage)
    snap = backup_dir(repo, src)
    (line,) = [line for line in repo.read_catalog(snap) if b'"p":"big"' in line]
    fetcher = restore.BlobFetcher(repo, restore.LOCAL_LAYOUT)
    run = [(bid, fetcher.locate(bid)) for bid in parse_entry(line).chunks]
    assert len(run) > 3 and len({ref.pack for _, ref in run}) == 1
    storage.ranges.clear()
    assert b"".join(fetcher.get_run(run)) == (src / "big").read_bytes()
    assert len(storage.ranges) == 1
    assert fetcher.get_run([run[2], run[0]]) == [fetcher.get(*run[2]), fetcher.get(*run[0])]  # not adjacent: each alone
    expected = fetcher.get_run(run)
    whole = restore.BlobFetcher(repo, restore.WHOLE_LAYOUT)  # S3: the pack is one cached segment, read once
    storage.ranges.clear()
    assert whole.get_run(run) == whole.get_run(run) == expected
    assert len(storage.ranges) == 1

    bid, ref = run[2]
    key = pack_key(ref.pack)
    data, when = storage._objects[key]
    flipped = ref.offset + 10  # inside the third blob's stored bytes
    storage._objects[key] = (data[:flipped] + bytes([data[flipped] ^ 1]) + data[flipped + 1 :], when)
    with pytest.raises(CorruptDataError, match=bid):
        fetcher.get_run(run)
