"""Helpers to run the data path on plain directories (no Docker) in tests."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from volmove.core.backup import BackupEngine, load_catalog_map
from volmove.core.format import DEFAULT_HASH, RepoConfig
from volmove.core.repository import Repository, init_repository
from volmove.core.restore import Restorer, RestoreResult
from volmove.core.snapshot import Snapshot, VolumeSpec
from volmove.core.storage.base import Storage


class Overlap:
    """Counts calls in flight: ``running`` now, ``most`` at once so far."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.running = self.most = 0

    @contextmanager
    def call(self) -> Iterator[None]:
        with self._lock:
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            yield
        finally:
            with self._lock:
                self.running -= 1


def config_doc(**changes: object) -> bytes:
    """A new repository's config object with some fields replaced (or added)."""
    doc = json.loads(RepoConfig(id="x", created="now").to_json())
    doc.update(changes)
    return json.dumps(doc).encode()


def new_repo(storage: Storage, hash_name: str = DEFAULT_HASH) -> Repository:
    init_repository(storage, hash_name=hash_name)
    repo = Repository.open(storage)
    repo.load_index()
    return repo


def backup_dir(repo: Repository, src: Path, volume: str = "vol", parent: Snapshot | None = None) -> Snapshot:
    fd = os.open(src, os.O_RDONLY | os.O_DIRECTORY)
    try:
        parent_map = load_catalog_map(repo, parent) if parent else None
        res = BackupEngine(repo, parent=parent_map).run(fd)
    finally:
        os.close(fd)
    snap = Snapshot(time=datetime.now(UTC), host="test", volume=VolumeSpec(volume), catalog=tuple(res.catalog),
                    entries=res.entries, stats=res.stats, parent=parent.id if parent else None)
    sid = repo.save_snapshot(snap)
    return repo.load_snapshot(sid)


def restore_dir(repo: Repository, snap: Snapshot, dst: Path, **kw: object) -> RestoreResult:
    dst.mkdir(exist_ok=True)
    fd = os.open(dst, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return Restorer(repo, fd, **kw).run(snap)  # type: ignore[arg-type]
    finally:
        os.close(fd)


def tree_state(root: Path) -> dict[bytes, tuple[object, ...]]:
    """Everything restore must reproduce, per path (bytes, so odd names compare exactly)."""
    out: dict[bytes, tuple[object, ...]] = {}
    rootb = os.fsencode(root)
    for dirpath, dirs, files in os.walk(rootb):
        for name in [b".", *dirs, *files] if dirpath == rootb else [*dirs, *files]:
            path = os.path.join(dirpath, name) if name != b"." else dirpath
            rel = os.path.relpath(path, rootb)
            out[rel] = _state(path)
    return out


def _state(path: bytes) -> tuple[object, ...]:
    st = os.lstat(path)
    kind = stat.S_IFMT(st.st_mode)
    content: object = None
    if stat.S_ISREG(st.st_mode):
        content = content_digest(path, st.st_size)
    elif stat.S_ISLNK(st.st_mode):
        content = os.readlink(path)
    try:
        names = os.listxattr(path, follow_symlinks=False)
        xattrs = sorted((n, os.getxattr(path, n, follow_symlinks=False)) for n in names)
    except OSError:
        xattrs = []
    return (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns, content, st.st_nlink,
            tuple(xattrs), st.st_rdev if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else 0)


def content_digest(path: bytes | str, size: int) -> str:
    """Hash of a file's data extents and their offsets: equal for equal content,
    and fast on large sparse files (holes read as nothing)."""
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY)
    try:
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            while start < end:
                data = os.pread(fd, min(8 << 20, end - start), start)
                if not data:
                    break
                # zero runs are skipped so hole layout differences between filesystems do not matter
                if data.count(0) != len(data):
                    h.update(start.to_bytes(8, "little") + data)
                start += len(data)
            pos = end
    finally:
        os.close(fd)
    return h.hexdigest()
