"""A local-directory backend, the embedded default.

Writes go to a temp file in the destination folder, are fsynced and renamed
into place, so a crash leaves either the whole object or a temp file that
``cleanup_incomplete`` removes.  ``os.link`` gives write-once semantics
without a check-then-rename race.

Packs are the bulk of a backup's writes and nothing names them until an
index does, so they are not fsynced one by one (a flush of the disk per 8 MiB
cost a third of a backup's time here): the first write of any other object
syncs the repository's filesystem once, which makes every pack written
before it durable before anything can refer to it.

Packs bypass the page cache (O_DIRECT, where the filesystem allows it): a backup
should not push the host's working set out of memory for data nobody reads back
soon, and copying into newly allocated cache pages was an eighth of a full
backup's CPU time here.  Only the last partial block of a pack is buffered.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from volmove.core.errors import (
    ConflictError,
    CorruptDataError,
    NotFoundError,
    RepositoryError,
    StorageError,
)
from volmove.core.files import DIRECT_ALIGN, O_DIRECT, write_all
from volmove.core.procs import pid_exists
from volmove.core.storage.base import ObjectInfo

TMP_PREFIX = ".tmp-"
DEFERRED_PREFIX = "data/"  # packs: durable at the next write of anything else
DIRECT_MIN = 1 << 20  # smaller objects are not worth a direct write


def _storage_error(exc: OSError, what: str) -> StorageError:
    if exc.errno == errno.ENOSPC:
        return StorageError(f"no space left on device while writing {what}")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return StorageError(f"permission denied: {what}")
    return StorageError(f"{what}: {exc.strerror or exc}")


class LocalStorage:
    prefers_whole_objects = False

    def __init__(self, root: str | Path, *, create: bool = False) -> None:
        self.root = Path(root).absolute()
        self.url = f"file://{self.root}"
        if create:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise _storage_error(exc, str(self.root)) from None
        elif not self.root.is_dir():
            raise RepositoryError(f"repository directory {self.root} does not exist (run 'volmove init')")
        self._host = socket.gethostname()
        self._unsynced = False
        self._sync_lock = threading.Lock()
        self._direct = bool(O_DIRECT)  # until the filesystem refuses it
        self._buffers = threading.local()  # an aligned staging buffer per writing thread
        self._advised: set[str] = set()  # objects whose read-ahead was requested

    def _path(self, key: str) -> Path:
        if key.startswith("/") or ".." in key.split("/") or "\0" in key:
            raise CorruptDataError(f"invalid object key {key!r}")
        return self.root / key

    def put(self, key: str, data: bytes, *, overwrite: bool = False) -> None:
        self.put_parts(key, [data], overwrite=overwrite)

    def put_parts(self, key: str, parts: Sequence[bytes | memoryview], *, overwrite: bool = False) -> None:
        path = self._path(key)
        deferred = key.startswith(DEFERRED_PREFIX)
        if not deferred:
            self.sync()  # whatever this object names must be on disk before it is
        tmp = path.parent / f"{TMP_PREFIX}{self._host}-{os.getpid()}-{time.monotonic_ns()}"
        size = sum(len(p) for p in parts)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                if not (deferred and size >= DIRECT_MIN and self._write_direct(fd, parts, size)):
                    for part in parts:
                        write_all(fd, part)
                if deferred:
                    _start_writeback(fd)  # so that the sync at the end has little left to wait for
                    self._unsynced = True
                else:
                    os.fsync(fd)
            finally:
                os.close(fd)
            if overwrite:
                os.replace(tmp, path)
            else:
                self._link_once(tmp, path, key)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise _storage_error(exc, f"object {key}") from None

    def _write_direct(self, fd: int, parts: Sequence[bytes | memoryview], size: int) -> bool:
        """Write the ``size`` bytes of ``parts`` at the start of the empty file ``fd`` bypassing the
        page cache, all but the last partial block; False (nothing written) where the filesystem
        does not allow it.  The parts are copied into the aligned buffer directly: joining them
        first would copy every byte twice, with the GIL held."""
        if not self._direct:
            return False
        aligned = size - size % DIRECT_ALIGN
        buf = self._staging(aligned)
        pos, tail = 0, []
        for part in parts:
            n = min(len(part), aligned - pos)
            if n > 0:
                buf[pos : pos + n] = memoryview(part)[:n]
                pos += n
            if n < len(part):
                tail.append(memoryview(part)[n:])
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        try:
            fcntl.fcntl(fd, fcntl.F_SETFL, flags | O_DIRECT)
            write_all(fd, memoryview(buf)[:aligned])
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self._direct = False  # e.g. tmpfs, or alignment rules stricter than ours
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            return False
        finally:
            fcntl.fcntl(fd, fcntl.F_SETFL, flags)
        for rest in tail:
            write_all(fd, rest)
        return True

    def _staging(self, size: int) -> mmap.mmap:
        buf: mmap.mmap | None = getattr(self._buffers, "buf", None)
        if buf is None or len(buf) < size:
            # Page-aligned, and reused: its pages stay mapped, unlike a fresh bytes object's.
            buf = self._buffers.buf = mmap.mmap(-1, max(size, 16 << 20))
        return buf

    def sync(self) -> None:
        """Make every object written so far durable (one sync of the filesystem)."""
        with self._sync_lock:
            if not self._unsynced:
                return
            try:
                _syncfs(self.root)
            except OSError as exc:
                raise _storage_error(exc, f"syncing {self.root}") from None
            self._unsynced = False

    def _link_once(self, tmp: Path, path: Path, key: str) -> None:
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise ConflictError(f"object {key} already exists") from None
        finally:
            tmp.unlink(missing_ok=True)

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise NotFoundError(f"object {key} not found in {self.url}") from None
        except OSError as exc:
            raise _storage_error(exc, f"object {key}") from None

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        path = self._path(key)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)  # not open(): a restore calls this per blob
            try:
                self._read_ahead(key, fd)
                data = os.pread(fd, length, offset)
            finally:
                os.close(fd)
        except FileNotFoundError:
            raise NotFoundError(f"object {key} not found in {self.url}") from None
        except OSError as exc:
            raise _storage_error(exc, f"object {key}") from None
        if len(data) != length:
            raise CorruptDataError(f"object {key} is shorter than expected")
        return data

    def _read_ahead(self, key: str, fd: int) -> None:
        """On the first ranged read of an object, ask for all of it: a restore reads a pack's
        blobs in turn, each through a new descriptor (so without the kernel's sequential
        read-ahead), and packs were written past the page cache."""
        if key in self._advised:
            return
        if len(self._advised) >= 4096:
            self._advised.clear()
        self._advised.add(key)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def stat(self, key: str) -> ObjectInfo:
        try:
            st = self._path(key).stat()
        except FileNotFoundError:
            raise NotFoundError(f"object {key} not found in {self.url}") from None
        return ObjectInfo(key, st.st_size, st.st_mtime)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        # Walk only the folder the prefix names, so listing snapshots/ does not read data/.
        base, _, _ = prefix.rpartition("/")
        start = self.root / base if base else self.root
        for dirpath, _dirs, files in os.walk(start):
            rel = os.path.relpath(dirpath, self.root)
            for name in files:
                if name.startswith(TMP_PREFIX):
                    continue
                key = name if rel == "." else f"{rel}/{name}"
                if key.startswith(prefix):
                    try:
                        st = os.stat(os.path.join(dirpath, name))
                    except FileNotFoundError:
                        continue
                    yield ObjectInfo(key, st.st_size, st.st_mtime)

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink(missing_ok=True)
        except OSError as exc:
            raise _storage_error(exc, f"object {key}") from None

    def cleanup_incomplete(self, older_than: float) -> int:
        """Remove temp files of dead writers on this host, or older than ``older_than``."""
        removed = 0
        now = time.time()
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                if name.startswith(TMP_PREFIX) and self._stale(os.path.join(dirpath, name), name, now, older_than):
                    Path(dirpath, name).unlink(missing_ok=True)
                    removed += 1
        return removed

    def _stale(self, path: str, name: str, now: float, older_than: float) -> bool:
        parts = name[len(TMP_PREFIX) :].rsplit("-", 2)
        if len(parts) == 3 and parts[0] == self._host and parts[1].isdigit() and not pid_exists(int(parts[1])):
            return True
        try:
            return now - os.stat(path).st_mtime > older_than
        except FileNotFoundError:
            return False

    def close(self) -> None:
        pass


_LIBC = ctypes.CDLL(None, use_errno=True)
_SYNC_FILE_RANGE_WRITE = 2


def _start_writeback(fd: int) -> None:
    """Ask the kernel to start writing the file out now, without waiting (Linux)."""
    fn = getattr(_LIBC, "sync_file_range", None)
    if fn is not None:
        fn(fd, ctypes.c_int64(0), ctypes.c_int64(0), _SYNC_FILE_RANGE_WRITE)  # advisory: errors are moot


def _syncfs(root: Path) -> None:
    """syncfs(2) on the filesystem holding ``root``; sync(2) where libc lacks it."""
    fn = getattr(_LIBC, "syncfs", None)
    if fn is None:
        os.sync()
        return
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if fn(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    finally:
        os.close(fd)
