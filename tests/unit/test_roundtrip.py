"""Backup then restore a directory tree exactly, on the local and memory backends."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.engine_helpers import backup_dir, new_repo, restore_dir, tree_state
from volmove.core.storage.local import LocalStorage
from volmove.core.storage.memory import MemoryStorage

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="restoring owners needs root")


def make_tree(root: Path) -> None:
    (root / "dir/sub/empty").mkdir(parents=True)
    (root / "dir/file.txt").write_text("hello\n")
    (root / "empty").write_bytes(b"")
    (root / "big.bin").write_bytes(os.urandom(3_000_000) + b"x" * 2_000_000)
    os.symlink("/etc/passwd", root / "abs-link")
    os.symlink("does/not/exist", root / "dir/dangling")
    os.link(root / "dir/file.txt", root / "hardlink")
    os.mkfifo(root / "fifo", 0o640)
    odd = os.fsencode(root) + b"/name-\xff\xfe-not-utf8"
    with open(odd, "wb") as f:
        f.write(b"odd")
    (root / ("l" * 255)).write_text("long name")
    setuid = root / "setuid"
    setuid.write_text("#!/bin/sh\n")
    os.chown(setuid, 1234, 5678)
    os.chmod(setuid, 0o4755)
    os.chmod(root / "dir/sub", 0o3777)  # setgid + sticky
    os.setxattr(root / "dir/file.txt", "user.note", b"\x00binary\xff")
    os.setxattr(root / "dir", "user.dirnote", b"d")
    with open(root / "sparse", "wb") as f:
        f.truncate(9 << 30)  # larger than 8 GiB, the ustar limit
        f.seek(1 << 30)
        f.write(b"middle")
    os.utime(root / "dir/sub/empty", ns=(1, 123_456_789_123_456_789))
    os.utime(root / "dir/sub", ns=(1, 1_000_000_001))


@pytest.mark.parametrize(("backend", "hash_name"), [("memory", "blake3"), ("local", "blake3"), ("local", "sha256")])
def test_round_trip_is_exact(tmp_path: Path, backend: str, hash_name: str) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    make_tree(src)
    storage = MemoryStorage() if backend == "memory" else LocalStorage(tmp_path / "repo", create=True)
    repo = new_repo(storage, hash_name)
    snap = backup_dir(repo, src)
    result = restore_dir(repo, snap, dst)
    assert result.warnings == []
    assert tree_state(dst) == tree_state(src)
    # Holes are kept: 9 GiB logical, a few KiB on disk.
    assert os.stat(dst / "sparse").st_blocks * 512 < 1 << 20


def test_second_backup_stores_little_and_skips_unchanged(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    data = bytearray(os.urandom(20 << 20))
    (src / "db").write_bytes(data)
    for i in range(50):
        (src / f"small{i}").write_bytes(os.urandom(1000))
    repo = new_repo(MemoryStorage())
    first = backup_dir(repo, src)
    with open(src / "db", "r+b") as f:
        for off in range(0, len(data), 4 << 20):
            f.seek(off + 12345)
            f.write(os.urandom(64 << 10))
    with open(src / "small3", "ab") as f:
        f.write(b"appended")
    second = backup_dir(repo, src, parent=first)
    assert second.stats.skipped_files == 49
    assert second.stats.new_bytes < 0.2 * first.stats.new_bytes
    dst = tmp_path / "dst"
    restore_dir(repo, second, dst)
    assert tree_state(dst) == tree_state(src)


def test_identical_content_deduplicates_across_paths(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    blob = os.urandom(5 << 20)
    (src / "a").write_bytes(blob)
    (src / "b").write_bytes(blob)
    repo = new_repo(MemoryStorage())
    snap = backup_dir(repo, src)
    assert snap.stats.new_bytes == len(blob)
    assert snap.stats.bytes == 2 * len(blob)


def test_compare_tree_finds_differences(tmp_path: Path) -> None:
    from volmove.core.verify import compare_tree, verify

    src = tmp_path / "src"
    src.mkdir()
    make_tree(src)
    repo = new_repo(MemoryStorage())
    snap = backup_dir(repo, src)
    fd = os.open(src, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert compare_tree(repo, snap, fd).ok
        (src / "dir/file.txt").write_text("changed\n")
        os.chmod(src / "empty", 0o600)
        report = compare_tree(repo, snap, fd)
    finally:
        os.close(fd)
    joined = "\n".join(report.differences)
    assert "dir/file.txt: " in joined and "content_hash differs" in joined
    assert "empty: mode differs" in joined
    assert verify(repo, [snap], read_data=True).ok
