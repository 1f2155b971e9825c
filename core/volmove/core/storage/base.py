"""The narrow storage interface the repository needs, owned by its consumer.

Objects are immutable: ``put`` of an existing key is refused unless
``overwrite`` (only the repository config's first write and lock renewals use
it).  Keys are ``/``-separated relative names such as ``data/ab/abcdef…``.
All methods are synchronous and thread-safe: the data path calls them from
worker threads; async callers wrap them with ``asyncio.to_thread``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    mtime: float  # seconds since the epoch, as the backend reports it


class Storage(Protocol):
    """What the repository asks of a backend.  Errors are volmove errors."""

    url: str
    # True where a request is expensive (S3): readers then fetch whole packs.
    prefers_whole_objects: bool

    def put(self, key: str, data: bytes, *, overwrite: bool = False) -> None:
        """Store ``data`` atomically: readers see the whole object or nothing."""

    def put_parts(self, key: str, parts: Sequence[bytes | memoryview], *, overwrite: bool = False) -> None:
        """``put`` of the parts' concatenation (a pack is its blobs: a backend may write them as they are)."""

    def get(self, key: str) -> bytes:
        """Return the whole object; NotFoundError if absent."""

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        """Return ``length`` bytes from ``offset``; CorruptDataError if short."""

    def exists(self, key: str) -> bool: ...

    def stat(self, key: str) -> ObjectInfo:
        """NotFoundError if absent."""

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Every object whose key starts with ``prefix``, in no particular order."""

    def delete(self, key: str) -> None:
        """Remove the object; absent keys are not an error."""

    def cleanup_incomplete(self, older_than: float) -> int:
        """Remove leftovers of interrupted writes older than ``older_than``
        seconds (temp files, unfinished multipart uploads); return how many."""

    def close(self) -> None: ...
