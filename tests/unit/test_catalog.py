"""The catalog codec and validator: pure, table-driven."""

from __future__ import annotations

import base64
import json
import random
from collections.abc import Callable

import pytest

from volmove.core.catalog import (
    BLOCKDEV,
    CHARDEV,
    DEVICES,
    DIR,
    FIFO,
    FILE,
    HARDLINK,
    PLAIN_FILE,
    ROOT,
    SOCKET,
    SYMLINK,
    TYPES,
    CatalogValidator,
    Entry,
    check_path,
    encode_lines,
    parent_of,
    parse_entry,
    parse_json_entry,
)
from volmove.core.errors import UnsafeDataError

CHUNK = "ab" * 32

ROUND_TRIP = [
    Entry(ROOT, DIR, mode=0o755, uid=1, gid=2, mtime_ns=-5),
    Entry("d/f", FILE, mode=0o4755, size=10, chunks=[CHUNK], ino=7, ctime_ns=9, xattrs={"user.a": b"\x00\xff"}),
    Entry("sparse", FILE, size=1 << 40, chunks=[CHUNK], extents=[(0, 3), (1 << 30, 5)]),
    Entry("l", SYMLINK, mode=0o777, target="/etc/passwd"),
    Entry("h", HARDLINK, target="d/f"),
    Entry("p", FIFO, mode=0o600),
    Entry("s", SOCKET),
    Entry("c", CHARDEV, rdev=0x0103),
    Entry("b", BLOCKDEV, rdev=(8 << 8) | 1),
    Entry("name-\udcff\udcfe-not-utf8", FILE),
]


@pytest.mark.parametrize("entry", ROUND_TRIP, ids=lambda e: e.path)
def test_entries_round_trip(entry: Entry) -> None:
    (line,) = encode_lines([entry])
    assert line.endswith(b"\n")
    back = parse_entry(line)
    if entry.type != FILE:  # change-detection fields are only kept for files
        back.ino, back.ctime_ns = entry.ino, entry.ctime_ns
    assert back == entry


@pytest.mark.parametrize("path", ["a", "a/b", "...", "a/.b", "a b/c", "\udcff", "x" * 255])
def test_paths_inside_are_accepted(path: str) -> None:
    check_path(path)


@pytest.mark.parametrize("path", ["/a", "../a", "a/..", "a/../b", "./a", "a/.", "a//b", "a/", "/", "x" * 70_000])
def test_paths_escaping_or_ambiguous_are_refused(path: str) -> None:
    with pytest.raises(UnsafeDataError):
        check_path(path)


def test_parent_of() -> None:
    assert parent_of("a") == ROOT
    assert parent_of("a/b/c") == "a/b"


def line(**kw: object) -> str:
    doc: dict[str, object] = {"p": "a", "t": "f", "m": 0o644, "u": 0, "g": 0, "mt": 0, "s": 0, "c": []}
    doc.update(kw)
    return json.dumps({k: v for k, v in doc.items() if v is not None})


BAD = {
    "not json": "{",
    "a list": "[]",
    "nested bomb": '{"p": ' + "[" * 50_000 + "]" * 50_000 + "}",
    "invalid utf-8": b'{"p": "\xff"}',
    "no path": line(p=None),
    "empty path": line(p=""),
    "path not a string": line(p=1),
    "NUL in path": line(p="a\0b"),
    "lone surrogate in path": line(p="\ud800"),
    "lone surrogate in target": line(t="l", lt="\udfff"),
    "unknown type": line(t="z"),
    "mode as string": line(m="644"),
    "mode with type bits": line(m=0o100644),
    "mode as bool": line(m=True),
    "negative uid": line(u=-1),
    "uid too big": line(u=1 << 32),
    "float mtime": line(mt=1.5),
    "huge mtime": line(mt=1 << 63),
    "negative size": line(s=-1),
    "size too big": line(s=1 << 61),
    "chunks not a list": line(c="ab"),
    "chunk upper-case": line(c=["AB" * 32]),
    "chunk short": line(c=["ab"]),
    "chunk not a string": line(c=[1]),
    "chunk with newline": line(c=[CHUNK + "\n"]),
    "extents not a list": line(s=5, e={}),
    "extent past size": line(s=5, e=[[0, 9]]),
    "extents overlapping": line(s=50, e=[[0, 10], [5, 10]]),
    "extent as string": line(s=5, e=[["0", 1]]),
    "extent bool": line(s=5, e=[[True, 1]]),
    "xattrs not a dict": line(x=["user.a"]),
    "xattr not base64": line(x={"user.a": "!!"}),
    "xattr name empty": line(x={"": ""}),
    "xattr name surrogate": line(x={"\ud800": ""}),
    "rdev as string": line(t="c", r="1"),
    "rdev negative": line(t="b", r=-1),
}


@pytest.mark.parametrize("raw", BAD.values(), ids=BAD.keys())
def test_malformed_lines_are_refused(raw: str | bytes) -> None:
    with pytest.raises(UnsafeDataError, match="catalog"):
        parse_entry(raw)


def validate(*entries: Entry, allow_devices: bool = False) -> None:
    v = CatalogValidator(allow_devices=allow_devices)
    for e in (Entry(ROOT, DIR), *entries):
        v.check(e)


def test_a_well_formed_tree_is_accepted() -> None:
    validate(Entry("d", DIR), Entry("d/f", FILE), Entry("d/h", HARDLINK, target="d/f"), Entry("l", SYMLINK,
             target="/anywhere"), Entry("p", FIFO), Entry("s", SOCKET), Entry("d/e", DIR), Entry("d/e/g", FILE))


def test_devices_need_permission() -> None:
    with pytest.raises(UnsafeDataError, match="--allow-devices"):
        validate(Entry("c", CHARDEV))
    validate(Entry("c", CHARDEV), Entry("b", BLOCKDEV), allow_devices=True)


@pytest.mark.parametrize("first", [FILE, DIR, SYMLINK, FIFO, SOCKET, HARDLINK])
@pytest.mark.parametrize("second", [FILE, DIR, SYMLINK, FIFO])
def test_any_path_twice_is_refused(first: str, second: str) -> None:
    def make(kind: str) -> Entry:
        return Entry("x", kind, target="t" if kind == HARDLINK else "/x" if kind == SYMLINK else None)

    with pytest.raises(UnsafeDataError, match="twice"):
        validate(Entry("t", FILE), make(first), make(second))


@pytest.mark.parametrize("parent", [FILE, SYMLINK, FIFO, HARDLINK, None])
def test_parent_must_be_a_directory_of_the_snapshot(parent: str | None) -> None:
    before = [] if parent is None else [Entry("p", parent, target="t" if parent == HARDLINK else "/")]
    with pytest.raises(UnsafeDataError, match="not inside a directory"):
        validate(Entry("t", FILE), *before, Entry("p/x", FILE))


@pytest.mark.parametrize("target", [None, "later", "d", "l", "/etc/passwd", "../t", "t/", "h0"])
def test_hardlinks_only_to_earlier_files(target: str | None) -> None:
    with pytest.raises(UnsafeDataError, match="hardlink"):
        validate(Entry("t", FILE), Entry("d", DIR), Entry("l", SYMLINK, target="t"),
                 Entry("h0", HARDLINK, target="t"), Entry("h", HARDLINK, target=target), Entry("later", FILE))


def test_root_must_come_first_and_once() -> None:
    with pytest.raises(UnsafeDataError, match="root"):
        CatalogValidator().check(Entry("a", FILE))
    with pytest.raises(UnsafeDataError, match="root"):
        validate(Entry(ROOT, DIR))
    with pytest.raises(UnsafeDataError, match="root"):
        CatalogValidator().check(Entry(ROOT, FILE))


def test_symlink_needs_a_target() -> None:
    with pytest.raises(UnsafeDataError, match="no target"):
        validate(Entry("l", SYMLINK))


def test_stored_extents_cannot_exceed_the_size() -> None:
    with pytest.raises(UnsafeDataError, match="inconsistent"):
        validate(Entry("f", FILE, size=5, extents=[(0, 3), (3, 3)]))


def _reference_json(e: Entry) -> str:
    """How catalog lines were written first: json.dumps of the document."""
    doc: dict[str, object] = {"p": e.path, "t": e.type, "m": e.mode, "u": e.uid, "g": e.gid, "mt": e.mtime_ns}
    if e.type == FILE:
        doc.update(s=e.size, c=e.chunks, h=e.content_hash, i=e.ino, ct=e.ctime_ns)
        if e.extents is not None:
            doc["e"] = [list(x) for x in e.extents]
    if e.target is not None:
        doc["lt"] = e.target
    if e.xattrs:
        doc["x"] = {k: base64.b64encode(v).decode() for k, v in sorted(e.xattrs.items())}
    if e.type in DEVICES:
        doc["r"] = e.rdev
    return json.dumps(doc, separators=(",", ":"))


@pytest.mark.parametrize("seed", range(30))
def test_to_json_writes_what_json_dumps_wrote(seed: int) -> None:
    rng = random.Random(seed)
    names = ["a", "dir/f.txt", 'quote"back\\slash', "tab\tnew\nline", "ünï", "\udcff\udc80raw", "日本/語", "x" * 300]
    kind = rng.choice(sorted(TYPES))
    e = Entry(rng.choice(names), kind, rng.randrange(0o10000), rng.randrange(1 << 32), rng.randrange(1 << 32),
              rng.randrange(-(1 << 62), 1 << 62), rng.randrange(1 << 40), ino=rng.randrange(1 << 64),
              ctime_ns=rng.randrange(1 << 62), rdev=rng.randrange(1 << 20))
    if kind == FILE:
        e.chunks = [rng.randbytes(32).hex() for _ in range(rng.randrange(4))]
        e.extents = rng.choice([None, [], [(0, 4096), (1 << 33, 10)]])
    if rng.random() < 0.5:
        e.target = rng.choice(names)
    if rng.random() < 0.5:
        e.xattrs = {rng.choice(["user.a", "user.\u00e9", "security.x"]): rng.randbytes(rng.randrange(20))}
    assert e.to_json() == _reference_json(e)


def _outcome(parse: Callable[[bytes], Entry], line: bytes) -> Entry | str:
    try:
        return parse(line)
    except UnsafeDataError as exc:
        return f"refused: {exc}"


def test_plain_file_lines_are_matched_whole_and_read_as_the_json_parser_reads_them() -> None:
    top = Entry("d/f", FILE, 0o7777, (1 << 32) - 1, (1 << 32) - 1, (1 << 63) - 1, (1 << 60) - 1,
                chunks=[CHUNK, "0" * 64], ino=(1 << 64) - 1, ctime_ns=1 - (1 << 63))
    plain = [top, Entry("small/f.json", FILE, 0o644, 0, 0, 1795847728444110434, 3008, chunks=[CHUNK], ino=9,
                        ctime_ns=7), Entry("empty", FILE, size=0), Entry("sp ace!#$[]~/x", FILE, chunks=[CHUNK])]
    lines = [e.to_json().encode() for e in plain]
    assert all(PLAIN_FILE.fullmatch(line) for line in lines)  # these take the fast path
    assert [parse_entry(line) for line in lines] == plain
    first = lines[0]
    out_of_range = [first.replace(b'"m":4095', b'"m":4096'), first.replace(b'"u":4294967295', b'"u":4294967296'),
                    first.replace(b'"mt":9223372036854775807', b'"mt":9223372036854775808'),
                    first.replace(b'"ct":-9223372036854775807', b'"ct":-9223372036854775808'),
                    first.replace(b'"s":1152921504606846975', b'"s":1152921504606846976'),
                    first.replace(b'"i":18446744073709551615', b'"i":18446744073709551616')]
    assert all(line != first and PLAIN_FILE.fullmatch(line) for line in out_of_range)
    near = [lines[1].replace(b'"m":420', b'"m":0420'), lines[1].replace(b'"u":0', b'"u":-0'),
            lines[1].replace(b'"ct":7', b'"ct":-0'), lines[1].replace(b'"s":3008', b'"s":3e3'),
            lines[1].replace(b"}", b',"z":1}'), lines[1] + b" ", lines[1].replace(b'"t":"f"', b'"t":"d"'),
            lines[0].replace(b'","', b'", "')]
    for line in lines + out_of_range + near:
        assert _outcome(parse_entry, line) == _outcome(parse_json_entry, line), line
    assert all(isinstance(_outcome(parse_entry, line), str) for line in out_of_range)
