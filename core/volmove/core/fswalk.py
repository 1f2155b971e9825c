"""Walk a directory tree through file descriptors, producing catalog entries.

Every component is opened relative to its parent's descriptor with
O_NOFOLLOW, so a symlink inside the tree is recorded, never followed — which
matters because the tree is reached through ``/proc/<pid>/root``, where an
absolute symlink would otherwise resolve on the host.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass

from volmove.core.catalog import (
    BLOCKDEV,
    CHARDEV,
    DIR,
    FIFO,
    FILE,
    HARDLINK,
    ROOT,
    SOCKET,
    SYMLINK,
    Entry,
)

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK

_TYPES = {
    stat.S_IFREG: FILE, stat.S_IFDIR: DIR, stat.S_IFLNK: SYMLINK, stat.S_IFIFO: FIFO,
    stat.S_IFCHR: CHARDEV, stat.S_IFBLK: BLOCKDEV, stat.S_IFSOCK: SOCKET,
}
_XATTR_TYPES = frozenset(_TYPES.values())


@dataclass(slots=True)
class Item:
    """An entry plus what is needed to read its content (regular files only)."""

    entry: Entry
    dir_fd: int
    name: str
    st: os.stat_result


def entry_from_stat(path: str, st: os.stat_result) -> Entry:
    return Entry(
        path=path, type=_TYPES.get(stat.S_IFMT(st.st_mode), FILE), mode=stat.S_IMODE(st.st_mode),
        uid=st.st_uid, gid=st.st_gid, mtime_ns=st.st_mtime_ns, size=st.st_size if stat.S_ISREG(st.st_mode) else 0,
        rdev=st.st_rdev, ino=st.st_ino, ctime_ns=st.st_ctime_ns,
    )


def read_xattrs(dir_fd: int, name: str | None) -> dict[str, bytes]:
    """xattrs of ``name`` in ``dir_fd`` (or of the directory itself), never following a symlink."""
    # A descriptor for the directory itself; for a child, a path whose last component is not followed.
    path: int | str = dir_fd if name is None else f"/proc/self/fd/{dir_fd}/{name}"
    follow = name is None
    try:
        names = os.listxattr(path, follow_symlinks=follow)
        return {n: os.getxattr(path, n, follow_symlinks=follow) for n in names}
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM, errno.ENODATA, errno.ENOENT):
            return {}
        raise


def read_fd_xattrs(fd: int) -> dict[str, bytes]:
    """xattrs of an open file: no path lookup, so cheaper than ``read_xattrs``."""
    try:
        return {n: os.getxattr(fd, n) for n in os.listxattr(fd)}
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM, errno.ENODATA):
            return {}
        raise


def walk(root_fd: int, *, xattrs: bool = True, file_xattrs: bool = True) -> Iterator[Item]:
    """Depth-first, children sorted by their byte names; hardlinked files after
    the first become HARDLINK entries pointing at the first path.

    ``file_xattrs=False`` leaves regular files' xattrs to a caller that opens
    them anyway and reads them through the descriptor."""
    types = (_XATTR_TYPES if file_xattrs else _XATTR_TYPES - {FILE}) if xattrs else frozenset()
    st = os.fstat(root_fd)
    root = entry_from_stat(ROOT, st)
    if DIR in types:
        root.xattrs = read_xattrs(root_fd, None)
    yield Item(root, root_fd, ".", st)
    seen: dict[tuple[int, int], str] = {}
    yield from _walk_dir(root_fd, "", seen, types)


def _walk_dir(dir_fd: int, prefix: str, seen: dict[tuple[int, int], str], xattrs: frozenset[str]) -> Iterator[Item]:
    """``xattrs``: the entry types whose xattrs are read."""
    try:
        names = sorted(os.listdir(dir_fd), key=os.fsencode)
    except FileNotFoundError:
        return  # removed while we walked
    for name in names:
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            continue
        path = prefix + name
        entry = entry_from_stat(path, st)
        if entry.type == FILE and st.st_nlink > 1:
            first = seen.setdefault((st.st_dev, st.st_ino), path)
            if first != path:
                entry.type, entry.target, entry.size = HARDLINK, first, 0
                yield Item(entry, dir_fd, name, st)
                continue
        if entry.type == SYMLINK:
            entry.target = os.readlink(name, dir_fd=dir_fd)
        if entry.type == DIR:
            yield from _walk_subdir(dir_fd, name, entry, st, seen, xattrs)
            continue
        if entry.type in xattrs:
            entry.xattrs = read_xattrs(dir_fd, name)
        yield Item(entry, dir_fd, name, st)


def _walk_subdir(dir_fd: int, name: str, entry: Entry, st: os.stat_result,
                 seen: dict[tuple[int, int], str], xattrs: frozenset[str]) -> Iterator[Item]:
    try:
        fd = os.open(name, DIR_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        return
    try:
        if DIR in xattrs:
            entry.xattrs = read_xattrs(fd, None)
        yield Item(entry, dir_fd, name, st)
        yield from _walk_dir(fd, entry.path + "/", seen, xattrs)
    finally:
        os.close(fd)


def data_extents(fd: int, size: int) -> list[tuple[int, int]] | None:
    """The data extents of a sparse file, or None when it has no holes."""
    extents: list[tuple[int, int]] = []
    pos = 0
    try:
        while pos < size:
            start = os.lseek(fd, pos, os.SEEK_DATA)
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            extents.append((start, end - start))
            pos = end
    except OSError as exc:
        if exc.errno != errno.ENXIO:  # ENXIO: no data after pos
            return None
    if extents == [(0, size)]:
        return None
    return extents


def tree_size(root_fd: int) -> tuple[int, int]:
    """Files and logical bytes under the tree, for progress totals."""
    files = total = 0
    for item in walk(root_fd, xattrs=False):
        if item.entry.type == FILE:
            files += 1
            total += item.entry.size
    return files, total
