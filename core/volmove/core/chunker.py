"""Content-defined chunking over a stream (FastCDC, gear hash).

Cut points depend only on the content, so equal data yields equal chunks
wherever it sits in a file and whichever host reads it.  A cut that falls at
the end of a buffer is not a real cut, so that tail is carried into the next
feed.  The gear hash restarts at every cut, which is why chunking a whole
buffer at once gives the same chunks as feeding it in pieces.
"""

from __future__ import annotations

from collections.abc import Iterator

from fastcdc import fastcdc_cy

from volmove.core.format import ChunkerParams


class StreamChunker:
    def __init__(self, params: ChunkerParams) -> None:
        self.params = params
        self._carry = b""

    def feed(self, data: bytes | memoryview) -> Iterator[memoryview]:
        """Chunks completed by ``data``; the unfinished tail stays buffered."""
        view = memoryview(data)
        if self._carry:
            # Only the chunk that spans the two buffers is copied; the rest are views of ``data``.
            carried = len(self._carry)
            head = memoryview(self._carry + view[: self.params.max_size])
            first = next(self._cuts(head))[1]
            if first == len(head) and len(view) <= self.params.max_size:
                self._carry = bytes(head)  # still no cut
                return
            yield head[:first]
            view = view[first - carried :]  # a cut never falls inside the carry: no cut was found there
        end = 0
        for off, length in self._cuts(view):
            if off + length == len(view):
                break  # may move once more data arrives
            yield view[off : off + length]
            end = off + length
        self._carry = bytes(view[end:])

    def finish(self) -> Iterator[memoryview]:
        """The remaining chunks at the end of the stream."""
        buf, self._carry = memoryview(self._carry), b""
        for off, length in self._cuts(buf):
            yield buf[off : off + length]

    def _cuts(self, buf: memoryview) -> Iterator[tuple[int, int]]:
        if not len(buf):
            return
        p = self.params
        for chunk in fastcdc_cy.fastcdc_cy(buf, p.min_size, p.avg_size, p.max_size):
            yield chunk.offset, chunk.length


def chunk_all(data: bytes, params: ChunkerParams) -> list[memoryview]:
    """Chunk a whole buffer at once: the chunks a stream of ``data`` would give."""
    if len(data) <= params.min_size:  # FastCDC never cuts before min_size: skip its per-call cost
        return [memoryview(data)] if data else []
    ch = StreamChunker(params)
    return [*ch.feed(data), *ch.finish()]


def chunk_bytes(data: bytes, params: ChunkerParams) -> list[bytes]:
    """Chunk a whole buffer at once (tests)."""
    return [bytes(c) for c in chunk_all(data, params)]
