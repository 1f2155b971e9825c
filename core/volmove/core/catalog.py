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
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeGuard

from volmove.core.errors import UnsafeDataError

# File types: regular, directory, symlink, hardlink, fifo, char/block device, socket.
FILE, DIR, SYMLINK, HARDLINK, FIFO, CHARDEV, BLOCKDEV, SOCKET = "f", "d", "l", "h", "p", "c", "b", "s"
TYPES = frozenset({FILE, DIR, SYMLINK, HARDLINK, FIFO, CHARDEV, BLOCKDEV, SOCKET})
DEVICES = frozenset({CHARDEV, BLOCKDEV})
ROOT = "."
MAX_PATH_BYTES = 64 * 1024
MAX_SIZE = 1 << 60
_I64 = 1 << 63
_HEX_RUN = re.compile(r"[0-9a-f]*")
_JSON = json.JSONDecoder()
_esc: Callable[[str], str] = json.encoder.encode_basestring_ascii  # the C escaper json.dumps uses
_ABSENT = object()
_NAT = rb"(0|[1-9][0-9]*)"
_INT = rb"(-?(?:0|[1-9][0-9]*))"
# A plain file's line as Entry.to_json writes it when its path needs no escapes and it has no
# extents or xattrs: most lines.  Matching it whole costs a third of json.loads; what it admits,
# the JSON parser reads the same (no leading zeros, no duplicate or unknown keys, no escapes).
PLAIN_FILE = re.compile(
    rb'\{"p":"([\x20\x21\x23-\x5b\x5d-\x7e]+)","t":"f","m":' + _NAT + rb',"u":' + _NAT + rb',"g":' + _NAT
    + rb',"mt":' + _INT + rb',"s":' + _NAT + rb',"c":\[((?:"[0-9a-f]{64}",)*"[0-9a-f]{64}")?\],"h":"[0-9a-f]{64}",'
    rb'"i":' + _NAT + rb',"ct":' + _INT + rb"\}")
_INT_RANGES = {"m": (0, 0o10000), "u": (0, 1 << 32), "g": (0, 1 << 32), "mt": (1 - _I64, _I64), "s": (0, MAX_SIZE),
               "i": (0, 1 << 64), "ct": (1 - _I64, _I64), "r": (0, 1 << 64)}


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
        """The catalog line: what ``json.dumps(doc, separators=(",", ":"))`` gives, built
        directly because it runs once per file of every backup (a third of the cost)."""
        parts = [f'{{"p":{_esc(self.path)},"t":{_esc(self.type)},"m":{self.mode:d},"u":{self.uid:d},'
                 f'"g":{self.gid:d},"mt":{self.mtime_ns:d}']
        if self.type == FILE:
            parts.append(f',"s":{self.size:d},"c":[{",".join(map(_esc, self.chunks))}],"h":"{self.content_hash}",'
                         f'"i":{self.ino:d},"ct":{self.ctime_ns:d}')
            if self.extents is not None:
                parts.append(',"e":[' + ",".join(f"[{a:d},{b:d}]" for a, b in self.extents) + "]")
        if self.target is not None:
            parts.append(f',"lt":{_esc(self.target)}')
        if self.xattrs:
            parts.append(',"x":{' + ",".join(f'{_esc(k)}:"{base64.b64encode(v).decode()}"'
                                            for k, v in sorted(self.xattrs.items())) + "}")
        if self.type in DEVICES:
            parts.append(f',"r":{self.rdev:d}')
        parts.append("}")
        return "".join(parts)


def content_hash(chunks: list[str]) -> str:
    return hashlib.sha256(b"".join(bytes.fromhex(c) for c in chunks)).hexdigest()


def encode_lines(entries: Iterable[Entry]) -> Iterator[bytes]:
    for entry in entries:
        yield entry.to_json().encode() + b"\n"


def parse_entry(line: bytes | str) -> Entry:
    """Decode one line, checking types and ranges (not yet its place in the tree).

    Runs once per entry of a restore, hence plain comparisons over helper calls, and
    most lines (plain files) matched whole rather than parsed as JSON."""
    if type(line) is bytes and (plain := PLAIN_FILE.fullmatch(line)) is not None:
        entry = _plain_file(plain)
        if entry is not None:
            return entry
    return parse_json_entry(line)


def parse_json_entry(line: bytes | str) -> Entry:
    """``parse_entry`` through the JSON parser, whatever the line."""
    doc = _load(line)
    get = doc.get
    path, kind, mode, uid, gid, mtime = get("p"), get("t"), get("m"), get("u"), get("g"), get("mt")
    if not (type(mode) is int and 0 <= mode <= 0o7777 and type(uid) is int and 0 <= uid < 1 << 32
            and type(gid) is int and 0 <= gid < 1 << 32 and type(mtime) is int and -_I64 < mtime < _I64):
        raise _malformed(doc, "m", "u", "g", "mt")
    if not _is_name(path) or type(kind) is not str:
        raise _malformed(doc, "p", "t")
    entry = Entry(path, kind, mode, uid, gid, mtime)
    if kind == FILE:
        _parse_file(doc, entry)
    elif kind not in TYPES:
        raise UnsafeDataError(f"catalog entry {path!r} has unknown type {kind!r}")
    if "lt" in doc:
        target = doc["lt"]
        if not _is_name(target):
            raise _malformed(doc, "lt")
        entry.target = target
    if "x" in doc:
        entry.xattrs = _parse_xattrs(doc["x"], path)
    if kind in DEVICES:
        rdev = get("r")
        if type(rdev) is not int or not 0 <= rdev < 1 << 64:
            raise _malformed(doc, "r")
        entry.rdev = rdev
    return entry


def plain_file_fields(plain: re.Match[bytes]) -> tuple[str, tuple[int, int, int, int, int, int, int], list[str]]:
    """A ``PLAIN_FILE`` match's path, (mode, uid, gid, mtime, size, ino, ctime) unchecked, and chunk ids."""
    path, mode, uid, gid, mtime, size, chunks, ino, ctime = plain.groups()
    meta = (int(mode), int(uid), int(gid), int(mtime), int(size), int(ino), int(ctime))
    return path.decode(), meta, chunks.decode()[1:-1].split('","') if chunks else []


def _plain_file(plain: re.Match[bytes]) -> Entry | None:
    """The entry of a ``PLAIN_FILE`` line; None if a number is out of range (the JSON path names it)."""
    path, (m, u, g, mt, s, i, ct), ids = plain_file_fields(plain)
    if not (m <= 0o7777 and u < 1 << 32 and g < 1 << 32 and -_I64 < mt < _I64 and s < MAX_SIZE and i < 1 << 64
            and -_I64 < ct < _I64):
        return None
    return Entry(path, FILE, m, u, g, mt, s, chunks=ids, ino=i, ctime_ns=ct)


def _load(line: bytes | str) -> dict[str, Any]:
    try:
        text = line.decode() if isinstance(line, bytes) else line
        doc, end = _JSON.raw_decode(text)
    except (ValueError, RecursionError):  # RecursionError: a forged line of deeply nested arrays
        raise UnsafeDataError("catalog line is not valid JSON") from None
    if type(doc) is not dict or text[end:].strip():
        raise UnsafeDataError("catalog line is malformed")
    return doc


def _parse_file(doc: dict[str, Any], entry: Entry) -> None:
    get = doc.get
    size, chunks, ino, ctime = get("s"), get("c"), get("i", 0), get("ct", 0)
    if not (type(size) is int and 0 <= size < MAX_SIZE and type(ino) is int and 0 <= ino < 1 << 64
            and type(ctime) is int and -_I64 < ctime < _I64):
        raise _malformed(doc, "s", "i", "ct")
    if not _is_chunk_list(chunks):
        raise UnsafeDataError(f"catalog entry {entry.path!r} has a malformed chunk list")
    entry.size, entry.chunks, entry.ino, entry.ctime_ns = size, chunks, ino, ctime
    if "e" in doc:
        entry.extents = _parse_extents(doc["e"], entry)


def _is_chunk_list(chunks: object) -> TypeGuard[list[str]]:
    """A list of 64-digit lower-case hex ids, checked in a few C-level passes."""
    if type(chunks) is not list:
        return False
    try:
        joined = "".join(chunks)
    except TypeError:
        return False
    return set(map(len, chunks)) <= {64} and _HEX_RUN.fullmatch(joined) is not None


def _is_name(value: object) -> TypeGuard[str]:
    """A non-empty string the OS can take: no NUL, and only the surrogates ``os.fsdecode`` makes."""
    if type(value) is not str or not value or "\0" in value:
        return False
    if value.isascii():
        return True
    try:
        value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return False
    return True


def _malformed(doc: dict[str, Any], *keys: str) -> UnsafeDataError:
    """The error for the first of ``keys`` that is absent or of the wrong type."""
    path = doc.get("p")
    what = f"catalog entry {path!r}" if _is_name(path) else "catalog entry"
    bad = next((k for k in keys if not _field_ok(k, doc.get(k, _ABSENT))), keys[0])
    return UnsafeDataError(f"{what} has a malformed field {bad!r}")


def _field_ok(key: str, value: object) -> bool:
    if key in ("p", "t", "lt"):
        return _is_name(value)
    if value is _ABSENT:
        return key in ("i", "ct")
    lo, hi = _INT_RANGES[key]
    return type(value) is int and lo <= value < hi


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
        if not isinstance(value, str) or not _is_name(name):
            raise UnsafeDataError(f"catalog entry {path!r} has malformed xattrs")
        try:
            out[name] = base64.b64decode(value, validate=True)
        except ValueError:
            raise UnsafeDataError(f"catalog entry {path!r} has malformed xattrs") from None
    return out


def _is_nat(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_SIZE


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
