"""Storage backends and the URL that picks one."""

from __future__ import annotations

from volmove.core.errors import UsageError
from volmove.core.storage.base import ObjectInfo, Storage

__all__ = ["ObjectInfo", "Storage", "open_storage"]


def open_storage(url: str, *, create: bool = False) -> Storage:
    """``/path``, ``file:///path``, ``s3://bucket/prefix`` or ``memory://``."""
    if url.startswith("s3://"):
        from volmove.core.storage.s3 import S3Storage

        return S3Storage.from_url(url, create=create)
    if url.startswith("memory://"):
        from volmove.core.storage.memory import MemoryStorage

        return MemoryStorage(url)
    if url.startswith("file://"):
        url = url[len("file://") :]
    if not url or "://" in url:
        raise UsageError(f"unsupported repository URL {url!r}: use /path, file:///path or s3://bucket/prefix")
    from volmove.core.storage.local import LocalStorage

    return LocalStorage(url, create=create)
