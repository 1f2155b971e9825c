"""Local file writing shared by the data path and the state files: whole writes, direct I/O
constants, syncing a file system, and small state files (journals of stopped containers, worker job records)."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

O_DIRECT = getattr(os, "O_DIRECT", 0)  # 0 where the platform has none: direct writes are then skipped
DIRECT_ALIGN = 4096  # offsets and lengths of direct writes: a multiple of any logical block size


def write_all(fd: int, data: bytes | memoryview, pos: int | None = None) -> None:
    """Write all of ``data`` at ``pos``, or at the file's offset."""
    done = os.write(fd, data) if pos is None else os.pwrite(fd, data, pos)
    if done < len(data):  # short writes are rare: finish through a view
        view = memoryview(data)
        while done < len(view):
            done += os.write(fd, view[done:]) if pos is None else os.pwrite(fd, view[done:], pos + done)


def syncfs(fd: int) -> None:
    """Write out the dirty data of the file system that holds ``fd``; raises its write-back errors
    (Linux 5.8 on).  Python 3.11 has no ``os.syncfs``; a ctypes call releases the GIL."""
    if libc().syncfs(fd) != 0:
        import ctypes

        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@functools.cache
def libc() -> Any:
    """The C library, for the calls Python has no wrapper for."""
    import ctypes  # here, not above: few runs need it (~2 ms)

    return ctypes.CDLL(None, use_errno=True)


def write_json_durably(path: Path, doc: Any) -> None:
    """Write atomically and durably: a crash leaves the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # not matched by *.json: readers never see it
    with tmp.open("w") as f:
        json.dump(doc, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
