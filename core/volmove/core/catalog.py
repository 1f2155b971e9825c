"""The per-file catalog of a snapshot: one JSON object per line.

Pure.  Paths are relative, ``/``-separated, decoded from bytes with
``surrogateescape`` (so names that are not UTF-8 round-trip through JSON's
``\\udcXX`` escapes).  The root of the volume is the entry ``.``.  Entries come
in depth-first order with each directory's children sorted by their byte
names, so a directory always precedes its contents.

A catalog read from a repository is hostile input: ``CatalogValidator``
refuses paths that escape, entries whose parent is not a directory of the
same snapshot, duplicates, and hardlinks to anything but an earlier regular
file of the snapshot.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from volmove.core.errors import UnsafeDataError

# File types: regular, directory, symlink, hardlink, fifo, char/block device, socket.
FILE, DIR, SYMLINK, HARDLINK, FIFO, CHARDEV, BLOCKDEV, SOCKET = "f", "d", "l", "h", "p", "c", "b", "s"
TYPES = frozenset({FILE, DIR, SYMLINK, HARDLINK, FIFO, CHARDEV, BLOCKDEV, SOCKET})
DEVICES = frozenset({CHARDEV, BLOCKDEV})
ROOT = "."
MAX_PATH_BYTES = 64 * 1024
MAX_SIZE = 1 << 60
_HEX_ID = re.compile(r"[0-9a-f]{64}")


@dataclass(slots=True)
class Entry:
    path: str
    type: str
    mode: int = 0o644  # permission bits including setuid, setgid and sticky
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    size: int = 0
    target: str | None = None  # symlink target, or the path a hardlink points to
    chunks: list[str] = field(default_factory=list)
    extents: list[tuple[int, int]] | None = None  # data extents of a sparse file
    xattrs: dict[str, bytes] = field(default_factory=dict)
    rdev: int = 0
    # Change detection against a parent snapshot; never restored.
    ino: int = 0
    ctime_ns: int = 0

    @property
    def content_hash(self) -> str:
        """Hash of the chunk list: chunking is deterministic, so equal content gives equal hashes."""
        return content_hash(self.chunks)

    def to_json(self) -> str:
        doc: dict[str, Any] = {"p": self.path, "t": self.type, "m": self.mode, "u": self.uid, "g": self.gid,
                               "mt": self.mtime_ns}
        if self.type == FILE:
            doc.update(s=self.size, c=self.chunks, h=self.content_hash, i=self.ino, ct=self.ctime_ns)
            if self.extents is not None:
                doc["e"] = [list(e) for e in self.extents]
        if self.target is not None:
            doc["lt"] = self.target
        if self.xattrs:
            doc["x"] = {k: base64.b64encode(v).decode() for k, v in sorted(self.xattrs.items())}
        if self.type in DEVICES:
            doc["r"] = self.rdev
        return json.dumps(doc, separators=(",", ":"))


def content_hash(chunks: list[str]) -> str:
    return hashlib.sha256(b"".join(bytes.fromhex(c) for c in chunks)).hexdigest()


def encode_lines(entries: Iterable[Entry]) -> Iterator[bytes]:
    for entry in entries:
        yield entry.to_json().encode() + b"\n"


def parse_entry(line: bytes | str) -> Entry:
    """Decode one line, checking types and ranges (not yet its place in the tree)."""
    try:
        doc = json.loads(line)
    except (ValueError, RecursionError):  # RecursionError: a forged line of deeply nested arrays
        raise UnsafeDataError("catalog line is not valid JSON") from None
    if not isinstance(doc, dict):
        raise UnsafeDataError("catalog line is malformed")
    path = _str(doc, "p")
    entry = Entry(path=path, type=_str(doc, "t"), mode=_num(doc, "m", 0o7777), uid=_num(doc, "u", 1 << 32),
                  gid=_num(doc, "g", 1 << 32), mtime_ns=_snum(doc, "mt"))
    if entry.type not in TYPES:
        raise UnsafeDataError(f"catalog entry {path!r} has unknown type {entry.type!r}")
    if entry.type == FILE:
        _parse_file(doc, entry)
    if "lt" in doc:
        entry.target = _str(doc, "lt")
    if "x" in doc:
        entry.xattrs = _parse_xattrs(doc["x"], path)
    if entry.type in DEVICES:
        entry.rdev = _num(doc, "r", 1 << 64)
    return entry


def _parse_file(doc: dict[str, Any], entry: Entry) -> None:
    entry.size = _num(doc, "s", MAX_SIZE)
    chunks = doc.get("c")
    if not isinstance(chunks, list) or not all(isinstance(c, str) and _HEX_ID.fullmatch(c) for c in chunks):
        raise UnsafeDataError(f"catalog entry {entry.path!r} has a malformed chunk list")
    entry.chunks = chunks
    entry.ino = _num(doc, "i", 1 << 64) if "i" in doc else 0
    entry.ctime_ns = _snum(doc, "ct") if "ct" in doc else 0
    if "e" in doc:
        entry.extents = _parse_extents(doc["e"], entry)


def _parse_extents(raw: object, entry: Entry) -> list[tuple[int, int]]:
    if not isinstance(raw, list):
        raise UnsafeDataError(f"catalog entry {entry.path!r} has malformed extents")
    extents: list[tuple[int, int]] = []
    end = 0
    for ext in raw:
        if not (isinstance(ext, list) and len(ext) == 2 and all(_is_nat(v) for v in ext)):
            raise UnsafeDataError(f"catalog entry {entry.path!r} has malformed extents")
        off, length = ext
        if off < end or off + length > entry.size:
            raise UnsafeDataError(f"catalog entry {entry.path!r} has extents out of order or past its size")
        extents.append((off, length))
        end = off + length
    return extents


def _parse_xattrs(raw: object, path: str) -> dict[str, bytes]:
    if not isinstance(raw, dict):
        raise UnsafeDataError(f"catalog entry {path!r} has malformed xattrs")
    out = {}
    for name, value in raw.items():
        if not isinstance(value, str) or not name or "\0" in name or not _encodable(name):
            raise UnsafeDataError(f"catalog entry {path!r} has malformed xattrs")
        try:
            out[name] = base64.b64decode(value, validate=True)
        except ValueError:
            raise UnsafeDataError(f"catalog entry {path!r} has malformed xattrs") from None
    return out


def _is_nat(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_SIZE


def _str(doc: dict[str, Any], key: str) -> str:
    value = doc.get(key)
    if not isinstance(value, str) or "\0" in value or not value or not _encodable(value):
        raise UnsafeDataError(f"catalog entry has a malformed field {key!r}")
    return value


def _encodable(value: str) -> bool:
    """Names reach the OS through ``os.fsencode``: only the surrogates it made may appear."""
    try:
        value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return False
    return True


def _num(doc: dict[str, Any], key: str, limit: int) -> int:
    value = doc.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < limit:
        raise UnsafeDataError(f"catalog entry has a malformed field {key!r}")
    return value


def _snum(doc: dict[str, Any], key: str) -> int:
    value = doc.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or abs(value) >= 1 << 63:
        raise UnsafeDataError(f"catalog entry has a malformed field {key!r}")
    return value


def check_path(path: str) -> None:
    """Refuse absolute paths, ``..`` and empty components: nothing may land outside the target."""
    if path == ROOT:
        return
    if path.startswith("/") or len(path.encode("utf-8", "surrogateescape")) > MAX_PATH_BYTES:
        raise UnsafeDataError(f"snapshot entry {path!r} has an absolute or overlong path")
    for part in path.split("/"):
        if part in ("", ".", ".."):
            raise UnsafeDataError(f"snapshot entry {path!r} contains '..', '.' or an empty component")


def parent_of(path: str) -> str:
    head, sep, _ = path.rpartition("/")
    return head if sep else ROOT


class CatalogValidator:
    """Checks each entry's place in the tree as a restore streams the catalog."""

    def __init__(self, *, allow_devices: bool = False) -> None:
        self.allow_devices = allow_devices
        self._dirs: set[str] = set()
        self._files: set[str] = set()
        self._others: set[str] = set()  # symlinks, hardlinks, nodes: only for spotting duplicates
        self._seen_root = False

    def check(self, entry: Entry) -> None:
        check_path(entry.path)
        if entry.path == ROOT:
            self._check_root(entry)
            return
        if not self._seen_root:
            raise UnsafeDataError("snapshot catalog does not start with its root directory")
        if entry.path in self._dirs or entry.path in self._files or entry.path in self._others:
            raise UnsafeDataError(f"snapshot entry {entry.path!r} appears twice")
        if parent_of(entry.path) not in self._dirs:
            raise UnsafeDataError(f"snapshot entry {entry.path!r} is not inside a directory of the snapshot")
        self._check_kind(entry)
        if entry.type == DIR:
            self._dirs.add(entry.path)
        elif entry.type == FILE:
            self._files.add(entry.path)
        else:
            self._others.add(entry.path)

    def _check_root(self, entry: Entry) -> None:
        if self._seen_root or entry.type != DIR:
            raise UnsafeDataError("snapshot catalog has a malformed root entry")
        self._seen_root = True
        self._dirs.add(ROOT)

    def _check_kind(self, entry: Entry) -> None:
        if entry.type == HARDLINK:
            if entry.target is None or entry.target not in self._files:
                raise UnsafeDataError(f"hardlink {entry.path!r} points outside the snapshot's files")
        elif entry.type == SYMLINK:
            if entry.target is None:
                raise UnsafeDataError(f"symlink {entry.path!r} has no target")
        elif entry.type in DEVICES and not self.allow_devices:
            raise UnsafeDataError(f"snapshot contains device node {entry.path!r}; pass --allow-devices to restore it")
        elif entry.type == FILE:
            stored = sum(e[1] for e in entry.extents) if entry.extents is not None else entry.size
            if stored > entry.size:
                raise UnsafeDataError(f"snapshot entry {entry.path!r} has inconsistent sizes")
