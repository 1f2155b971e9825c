"""Content-defined chunking over a stream (FastCDC, gear hash).

Cut points depend only on the content, so equal data yields equal chunks
wherever it sits in a file and whichever host reads it.  A cut that falls at
the end of a buffer is not a real cut, so that tail is carried into the next
feed.
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
        buf = memoryview(self._carry + bytes(data)) if self._carry else memoryview(data)
        end = 0
        for off, length in self._cuts(buf):
            if off + length == len(buf):
                break  # may move once more data arrives
            yield buf[off : off + length]
            end = off + length
        self._carry = bytes(buf[end:])

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


def chunk_bytes(data: bytes, params: ChunkerParams) -> list[bytes]:
    """Chunk a whole buffer at once (small files, tests)."""
    ch = StreamChunker(params)
    out = [bytes(c) for c in ch.feed(data)]
    out.extend(bytes(c) for c in ch.finish())
    return out
