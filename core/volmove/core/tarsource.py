"""Backing up through the archive endpoint of a remote Docker engine.

The engine streams a tar of the helper's /data; this module turns it into
catalog entries with their content for BackupEngine.run_stream.  The tar is
the engine's, so it is checked like any other input: names must stay inside
/data and hardlinks must point at earlier files.
"""

from __future__ import annotations

import os
import queue
import tarfile
import threading
from collections.abc import Iterator

from volmove.core.backup import SourceEntry
from volmove.core.catalog import (
    BLOCKDEV,
    CHARDEV,
    FILE,
    HARDLINK,
    ROOT,
    SYMLINK,
    Entry,
    check_path,
)
from volmove.core.errors import CorruptDataError, UnsafeDataError
from volmove.core.tarstream import TAR_TYPES

READ_PIECE = 4 << 20
# The inverse of what restores write; old-style regular files are files too.
_TYPES = {kind: entry_type for entry_type, kind in TAR_TYPES.items()} | {tarfile.AREGTYPE: FILE}
_XATTR = "SCHILY.xattr."


class Pipe:
    """Bytes handed from the event loop to the thread that parses them, bounded,
    and abortable from either side so neither waits forever for a dead peer."""

    def __init__(self, depth: int = 8) -> None:
        self._queue: queue.Queue[bytes | None] = queue.Queue(depth)
        self._buf = b""
        self.aborted = threading.Event()

    def put(self, chunk: bytes | None) -> None:
        """Blocking; None marks the end.  Returns quietly once the reader gave up."""
        while not self.aborted.is_set():
            try:
                self._queue.put(chunk, timeout=0.2)
                return
            except queue.Full:
                continue

    def read(self, n: int = -1) -> bytes:
        while (n < 0 or len(self._buf) < n) and not self.aborted.is_set():
            chunk = self._queue.get()
            if chunk is None:
                self.aborted.set()
                break
            self._buf += chunk
        out, self._buf = (self._buf, b"") if n < 0 else (self._buf[:n], self._buf[n:])
        return out


def tar_entries(stream: Pipe, root: str = "data") -> Iterator[SourceEntry]:
    """Entries of the tar of ``root`` in order, each file with an iterator over its bytes."""
    files: set[str] = set()
    try:
        with tarfile.open(fileobj=stream, mode="r|", errors="surrogateescape") as tar:  # type: ignore[call-overload]
            for member in tar:
                entry = to_entry(member, root, files)
                if entry is None:
                    continue
                yield entry, _content(tar, member) if entry.type == FILE else None
    except tarfile.TarError as exc:
        raise CorruptDataError(f"the engine's archive stream is malformed: {exc}") from None
    finally:
        stream.aborted.set()


def _content(tar: tarfile.TarFile, member: tarfile.TarInfo) -> Iterator[bytes]:
    reader = tar.extractfile(member)
    if reader is None:
        return
    while piece := reader.read(READ_PIECE):
        yield piece


def to_entry(member: tarfile.TarInfo, root: str, files: set[str]) -> Entry | None:
    path = _relative(member.name, root)
    kind = _TYPES.get(member.type)
    if kind is None:
        return None  # GNU extensions the engine never writes
    entry = Entry(path=path, type=kind, mode=member.mode & 0o7777, uid=member.uid, gid=member.gid,
                  mtime_ns=_mtime_ns(member))
    if kind in (SYMLINK, HARDLINK):
        entry.target = member.linkname if kind == SYMLINK else _relative(member.linkname, root)
        if kind == HARDLINK and entry.target not in files:
            raise UnsafeDataError(f"archive hardlink {path!r} points outside the volume's files")
    if kind in (CHARDEV, BLOCKDEV):
        entry.rdev = os.makedev(member.devmajor, member.devminor)
    if kind == FILE:
        entry.size = member.size
        files.add(path)
    entry.xattrs = {k[len(_XATTR):]: v.encode("utf-8", "surrogateescape")
                    for k, v in member.pax_headers.items() if k.startswith(_XATTR)}
    return entry


def _relative(name: str, root: str) -> str:
    name = name.rstrip("/")
    if name in (root, f"./{root}", "."):
        return ROOT
    for prefix in (f"{root}/", f"./{root}/"):
        if name.startswith(prefix):
            path = name[len(prefix):]
            check_path(path)
            return path
    raise UnsafeDataError(f"archive entry {name!r} lies outside {root}/")


def _mtime_ns(member: tarfile.TarInfo) -> int:
    """Exact nanoseconds from the PAX record when present (tarfile's float loses them)."""
    raw = member.pax_headers.get("mtime")
    if raw:
        sec, _, frac = raw.partition(".")
        try:
            return int(sec) * 1_000_000_000 + int((frac + "000000000")[:9] or 0) * (-1 if sec.startswith("-") else 1)
        except ValueError:
            pass
    return int(member.mtime) * 1_000_000_000
