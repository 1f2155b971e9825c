"""A backup reads its source first and finishes without it, so the helper can go (and
stopped containers start again) while the last packs and the index are written."""

from __future__ import annotations

import os
import random
import threading
from pathlib import Path

from tests.engine_helpers import backup_dir, new_repo
from volmove.core.backup import BackupEngine
from volmove.core.format import BLOB_DATA
from volmove.core.repository import Repository
from volmove.core.storage.memory import MemoryStorage


def make_source(root: Path) -> None:
    rng = random.Random(7)
    (root / "d").mkdir(parents=True)
    for i in range(50):
        (root / "d" / f"f{i}").write_bytes(rng.randbytes(20_000 + i))
    (root / "big").write_bytes(rng.randbytes(3 << 20))


def read_tree(engine: BackupEngine, src: Path) -> None:
    fd = os.open(src, os.O_RDONLY | os.O_DIRECTORY)
    try:
        engine.read(fd)
    finally:
        os.close(fd)


def data_blobs(repo: Repository) -> set[str]:
    return {bid for bid, ref in repo.index.items() if ref.type == BLOB_DATA}


def test_finish_needs_no_source(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_source(src)
    repo = new_repo(MemoryStorage())
    engine = BackupEngine(repo)
    read_tree(engine, src)
    for path in sorted(src.rglob("*"), reverse=True):  # the source is gone before the finish
        path.rmdir() if path.is_dir() else path.unlink()
    result = engine.finish()
    assert result.stats.files == 51 and result.stats.bytes == sum(20_000 + i for i in range(50)) + (3 << 20)
    assert list(repo.storage.list("index/"))
    # The same as a backup in one go of the same content.
    make_source(tmp_path / "again")
    other = new_repo(MemoryStorage())
    whole = backup_dir(other, tmp_path / "again")  # BackupEngine.run, source present throughout
    assert data_blobs(repo) == data_blobs(other) and len(data_blobs(repo)) > 50
    assert result.stats.new_bytes == whole.stats.new_bytes  # (catalogs differ: mtimes and inodes)


def test_abort_after_reading_commits_nothing(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_source(src)
    storage = MemoryStorage()
    repo = new_repo(storage)
    before = set(threading.enumerate())
    engine = BackupEngine(repo)
    read_tree(engine, src)
    engine.abort()
    assert not list(storage.list("index/"))
    assert not list(storage.list("snapshots/"))
    assert {t for t in threading.enumerate() if t.is_alive()} <= before  # no pool thread left behind
