"""Content-defined chunking over a stream (FastCDC, gear hash).

Cut points depend only on the content, so equal data yields equal chunks
wherever it sits in a file and whichever host reads it.  A cut that falls at
the end of a buffer is not a real cut, so that tail is carried into the next
feed.  The gear hash restarts at every cut, which is why chunking a whole
buffer at once gives the same chunks as feeding it in pieces.
"""

from __future__ import annotations

from collections.abc import Iterator

import pyfastcdc

from volmove.core.format import CDC_2020, ChunkerParams


class StreamChunker:
    def __init__(self, params: ChunkerParams) -> None:
        self.params = params
        self._carry = b""

    def feed(self, data: bytes | memoryview) -> Iterator[memoryview]:
        """Chunks completed by ``data``; the unfinished tail stays buffered."""
        view = memoryview(data)
        if self._carry:
            # Only the chunks that start in the carry are copied; the rest are views of ``data``.
            # They may end inside it: FastCDC 2020 steps two bytes at a time, so it never looks at
            # the last byte of a buffer of odd length, and a cut can fall there once more data comes.
            carried = len(self._carry)
            head = memoryview(self._carry + view[: self.params.max_size])
            pos = 0
            while pos < carried:
                cut = next(cuts(head[pos:], self.params))[1]
                if pos + cut == len(head) and len(view) <= self.params.max_size:
                    self._carry = bytes(head[pos:])  # still no cut
                    return
                yield head[pos : pos + cut]
                pos += cut
            view = view[pos - carried :]
        end = 0
        for off, length in cuts(view, self.params):
            if off + length == len(view):
                break  # may move once more data arrives
            yield view[off : off + length]
            end = off + length
        self._carry = bytes(view[end:])

    def finish(self) -> Iterator[memoryview]:
        """The remaining chunks at the end of the stream."""
        buf, self._carry = memoryview(self._carry), b""
        for off, length in cuts(buf, self.params):
            yield buf[off : off + length]


def cuts(buf: memoryview, params: ChunkerParams) -> Iterator[tuple[int, int]]:
    """Offset and length of each chunk of ``buf``, the last one ending at its end."""
    if not len(buf):
        return
    p = params
    if p.algorithm == CDC_2020:
        # Normalized chunking level 1 and the default gear table (fastcdc-rs's v2020).
        cdc = pyfastcdc.FastCDC(p.avg_size, min_size=p.min_size, max_size=p.max_size, normalized_chunking=1)
        for chunk in cdc.cut_buf(buf):
            yield chunk.offset, chunk.length
    else:
        # Imported here: the package also imports click, for its command line (~10 ms of every start).
        from fastcdc import fastcdc_cy

        for old in fastcdc_cy.fastcdc_cy(buf, p.min_size, p.avg_size, p.max_size):
            yield old.offset, old.length


def chunk_all(data: bytes, params: ChunkerParams) -> list[memoryview]:
    """Chunk a whole buffer at once: the chunks a stream of ``data`` would give."""
    if len(data) <= params.min_size:  # FastCDC never cuts before min_size: skip its per-call cost
        return [memoryview(data)] if data else []
    ch = StreamChunker(params)
    return [*ch.feed(data), *ch.finish()]


def chunk_bytes(data: bytes, params: ChunkerParams) -> list[bytes]:
    """Chunk a whole buffer at once (tests)."""
    return [bytes(c) for c in chunk_all(data, params)]
