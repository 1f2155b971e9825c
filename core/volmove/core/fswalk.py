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
from collections.abc import Generator, Iterator
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
_S_IFMT = 0o170000  # stat.S_IFMT as a mask


@dataclass(slots=True)
class Item:
    """An entry plus what is needed to read its content (regular files only)."""

    entry: Entry
    dir_fd: int
    name: str
    st: os.stat_result


def entry_from_stat(path: str, st: os.stat_result) -> Entry:
    m = st.st_mode
    kind = _TYPES.get(m & _S_IFMT, FILE)
    return Entry(path, kind, m & 0o7777, st.st_uid, st.st_gid, st.st_mtime_ns,
                 st.st_size if m & _S_IFMT == stat.S_IFREG else 0, rdev=st.st_rdev, ino=st.st_ino,
                 ctime_ns=st.st_ctime_ns)  # plain bit operations: this runs once per file of every walk


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


def walk(root_fd: int, *, xattrs: bool = True, file_xattrs: bool = True) -> Generator[Item, None, None]:
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
    yield from _walk_tree(root_fd, types)


def _walk_tree(root_fd: int, xattrs: frozenset[str]) -> Generator[Item, None, None]:
    """``xattrs``: the entry types whose xattrs are read.  The directories being walked are a
    stack, not nested generators: each level of those costs every item below it a resume."""
    seen: dict[tuple[int, int], str] = {}
    stack: list[tuple[int, str, Iterator[str]]] = []  # the ancestors: descriptor, path prefix, names left
    dir_fd, prefix, names = root_fd, "", _names(root_fd)
    try:
        while True:
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
                    try:
                        fd = os.open(name, DIR_FLAGS, dir_fd=dir_fd)
                    except FileNotFoundError:
                        continue
                    stack.append((dir_fd, prefix, names))
                    parent_fd, dir_fd, prefix, names = dir_fd, fd, path + "/", iter(())  # `finally` closes fd now
                    if DIR in xattrs:
                        entry.xattrs = read_xattrs(fd, None)
                    yield Item(entry, parent_fd, name, st)
                    names = _names(fd)
                    break  # into it: the loop starts over on its names
                if entry.type in xattrs:
                    entry.xattrs = read_xattrs(dir_fd, name)
                yield Item(entry, dir_fd, name, st)
            else:  # this directory is done: back to its parent
                if not stack:
                    return
                os.close(dir_fd)
                dir_fd, prefix, names = stack.pop()
    finally:
        for fd in [dir_fd, *(s[0] for s in stack)]:
            if fd != root_fd:
                os.close(fd)


def _names(dir_fd: int) -> Iterator[str]:
    """A directory's names in walk order: sorted by their bytes."""
    try:
        return iter(sorted(os.listdir(dir_fd), key=os.fsencode))
    except FileNotFoundError:
        return iter(())  # removed while we walked


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
