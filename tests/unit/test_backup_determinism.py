"""The backup engine's output depends on the tree only: not on timing, worker counts,
read sizes, batching, or whether a parent snapshot was used."""

from __future__ import annotations

import json
import os
import random
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.engine_helpers import backup_dir, new_repo
from volmove.core import backup
from volmove.core.backup import BackupEngine
from volmove.core.catalog import DIR, FILE, PLAIN_FILE, Entry, parse_entry
from volmove.core.chunker import StreamChunker, chunk_all, cuts
from volmove.core.errors import CancelledByUser
from volmove.core.format import CDC_2020, CDC_RONOMON, ChunkerParams
from volmove.core.fswalk import Item, walk
from volmove.core.repository import Repository
from volmove.core.snapshot import Snapshot
from volmove.core.storage.memory import MemoryStorage


def make_mixed_tree(root: Path) -> None:
    """Many small files of every size class around the chunker's minimum, a few large ones."""
    rng = random.Random(7)
    for d in range(6):
        sub = root / f"d{d:02}"
        sub.mkdir()
        for i in range(30):
            size = rng.choice([0, 1, 100, 4000, 32 * 1024, 32 * 1024 + 1, 200_000, 1 << 20, (1 << 20) + 1])
            (sub / f"f{i:03}").write_bytes(rng.randbytes(size))
    (root / "big-random").write_bytes(rng.randbytes(9 << 20))
    (root / "big-text").write_bytes(b"".join(b'{"n": %d, "v": "%x"}\n' % (i, i * 7919) for i in range(400_000)))
    os.setxattr(root / "d03/f001", "user.small", b"s")
    os.setxattr(root / "big-text", "user.large", b"\x00large")
    os.link(root / "d01/f002", root / "hardlink")
    with open(root / "sparse", "wb") as f:
        f.truncate(64 << 20)
        f.seek(5 << 20)
        f.write(rng.randbytes(300_000))


def catalog_bytes(repo: Repository, snap: Snapshot) -> bytes:
    return b"\n".join(repo.read_catalog(snap))


def run_engine(repo: Repository, src: Path, **kw: object) -> backup.BackupResult:
    fd = os.open(src, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return BackupEngine(repo, **kw).run(fd)  # type: ignore[arg-type]
    finally:
        os.close(fd)


@pytest.fixture(scope="module")
def mixed_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mixed")
    make_mixed_tree(root)
    return root


def test_catalog_is_identical_across_fresh_repositories_and_worker_counts(mixed_tree: Path) -> None:
    results = [run_engine(new_repo(MemoryStorage()), mixed_tree, workers=w) for w in (2, 2, 1, 4)]
    assert all(r.catalog == results[0].catalog for r in results)
    assert all(r.stats.new_bytes == results[0].stats.new_bytes for r in results)
    assert results[0].entries > 180


def test_batching_and_read_sizes_do_not_change_the_catalog(mixed_tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = run_engine(new_repo(MemoryStorage()), mixed_tree)
    monkeypatch.setattr(backup, "READ_SIZE", 300_001)
    monkeypatch.setattr(backup, "BATCH_BYTES", 70_000)
    monkeypatch.setattr(backup, "BATCH_ENTRIES", 3)
    monkeypatch.setattr(backup, "WINDOW_BYTES", 1 << 20)
    monkeypatch.setattr(backup, "SMALL_FILE", 40_000)
    monkeypatch.setattr(backup, "SMALL_CHUNK", 1)
    monkeypatch.setattr(backup, "_MULTI_COMPRESS", not backup._MULTI_COMPRESS)
    repo = new_repo(MemoryStorage())
    second = run_engine(repo, mixed_tree)
    assert second.catalog == first.catalog
    assert second.stats.stored_bytes == first.stats.stored_bytes
    entry = next(parse_entry(line) for line in _lines(repo, second.catalog) if b'"p":"big-text"' in line)
    assert len(b"".join(repo.read_blob(c) for c in entry.chunks)) == entry.size


def test_incremental_backup_writes_the_same_catalog_as_a_full_one(mixed_tree: Path, tmp_path: Path) -> None:
    repo = new_repo(MemoryStorage())
    first = backup_dir(repo, mixed_tree)
    second = backup_dir(repo, mixed_tree, parent=first)
    assert second.stats.skipped_files == first.stats.files
    assert second.catalog == first.catalog
    text = catalog_bytes(repo, second).decode()
    assert '"user.large"' in text and '"user.small"' in text


def test_changed_and_new_files_are_read_again(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(20):
        (src / f"f{i:02}").write_bytes(os.urandom(5000))
    repo = new_repo(MemoryStorage())
    first = backup_dir(repo, src)
    (src / "f03").write_bytes(b"changed")
    os.chmod(src / "f07", 0o600)
    os.setxattr(src / "f09", "user.new", b"x")
    (src / "f05").unlink()
    (src / "f055").write_bytes(b"new between f05 and f06")
    (src / "zz").write_bytes(b"new at the end")
    second = backup_dir(repo, src, parent=first)
    assert second.stats.skipped_files == 20 - 4
    fresh = backup_dir(new_repo(MemoryStorage()), src)
    assert second.catalog == fresh.catalog


def test_large_files_changed_in_place_reuse_their_old_chunks_and_give_the_full_catalog(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    guided: list[int] = []
    real = backup.guided_chunks
    monkeypatch.setattr(backup, "guided_chunks", lambda old, *a: guided.append(len(old)) or real(old, *a))
    src = tmp_path / "src"
    src.mkdir()
    rng = random.Random(5)
    for name in ("db", "grows", "shrinks", "shifted", "sparse-now"):
        (src / name).write_bytes(rng.randbytes(6 << 20))
    repo = new_repo(MemoryStorage())
    first = backup_dir(repo, src)
    with open(src / "db", "r+b") as f:  # pages overwritten in place, as a database does
        for off in (0, 1 << 20, (3 << 20) + 4096, (6 << 20) - 65536):
            f.seek(off)
            f.write(rng.randbytes(65536))
    with open(src / "grows", "ab") as f:
        f.write(rng.randbytes(100_000))
    os.truncate(src / "shrinks", (4 << 20) + 123)
    data = (src / "shifted").read_bytes()
    (src / "shifted").write_bytes(data[:777] + b"inserted" + data[777:])
    with open(src / "sparse-now", "r+b") as f:
        f.truncate(64 << 20)
    second = backup_dir(repo, src, parent=first)
    fresh = backup_dir(new_repo(MemoryStorage()), src)
    assert catalog_bytes(repo, second).replace(b"\n", b"").count(b'"p":') == 6
    assert [_chunks(line) for line in repo.read_catalog(second)] == [_chunks(line) for line in repo.read_catalog(fresh)]
    assert second.stats.new_bytes < 0.15 * first.stats.new_bytes  # only the changed stretches are new
    assert len(guided) == 4  # every changed file but the one that became sparse


def _chunks(line: bytes) -> tuple[str, list[str]]:
    doc = json.loads(line)
    return doc["p"], doc.get("c", [])


def test_a_forged_parent_line_is_not_reused(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"a" * 100)
    (src / "b").write_bytes(b"b" * 100)
    repo = new_repo(MemoryStorage())
    first = backup_dir(repo, src)
    lines = list(repo.read_catalog(first))
    forged = [line.replace(b'"m":420', b'"m":%d' % 0o6755) if b'"p":"a"' in line else line for line in lines]
    forged.insert(1, b"not json")
    forged.insert(2, lines[1].replace(b'"p":"a"', b'"p":"\\ud800"'))  # a name no walk produces
    parent = backup.ParentCatalog(iter(forged))
    found = parent.get("a")
    assert found is not None and found.meta[0] == 0o6755  # the engine compares it with the tree
    result = run_engine(repo, src, parent=backup.ParentCatalog(iter(forged)))
    assert result.stats.skipped_files == 1
    fresh = run_engine(new_repo(MemoryStorage()), src)
    assert result.catalog == fresh.catalog


def test_parent_lookups_follow_walk_order_with_odd_names() -> None:
    names = ["a", "a/b", "a/b/c", "a/z", "a.txt", "b\udcff", "b\udcff/x", "é", "é/1"]  # walk order
    lines = [json.dumps({"p": name, "t": "f", "m": 420, "u": 0, "g": 0, "mt": 1, "s": 0, "c": [], "i": 1, "ct": 1},
                        separators=(",", ":")).encode() for name in names]
    assert [parse_entry(line).path for line in lines] == names
    catalog = backup.ParentCatalog(iter(lines))
    found = [catalog.get(n) is not None for n in ["a", "a/b/c", "a/m", "a/z", "b\udcff/x", "é/1"]]
    assert found == [True, True, False, True, True, True]
    assert catalog.get("a") is None  # the stream has moved past it


@pytest.mark.parametrize("limit", [0, 1, 150, 10**6])
def test_parsing_the_parent_ahead_changes_no_lookup(limit: int) -> None:
    names = [f"d{i}/f{j}" for i in range(3) for j in range(4)]  # walk order
    lines = [json.dumps({"p": name, "t": "f", "m": 420, "u": 0, "g": 0, "mt": 1, "s": 0, "c": [], "i": 1, "ct": 1},
                        separators=(",", ":")).encode() for name in names]
    lines.insert(5, b"not json")  # skipped ahead as it is in the walk
    wanted = ["d0/f1", "d0/f2", "d1/f0", "d1/f9", "d2/f3"]
    catalog = backup.ParentCatalog(iter(lines))
    catalog.parse_ahead(limit)
    held = len(catalog._ahead)
    # It stops once `limit` bytes of lines are held (each line is ~110 bytes); all of them if they fit.
    assert held == {0: 0, 1: 1, 150: 2, 10**6: len(names) - 1}[limit]  # the head is parsed already
    assert [catalog.get(n) is not None for n in wanted] == [True, True, True, False, True]


def test_parsing_the_parent_ahead_stops_when_told() -> None:
    lines = [json.dumps({"p": f"f{i:02}", "t": "f", "m": 420, "u": 0, "g": 0, "mt": 1, "s": 0, "c": [], "i": 1,
                         "ct": 1}, separators=(",", ":")).encode() for i in range(20)]
    stop = threading.Event()
    parsed = 0

    def counted() -> Iterator[bytes]:
        nonlocal parsed
        for line in lines:
            parsed += 1
            if parsed == 5:
                stop.set()
            yield line

    catalog = backup.ParentCatalog(counted())
    catalog.parse_ahead(until=stop)
    assert parsed == 5 and len(catalog._ahead) == 4
    assert all(catalog.get(f"f{i:02}") is not None for i in range(20))  # the rest as the walk comes


def test_the_fast_parse_of_plain_parent_lines_agrees_with_the_json_parser() -> None:
    ids = ["0" * 64, "ab" * 32]
    entries = [Entry("small/f.json", FILE, 0o644, 0, 0, 1795847728444110434, 3008, chunks=ids[:1], ino=9, ctime_ns=7),
               Entry("empty", FILE, 0o4755, 1000, 1000, -5, 0, ino=1, ctime_ns=0),
               Entry("two", FILE, chunks=ids, size=9), Entry("sp ace!#$[]~", FILE, chunks=ids, size=3),
               Entry('quo"te\\', FILE), Entry("é", FILE), Entry("b\udcff", FILE), Entry("\t", FILE),
               Entry("sparse", FILE, size=9, chunks=ids, extents=[(0, 9)]), Entry("x", FILE, xattrs={"user.a": b"1"}),
               Entry("d", DIR)]
    lines = [e.to_json().encode() for e in entries]
    assert [PLAIN_FILE.fullmatch(line) is not None for line in lines] == [True] * 4 + [False] * 7
    near = [lines[0].replace(b'"m":420', b'"m":0420'), lines[0].replace(b'"u":0', b'"u":-0'),
            lines[0].replace(b'"s":3008', b'"s":3e3'), lines[0].replace(ids[0].encode(), b"A" * 64),
            lines[0].replace(b"}", b',"z":1}'), lines[0].replace(b'"ct":7', b'"ct":-0'), lines[0] + b" ",
            lines[2].replace(b'","', b'", "'), lines[1].replace(b'"c":[]', b'"c":[""]')]
    for line in lines + near:
        assert backup._parent_file(line) == backup._parsed_parent_file(line), line


def test_a_file_that_vanishes_after_listing_is_left_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name in ("a", "b", "c"):
        (src / name).write_bytes(name.encode() * 10)

    def vanishing(root_fd: int, **kw: bool) -> Iterator[Item]:
        for item in walk(root_fd, **kw):
            if item.entry.path == "b":
                os.unlink(src / "b")
            yield item

    monkeypatch.setattr(backup, "walk", vanishing)
    repo = new_repo(MemoryStorage())
    result = run_engine(repo, src)
    assert result.warnings == ["b: vanished during the backup"]
    assert result.entries == 3  # ".", "a", "c"


def test_a_small_file_that_grew_is_read_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "log").write_bytes(b"x" * 100)
    grown = os.urandom(3 << 20)

    def growing(root_fd: int, **kw: bool) -> Iterator[Item]:
        for item in walk(root_fd, **kw):
            if item.entry.path == "log":
                (src / "log").write_bytes(grown)
            yield item

    monkeypatch.setattr(backup, "walk", growing)
    repo = new_repo(MemoryStorage())
    result = run_engine(repo, src)
    entry = next(e for e in map(parse_entry, _lines(repo, result.catalog)) if e.path == "log")
    assert entry.size == len(grown)
    assert b"".join(repo.read_blob(c) for c in entry.chunks) == grown


def _lines(repo: Repository, catalog: list[str]) -> list[bytes]:
    return b"".join(repo.read_blob(b) for b in catalog).splitlines()


@pytest.mark.parametrize("algorithm", [CDC_2020, CDC_RONOMON])
@pytest.mark.parametrize("sizes", [(32 << 10, 128 << 10, 512 << 10), (64, 256, 1024), (65, 257, 1025)])
def test_chunks_do_not_depend_on_how_the_stream_is_split(algorithm: str, sizes: tuple[int, int, int]) -> None:
    params = ChunkerParams(*sizes, algorithm=algorithm)
    rng = random.Random(3)
    for data in (rng.randbytes(3_000_001), bytes(2_000_000), b"abc" * 700_001):
        whole = [bytes(data[off : off + n]) for off, n in cuts(memoryview(data), params)]  # one pass
        assert b"".join(whole) == data
        assert [bytes(c) for c in chunk_all(data, params)] == whole
        for _ in range(5):
            chunker, out, pos = StreamChunker(params), [], 0
            while pos < len(data):
                size = rng.choice([1, 7, params.max_size - 1, params.max_size, params.max_size + 1,
                                   rng.randrange(1, 5 * params.max_size)])
                out += [bytes(c) for c in chunker.feed(data[pos : pos + size])]
                pos += size
            out += [bytes(c) for c in chunker.finish()]
            assert out == whole


def test_cancel_stops_the_backup(mixed_tree: Path) -> None:
    cancel = threading.Event()
    calls = 0

    def progress(_: object) -> None:
        nonlocal calls
        calls += 1
        cancel.set()

    repo = new_repo(MemoryStorage())
    with pytest.raises(CancelledByUser):
        run_engine(repo, mixed_tree, cancel=cancel, progress=progress)
    assert calls >= 1
    assert not list(repo.storage.list("index/"))  # nothing was committed
