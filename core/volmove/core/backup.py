"""The backup data path: walk a tree, chunk, deduplicate, compress, pack.

Runs in a worker thread.  The walking thread reads and chunks; a small pool
hashes and compresses chunks (both release the GIL); results are consumed in
walk order so the catalog stays deterministic.  Memory is bounded by the
in-flight window and the packs being uploaded, not by the volume's size.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import zstandard
from volmove.core.catalog import DIR, FILE, Entry, parse_entry
from volmove.core.chunker import StreamChunker
from volmove.core.errors import CancelledByUser, StorageError
from volmove.core.format import BLOB_DATA, BLOB_META, blob_id
from volmove.core.fswalk import FILE_FLAGS, Item, data_extents, walk
from volmove.core.progress import Progress, ProgressFn, no_progress
from volmove.core.repository import PackWriter, Repository
from volmove.core.snapshot import Snapshot, SnapshotStats

READ_SIZE = 4 << 20
WINDOW_BYTES = 48 << 20
CATALOG_FLUSH = 1 << 20
ZSTD_LEVEL = 3
JobResult = tuple[str, bytes | None, int]


@dataclass
class BackupResult:
    catalog: list[str]
    entries: int
    stats: SnapshotStats
    warnings: list[str] = field(default_factory=list)


class _Compressors(threading.local):
    def __init__(self) -> None:
        self.zstd = zstandard.ZstdCompressor(level=ZSTD_LEVEL)


class BackupEngine:
    def __init__(self, repo: Repository, *, parent: dict[str, Entry] | None = None,
                 progress: ProgressFn = no_progress, cancel: threading.Event | None = None,
                 workers: int = 2) -> None:
        self.repo = repo
        self.parent = parent or {}
        self.report = progress
        self.cancel = cancel or threading.Event()
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="chunk")
        self.packs = PackWriter(repo)
        self.progress = Progress("backup")
        self.queue: deque[tuple[Entry, Future[JobResult] | None]] = deque()
        self.in_flight = 0
        self.catalog = _CatalogWriter(repo, self.packs)
        self.counts = {"files": 0, "dirs": 0, "other": 0, "bytes": 0, "new_bytes": 0, "chunks": 0,
                       "new_chunks": 0, "skipped_files": 0}
        self.warnings: list[str] = []
        self._tls = _Compressors()
        self._last_report = 0.0

    def run(self, root_fd: int, totals: tuple[int, int] | None = None) -> BackupResult:
        started = time.monotonic()
        if totals:
            self.progress.files_total, self.progress.bytes_total = totals
        try:
            for item in walk(root_fd):
                self._check_cancel()
                self._add(item)
            self._drain(0)
            catalog = self.catalog.finish()
            self.repo.write_index(self.packs.finish())  # packs, then index; the caller commits the manifest
        except BaseException:
            self.packs.abort()
            raise
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)
        self.progress.phase = "done"
        self.report(self.progress)
        stats = SnapshotStats(**self.counts, stored_bytes=self.packs.stored_bytes,
                              duration=round(time.monotonic() - started, 3))
        return BackupResult(catalog, self.catalog.entries, stats, self.warnings)

    def _check_cancel(self) -> None:
        if self.cancel.is_set():
            raise CancelledByUser("backup cancelled")

    def _add(self, item: Item) -> None:
        entry = item.entry
        kind = "files" if entry.type == FILE else "dirs" if entry.type == DIR else "other"
        self.counts[kind] += 1
        if entry.type == FILE and not self._reuse_parent(entry):
            self._read_file(item)
        self.queue.append((entry, None))
        self._drain(WINDOW_BYTES)

    def _reuse_parent(self, entry: Entry) -> bool:
        """Skip reading a file whose metadata says it did not change since the parent snapshot."""
        old = self.parent.get(entry.path)
        if old is None or old.type != FILE or (old.size, old.mtime_ns, old.ctime_ns, old.ino) != (
                entry.size, entry.mtime_ns, entry.ctime_ns, entry.ino):
            return False
        if not all(self.repo.has_blob(c) for c in old.chunks):
            return False
        entry.chunks, entry.extents = list(old.chunks), old.extents
        self.counts["skipped_files"] += 1
        self.counts["bytes"] += entry.size
        self.counts["chunks"] += len(entry.chunks)
        self._advance(entry.size, 1)
        return True

    def _read_file(self, item: Item) -> None:
        entry = item.entry
        try:
            fd = os.open(item.name, FILE_FLAGS, dir_fd=item.dir_fd)
        except FileNotFoundError:
            self.warnings.append(f"{entry.path}: vanished during the backup")
            return
        try:
            chunker = StreamChunker(self.repo.config.chunker)
            size = 0
            for data in self._file_data(fd, entry):
                size += len(data)
                self._submit_all(entry, chunker.feed(data))
            self._submit_all(entry, chunker.finish())
            if entry.extents is None:
                entry.size = size  # the file may have changed since it was listed
        finally:
            os.close(fd)
        self.counts["bytes"] += entry.size
        self.progress.files_done += 1

    def _file_data(self, fd: int, entry: Entry) -> Iterator[bytes]:
        if entry.size and item_is_sparse(fd, entry.size):
            entry.extents = data_extents(fd, entry.size)
        ranges = entry.extents if entry.extents is not None else [(0, None)]
        for start, length in ranges:
            yield from _read_range(fd, start, length)

    def _submit_all(self, entry: Entry, chunks: Iterator[memoryview]) -> None:
        for chunk in chunks:
            self.queue.append((entry, self.pool.submit(self._hash_compress, chunk)))
            self.in_flight += len(chunk)
            self._drain(WINDOW_BYTES)

    def _hash_compress(self, chunk: memoryview) -> JobResult:
        bid = blob_id(chunk)
        if self.repo.has_blob(bid):
            return bid, None, len(chunk)
        return bid, self._tls.zstd.compress(chunk), len(chunk)

    def _drain(self, limit: int) -> None:
        """Consume results in order until the in-flight window is below ``limit``."""
        while self.queue and (self.in_flight > limit or self.queue[0][1] is None or self.queue[0][1].done()):
            entry, future = self.queue.popleft()
            if future is None:
                self.catalog.add(entry)
                continue
            bid, compressed, raw_len = future.result()
            self.in_flight -= raw_len
            entry.chunks.append(bid)
            self.counts["chunks"] += 1
            if compressed is not None and self.packs.add(bid, BLOB_DATA, compressed, raw_len):
                self.counts["new_chunks"] += 1
                self.counts["new_bytes"] += raw_len
            self._advance(raw_len, 0)

    def _advance(self, nbytes: int, files: int) -> None:
        self.progress.bytes_done += nbytes
        self.progress.files_done += files
        now = time.monotonic()
        if now - self._last_report >= 0.2:
            self._last_report = now
            self.report(self.progress)


def item_is_sparse(fd: int, size: int) -> bool:
    return os.fstat(fd).st_blocks * 512 < size


def _read_range(fd: int, start: int, length: int | None) -> Iterator[bytes]:
    pos, end = start, None if length is None else start + length
    while end is None or pos < end:
        want = READ_SIZE if end is None else min(READ_SIZE, end - pos)
        try:
            data = os.pread(fd, want, pos)
        except OSError as exc:
            raise StorageError(f"cannot read volume data: {os.strerror(exc.errno or errno.EIO)}") from None
        if not data:
            return
        pos += len(data)
        yield data


class _CatalogWriter:
    """Streams catalog lines through the chunker into metadata blobs."""

    def __init__(self, repo: Repository, packs: PackWriter) -> None:
        self.packs = packs
        self.chunker = StreamChunker(repo.config.chunker)
        self.zstd = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
        self.buf: list[bytes] = []
        self.size = 0
        self.ids: list[str] = []
        self.entries = 0

    def add(self, entry: Entry) -> None:
        line = entry.to_json().encode() + b"\n"
        self.buf.append(line)
        self.size += len(line)
        self.entries += 1
        if self.size >= CATALOG_FLUSH:
            self._store(self.chunker.feed(b"".join(self.buf)))
            self.buf, self.size = [], 0

    def finish(self) -> list[str]:
        self._store(self.chunker.feed(b"".join(self.buf)))
        self._store(self.chunker.finish())
        return self.ids

    def _store(self, chunks: Iterator[memoryview]) -> None:
        for chunk in chunks:
            bid = blob_id(chunk)
            self.ids.append(bid)
            self.packs.add(bid, BLOB_META, self.zstd.compress(chunk), len(chunk))


def load_catalog_map(repo: Repository, snapshot: Snapshot) -> dict[str, Entry]:
    """A parent snapshot's files by path, for change detection."""
    out = {}
    for line in repo.read_catalog(snapshot):
        entry = parse_entry(line)
        if entry.type == FILE:
            out[entry.path] = entry
    return out
