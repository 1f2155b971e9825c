"""The restore data path: write a snapshot into a directory, safely.

The catalog is hostile input.  Every entry is validated before use, every
blob is checked against its hash, and every file-system call is made
relative to a directory descriptor with O_NOFOLLOW, so nothing is written,
created or chmod-ed through a symlink — neither one from the snapshot nor
one planted in the target beforehand.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from volmove.core.catalog import (
    BLOCKDEV,
    CHARDEV,
    DEVICES,
    DIR,
    FIFO,
    FILE,
    HARDLINK,
    ROOT,
    SOCKET,
    SYMLINK,
    CatalogValidator,
    Entry,
    parent_of,
    parse_entry,
)
from volmove.core.errors import CancelledByUser, ConflictError, CorruptDataError, StorageError
from volmove.core.fswalk import DIR_FLAGS
from volmove.core.progress import Progress, ProgressFn, no_progress
from volmove.core.repository import Repository, check_blob
from volmove.core.snapshot import Snapshot

WINDOW_CHUNKS = 48
PACK_CACHE = 4
CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_NODE_TYPES = {FIFO: stat.S_IFIFO, SOCKET: stat.S_IFSOCK, CHARDEV: stat.S_IFCHR, BLOCKDEV: stat.S_IFBLK}


@dataclass
class RestoreResult:
    files: int = 0
    dirs: int = 0
    other: int = 0
    bytes: int = 0
    warnings: list[str] = field(default_factory=list)


class BlobFetcher:
    """Fetches checked blobs; whole packs are cached when the backend prefers
    few large reads (S3), ranged reads are used otherwise (local files)."""

    def __init__(self, repo: Repository, *, whole_packs: bool) -> None:
        self.repo = repo
        self.whole_packs = whole_packs
        self._packs: OrderedDict[str, Future[bytes]] = OrderedDict()
        self._lock = threading.Lock()
        self._loader = ThreadPoolExecutor(2, thread_name_prefix="pack-fetch")

    def get(self, bid: str) -> bytes:
        ref = self.repo.index.get(bid)
        if ref is None:
            raise CorruptDataError(f"blob {bid} is not in any index (missing data)")
        if not self.whole_packs:
            return self.repo.read_blob(bid)
        pack = self._pack(ref.pack).result()
        raw = memoryview(pack)[ref.offset : ref.offset + ref.length]
        if len(raw) != ref.length:
            raise CorruptDataError(f"pack {ref.pack} is truncated")
        return check_blob(bid, ref, raw)

    def _pack(self, pack_id: str) -> Future[bytes]:
        with self._lock:
            fut = self._packs.get(pack_id)
            if fut is None:
                fut = self._loader.submit(self.repo.read_pack, pack_id)
                self._packs[pack_id] = fut
                while len(self._packs) > PACK_CACHE:
                    self._packs.popitem(last=False)
            else:
                self._packs.move_to_end(pack_id)
            return fut

    def close(self) -> None:
        self._loader.shutdown(wait=True, cancel_futures=True)


class Restorer:
    def __init__(self, repo: Repository, root_fd: int, *, allow_devices: bool = False,
                 progress: ProgressFn = no_progress, cancel: threading.Event | None = None,
                 workers: int = 3) -> None:
        self.repo = repo
        self.root_fd = root_fd
        self.validator = CatalogValidator(allow_devices=allow_devices)
        self.report = progress
        self.cancel = cancel or threading.Event()
        self.fetcher = BlobFetcher(repo, whole_packs=getattr(repo.storage, "prefers_whole_objects", False))
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="restore")
        self.result = RestoreResult()
        self.progress = Progress("restore")
        self.dirs: list[tuple[str, int, Entry]] = []  # open directory stack: path, fd, entry
        self._last_report = 0.0

    def run(self, snapshot: Snapshot) -> RestoreResult:
        self.progress.bytes_total = snapshot.stats.bytes
        self.progress.files_total = snapshot.stats.files
        try:
            self._restore_all(parse_entry(line) for line in self.repo.read_catalog(snapshot))
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.fetcher.close()
            self._close_dirs(apply=False)
        self.progress.phase = "done"
        self.report(self.progress)
        return self.result

    def _restore_all(self, entries: Iterable[Entry]) -> None:
        pending: deque[tuple[Entry, list[Future[bytes]]]] = deque()
        in_flight = 0
        for entry in entries:
            if self.cancel.is_set():
                raise CancelledByUser("restore cancelled")
            self.validator.check(entry)
            futures = [self.pool.submit(self.fetcher.get, c) for c in entry.chunks] if entry.type == FILE else []
            pending.append((entry, futures))
            in_flight += len(futures)
            while pending and (in_flight > WINDOW_CHUNKS or not pending[0][1]):
                done_entry, done_futures = pending.popleft()
                in_flight -= len(done_futures)
                self._apply(done_entry, done_futures)
        while pending:
            self._apply(*pending.popleft())
        self._close_dirs(apply=True)

    def _apply(self, entry: Entry, futures: list[Future[bytes]]) -> None:
        try:
            self._apply_entry(entry, futures)
        except OSError as exc:
            raise _os_error(exc, entry.path) from None

    def _apply_entry(self, entry: Entry, futures: list[Future[bytes]]) -> None:
        if entry.path == ROOT:
            self.dirs = [(ROOT, os.dup(self.root_fd), entry)]
            self.result.dirs += 1
            return
        parent_fd = self._parent_fd(parent_of(entry.path))
        name = entry.path.rsplit("/", 1)[-1]
        if entry.type == DIR:
            self._make_dir(parent_fd, name, entry)
        elif entry.type == FILE:
            self._write_file(parent_fd, name, entry, futures)
        elif entry.type == SYMLINK:
            self._make_symlink(parent_fd, name, entry)
        elif entry.type == HARDLINK:
            self._make_hardlink(parent_fd, name, entry)
        else:
            self._make_node(parent_fd, name, entry)

    # -- directories ---------------------------------------------------------

    def _parent_fd(self, path: str) -> int:
        """The open descriptor of ``path``, closing directories we have left
        (applying their metadata: their mtimes are final once their children are written)."""
        while self.dirs and not _is_within(path, self.dirs[-1][0]):
            self._pop_dir(apply=True)
        if not self.dirs:
            raise CorruptDataError("snapshot catalog does not start with its root directory")
        top_path, top_fd, _ = self.dirs[-1]
        if top_path == path:
            return top_fd
        # An out-of-order (forged) catalog: reopen the path component by component without following links.
        fd = os.dup(top_fd)
        rest = path[len(top_path) + 1 :] if top_path != ROOT else path
        for part in rest.split("/"):
            nfd = os.open(part, DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nfd
        self.dirs.append((path, fd, Entry(path, DIR)))
        return fd

    def _make_dir(self, parent_fd: int, name: str, entry: Entry) -> None:
        try:
            os.mkdir(name, 0o700, dir_fd=parent_fd)
        except FileExistsError:
            st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode):
                _clear(parent_fd, name)
                os.mkdir(name, 0o700, dir_fd=parent_fd)
        fd = os.open(name, DIR_FLAGS, dir_fd=parent_fd)
        self.dirs.append((entry.path, fd, entry))
        self.result.dirs += 1

    def _pop_dir(self, *, apply: bool) -> None:
        _path, fd, entry = self.dirs.pop()
        try:
            if apply and entry.mtime_ns:
                self._set_meta_fd(fd, entry)
        finally:
            os.close(fd)

    def _close_dirs(self, *, apply: bool) -> None:
        while self.dirs:
            self._pop_dir(apply=apply)

    # -- files ---------------------------------------------------------------

    def _write_file(self, parent_fd: int, name: str, entry: Entry, futures: list[Future[bytes]]) -> None:
        _clear(parent_fd, name)
        fd = os.open(name, CREATE_FLAGS, 0o600, dir_fd=parent_fd)
        try:
            if entry.extents is None:
                self._write_sequential(fd, entry, futures)
            else:
                self._write_extents(fd, entry, futures)
            os.ftruncate(fd, entry.size)
            self._set_meta_fd(fd, entry)
        finally:
            os.close(fd)
        self.result.files += 1
        self.result.bytes += entry.size
        self.progress.files_done += 1

    def _write_sequential(self, fd: int, entry: Entry, futures: list[Future[bytes]]) -> None:
        written = 0
        for fut in futures:
            data = fut.result()
            _write_all(fd, data, None)
            written += len(data)
            self._advance(len(data))
        if written != entry.size:
            raise CorruptDataError(f"file {entry.path!r}: chunks hold {written} bytes, catalog says {entry.size}")

    def _write_extents(self, fd: int, entry: Entry, futures: list[Future[bytes]]) -> None:
        cursor = _ExtentCursor(entry.extents or [], entry.path)
        for fut in futures:
            data = fut.result()
            for pos, part in cursor.place(memoryview(data)):
                _write_all(fd, part, pos)
            self._advance(len(data))
        cursor.check_done()

    def _set_meta_fd(self, fd: int, entry: Entry) -> None:
        os.fchown(fd, entry.uid, entry.gid)
        os.fchmod(fd, entry.mode)  # after chown, which clears setuid/setgid
        for xname, value in entry.xattrs.items():
            self._set_xattr(fd, xname, value, entry.path)
        os.utime(fd, ns=(entry.mtime_ns, entry.mtime_ns))

    def _set_xattr(self, path: int | str, xname: str, value: bytes, what: str) -> None:
        try:
            # A descriptor, or a /proc/self/fd/<dir>/<name> path whose last component is not followed.
            os.setxattr(path, xname, value, follow_symlinks=isinstance(path, int))
        except OSError as exc:
            if exc.errno not in (errno.ENOTSUP, errno.EPERM, errno.EOPNOTSUPP):
                raise
            self.result.warnings.append(f"{what}: xattr {xname} not supported by the target")

    # -- links and nodes -----------------------------------------------------

    def _make_symlink(self, parent_fd: int, name: str, entry: Entry) -> None:
        _clear(parent_fd, name)
        os.symlink(entry.target or "", name, dir_fd=parent_fd)
        os.chown(name, entry.uid, entry.gid, dir_fd=parent_fd, follow_symlinks=False)
        for xname, value in entry.xattrs.items():
            self._set_xattr(f"/proc/self/fd/{parent_fd}/{name}", xname, value, entry.path)
        os.utime(name, ns=(entry.mtime_ns, entry.mtime_ns), dir_fd=parent_fd, follow_symlinks=False)
        self.result.other += 1

    def _make_hardlink(self, parent_fd: int, name: str, entry: Entry) -> None:
        target = entry.target or ""
        src_fd = self._open_dir_nofollow(parent_of(target))
        try:
            _clear(parent_fd, name)
            os.link(target.rsplit("/", 1)[-1], name, src_dir_fd=src_fd, dst_dir_fd=parent_fd,
                    follow_symlinks=False)
        finally:
            os.close(src_fd)
        self.result.other += 1

    def _open_dir_nofollow(self, path: str) -> int:
        fd = os.dup(self.root_fd)
        if path == ROOT:
            return fd
        for part in path.split("/"):
            nfd = os.open(part, DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nfd
        return fd

    def _make_node(self, parent_fd: int, name: str, entry: Entry) -> None:
        _clear(parent_fd, name)
        rdev = entry.rdev if entry.type in DEVICES else 0
        os.mknod(name, _NODE_TYPES[entry.type] | 0o600, rdev, dir_fd=parent_fd)
        if entry.type == FIFO:
            # Opening a FIFO non-blocking for reading gives a descriptor to set metadata on, race-free.
            fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW, dir_fd=parent_fd)
            try:
                self._set_meta_fd(fd, entry)
            finally:
                os.close(fd)
        else:
            os.chown(name, entry.uid, entry.gid, dir_fd=parent_fd, follow_symlinks=False)
            os.chmod(name, entry.mode, dir_fd=parent_fd)
            os.utime(name, ns=(entry.mtime_ns, entry.mtime_ns), dir_fd=parent_fd, follow_symlinks=False)
        self.result.other += 1

    def _advance(self, nbytes: int) -> None:
        self.progress.bytes_done += nbytes
        now = time.monotonic()
        if now - self._last_report >= 0.2:
            self._last_report = now
            self.report(self.progress)


def _is_within(path: str, dir_path: str) -> bool:
    return dir_path == ROOT or path == dir_path or path.startswith(dir_path + "/")


def _clear(parent_fd: int, name: str) -> None:
    """Remove whatever is at ``name`` (a file, a planted symlink, a directory) without following it."""
    try:
        st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(name, dir_fd=parent_fd)
    else:
        os.unlink(name, dir_fd=parent_fd)


def _write_all(fd: int, data: bytes | memoryview, pos: int | None) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view) if pos is None else os.pwrite(fd, view, pos)
        view = view[n:]
        if pos is not None:
            pos += n


class _ExtentCursor:
    """Places a sparse file's content stream at its data extents' offsets."""

    def __init__(self, extents: list[tuple[int, int]], path: str) -> None:
        self.extents = [e for e in extents if e[1]]
        self.path = path
        self.index = 0
        self.used = 0

    def place(self, data: memoryview) -> Iterator[tuple[int, memoryview]]:
        while data:
            if self.index >= len(self.extents):
                raise CorruptDataError(f"file {self.path!r} has more data than its extents")
            off, length = self.extents[self.index]
            part = data[: length - self.used]
            yield off + self.used, part
            self.used += len(part)
            data = data[len(part) :]
            if self.used == length:
                self.index, self.used = self.index + 1, 0

    def check_done(self) -> None:
        if self.index != len(self.extents):
            raise CorruptDataError(f"file {self.path!r} has less data than its extents")


def _os_error(exc: OSError, path: str) -> Exception:
    if exc.errno == errno.ENOSPC:
        return StorageError(f"no space left on the target volume while restoring {path!r}")
    if exc.errno == errno.EDQUOT:
        return StorageError(f"disk quota exceeded while restoring {path!r}")
    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
        return ConflictError(f"refusing to follow a symlink in the target at {path!r}")
    return StorageError(f"cannot restore {path!r}: {exc.strerror}")


def target_is_empty(root_fd: int) -> bool:
    return not os.listdir(root_fd)
