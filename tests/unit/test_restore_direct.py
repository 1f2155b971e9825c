"""Large files are restored past the page cache: exactly, whatever their size, and through
the cache where the target refuses direct writes."""

from __future__ import annotations

import errno
import os
import random
import shutil
from pathlib import Path

import pytest

from tests.engine_helpers import backup_dir, new_repo, restore_dir
from volmove.core import restore
from volmove.core.storage.memory import MemoryStorage

MIB = 1 << 20
SIZES = [MIB, MIB + 1, 4 * MIB - 1, 4 * MIB, 4 * MIB + 1, 12 * MIB + 4095, 13 * MIB + 4096]


def make_files(src: Path) -> dict[str, bytes]:
    rng = random.Random(5)
    files = {f"f{size}": rng.randbytes(size) for size in SIZES}
    files["text"] = b"".join(b"line %d of a log\\n" % i for i in range(400_000))  # compressible, 7 MB
    src.mkdir()
    for name, data in files.items():
        (src / name).write_bytes(data)
    return files


def round_trip(tmp_path: Path, dst: Path) -> None:
    files = make_files(tmp_path / "src")
    repo = new_repo(MemoryStorage())
    snap = backup_dir(repo, tmp_path / "src")
    result = restore_dir(repo, snap, dst)
    assert result.files == len(files)
    for name, data in files.items():
        assert (dst / name).read_bytes() == data, name
        assert (dst / name).stat().st_size == len(data)


@pytest.mark.parametrize("where", ["disk", "tmpfs"])
def test_large_files_restore_exactly(tmp_path: Path, where: str) -> None:
    dst = tmp_path / "dst" if where == "disk" else Path("/dev/shm") / f"{tmp_path.name}-dst"
    try:
        round_trip(tmp_path, dst)
    finally:
        if where == "tmpfs":
            shutil.rmtree(dst, ignore_errors=True)


def test_direct_writes_are_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    direct_writes = []
    real = os.pwrite

    def spy(fd: int, data: bytes, offset: int) -> int:
        if restore.fcntl.fcntl(fd, restore.fcntl.F_GETFL) & restore.O_DIRECT:
            direct_writes.append((offset, len(data)))
        return real(fd, data, offset)

    monkeypatch.setattr(restore.os, "pwrite", spy)
    round_trip(tmp_path, tmp_path / "dst")
    assert direct_writes, "no direct write happened"
    assert all(off % restore.DIRECT_ALIGN == 0 and n % restore.DIRECT_ALIGN == 0 for off, n in direct_writes)


def test_a_target_refusing_o_direct_is_written_through_the_cache(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    real = restore.fcntl.fcntl

    def refuse(fd: int, cmd: int, arg: int = 0) -> int:
        if cmd == restore.fcntl.F_SETFL and arg & restore.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, cmd, arg)

    monkeypatch.setattr(restore.fcntl, "fcntl", refuse)
    round_trip(tmp_path, tmp_path / "dst")


def test_stricter_alignment_falls_back_mid_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """EINVAL from a direct write (a block size above 4 KiB, say): rewritten through the cache."""
    real = os.pwrite
    refused = []

    def strict(fd: int, data: bytes, offset: int) -> int:
        if restore.fcntl.fcntl(fd, restore.fcntl.F_GETFL) & restore.O_DIRECT and len(data) % (64 << 10):
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)

    monkeypatch.setattr(restore.os, "pwrite", strict)
    round_trip(tmp_path, tmp_path / "dst")
    assert refused


def test_a_failing_write_fails_the_restore(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.pwrite

    def full(fd: int, data: bytes, offset: int) -> int:
        if offset >= 8 * MIB:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(restore.os, "pwrite", full)
    with pytest.raises(restore.StorageError, match="no space left"):
        round_trip(tmp_path, tmp_path / "dst")
