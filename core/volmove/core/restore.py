"""The restore data path: write a snapshot into a directory, safely.

The catalog is hostile input.  Every entry is validated before use, every
blob's sizes are bounded before it is inflated and its content is checked
against its hash, and every file-system call is made relative to a directory
descriptor with O_NOFOLLOW, so nothing is written, created or chmod-ed
through a symlink — neither one from the snapshot nor one planted in the
target beforehand.

Speed: packs are read in segments (one read serves many small blobs) by a
loader running ahead, and the chunks of large files are inflated and hashed
by a pool running ahead within a byte budget (both release the GIL for long
stretches).  Everything else happens in one thread: writer threads for small
files were measured slower, as each file's half-dozen syscalls and checks
hand the GIL back and forth between threads.

Large files are written past the page cache (O_DIRECT, where the target allows
it) by two I/O threads, a few MiB at a time while the writer gathers the next
buffer: copying a volume's worth of data into newly allocated cache pages cost
more than inflating it here, and a restore should not evict the host's working
set for data that is on its way to disk.

A restore is durable when it returns: a thread writes the target's file system
out every ``FLUSH_EVERY`` seconds while the restore goes on (the kernel's own
write-back starts only after 30 s), so the final sync has little left to do.
Without it, the helper's removal paid for the sync instead (unmounting its
overlay syncs the file system that holds the volume): ~0.2 s after a 1 GiB
restore here, against ~0.02 s for the final sync now, and the restore itself
no slower.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import mmap
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
from volmove.core.files import DIRECT_ALIGN, O_DIRECT, syncfs, write_all
from volmove.core.format import BlobRef, pack_key
from volmove.core.fswalk import DIR_FLAGS
from volmove.core.progress import Progress, ProgressFn, no_progress
from volmove.core.repository import Repository, check_blob
from volmove.core.snapshot import Snapshot

BUDGET_BYTES = 8 << 20  # raw bytes of large files' chunks decoded ahead of the writer
AHEAD_ENTRIES = 512  # catalog entries validated ahead of the writer
INLINE_MAX = 64 << 10  # a large file's chunks up to this size are checked by the writer itself
RUN_BYTES = 1 << 20  # a large file's next chunks decoded by one pool job (one read where they are adjacent)
SMALL_FILE = 1 << 20  # files up to this size (and few chunks) have all their chunks located when validated
SMALL_CHUNKS = 64
CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
DIRECT_MIN = 1 << 20  # files from this size on are written past the page cache
DIRECT_BUFFER = 4 << 20
DIRECT_BUFFERS = 4  # one filling, the others being written
FLUSH_EVERY = 0.3  # seconds between syncs of the target while restoring
_NODE_TYPES = {FIFO: stat.S_IFIFO, SOCKET: stat.S_IFSOCK, CHARDEV: stat.S_IFCHR, BLOCKDEV: stat.S_IFBLK}
T = TypeVar("T")


@dataclass
class RestoreResult:
    files: int = 0
    dirs: int = 0
    other: int = 0
    bytes: int = 0
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ReadLayout:
    """How packs are read: ``segment`` bytes at a time, blobs of ``alone``
    bytes or more on their own; ``cache`` segments are kept."""

    segment: int
    alone: int
    cache: int


LOCAL_LAYOUT = ReadLayout(segment=1 << 20, alone=64 << 10, cache=16)
WHOLE_LAYOUT = ReadLayout(segment=16 << 20, alone=16 << 20, cache=6)  # S3: one request per pack
SegmentKey = tuple[str, int]


class _Decoders(threading.local):
    def __init__(self) -> None:
        self.dctx = zstandard.ZstdDecompressor()  # reused: creating one costs more than inflating a small blob


class BlobFetcher:
    """Reads, bounds and checks blobs; thread-safe.  Small blobs are sliced
    from cached segments of their pack, loaded ahead by ``prefetch``."""

    def __init__(self, repo: Repository, layout: ReadLayout) -> None:
        self.repo = repo
        self.layout = layout
        self.max_raw = repo.config.chunker.max_size
        self._segments: OrderedDict[SegmentKey, Future[bytes]] = OrderedDict()
        self._ready: dict[SegmentKey, bytes] = {}  # loaded segments of ``_segments``: read without the lock
        self._sizes: dict[str, int] = {}
        self._lock = threading.Lock()
        self._loader = ThreadPoolExecutor(2, thread_name_prefix="pack-read")
        self._decoders = _Decoders()
        self._last_prefetch: SegmentKey | None = None

    def locate(self, bid: str) -> BlobRef:
        """The blob's place, refused if its sizes are impossible: they size allocations."""
        ref = self.repo.index.get(bid)
        if ref is None:
            raise CorruptDataError(f"blob {bid} is not in any index (missing data)")
        if not 0 < ref.raw_length <= self.max_raw or ref.length > ref.raw_length + (ref.raw_length >> 7) + 1024:
            raise CorruptDataError(f"blob {bid} in pack {ref.pack} has impossible sizes "
                                   f"({ref.length} stored, {ref.raw_length} raw)")
        return ref

    def prefetch(self, bid: str, ref: BlobRef) -> None:
        key = self._key(ref)
        if key is not None and key != self._last_prefetch:
            self._last_prefetch = key
            with self._lock:
                self._segment(key, bid)

    def get(self, bid: str, ref: BlobRef) -> bytes:
        return self._decode(bid, ref, self._raw(bid, ref))

    def get_run(self, run: list[tuple[str, BlobRef]]) -> list[bytes]:
        """Several blobs; one read where they lie back to back in one pack, as a file's chunks
        usually do (a future and a read per chunk cost more than inflating it), unless the layout
        reads all of them through its cached segments anyway."""
        (bid, first), last = run[0], run[-1][1]
        pairs = itertools.pairwise(r for _, r in run)
        adjacent = all(b.pack == a.pack and b.offset == a.offset + a.length for a, b in pairs)
        if len(run) == 1 or not adjacent or all(self._key(r) is not None for _, r in run):
            return [self.get(b, r) for b, r in run]  # alone, or all from cached segments (whole packs from S3)
        span = memoryview(self._read(bid, first.pack, first.offset, last.offset + last.length - first.offset))
        return [self._decode(b, r, span[r.offset - first.offset : r.offset - first.offset + r.length]) for b, r in run]

    def _key(self, ref: BlobRef) -> SegmentKey | None:
        seg = self.layout.segment
        index = ref.offset // seg
        if ref.length >= self.layout.alone or ref.offset + ref.length > (index + 1) * seg:
            return None
        return ref.pack, index

    def _raw(self, bid: str, ref: BlobRef) -> bytes | memoryview:
        key = self._key(ref)
        if key is None:
            return self._read(bid, ref.pack, ref.offset, ref.length)
        data = self._ready.get(key)
        if data is None:
            with self._lock:
                fut = self._segment(key, bid)
            data = fut.result()
        start = ref.offset - key[1] * self.layout.segment
        raw = memoryview(data)[start : start + ref.length]
        if len(raw) != ref.length:
            raise CorruptDataError(f"pack {ref.pack} is truncated: blob {bid} lies past its end")
        return raw

    def _segment(self, key: SegmentKey, bid: str) -> Future[bytes]:
        """The segment's bytes, loading or cached; the least recently used beyond ``cache`` are dropped."""
        fut = self._segments.get(key)
        if fut is None:
            fut = self._segments[key] = self._loader.submit(self._load, key, bid)
            if len(self._segments) > self.layout.cache:
                old, _ = self._segments.popitem(last=False)
                self._ready.pop(old, None)
        else:
            self._segments.move_to_end(key)
        return fut

    def _load(self, key: SegmentKey, bid: str) -> bytes:
        pack, index = key
        start = index * self.layout.segment
        size = self._pack_size(pack, bid)
        if start >= size:
            raise CorruptDataError(f"pack {pack} is truncated: blob {bid} lies past its end")
        data = self._read(bid, pack, start, min(self.layout.segment, size - start))
        with self._lock:
            if key in self._segments:
                self._ready[key] = data
        return data

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
        return check_blob(bid, ref, raw, self.repo.blob_id, self._decoders.dctx)

    def close(self) -> None:
        self._loader.shutdown(wait=True, cancel_futures=True)


@dataclass(slots=True)
class _Job:
    """An entry on its way to the target."""

    entry: Entry
    refs: list[BlobRef] | None = None  # a small file's chunks, located when validated
    # A large file's chunks: decoded by a pool job with the chunks around it (its result at an index),
    # or None: checked by the writer itself.
    chunks: deque[tuple[str, BlobRef, Future[list[bytes]] | None, int]] = field(default_factory=deque)


class _Ahead:
    """Validated entries in catalog order.  Small files' segments start
    loading; large files' chunks are decoded ahead in ``pool`` within
    ``BUDGET_BYTES`` (those up to ``INLINE_MAX`` are left to the writer)."""

    def __init__(self, entries: Iterator[Entry], validator: CatalogValidator, fetcher: BlobFetcher,
                 pool: ThreadPoolExecutor, cancel: threading.Event) -> None:
        self.entries = entries
        self.validator = validator
        self.fetcher = fetcher
        self.pool = pool
        self.cancel = cancel
        self.jobs: deque[_Job] = deque()
        self.unsubmitted: deque[_Job] = deque()  # large files with chunks still to submit, in order
        self.next_chunk = 0  # of unsubmitted[0]
        self.in_flight = 0
        self.exhausted = False

    def next_job(self) -> _Job | None:
        self.fill()
        if not self.jobs and not self.exhausted:
            self._pull()  # the budget is spent on chunks of a file not yet reached
        return self.jobs.popleft() if self.jobs else None

    def take(self, job: _Job) -> bytes:
        """The next chunk of a large file, checked."""
        while not job.chunks:
            self._submit_next()  # past the budget: the file being written must progress
        bid, ref, decoded, i = job.chunks.popleft()
        if decoded is None:
            return self.fetcher.get(bid, ref)
        run = decoded.result()
        data, run[i] = run[i], b""  # the run's other chunks may still wait: let this one go when written
        self.in_flight -= ref.raw_length
        self.fill()
        return data

    def fill(self) -> None:
        while self.in_flight < BUDGET_BYTES:
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
        if entry.type == FILE and entry.chunks:
            if entry.size <= SMALL_FILE and len(entry.chunks) <= SMALL_CHUNKS:
                job.refs = []
                for bid in entry.chunks:
                    ref = self.fetcher.locate(bid)
                    self.fetcher.prefetch(bid, ref)
                    job.refs.append(ref)
            else:
                self.unsubmitted.append(job)
        self.jobs.append(job)

    def _submit_next(self) -> None:
        """Queue the next chunks of the first large file not queued in full: a run of up to
        ``RUN_BYTES`` for one pool job, or one small chunk for the writer."""
        job = self.unsubmitted[0]
        chunks = job.entry.chunks
        run: list[tuple[str, BlobRef]] = []
        size = 0
        while self.next_chunk < len(chunks) and size < RUN_BYTES:
            bid = chunks[self.next_chunk]
            ref = self.fetcher.locate(bid)
            if ref.raw_length <= INLINE_MAX:
                if run:
                    break  # it follows this run
                self.fetcher.prefetch(bid, ref)
                job.chunks.append((bid, ref, None, 0))
                self.next_chunk += 1
                break
            run.append((bid, ref))
            size += ref.raw_length
            self.next_chunk += 1
        if run:
            decoded = self.pool.submit(self.fetcher.get_run, run)
            job.chunks.extend((bid, ref, decoded, i) for i, (bid, ref) in enumerate(run))
            self.in_flight += size
        if self.next_chunk == len(chunks):
            self.unsubmitted.popleft()
            self.next_chunk = 0


@dataclass(slots=True)
class _OpenDir:
    path: str
    fd: int
    entry: Entry  # its metadata is applied when it is left


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
        self.fetcher = BlobFetcher(repo, WHOLE_LAYOUT if repo.storage.prefers_whole_objects else LOCAL_LAYOUT)
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="restore")
        self.result = RestoreResult()
        self.progress = Progress("restore")
        self.dirs: list[_OpenDir] = []  # the open directory stack
        self._last_report = 0.0
        self.direct = _DirectIO() if O_DIRECT else None
        self.flusher = _Flusher(root_fd)

    def run(self, snapshot: Snapshot) -> RestoreResult:
        self.progress.bytes_total = snapshot.stats.bytes
        self.progress.files_total = snapshot.stats.files
        entries = (parse_entry(line) for line in self.repo.read_catalog(snapshot))
        self.ahead = _Ahead(entries, self.validator, self.fetcher, self.pool, self.cancel)
        self.flusher.start()
        try:
            while (job := self.ahead.next_job()) is not None:
                self._apply(job)
            self._close_dirs(apply=True)
            self.flusher.finish()
        finally:
            self.flusher.stop()
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.fetcher.close()
            self._close_dirs(apply=False)
            if self.direct is not None:
                self.direct.close()
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
            self.dirs = [_OpenDir(ROOT, os.dup(self.root_fd), entry)]
            self.result.dirs += 1
            return
        head, _, name = entry.path.rpartition("/")
        parent = self._parent(head or ROOT)
        if entry.type == FILE:
            self._write_file(parent, name, job)
        elif entry.type == DIR:
            self._make_dir(parent.fd, name, entry)
        elif entry.type == SYMLINK:
            self._make_symlink(parent.fd, name, entry)
        elif entry.type == HARDLINK:
            self._make_hardlink(parent.fd, name, entry)
        else:
            self._make_node(parent.fd, name, entry)

    # -- directories ---------------------------------------------------------

    def _parent(self, path: str) -> _OpenDir:
        """The open directory ``path``, closing directories we have left
        (applying their metadata: their mtimes are final once their children are written)."""
        top = self.dirs[-1] if self.dirs else None
        if top is not None and top.path == path:
            return top
        while self.dirs and not _is_within(path, self.dirs[-1].path):
            self._pop_dir(apply=True)
        if not self.dirs:
            raise CorruptDataError("snapshot catalog does not start with its root directory")
        top = self.dirs[-1]
        if top.path == path:
            return top
        # An out-of-order (forged) catalog: reopen the path component by component without following links.
        rest = path[len(top.path) + 1 :] if top.path != ROOT else path
        self.dirs.append(_OpenDir(path, _open_dirs(top.fd, rest), Entry(path, DIR)))
        return self.dirs[-1]

    def _make_dir(self, parent_fd: int, name: str, entry: Entry) -> None:
        try:
            os.mkdir(name, 0o700, dir_fd=parent_fd)
        except FileExistsError:
            st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode):
                _clear(parent_fd, name)
                os.mkdir(name, 0o700, dir_fd=parent_fd)
        fd = os.open(name, DIR_FLAGS, dir_fd=parent_fd)
        self.dirs.append(_OpenDir(entry.path, fd, entry))
        self.result.dirs += 1

    def _pop_dir(self, *, apply: bool) -> None:
        top = self.dirs.pop()
        try:
            if apply and top.entry.mtime_ns:
                self._set_meta_fd(top.fd, top.entry)
        finally:
            os.close(top.fd)

    def _close_dirs(self, *, apply: bool) -> None:
        while self.dirs:
            self._pop_dir(apply=apply)

    # -- files ---------------------------------------------------------------

    def _write_file(self, parent: _OpenDir, name: str, job: _Job) -> None:
        entry = job.entry
        if job.refs is not None or not entry.chunks:
            self._write_small(parent.fd, name, job)
            self._advance(entry.size)
        else:
            fd = _replacing(parent.fd, name, lambda: os.open(name, CREATE_FLAGS, 0o600, dir_fd=parent.fd))
            try:
                if not (entry.extents is None and entry.size >= DIRECT_MIN and self.direct is not None
                        and self.direct.write_file(fd, entry, lambda: self._take(job))):
                    self._write_content(fd, entry, lambda: self._take(job))
                self._set_meta_fd(fd, entry)
            finally:
                os.close(fd)
            if entry.extents is not None:  # holes count as restored bytes, as in the snapshot's totals
                self._advance(entry.size - sum(length for _, length in entry.extents))
        self.result.files += 1
        self.result.bytes += entry.size
        self.progress.files_done += 1

    def _take(self, job: _Job) -> bytes:
        data = self.ahead.take(job)
        self._advance(len(data))
        return data

    def _write_small(self, dir_fd: int, name: str, job: _Job) -> None:
        """A file whose chunks were located ahead (their segments are loading)."""
        entry, refs = job.entry, job.refs or []
        fd = _replacing(dir_fd, name, lambda: os.open(name, CREATE_FLAGS, 0o600, dir_fd=dir_fd))
        try:
            if len(refs) == 1 and entry.extents is None and refs[0].raw_length == entry.size:
                write_all(fd, self.fetcher.get(entry.chunks[0], refs[0]))  # most small files: one chunk
            else:
                pairs = zip(entry.chunks, refs, strict=True)
                self._write_content(fd, entry, lambda: self.fetcher.get(*next(pairs)))
            self._set_meta_fd(fd, entry)
        finally:
            os.close(fd)

    def _write_content(self, fd: int, entry: Entry, next_chunk: Callable[[], bytes]) -> None:
        if entry.extents is None:
            _copy_chunks(entry, next_chunk, lambda data: write_all(fd, data))
            return
        cursor = _ExtentCursor(entry.extents, entry.path)
        for _ in entry.chunks:
            for pos, part in cursor.place(memoryview(next_chunk())):
                write_all(fd, part, pos)
        cursor.check_done()
        os.ftruncate(fd, entry.size)  # a hole at the end has no extent to write

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


class _Flusher:
    """Syncs the target's file system every ``FLUSH_EVERY`` seconds in a thread of its own
    until stopped; ``finish`` syncs it once more and raises any write-back error met."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="restore-flush", daemon=True)
        self.error: OSError | None = None

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping.wait(FLUSH_EVERY):
            try:
                syncfs(self.fd)
            except OSError as exc:  # reported once: the final sync may not see it again
                self.error = self.error or exc

    def stop(self) -> None:
        """Stop without waiting: a failed restore is not held up by a sync under way."""
        self.stopping.set()

    def finish(self) -> None:
        self.stop()
        self.thread.join()
        if self.error is None:
            try:
                syncfs(self.fd)
            except OSError as exc:
                self.error = exc
        if self.error is not None:
            raise StorageError(f"cannot write the restored data out: {self.error.strerror}")


class _DirectIO:
    """Writes files' content past the page cache: the writer fills aligned buffers, I/O
    threads write them; a file's last partial block is written buffered."""

    def __init__(self) -> None:
        self.io = ThreadPoolExecutor(2, thread_name_prefix="restore-io")  # two writes in flight: faster than one here
        self.free = [mmap.mmap(-1, DIRECT_BUFFER) for _ in range(DIRECT_BUFFERS)]
        self.enabled = True  # until a target refuses O_DIRECT

    def write_file(self, fd: int, entry: Entry, next_chunk: Callable[[], bytes]) -> bool:
        """Write the file's chunks; False (nothing written) where the target refuses direct writes."""
        if not self.enabled:
            return False
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        try:
            fcntl.fcntl(fd, fcntl.F_SETFL, flags | O_DIRECT)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self.enabled = False
            return False
        out = _DirectFile(self, fd, flags)
        try:
            _copy_chunks(entry, next_chunk, lambda data: out.write(memoryview(data)))
        finally:
            out.close()  # waits for its writes: the descriptor is closed next
        return True

    def close(self) -> None:
        self.io.shutdown(wait=True)


class _DirectFile:
    """One file's direct writes.  A buffer is owned by this file while it fills, by ``writes``
    while it is written, and by the pool's ``free`` list otherwise."""

    def __init__(self, direct: _DirectIO, fd: int, flags: int) -> None:
        self.direct, self.fd, self.flags = direct, fd, flags
        self.buf: mmap.mmap | None = direct.free.pop()
        self.used = 0  # bytes gathered in ``buf``
        self.offset = 0  # of ``buf`` in the file
        self.writes: deque[tuple[Future[None], mmap.mmap]] = deque()

    def write(self, data: memoryview) -> None:
        while data:
            if self.buf is None:
                self.buf = self._reclaim()
            n = min(len(data), DIRECT_BUFFER - self.used)
            self.buf[self.used : self.used + n] = data[:n]
            self.used += n
            data = data[n:]
            if self.used == DIRECT_BUFFER:
                self._submit(DIRECT_BUFFER)

    def close(self) -> None:
        """Write what is gathered, wait for every write, and raise the first that failed."""
        error: BaseException | None = None
        tail = b""
        try:
            if self.buf is not None:
                aligned = self.used - self.used % DIRECT_ALIGN
                tail = bytes(self.buf[aligned : self.used])  # under one block
                if aligned:
                    self._submit(aligned)
            while self.writes:
                future, buf = self.writes.popleft()
                self.direct.free.append(buf)
                try:
                    future.result()
                except BaseException as exc:
                    error = error or exc  # the first error wins; every write is waited for
            if error is None and tail:
                fcntl.fcntl(self.fd, fcntl.F_SETFL, self.flags)
                write_all(self.fd, tail, self.offset)
        finally:
            if self.buf is not None:
                self.direct.free.append(self.buf)
                self.buf = None
        if error is not None:
            raise error

    def _submit(self, length: int) -> None:
        buf, self.buf = self.buf, None
        assert buf is not None
        self.writes.append((self.direct.io.submit(self._pwrite, buf, length, self.offset), buf))
        self.offset += length
        self.used = 0

    def _reclaim(self) -> mmap.mmap:
        if not self.direct.free:
            future, buf = self.writes.popleft()
            self.direct.free.append(buf)  # the pool's again, whether its write failed or not
            future.result()
        return self.direct.free.pop()

    def _pwrite(self, buf: mmap.mmap, length: int, offset: int) -> None:
        view = memoryview(buf)[:length]
        try:
            write_all(self.fd, view, offset)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            # Alignment rules stricter than ours: this file and the next ones go through the cache.
            self.direct.enabled = False
            fcntl.fcntl(self.fd, fcntl.F_SETFL, self.flags)
            write_all(self.fd, view, offset)


def _copy_chunks(entry: Entry, next_chunk: Callable[[], bytes], write: Callable[[bytes], None]) -> None:
    """Hand a non-sparse file's chunks to ``write`` in order; they must add up to its size."""
    written = 0
    for _ in entry.chunks:
        data = next_chunk()
        write(data)
        written += len(data)
    if written != entry.size:
        raise CorruptDataError(f"file {entry.path!r}: chunks hold {written} bytes, catalog says {entry.size}")


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
