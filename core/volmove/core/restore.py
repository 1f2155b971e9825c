"""The restore data path: write a snapshot into a directory, safely.

The catalog is hostile input.  Every entry is validated before use, every
blob's sizes are bounded before it is inflated and its content is checked
against its hash, and every file-system call is made relative to a directory
descriptor with O_NOFOLLOW, so nothing is written, created or chmod-ed
through a symlink — neither one from the snapshot nor one planted in the
target beforehand.

One thread writes, because a restore of many small files is mostly
syscalls, and Python threads making syscalls queue for the GIL after each
one.  Packs are read in segments (one read serves many small blobs), small
blobs are checked by the writer itself, and large ones by a pool running
ahead of the writer within a byte budget.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import zstandard

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
from volmove.core.errors import CancelledByUser, ConflictError, CorruptDataError, NotFoundError, StorageError
from volmove.core.format import BlobRef, blob_id, pack_key
from volmove.core.fswalk import DIR_FLAGS
from volmove.core.progress import Progress, ProgressFn, no_progress
from volmove.core.repository import Repository
from volmove.core.snapshot import Snapshot

BUDGET_BYTES = 32 << 20  # raw bytes of large chunks decoded ahead of the writer
AHEAD_ENTRIES = 1024  # catalog entries validated ahead of the writer
INLINE_MAX = 64 << 10  # chunks up to this raw size are checked by the writer itself
CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_NODE_TYPES = {FIFO: stat.S_IFIFO, SOCKET: stat.S_IFSOCK, CHARDEV: stat.S_IFCHR, BLOCKDEV: stat.S_IFBLK}


@dataclass
class RestoreResult:
    files: int = 0
    dirs: int = 0
    other: int = 0
    bytes: int = 0
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ReadLayout:
    """How packs are read: ``segment`` bytes at a time, blobs of ``alone`` bytes
    or more on their own; ``cache`` segments kept, ``ahead`` of them loaded
    before the writer needs them."""

    segment: int
    alone: int
    cache: int
    ahead: int


LOCAL_LAYOUT = ReadLayout(segment=1 << 20, alone=64 << 10, cache=8, ahead=4)
WHOLE_LAYOUT = ReadLayout(segment=16 << 20, alone=16 << 20, cache=4, ahead=2)  # S3: one request per pack
SegmentKey = tuple[str, int]
T = TypeVar("T")


class _Decoders(threading.local):
    def __init__(self) -> None:
        self.dctx = zstandard.ZstdDecompressor()  # reused: creating one costs more than inflating a small blob


class BlobFetcher:
    """Reads, bounds and checks blobs.  ``reserve``/``release`` run in the
    writer's thread; ``get`` in any thread."""

    def __init__(self, repo: Repository, layout: ReadLayout) -> None:
        self.repo = repo
        self.layout = layout
        self.max_raw = repo.config.chunker.max_size
        self._segments: OrderedDict[SegmentKey, Future[bytes]] = OrderedDict()
        self._users: dict[SegmentKey, int] = {}  # reserved blobs per segment: never evicted while used
        self._sizes: dict[str, int] = {}
        self._lock = threading.Lock()
        self._loader = ThreadPoolExecutor(2, thread_name_prefix="pack-read")
        self._decoders = _Decoders()

    @property
    def segments_in_use(self) -> int:
        return len(self._users)

    def locate(self, bid: str) -> BlobRef:
        """The blob's place, refused if its sizes are impossible: they size allocations."""
        ref = self.repo.index.get(bid)
        if ref is None:
            raise CorruptDataError(f"blob {bid} is not in any index (missing data)")
        if not 0 < ref.raw_length <= self.max_raw or ref.length > ref.raw_length + (ref.raw_length >> 7) + 1024:
            raise CorruptDataError(f"blob {bid} in pack {ref.pack} has impossible sizes "
                                   f"({ref.length} stored, {ref.raw_length} raw)")
        return ref

    def reserve(self, bid: str) -> BlobRef:
        """Locate a blob and start loading its segment."""
        ref = self.locate(bid)
        key = self._segment_key(ref)
        if key is not None:
            with self._lock:
                self._users[key] = self._users.get(key, 0) + 1
                self._segment(key, bid)
        return ref

    def release(self, ref: BlobRef) -> None:
        key = self._segment_key(ref)
        if key is None:
            return
        with self._lock:
            left = self._users.pop(key) - 1
            if left:
                self._users[key] = left
            else:
                self._evict()

    def get(self, bid: str, ref: BlobRef) -> bytes:
        return self._decode(bid, ref, self._raw(bid, ref))

    def _segment_key(self, ref: BlobRef) -> SegmentKey | None:
        seg = self.layout.segment
        index = ref.offset // seg
        if ref.length >= self.layout.alone or ref.offset + ref.length > (index + 1) * seg:
            return None
        return ref.pack, index

    def _raw(self, bid: str, ref: BlobRef) -> bytes | memoryview:
        key = self._segment_key(ref)
        if key is None:
            return self._read(bid, ref.pack, ref.offset, ref.length)
        with self._lock:
            fut = self._segment(key, bid)
        start = ref.offset - key[1] * self.layout.segment
        raw = memoryview(fut.result())[start : start + ref.length]
        if len(raw) != ref.length:
            raise CorruptDataError(f"pack {ref.pack} is truncated: blob {bid} lies past its end")
        return raw

    def _segment(self, key: SegmentKey, bid: str) -> Future[bytes]:
        fut = self._segments.get(key)
        if fut is None:
            fut = self._loader.submit(self._load, key, bid)
            self._segments[key] = fut
            self._evict()
        else:
            self._segments.move_to_end(key)
        return fut

    def _evict(self) -> None:
        excess = len(self._segments) - self.layout.cache
        for key in [k for k in self._segments if k not in self._users][: max(excess, 0)]:
            del self._segments[key]

    def _load(self, key: SegmentKey, bid: str) -> bytes:
        pack, index = key
        start = index * self.layout.segment
        size = self._pack_size(pack, bid)
        if start >= size:
            raise CorruptDataError(f"pack {pack} is truncated: blob {bid} lies past its end")
        return self._read(bid, pack, start, min(self.layout.segment, size - start))

    def _pack_size(self, pack: str, bid: str) -> int:
        size = self._sizes.get(pack)
        if size is None:
            try:
                size = self.repo.storage.stat(pack_key(pack)).size
            except NotFoundError:
                raise CorruptDataError(f"pack {pack} holding blob {bid} is missing") from None
            self._sizes[pack] = size
        return size

    def _read(self, bid: str, pack: str, offset: int, length: int) -> bytes:
        try:
            return self.repo.storage.get_range(pack_key(pack), offset, length)
        except NotFoundError:
            raise CorruptDataError(f"pack {pack} holding blob {bid} is missing") from None
        except CorruptDataError:
            raise CorruptDataError(f"pack {pack} is truncated: blob {bid} lies past its end") from None

    def _decode(self, bid: str, ref: BlobRef, raw: bytes | memoryview) -> bytes:
        what = f"blob {bid} in pack {ref.pack}"
        try:
            # A declared content size makes zstandard ignore max_output_size: check it first.
            declared = zstandard.frame_content_size(raw)
            if declared > ref.raw_length:
                raise CorruptDataError(f"{what} claims {declared} bytes, more than the {ref.raw_length} indexed")
            data: bytes = self._decoders.dctx.decompress(raw, max_output_size=ref.raw_length)
        except zstandard.ZstdError as exc:
            raise CorruptDataError(f"{what} cannot be decompressed: {exc}") from None
        if len(data) != ref.raw_length or blob_id(data) != bid:
            raise CorruptDataError(f"{what} does not match its hash")
        return data

    def close(self) -> None:
        self._loader.shutdown(wait=True, cancel_futures=True)


@dataclass(slots=True)
class _Job:
    """An entry on its way to the target, with the chunks submitted so far."""

    entry: Entry
    chunks: deque[tuple[BlobRef, str, Future[bytes] | None]] = field(default_factory=deque)


class _Ahead:
    """Validated entries in catalog order; large chunks are decoded ahead in
    ``pool`` within ``BUDGET_BYTES``, small ones have their segment loading."""

    def __init__(self, entries: Iterator[Entry], validator: CatalogValidator, fetcher: BlobFetcher,
                 pool: ThreadPoolExecutor, cancel: threading.Event) -> None:
        self.entries = entries
        self.validator = validator
        self.fetcher = fetcher
        self.pool = pool
        self.cancel = cancel
        self.jobs: deque[_Job] = deque()
        self.unsubmitted: deque[_Job] = deque()  # files with chunks still to submit, in order
        self.next_chunk = 0  # of unsubmitted[0]
        self.in_flight = 0
        self.exhausted = False

    def next_job(self) -> _Job | None:
        self.fill()
        return self.jobs.popleft() if self.jobs else None

    def take(self, job: _Job) -> bytes:
        """The next chunk of ``job``'s file, checked."""
        while not job.chunks:
            self._submit_next()  # past the budget: the file being written must progress
        ref, bid, fut = job.chunks.popleft()
        data = fut.result() if fut is not None else self.fetcher.get(bid, ref)
        self.fetcher.release(ref)
        if fut is not None:
            self.in_flight -= ref.raw_length
        self.fill()
        return data

    def fill(self) -> None:
        while self.in_flight < BUDGET_BYTES and self.fetcher.segments_in_use <= self.fetcher.layout.ahead:
            if self.unsubmitted:
                self._submit_next()
            elif len(self.jobs) < AHEAD_ENTRIES and not self.exhausted:
                self._pull()
            else:
                return

    def _pull(self) -> None:
        if self.cancel.is_set():
            raise CancelledByUser("restore cancelled")
        entry = next(self.entries, None)
        if entry is None:
            self.exhausted = True
            return
        self.validator.check(entry)
        job = _Job(entry)
        self.jobs.append(job)
        if entry.type == FILE and entry.chunks:
            self.unsubmitted.append(job)

    def _submit_next(self) -> None:
        job = self.unsubmitted[0]
        bid = job.entry.chunks[self.next_chunk]
        ref = self.fetcher.reserve(bid)
        fut = None
        if ref.raw_length > INLINE_MAX:
            fut = self.pool.submit(self.fetcher.get, bid, ref)
            self.in_flight += ref.raw_length
        job.chunks.append((ref, bid, fut))
        self.next_chunk += 1
        if self.next_chunk == len(job.entry.chunks):
            self.unsubmitted.popleft()
            self.next_chunk = 0


class Restorer:
    ahead: _Ahead

    def __init__(self, repo: Repository, root_fd: int, *, allow_devices: bool = False,
                 progress: ProgressFn = no_progress, cancel: threading.Event | None = None,
                 workers: int = 2) -> None:
        self.repo = repo
        self.root_fd = root_fd
        self.validator = CatalogValidator(allow_devices=allow_devices)
        self.report = progress
        self.cancel = cancel or threading.Event()
        layout = WHOLE_LAYOUT if repo.storage.prefers_whole_objects else LOCAL_LAYOUT
        self.fetcher = BlobFetcher(repo, layout)
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="restore")
        self.result = RestoreResult()
        self.progress = Progress("restore")
        self.dirs: list[tuple[str, int, Entry]] = []  # open directory stack: path, fd, entry
        self._last_report = 0.0

    def run(self, snapshot: Snapshot) -> RestoreResult:
        self.progress.bytes_total = snapshot.stats.bytes
        self.progress.files_total = snapshot.stats.files
        entries = (parse_entry(line) for line in self.repo.read_catalog(snapshot))
        self.ahead = _Ahead(entries, self.validator, self.fetcher, self.pool, self.cancel)
        try:
            while (job := self.ahead.next_job()) is not None:
                self._apply(job)
            self._close_dirs(apply=True)
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.fetcher.close()
            self._close_dirs(apply=False)
        self.progress.phase = "done"
        self.report(self.progress)
        return self.result

    def _apply(self, job: _Job) -> None:
        try:
            self._apply_entry(job)
        except OSError as exc:
            raise _os_error(exc, job.entry.path) from None

    def _apply_entry(self, job: _Job) -> None:
        entry = job.entry
        if entry.path == ROOT:
            self.dirs = [(ROOT, os.dup(self.root_fd), entry)]
            self.result.dirs += 1
            return
        parent_fd = self._parent_fd(parent_of(entry.path))
        name = entry.path.rsplit("/", 1)[-1]
        if entry.type == FILE:
            self._write_file(parent_fd, name, job)
        elif entry.type == DIR:
            self._make_dir(parent_fd, name, entry)
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
        rest = path[len(top_path) + 1 :] if top_path != ROOT else path
        fd = _open_dirs(top_fd, rest)
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

    def _write_file(self, parent_fd: int, name: str, job: _Job) -> None:
        entry = job.entry
        fd = _replacing(parent_fd, name, lambda: os.open(name, CREATE_FLAGS, 0o600, dir_fd=parent_fd))
        try:
            if entry.extents is None:
                self._write_sequential(fd, job)
            else:
                self._write_extents(fd, job)
                os.ftruncate(fd, entry.size)  # a hole at the end has no extent to write
            self._set_meta_fd(fd, entry)
        finally:
            os.close(fd)
        self.result.files += 1
        self.result.bytes += entry.size
        self.progress.files_done += 1

    def _write_sequential(self, fd: int, job: _Job) -> None:
        entry = job.entry
        written = 0
        for _ in entry.chunks:
            data = self.ahead.take(job)
            _write_all(fd, data, None)
            written += len(data)
            self._advance(len(data))
        if written != entry.size:
            raise CorruptDataError(f"file {entry.path!r}: chunks hold {written} bytes, catalog says {entry.size}")

    def _write_extents(self, fd: int, job: _Job) -> None:
        cursor = _ExtentCursor(job.entry.extents or [], job.entry.path)
        for _ in job.entry.chunks:
            data = self.ahead.take(job)
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

    def _set_xattr(self, path: int | str, xname: str, value: bytes, what: str, *, follow: bool = True) -> None:
        try:
            os.setxattr(path, xname, value, follow_symlinks=follow)
        except OSError as exc:
            if exc.errno not in (errno.ENOTSUP, errno.EPERM, errno.EOPNOTSUPP):
                raise
            self.result.warnings.append(f"{what}: xattr {xname} not supported by the target")

    # -- links and nodes -----------------------------------------------------

    def _make_symlink(self, parent_fd: int, name: str, entry: Entry) -> None:
        _replacing(parent_fd, name, lambda: os.symlink(entry.target or "", name, dir_fd=parent_fd))
        os.chown(name, entry.uid, entry.gid, dir_fd=parent_fd, follow_symlinks=False)
        for xname, value in entry.xattrs.items():
            # The last component (the link itself) is not followed.
            self._set_xattr(f"/proc/self/fd/{parent_fd}/{name}", xname, value, entry.path, follow=False)
        os.utime(name, ns=(entry.mtime_ns, entry.mtime_ns), dir_fd=parent_fd, follow_symlinks=False)
        self.result.other += 1

    def _make_hardlink(self, parent_fd: int, name: str, entry: Entry) -> None:
        # The validator admits only earlier regular files of this snapshot, all written by now.
        target = entry.target or ""
        src_fd = _open_dirs(self.root_fd, parent_of(target))
        try:
            _replacing(parent_fd, name, lambda: os.link(target.rsplit("/", 1)[-1], name, src_dir_fd=src_fd,
                                                        dst_dir_fd=parent_fd, follow_symlinks=False))
        finally:
            os.close(src_fd)
        self.result.other += 1

    def _make_node(self, parent_fd: int, name: str, entry: Entry) -> None:
        rdev = entry.rdev if entry.type in DEVICES else 0
        _replacing(parent_fd, name, lambda: os.mknod(name, _NODE_TYPES[entry.type] | 0o600, rdev, dir_fd=parent_fd))
        # O_PATH opens the node itself (never a device driver, never a symlink), so
        # metadata is set on what was just created even if the name is swapped meanwhile.
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd)
        try:
            node = f"/proc/self/fd/{fd}"
            os.chown(node, entry.uid, entry.gid)
            os.chmod(node, entry.mode)
            for xname, value in entry.xattrs.items():
                self._set_xattr(node, xname, value, entry.path)
            os.utime(node, ns=(entry.mtime_ns, entry.mtime_ns))
        finally:
            os.close(fd)
        self.result.other += 1

    def _advance(self, nbytes: int) -> None:
        self.progress.bytes_done += nbytes
        now = time.monotonic()
        if now - self._last_report >= 0.2:
            self._last_report = now
            self.report(self.progress)


def _is_within(path: str, dir_path: str) -> bool:
    return dir_path == ROOT or path == dir_path or path.startswith(dir_path + "/")


def _open_dirs(base_fd: int, path: str) -> int:
    """A new descriptor of ``path`` under ``base_fd``, opened one component at a time, following no link."""
    fd = os.dup(base_fd)
    if path == ROOT:
        return fd
    for part in path.split("/"):
        try:
            nfd = os.open(part, DIR_FLAGS, dir_fd=fd)
        finally:
            os.close(fd)
        fd = nfd
    return fd


def _replacing(parent_fd: int, name: str, create: Callable[[], T]) -> T:
    """Create ``name``; if something is in the way, remove it (unfollowed) and create again.
    Trying first saves a stat per entry in the usual, empty, target."""
    try:
        return create()
    except FileExistsError:
        _clear(parent_fd, name)
        return create()


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
