"""Re-chunking a changed file guided by its previous chunks.

A database overwrites pages in place: most of a changed file is what it was.
Content-defined chunking restarts at every cut, so where the file still holds
an old chunk at the old chunk's offset, full chunking would cut it there again
- and a chunk whose bytes hash to the old id holds those bytes.  Only the
stretches that changed need the chunker, until one of its cuts lands on an old
boundary again.  The chunks are exactly those of chunking the whole file (the
tests compare both), at the cost of hashing the old chunks' ranges, which
threads do in parallel (hashing releases the GIL).

Two exceptions keep it exact: an old chunk that ended at the old end of the
file was cut by the end, not by its content, so it is reused only where the
file still ends there; and a sparse file's chunks cover its data extents, not
its offsets, so sparse files are never guided.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from volmove.core.chunker import cuts
from volmove.core.format import ChunkerParams

READ_AHEAD = 1 << 20
ReadAt = Callable[[int, int], bytes]  # (offset, length) -> at most length bytes; short only at the end


@dataclass(frozen=True, slots=True)
class OldChunk:
    id: str
    offset: int
    length: int


def old_layout(chunks: Sequence[tuple[str, int]]) -> list[OldChunk]:
    """Offsets of the previous chunks, from their ids and lengths in file order."""
    out, offset = [], 0
    for bid, length in chunks:
        out.append(OldChunk(bid, offset, length))
        offset += length
    return out


def guided_chunks(old: Sequence[OldChunk], still_there: Callable[[int], bool], read_at: ReadAt,
                  params: ChunkerParams) -> Iterator[tuple[OldChunk | None, memoryview]]:
    """The file's chunks in order: ``(old chunk, empty view)`` where old chunk ``k`` is reused
    (``still_there(k)``: the file holds its bytes at its offset), else ``(None, bytes)``."""
    starts = {c.offset: k for k, c in enumerate(old)}
    old_end = old[-1].offset + old[-1].length if old else 0
    reader = _Window(read_at)
    pos = 0
    while True:
        k = starts.get(pos)
        if k is not None and still_there(k):
            end = pos + old[k].length
            if end != old_end or not reader.read(end, 1):  # cut by the old end: only where it still ends
                yield old[k], memoryview(b"")
                pos = end
                continue
        data = reader.read(pos, params.max_size)
        if not data:
            return
        cut = first_cut(data, params)
        yield None, data[:cut]
        pos += cut


def first_cut(data: memoryview, params: ChunkerParams) -> int:
    """Length of the chunk that starts ``data``: ``data`` holds max_size bytes, or the rest of the file."""
    if len(data) <= params.min_size:
        return len(data)
    return next(cuts(data, params))[1]


class _Window:
    """Reads ahead so that chunking a changed stretch costs one read per few MiB, not per chunk."""

    def __init__(self, read_at: ReadAt) -> None:
        self.read_at = read_at
        self.start = 0
        self.buf = memoryview(b"")
        self.eof = False

    def read(self, offset: int, length: int) -> memoryview:
        rel = offset - self.start
        if not (rel >= 0 and (rel + length <= len(self.buf) or self.eof)):
            self.start, rel = offset, 0
            want = max(length, READ_AHEAD)
            self.buf = memoryview(self.read_at(offset, want))
            self.eof = len(self.buf) < want
        return self.buf[rel : rel + length]
