"""Tar streams for Docker engines on other machines.

When the host cannot reach a helper's mount through /proc (a remote engine),
volumes are read and written through the engine's archive endpoint.  The tar
written here is PAX with nanosecond mtimes and xattrs; holes of sparse files
are sent as zeros (the engine's extractor cannot make holes).
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator

from volmove.core.catalog import (
    BLOCKDEV,
    CHARDEV,
    DIR,
    FIFO,
    FILE,
    HARDLINK,
    ROOT,
    SYMLINK,
    CatalogValidator,
    Entry,
    parse_entry,
)
from volmove.core.errors import UnsafeDataError
from volmove.core.repository import Repository
from volmove.core.snapshot import Snapshot

BLOCK = tarfile.BLOCKSIZE
_ZEROS = bytes(1 << 20)
TAR_TYPES = {FILE: tarfile.REGTYPE, DIR: tarfile.DIRTYPE, SYMLINK: tarfile.SYMTYPE, HARDLINK: tarfile.LNKTYPE,
              FIFO: tarfile.FIFOTYPE, CHARDEV: tarfile.CHRTYPE, BLOCKDEV: tarfile.BLKTYPE}


def snapshot_tar(repo: Repository, snap: Snapshot, *, allow_devices: bool = False) -> Iterator[bytes]:
    """The snapshot as a tar stream, entries validated exactly as for a local restore."""
    validator = CatalogValidator(allow_devices=allow_devices)
    for line in repo.read_catalog(snap):
        entry = parse_entry(line)
        validator.check(entry)
        if entry.type not in TAR_TYPES:
            continue  # sockets cannot travel in a tar; they are recreated by their server anyway
        yield header(entry)
        if entry.type == FILE:
            yield from _content(repo, entry)
            if entry.size % BLOCK:
                yield bytes(BLOCK - entry.size % BLOCK)
    yield bytes(2 * BLOCK)


def header(entry: Entry) -> bytes:
    info = tarfile.TarInfo("." if entry.path == ROOT else entry.path)
    info.type = TAR_TYPES[entry.type]
    info.mode, info.uid, info.gid = entry.mode, entry.uid, entry.gid
    info.size = entry.size if entry.type == FILE else 0
    info.mtime = entry.mtime_ns // 1_000_000_000
    info.linkname = entry.target or ""
    info.devmajor, info.devminor = entry.rdev >> 8 & 0xFFF, (entry.rdev & 0xFF) | (entry.rdev >> 12 & 0xFFF00)
    seconds, nanos = divmod(entry.mtime_ns, 1_000_000_000)
    info.pax_headers = {"mtime": f"{seconds}.{nanos:09d}"}
    for name, value in entry.xattrs.items():
        info.pax_headers[f"SCHILY.xattr.{name}"] = value.decode("utf-8", "surrogateescape")
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def _content(repo: Repository, entry: Entry) -> Iterator[bytes]:
    """File bytes in order: stored data at its extents, zeros in the holes."""
    extents = entry.extents if entry.extents is not None else [(0, entry.size)]
    blobs = (repo.read_blob(c) for c in entry.chunks)
    pos = 0
    pending = b""
    for off, length in extents:
        yield from _zeros(off - pos)
        need = length
        while need:
            if not pending:
                pending = next(blobs, b"")
                if not pending:
                    raise UnsafeDataError(f"file {entry.path!r} has less data than its catalog entry says")
            part, pending = pending[:need], pending[need:]
            need -= len(part)
            yield part
        pos = off + length
    if pending or next(blobs, None) is not None:
        raise UnsafeDataError(f"file {entry.path!r} has more data than its catalog entry says")
    yield from _zeros(entry.size - pos)


def _zeros(n: int) -> Iterator[bytes]:
    while n > 0:
        part = min(n, len(_ZEROS))
        yield _ZEROS[:part]
        n -= part
