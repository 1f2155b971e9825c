"""The backup data path: walk a tree, chunk, deduplicate, compress, pack.

Runs in a worker thread.  The walking thread lists, reads and chunks (a small
file in one read, a large one a buffer at a time) and hashes small chunks; a
small pool hashes the rest and compresses, one batch of a few MiB or a few
hundred entries per job.  Hashing and compression release the GIL, and batches
keep per-file costs out of futures and thread switches.  Batches are consumed
in walk order, so the catalog and the packs do not depend on timing or on the
number of workers.  Memory is bounded by the in-flight window and the packs
being uploaded, not by the volume's size (only the ids of the blobs a run adds
grow with it); the parent snapshot's catalog is streamed (a bounded stretch parsed ahead), not loaded.
"""

from __future__ import annotations

import errno
import json
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import NamedTuple

import zstandard

from volmove.core.catalog import DIR, FILE, PLAIN_FILE, Entry, plain_file_fields
from volmove.core.chunker import StreamChunker, chunk_all
from volmove.core.errors import CancelledByUser, CorruptDataError, StorageError
from volmove.core.format import BLOB_DATA, BLOB_META, ChunkerParams, Hasher
from volmove.core.fswalk import FILE_FLAGS, Item, data_extents, read_fd_xattrs, walk
from volmove.core.progress import Progress, ProgressFn, no_progress
from volmove.core.rechunk import OldChunk, guided_chunks, old_layout
from volmove.core.repository import PackWriter, Repository
from volmove.core.snapshot import Snapshot, SnapshotStats

READ_SIZE = 4 << 20
SMALL_FILE = 1 << 20  # read in one call and chunked at once
SMALL_CHUNK = 64 << 10  # hashed by the walking thread, see _add_chunks
BATCH_BYTES = 4 << 20
BATCH_ENTRIES = 256
WINDOW_BYTES = 24 << 20
WINDOW_BATCHES = 64  # bounds the entries held when files are tiny or unchanged
VERIFY_BYTES = 4 << 20  # old chunks checked per pool job when a changed file is re-chunked
VERIFY_AHEAD = 4  # such jobs queued ahead of the chunker
CATALOG_FLUSH = 1 << 20
PARSE_AHEAD = 8 << 20  # bytes of parent catalog lines parsed before the walk; held as ~3x that
ZSTD_LEVEL = 3
Frame = bytes | memoryview  # a compressed chunk
BlobResult = tuple[str, Frame | None]  # id, compressed data unless already stored
# One call compresses a whole batch (C backend; marked experimental, hence the fallback).
_MULTI_COMPRESS = "multi_compress_to_buffer" in zstandard.backend_features
SourceEntry = tuple[Entry, Iterable[bytes] | None]  # an entry and, for a file, its content
_FILE_KEYS = frozenset({"p", "t", "m", "u", "g", "mt", "s", "c", "h", "i", "ct", "e", "x"})


@dataclass
class BackupResult:
    catalog: list[str]
    entries: int
    stats: SnapshotStats
    warnings: list[str] = field(default_factory=list)


class _Compressors(threading.local):
    def __init__(self) -> None:
        self.zstd = zstandard.ZstdCompressor(level=ZSTD_LEVEL)


@dataclass(slots=True)
class _Batch:
    """Chunks to hash and compress, each with the entry it belongs to, and the
    catalog entries that are complete once these chunks are stored."""

    owners: list[Entry] = field(default_factory=list)
    chunks: list[memoryview] = field(default_factory=list)  # empty for a chunk reused by id
    ids: list[str | None] = field(default_factory=list)  # None: not hashed yet
    lengths: list[int] = field(default_factory=list)
    entries: list[Entry | bytes] = field(default_factory=list)  # bytes: a line reused from the parent
    nbytes: int = 0
    future: Future[list[BlobResult]] | None = None

    def ready(self) -> bool:
        return self.future is None or self.future.done()


class BackupEngine:
    def __init__(self, repo: Repository, *, parent: ParentCatalog | None = None,
                 progress: ProgressFn = no_progress, cancel: threading.Event | None = None,
                 workers: int = 2) -> None:
        self.repo = repo
        self.params: ChunkerParams = repo.config.chunker
        self.blob_id = repo.blob_id
        self.parent = parent or ParentCatalog(iter(()))
        self.report = progress
        self.cancel = cancel or threading.Event()
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="chunk")
        self.packs = PackWriter(repo)
        self.progress = Progress("backup")
        self.queue: deque[_Batch] = deque()
        self.batch = _Batch()  # being filled; not queued yet
        self.in_flight = 0
        self.catalog = _CatalogWriter(repo, self.packs)
        self.counts = {"files": 0, "dirs": 0, "other": 0, "bytes": 0, "new_bytes": 0, "chunks": 0,
                       "new_chunks": 0, "skipped_files": 0}
        self.warnings: list[str] = []
        self._tls = _Compressors()
        self._last_report = 0.0
        self.started = time.monotonic()

    def run(self, root_fd: int, totals: tuple[int, int] | None = None) -> BackupResult:
        """Back up the tree below an open directory descriptor."""
        self.read(root_fd, totals)
        return self.finish()

    def read(self, root_fd: int, totals: tuple[int, int] | None = None) -> None:
        """The part of ``run`` that reads the tree; ``finish`` (or ``abort``) must follow.
        The source is not needed once this returns."""
        def add_all() -> None:
            for item in walk(root_fd, file_xattrs=False):  # read through the file's descriptor instead
                self._check_cancel()
                self._add(item)
        self._read_all(add_all, totals)

    def run_stream(self, items: Iterable[SourceEntry], totals: tuple[int, int] | None = None) -> BackupResult:
        """Back up entries that arrive with their content (a tar from a remote engine), in catalog order."""
        def add_all() -> None:
            for entry, data in items:
                self._check_cancel()
                self._add_streamed(entry, data)
        self._read_all(add_all, totals)
        return self.finish()

    def _read_all(self, add_all: Callable[[], None], totals: tuple[int, int] | None) -> None:
        self.started = time.monotonic()
        if totals:
            self.progress.files_total, self.progress.bytes_total = totals
        try:
            add_all()
            self._queue_batch()
        except BaseException:
            self.abort()
            raise

    def finish(self) -> BackupResult:
        """Store what is still in flight, then the catalog, the last packs and the index."""
        try:
            self._drain(everything=True)
            catalog = self.catalog.finish()
            self.repo.write_index(self.packs.finish())  # packs, then index; the caller commits the manifest
        except BaseException:
            self.abort()
            raise
        self.pool.shutdown()  # drained: nothing is left to run
        self.progress.phase = "done"
        self.report(self.progress)
        stats = SnapshotStats(**self.counts, stored_bytes=self.packs.stored_bytes,
                              duration=round(time.monotonic() - self.started, 3))
        return BackupResult(catalog, self.catalog.entries, stats, self.warnings)

    def abort(self) -> None:
        """Give up: no more hashing, compressing or uploading (nothing is committed)."""
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.packs.abort()

    def _add_streamed(self, entry: Entry, data: Iterable[bytes] | None) -> None:
        self.counts["files" if entry.type == FILE else "dirs" if entry.type == DIR else "other"] += 1
        if entry.type == FILE:
            chunker = StreamChunker(self.params)
            entry.size = 0
            for piece in data or ():
                entry.size += len(piece)
                self._add_chunks(entry, chunker.feed(piece))
            self._add_chunks(entry, chunker.finish())
            self.counts["bytes"] += entry.size
            self.progress.files_done += 1
        self.batch.entries.append(entry)
        if len(self.batch.entries) >= BATCH_ENTRIES:
            self._queue_batch()

    def _check_cancel(self) -> None:
        if self.cancel.is_set():
            raise CancelledByUser("backup cancelled")

    def _add(self, item: Item) -> None:
        entry = item.entry
        kind = "files" if entry.type == FILE else "dirs" if entry.type == DIR else "other"
        self.counts[kind] += 1
        record: Entry | bytes = entry
        if entry.type == FILE:
            old = self.parent.get(entry.path)
            reused = self._reuse_parent(entry, old)
            if reused is not None:
                record = reused
            elif not self._read_file(item, old):
                return  # vanished since it was listed
        self.batch.entries.append(record)
        if len(self.batch.entries) >= BATCH_ENTRIES:
            self._queue_batch()

    def _reuse_parent(self, entry: Entry, old: ParentFile | None) -> bytes | None:
        """The parent snapshot's catalog line for a file whose metadata says it did not change."""
        if old is None or old.meta != _meta(entry) or not all(map(self.repo.has_blob, old.chunks)):
            return None
        self.counts["skipped_files"] += 1
        self.counts["bytes"] += entry.size
        self.counts["chunks"] += len(old.chunks)
        self._advance(entry.size, 1)
        return old.line

    def _read_file(self, item: Item, old: ParentFile | None) -> bool:
        """Queue the file's chunks; False if it vanished since it was listed."""
        entry = item.entry
        try:
            fd = os.open(item.name, FILE_FLAGS, dir_fd=item.dir_fd)
        except FileNotFoundError:
            self.warnings.append(f"{entry.path}: vanished during the backup")
            return False
        try:
            entry.xattrs = read_fd_xattrs(fd)
            sparse = entry.size > 0 and item.st.st_blocks * 512 < entry.size
            data = None if sparse or entry.size > SMALL_FILE else _read_small(fd, entry)
            layout = None if sparse or data is not None else self._old_layout(old)
            if data is not None:
                self._add_chunks(entry, chunk_all(data, self.params))
            elif layout:
                self._read_guided(fd, entry, layout)
            else:
                self._read_stream(fd, entry, sparse)
        finally:
            os.close(fd)
        self.counts["bytes"] += entry.size
        self.progress.files_done += 1
        return True

    def _read_stream(self, fd: int, entry: Entry, sparse: bool) -> None:
        if sparse:
            entry.extents = data_extents(fd, entry.size)
        ranges = entry.extents if entry.extents is not None else [(0, None)]
        chunker = StreamChunker(self.params)
        size = 0
        for start, length in ranges:
            for data in _read_range(fd, start, length):
                size += len(data)
                self._add_chunks(entry, chunker.feed(data))
        self._add_chunks(entry, chunker.finish())
        if entry.extents is None:
            entry.size = size  # the file may have changed since it was listed

    def _old_layout(self, old: ParentFile | None) -> list[OldChunk] | None:
        """Where the parent's chunks of a changed large file lie, if it can guide re-chunking."""
        if old is None or old.sparse or not old.chunks:
            return None
        lengths = []
        for bid in old.chunks:
            ref = self.repo.index.get(bid)
            if ref is None:
                return None  # a prune removed it: chunk the file afresh
            lengths.append((bid, ref.raw_length))
        return old_layout(lengths)

    def _read_guided(self, fd: int, entry: Entry, old: list[OldChunk]) -> None:
        """Re-chunk a changed file, reusing the old chunks that are still where they were."""
        verifier = _Verifier(self.pool, fd, old, self.blob_id)
        size = 0
        try:
            for reused, data in guided_chunks(old, verifier.still_there, lambda off, n: _pread(fd, n, off),
                                              self.params):
                if reused is not None:
                    self._add_known(entry, reused.id, reused.length)
                    size += reused.length
                else:
                    self._add_chunks(entry, (data,))
                    size += len(data)
        finally:
            verifier.close()
        entry.size = size

    def _add_known(self, entry: Entry, bid: str, length: int) -> None:
        batch = self.batch
        batch.owners.append(entry)
        batch.chunks.append(_NO_DATA)
        batch.ids.append(bid)
        batch.lengths.append(length)

    def _add_chunks(self, entry: Entry, chunks: Iterable[memoryview]) -> None:
        # Small chunks are hashed here: in a worker, each hash would hand the GIL over and
        # take it back, and a thread switch costs more than hashing a small file.
        batch = self.batch
        for chunk in chunks:
            batch.owners.append(entry)
            batch.chunks.append(chunk)
            batch.ids.append(self.blob_id(chunk) if len(chunk) < SMALL_CHUNK else None)
            batch.lengths.append(len(chunk))
            batch.nbytes += len(chunk)
        if batch.nbytes >= BATCH_BYTES:
            self._queue_batch()

    def _queue_batch(self) -> None:
        batch, self.batch = self.batch, _Batch()
        if batch.chunks:
            batch.future = self.pool.submit(self._hash_compress, batch.chunks, batch.ids)
        if batch.chunks or batch.entries:
            self.queue.append(batch)
            self.in_flight += batch.nbytes
            self._drain()

    def _hash_compress(self, chunks: list[memoryview], ids: list[str | None]) -> list[BlobResult]:
        """In the pool: the chunks' ids, and the chunks the repository lacks compressed."""
        blob_id = self.blob_id
        bids = [bid or blob_id(chunk) for bid, chunk in zip(ids, chunks, strict=True)]
        new = [i for i, bid in enumerate(bids) if not self.repo.has_blob(bid)]
        compressed: list[Frame | None] = [None] * len(chunks)
        for i, data in zip(new, self._compress_all([chunks[i] for i in new]), strict=True):
            compressed[i] = data
        return list(zip(bids, compressed, strict=True))

    def _compress_all(self, chunks: list[bytes | bytearray | memoryview]) -> list[Frame]:
        zstd = self._tls.zstd
        if _MULTI_COMPRESS and chunks:  # the GIL is released once for the batch, not once per chunk
            frames = zstd.multi_compress_to_buffer(chunks)
            # Views, not copies: the pack joins them once (they keep the batch's buffer alive until then).
            return [memoryview(frames[i]) for i in range(len(frames))]  # type: ignore[arg-type]  # a buffer; stubs lag
        return [zstd.compress(chunk) for chunk in chunks]

    def _drain(self, everything: bool = False) -> None:
        """Consume finished batches in order, waiting while the window is full."""
        while self.queue and (everything or self.queue[0].ready() or self.in_flight > WINDOW_BYTES
                              or len(self.queue) > WINDOW_BATCHES):
            batch = self.queue.popleft()
            if batch.future is not None:
                self._store(batch.owners, batch.future.result(), batch.lengths)
            for entry in batch.entries:
                self.catalog.add(entry)
            self.in_flight -= batch.nbytes

    def _store(self, owners: list[Entry], blobs: list[BlobResult], lengths: list[int]) -> None:
        new_chunks = new_bytes = raw_bytes = 0
        for entry, (bid, compressed), raw_len in zip(owners, blobs, lengths, strict=True):
            entry.chunks.append(bid)
            raw_bytes += raw_len
            if compressed is not None and self.packs.add(bid, BLOB_DATA, compressed, raw_len):
                new_chunks += 1
                new_bytes += raw_len
        self.counts["chunks"] += len(blobs)
        self.counts["new_chunks"] += new_chunks
        self.counts["new_bytes"] += new_bytes
        self._advance(raw_bytes, 0)

    def _advance(self, nbytes: int, files: int) -> None:
        self.progress.bytes_done += nbytes
        self.progress.files_done += files
        now = time.monotonic()
        if now - self._last_report >= 0.2:
            self._last_report = now
            self.report(self.progress)


_NO_DATA = memoryview(b"")


class _Verifier:
    """Checks in the pool, a few MiB per job and a few jobs ahead, which old chunks
    a changed file still holds at their offsets (reads and hashes release the GIL)."""

    def __init__(self, pool: ThreadPoolExecutor, fd: int, old: list[OldChunk], blob_id: Hasher) -> None:
        self.pool, self.fd, self.old, self.blob_id = pool, fd, old, blob_id
        self.groups: list[tuple[int, int]] = []  # [first, end) chunk indexes per job
        first = 0
        while first < len(old):
            end, size = first, 0
            while end < len(old) and (size < VERIFY_BYTES or end == first):
                size += old[end].length
                end += 1
            self.groups.append((first, end))
            first = end
        self.group_of = [g for g, (a, b) in enumerate(self.groups) for _ in range(a, b)]
        self.jobs: list[Future[list[bool]]] = []

    def still_there(self, k: int) -> bool:
        g = self.group_of[k]
        while len(self.jobs) < min(len(self.groups), g + 1 + VERIFY_AHEAD):
            self.jobs.append(self.pool.submit(self._check, *self.groups[len(self.jobs)]))
        first = self.groups[g][0]
        return self.jobs[g].result()[k - first]

    def _check(self, first: int, end: int) -> list[bool]:
        start = self.old[first].offset
        data = memoryview(_pread(self.fd, self.old[end - 1].offset + self.old[end - 1].length - start, start))
        out = []
        for c in self.old[first:end]:
            piece = data[c.offset - start : c.offset - start + c.length]
            out.append(len(piece) == c.length and self.blob_id(piece) == c.id)
        return out

    def close(self) -> None:
        """Wait for every job: none may read the descriptor after the file is closed."""
        for job in self.jobs:
            if not job.cancel():
                job.exception()


def _read_small(fd: int, entry: Entry) -> bytes | None:
    """A small file's content in one call, or None if it grew since it was listed."""
    data = _pread(fd, entry.size + 1, 0)  # one byte more: a short read is the end, no second call
    if len(data) > entry.size:
        return None
    entry.size = len(data)
    return data


def _read_range(fd: int, start: int, length: int | None) -> Iterator[bytes]:
    pos, end = start, None if length is None else start + length
    while end is None or pos < end:
        want = READ_SIZE if end is None else min(READ_SIZE, end - pos)
        data = _pread(fd, want, pos)
        if not data:
            return
        pos += len(data)
        yield data
        if len(data) < want:
            return  # a short read of a regular file is its end: saves a syscall per file


def _pread(fd: int, size: int, offset: int) -> bytes:
    try:
        return os.pread(fd, size, offset)
    except OSError as exc:
        raise StorageError(f"cannot read volume data: {os.strerror(exc.errno or errno.EIO)}") from None


class _CatalogWriter:
    """Streams catalog lines through the chunker into metadata blobs."""

    def __init__(self, repo: Repository, packs: PackWriter) -> None:
        self.packs = packs
        self.blob_id = repo.blob_id
        self.chunker = StreamChunker(repo.config.chunker)
        self.zstd = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
        self.buf: list[bytes] = []
        self.size = 0
        self.ids: list[str] = []
        self.entries = 0

    def add(self, entry: Entry | bytes) -> None:
        line = entry if isinstance(entry, bytes) else entry.to_json().encode() + b"\n"
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
            bid = self.blob_id(chunk)
            self.ids.append(bid)
            if not self.packs.has(bid):  # an unchanged stretch of the parent's catalog is stored already
                self.packs.add(bid, BLOB_META, self.zstd.compress(chunk), len(chunk))


class ParentFile(NamedTuple):  # a tuple: made once per file, three times cheaper than a frozen dataclass
    """A regular file of the parent snapshot: its metadata as recorded, its chunks, and its
    catalog line, which is what a new backup of the unchanged file would write."""

    meta: tuple[int, ...]
    chunks: list[str]
    line: bytes
    sparse: bool  # its chunks cover its data extents, not its offsets


class ParentCatalog:
    """A parent snapshot's files, looked up in walk order while its catalog streams by.

    The catalog is in walk order too, so this is a merge: memory stays flat however
    many files the volume has.  A line that is malformed, out of order or unreadable
    costs only reuse: that file is read again."""

    def __init__(self, lines: Iterator[bytes]) -> None:
        self._lines = lines
        self._ahead: deque[tuple[str, ParentFile]] = deque()
        self._head: tuple[str, ParentFile] | None = None
        self._advance()

    def parse_ahead(self, limit: int = PARSE_AHEAD, until: threading.Event | None = None) -> None:
        """Parse files ahead of the walk, up to ``limit`` bytes of their lines or until ``until``
        is set: done while the backup waits for its helper to start, it takes that work off the walk's path."""
        held = 0
        while held < limit and not (until and until.is_set()):
            found = self._next_file()
            if found is None:
                return
            self._ahead.append(found)
            held += len(found[1].line)

    def get(self, path: str) -> ParentFile | None:
        """``path``'s entry; paths must come in walk order."""
        if self._head is not None and self._head[0] != path:
            key = _walk_key(path)
            while self._head is not None and self._head[0] != path and _walk_key(self._head[0]) < key:
                self._advance()
        if self._head is None or self._head[0] != path:
            return None
        found = self._head[1]
        self._advance()
        return found

    def _advance(self) -> None:
        """Move to the next regular file of the catalog."""
        self._head = self._ahead.popleft() if self._ahead else self._next_file()

    def _next_file(self) -> tuple[str, ParentFile] | None:
        try:
            for line in self._lines:
                found = _parent_file(line)
                if found is not None:
                    return found
        except CorruptDataError:
            pass  # a damaged parent only means reading everything again
        return None


def _walk_key(path: str) -> tuple[bytes, ...]:
    # Depth first, siblings by their byte names: the order of fswalk and of every catalog.
    return tuple(os.fsencode(path).split(b"/"))


def _meta(entry: Entry) -> tuple[int, ...]:
    # Any change of content, owner, mode or xattrs moves the ctime; the rest guards forged lines.
    return entry.mode, entry.uid, entry.gid, entry.mtime_ns, entry.size, entry.ino, entry.ctime_ns


def load_catalog_map(repo: Repository, snapshot: Snapshot) -> ParentCatalog:
    """A parent snapshot's regular files, for change detection (read as the backup walks)."""
    return ParentCatalog(repo.read_catalog(snapshot))


def _parent_file(line: bytes) -> tuple[str, ParentFile] | None:
    """A file's line, checked only as far as reusing it needs (restore checks it in full):
    parsing each line in full would cost more than the rest of an incremental backup."""
    plain = PLAIN_FILE.fullmatch(line)
    if plain is not None:
        path, meta, ids = plain_file_fields(plain)  # in _meta's order
        return path, ParentFile(meta, ids, line + b"\n", False)
    return _parsed_parent_file(line)


def _parsed_parent_file(line: bytes) -> tuple[str, ParentFile] | None:
    """``_parent_file`` for any line: through the JSON parser."""
    try:
        doc = json.loads(line)
        meta = (doc["m"], doc["u"], doc["g"], doc["mt"], doc["s"], doc["i"], doc["ct"])
        path, chunks = doc["p"], doc["c"]
        if (doc["t"] != FILE or not doc.keys() <= _FILE_KEYS or type(path) is not str
                or not all(type(v) is int for v in meta) or not all(type(c) is str for c in chunks)):
            return None
        os.fsencode(path)  # a name no walk can produce would break the ordering: UnicodeEncodeError
    except (ValueError, KeyError, TypeError, AttributeError):  # UnicodeError is a ValueError
        return None
    return path, ParentFile(meta, chunks, line + b"\n", "e" in doc)
