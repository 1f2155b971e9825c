"""The local backend's write ordering: packs are synced in bulk, before anything can name them."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from volmove.core.storage import local
from volmove.core.storage.local import LocalStorage


@pytest.fixture
def syncs(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    calls: list[Path] = []
    real = local._syncfs

    def record(root: Path) -> None:
        calls.append(root)
        real(root)  # the real call must work here too

    monkeypatch.setattr(local, "_syncfs", record)
    return calls


def test_packs_are_synced_once_before_the_index_that_names_them(tmp_path: Path, syncs: list[Path]) -> None:
    storage = LocalStorage(tmp_path)
    for i in range(3):
        storage.put(f"data/ab/ab{i}", b"pack %d" % i)
    assert syncs == []  # no flush of the disk per pack
    storage.put("index/1", b"names the packs")
    assert syncs == [tmp_path]
    storage.put("snapshots/1", b"names the index")  # fsynced itself; nothing deferred is left
    assert syncs == [tmp_path]
    assert [storage.get(f"data/ab/ab{i}") for i in range(3)] == [b"pack 0", b"pack 1", b"pack 2"]


def test_explicit_sync_and_nothing_to_sync(tmp_path: Path, syncs: list[Path]) -> None:
    storage = LocalStorage(tmp_path)
    storage.sync()
    storage.put("config", b"{}")
    assert syncs == []
    storage.put("data/00/00ff", b"x")
    storage.sync()
    storage.sync()
    assert syncs == [tmp_path]


SIZES = [local.DIRECT_MIN, local.DIRECT_MIN + 1, 3 * local.DIRECT_MIN + local.DIRECT_ALIGN - 1, 20 << 20]


def _patterned(size: int, seed: int) -> bytes:
    block = bytes((seed + i * 7) % 251 for i in range(4093))  # no alignment in the pattern either
    return (block * (size // len(block) + 1))[:size]


@pytest.mark.parametrize("where", ["disk", "tmpfs"])
def test_packs_written_past_the_page_cache_read_back_exactly(tmp_path: Path, where: str) -> None:
    root = tmp_path if where == "disk" else Path("/dev/shm") / tmp_path.name
    storage = LocalStorage(root, create=True)
    try:
        datas = [_patterned(size, i) for i, size in enumerate(SIZES)]
        for i, data in enumerate(datas):
            storage.put(f"data/ab/ab{i}", data)
        storage.put("index/1", b"names them")  # syncs the packs' buffered tails
        for i, data in enumerate(datas):
            assert storage.get(f"data/ab/ab{i}") == data
            assert storage.get_range(f"data/ab/ab{i}", len(data) - 5000, 5000) == data[-5000:]
        assert not list(root.glob("data/ab/.tmp-*"))
    finally:
        if where == "tmpfs":
            shutil.rmtree(root, ignore_errors=True)


def test_a_filesystem_refusing_direct_writes_falls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """EINVAL from the direct write (alignment rules of some filesystems) rewrites the object buffered."""
    storage = LocalStorage(tmp_path)
    real_write = local.os.write

    def refuse_direct(fd: int, data: bytes) -> int:
        if local.fcntl.fcntl(fd, local.fcntl.F_GETFL) & local.O_DIRECT:
            raise OSError(local.errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(local.os, "write", refuse_direct)
    data = _patterned(SIZES[2], 3)
    storage.put("data/ab/ab0", data)
    assert storage._direct is False
    storage.put("data/ab/ab1", data)  # not tried again
    assert storage.get("data/ab/ab0") == data == storage.get("data/ab/ab1")


def test_a_pack_in_parts_goes_past_the_cache_in_aligned_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = LocalStorage(tmp_path)
    writes: list[tuple[bool, int]] = []
    real_write = local.os.write

    def record(fd: int, data: bytes) -> int:
        writes.append((bool(local.fcntl.fcntl(fd, local.fcntl.F_GETFL) & local.O_DIRECT), len(data)))
        return real_write(fd, data)

    monkeypatch.setattr(local.os, "write", record)
    parts = [_patterned(n, i) for i, n in enumerate([5000, local.DIRECT_MIN, 0, local.DIRECT_ALIGN + 3, 17])]
    storage.put_parts("data/ab/ab0", [memoryview(p) for p in parts])
    size = sum(map(len, parts))
    assert storage.get("data/ab/ab0") == b"".join(parts)
    direct = sum(n for is_direct, n in writes if is_direct)
    assert direct == size - size % local.DIRECT_ALIGN and all(n % local.DIRECT_ALIGN == 0 for d, n in writes if d)
    assert sum(n for is_direct, n in writes if not is_direct) == size % local.DIRECT_ALIGN  # only the last block
