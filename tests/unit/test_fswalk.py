"""The tree walk: its order, what it records, and that it holds no descriptor once done."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from volmove.core.catalog import DIR, FILE, HARDLINK, ROOT, SYMLINK
from volmove.core.fswalk import walk


def _tree(root: Path) -> None:
    for d in ("b", "a/y", "a/x/deep/er", "a-", "empty"):
        (root / d).mkdir(parents=True)
    for f in ("b/1", "a/y/2", "a/x/deep/er/3", "a/x/4", "a-/5", "z"):
        (root / f).write_bytes(f.encode())
    (root / "a/link").symlink_to("/etc")  # recorded, never followed
    os.link(root / "a/x/4", root / "b/4-again")


@contextmanager
def _opened(root: Path) -> Iterator[int]:
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield fd
    finally:
        os.close(fd)


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_depth_first_with_siblings_in_byte_order(tmp_path: Path) -> None:
    _tree(tmp_path)
    with _opened(tmp_path) as fd:
        items = [(i.entry.path, i.entry.type) for i in walk(fd)]
    assert items == [
        (ROOT, DIR), ("a", DIR), ("a/link", SYMLINK), ("a/x", DIR), ("a/x/4", FILE), ("a/x/deep", DIR),
        ("a/x/deep/er", DIR), ("a/x/deep/er/3", FILE), ("a/y", DIR), ("a/y/2", FILE), ("a-", DIR), ("a-/5", FILE),
        ("b", DIR), ("b/1", FILE), ("b/4-again", HARDLINK), ("empty", DIR), ("z", FILE),
    ]  # "a" < "a-" < "a/..." as bytes, but a directory's contents come right after it


def test_entries_carry_what_the_catalog_needs(tmp_path: Path) -> None:
    _tree(tmp_path)
    contents = {}
    with _opened(tmp_path) as fd:
        entries = {}
        for item in walk(fd):
            entries[item.entry.path] = item.entry
            if item.entry.type == FILE:  # named relative to its directory's descriptor, open while it is read
                file_fd = os.open(item.name, os.O_RDONLY, dir_fd=item.dir_fd)
                contents[item.entry.path] = os.read(file_fd, 100)
                os.close(file_fd)
    assert contents == {p: p.encode() for p in ("a/x/4", "a/x/deep/er/3", "a/y/2", "a-/5", "b/1", "z")}
    link, again, four = entries["a/link"], entries["b/4-again"], entries["a/x/4"]
    assert link.target == "/etc" and again.target == "a/x/4" and again.size == 0
    st = os.stat(tmp_path / "a/x/4")
    assert (four.size, four.mode, four.uid, four.ino, four.mtime_ns, four.ctime_ns) == (
        5, st.st_mode & 0o7777, st.st_uid, st.st_ino, st.st_mtime_ns, st.st_ctime_ns)


def test_no_descriptor_outlives_the_walk_finished_or_abandoned(tmp_path: Path) -> None:
    _tree(tmp_path)
    with _opened(tmp_path) as fd:
        before = _fds()
        assert len(list(walk(fd))) == 17
        assert _fds() == before
        items = walk(fd)
        for item in items:
            if item.entry.path == "a/x/deep/er":  # four directories deep
                break
        assert len(_fds() - before) == 4
        items.close()
        assert _fds() == before


def test_a_directory_removed_while_walking_is_left_out(tmp_path: Path) -> None:
    _tree(tmp_path)
    with _opened(tmp_path) as fd:
        paths = []
        for item in walk(fd):
            paths.append(item.entry.path)
            if item.entry.path == "a-/5":
                for name in ("1", "4-again"):
                    os.unlink(tmp_path / "b" / name)
                os.rmdir(tmp_path / "b")
    assert paths[-2:] == ["empty", "z"] and "b" not in paths
