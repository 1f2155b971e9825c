"""An in-memory backend: the fake for fast tests, held to the same conformance suite."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence

from volmove.core.errors import ConflictError, CorruptDataError, NotFoundError
from volmove.core.storage.base import ObjectInfo


class MemoryStorage:
    prefers_whole_objects = False

    def __init__(self, url: str = "memory://") -> None:
        self.url = url
        self._objects: dict[str, tuple[bytes, float]] = {}
        self._lock = threading.Lock()

    def put_parts(self, key: str, parts: Sequence[bytes | memoryview], *, overwrite: bool = False) -> None:
        self.put(key, b"".join(parts), overwrite=overwrite)

    def put(self, key: str, data: bytes, *, overwrite: bool = False) -> None:
        with self._lock:
            if not overwrite and key in self._objects:
                raise ConflictError(f"object {key} already exists")
            self._objects[key] = (bytes(data), time.time())

    def get(self, key: str) -> bytes:
        with self._lock:
            try:
                return self._objects[key][0]
            except KeyError:
                raise NotFoundError(f"object {key} not found in {self.url}") from None

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        data = self.get(key)[offset : offset + length]
        if len(data) != length:
            raise CorruptDataError(f"object {key} is shorter than expected")
        return data

    def exists(self, key: str) -> bool:
        with self._lock:
            return key in self._objects

    def stat(self, key: str) -> ObjectInfo:
        with self._lock:
            try:
                data, mtime = self._objects[key]
            except KeyError:
                raise NotFoundError(f"object {key} not found in {self.url}") from None
            return ObjectInfo(key, len(data), mtime)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        with self._lock:
            items = [ObjectInfo(k, len(d), m) for k, (d, m) in self._objects.items() if k.startswith(prefix)]
        yield from items

    def delete(self, key: str) -> None:
        with self._lock:
            self._objects.pop(key, None)

    def cleanup_incomplete(self, older_than: float) -> int:
        return 0

    def close(self) -> None:
        pass

    def set_mtime(self, key: str, mtime: float) -> None:
        """Tests age objects with this instead of sleeping."""
        with self._lock:
            data, _ = self._objects[key]
            self._objects[key] = (data, mtime)
