"""Restore treats a snapshot as hostile input.

Each test forges a snapshot (catalog lines, blobs, index rows, manifests) or
tampers with stored objects, restores it into ``target`` and checks two
things: a clear volmove error naming the culprit, and that ``outside`` — a
sentinel directory next to the target — is exactly as it was.
"""

from __future__ import annotations

import json
import os
import stat
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import zstandard

from tests.engine_helpers import backup_dir, new_repo, restore_dir, tree_state
from volmove.core.catalog import BLOCKDEV, CHARDEV, DIR, FIFO, FILE, HARDLINK, SOCKET, SYMLINK, Entry
from volmove.core.errors import CorruptDataError, UnsafeDataError
from volmove.core.format import BLOB_DATA, BLOB_HASHES, BLOB_META, DEFAULT_HASH, pack_key, snapshot_key
from volmove.core.repository import PackWriter, Repository
from volmove.core.restore import RestoreResult
from volmove.core.snapshot import Snapshot, SnapshotStats, VolumeSpec
from volmove.core.storage.base import Storage
from volmove.core.storage.local import LocalStorage
from volmove.core.storage.memory import MemoryStorage

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="restoring owners and device nodes needs root")

Line = Entry | dict[str, Any] | str

blob_id = BLOB_HASHES[DEFAULT_HASH]  # the hash of the repositories these tests forge


class Forge:
    """Builds a snapshot from arbitrary catalog lines and blobs, bypassing the backup engine."""

    def __init__(self, repo: Repository, *, root: bool = True) -> None:
        self.repo = repo
        self.lines: list[Line] = []
        self.blobs: dict[str, tuple[bytes, int]] = {}  # id -> stored frame, raw length
        if root:
            self.add(Entry(".", DIR, mode=0o755))

    def add(self, line: Line) -> Forge:
        self.lines.append(line)
        return self

    def blob(self, data: bytes) -> str:
        bid = blob_id(data)
        self.blobs[bid] = (zstandard.ZstdCompressor().compress(data), len(data))
        return bid

    def file(self, path: str, data: bytes = b"payload", **kw: Any) -> Forge:
        return self.add(Entry(path, FILE, size=len(data), chunks=[self.blob(data)] if data else [], **kw))

    def dir(self, path: str, **kw: Any) -> Forge:
        return self.add(Entry(path, DIR, mode=0o755, **kw))

    def symlink(self, path: str, target: str) -> Forge:
        return self.add(Entry(path, SYMLINK, mode=0o777, target=target))

    def hardlink(self, path: str, target: str) -> Forge:
        return self.add(Entry(path, HARDLINK, target=target))

    def commit(self) -> Snapshot:
        text = "".join((ln.to_json() if isinstance(ln, Entry) else ln if isinstance(ln, str) else json.dumps(ln))
                       + "\n" for ln in self.lines).encode("utf-8", "surrogatepass")
        packs = PackWriter(self.repo)
        for bid, (frame, raw_len) in self.blobs.items():
            packs.add(bid, BLOB_DATA, frame, raw_len)
        cat = blob_id(text)
        packs.add(cat, BLOB_META, zstandard.ZstdCompressor().compress(text), len(text))
        self.repo.write_index(packs.finish())
        return save(self.repo, (cat,), len(self.lines))


def save(repo: Repository, catalog: tuple[str, ...], entries: int) -> Snapshot:
    snap = Snapshot(time=datetime.now(UTC), host="test", volume=VolumeSpec("vol"), catalog=catalog,
                    entries=entries, stats=SnapshotStats())
    return repo.load_snapshot(repo.save_snapshot(snap))


@dataclass
class Env:
    tmp: Path
    storage: Storage
    repo: Repository
    target: Path
    outside: Path
    before: dict[bytes, tuple[object, ...]] = field(default_factory=dict)

    def forge(self, *, root: bool = True) -> Forge:
        return Forge(self.repo, root=root)

    def restore(self, snap: Snapshot, **kw: object) -> RestoreResult:
        return restore_dir(self.repo, snap, self.target, **kw)

    def refused(self, snap: Snapshot, error: type[Exception], *names: str, **kw: object) -> str:
        """Restore must fail with ``error``, naming each of ``names``; returns the message."""
        with pytest.raises(error) as info:
            self.restore(snap, **kw)
        for name in names:
            assert name in str(info.value)
        self.assert_contained()
        return str(info.value)

    def assert_contained(self) -> None:
        assert tree_state(self.outside) == self.before
        assert {p.name for p in self.tmp.iterdir()} - {"repo"} == {"outside", "target"}


def make_env(tmp_path: Path, storage: Storage) -> Env:
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "keep").write_bytes(b"precious\n")
    (outside / "sub/keep2").write_bytes(b"also precious\n")
    os.chmod(outside / "keep", 0o640)
    env = Env(tmp_path, storage, new_repo(storage), tmp_path / "target", outside)
    env.target.mkdir()
    env.before = tree_state(outside)
    return env


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = make_env(tmp_path, MemoryStorage())
    yield e
    e.assert_contained()


class WholeObjectStorage(MemoryStorage):
    """Reads whole packs, as restores from S3 do."""

    prefers_whole_objects = True


@pytest.fixture(params=["memory", "local", "whole-object", pytest.param("s3", marks=pytest.mark.s3)])
def any_env(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Env]:
    storage: Storage
    if request.param == "s3":
        from volmove.core.storage.s3 import S3Storage

        storage = S3Storage.from_url(request.getfixturevalue("s3_url"))
    elif request.param == "local":
        storage = LocalStorage(tmp_path / "repo", create=True)
    else:
        storage = WholeObjectStorage() if request.param == "whole-object" else MemoryStorage()
    e = make_env(tmp_path, storage)
    yield e
    e.assert_contained()


# ---------------------------------------------------------------- paths


@pytest.mark.parametrize("path", ["../escape", "a/../../escape", "a/..", "./x", "a//b", "a/", "..", "/abs"])
def test_escaping_paths_are_refused(env: Env, path: str) -> None:
    snap = env.forge().dir("a").file(path).commit()
    env.refused(snap, UnsafeDataError, repr(path))


def test_absolute_path_into_the_sentinel_is_refused(env: Env) -> None:
    path = str(env.outside / "planted")
    snap = env.forge().file(path).commit()
    env.refused(snap, UnsafeDataError, repr(path))


def test_symlink_then_write_through_it_is_refused(env: Env) -> None:
    snap = env.forge().symlink("a", str(env.outside)).file("a/x", b"evil").commit()
    env.refused(snap, UnsafeDataError, "'a/x'")


def test_symlink_then_directory_of_the_same_name_is_refused(env: Env) -> None:
    snap = env.forge().symlink("a", str(env.outside)).dir("a").file("a/keep", b"evil").commit()
    env.refused(snap, UnsafeDataError, "'a'", "twice")


def test_symlink_then_write_across_two_restores(env: Env) -> None:
    first = env.forge().symlink("d", str(env.outside)).symlink("f", str(env.outside / "keep")).commit()
    env.restore(first)
    assert os.readlink(env.target / "d") == str(env.outside)
    # --force: the second snapshot restores over the first one's symlinks.
    second = env.forge().dir("d").file("d/keep", b"inside\n").file("f", b"a file now\n").commit()
    env.restore(second)
    assert (env.target / "d").is_dir() and not (env.target / "d").is_symlink()
    assert (env.target / "d/keep").read_bytes() == b"inside\n"
    assert not (env.target / "f").is_symlink() and (env.target / "f").read_bytes() == b"a file now\n"


def plant(env: Env) -> None:
    """Symlinks (and a directory holding one) at paths where the snapshot has other things."""
    t = env.target
    (t / "sub").mkdir()
    for name in ("file", "dir", "link", "fifo", "hard", "sub/file", "empty"):
        os.symlink(env.outside / "keep" if "dir" not in name else env.outside, t / name)
    (t / "wasdir").mkdir()
    os.symlink(env.outside, t / "wasdir/escape")
    os.symlink(env.outside / "keep", t / "wasdir/escape-file")


def test_symlinks_planted_in_the_target_are_replaced_not_followed(env: Env) -> None:
    plant(env)
    snap = (env.forge().dir("dir").file("dir/inner", b"in dir\n", mode=0o600).file("empty", b"")
            .add(Entry("fifo", FIFO, mode=0o600)).file("file", b"new\n", mode=0o600).hardlink("hard", "file")
            .symlink("link", "relative/target").dir("sub").file("sub/file", b"nested\n").file("wasdir", b"was dir\n")
            .commit())
    env.restore(snap)
    t = env.target
    assert (t / "dir").is_dir() and not (t / "dir").is_symlink()
    assert (t / "dir/inner").read_bytes() == b"in dir\n"
    assert (t / "file").read_bytes() == b"new\n" and not (t / "file").is_symlink()
    assert os.stat(t / "file").st_mode & 0o777 == 0o600
    assert os.stat(t / "hard").st_ino == os.stat(t / "file").st_ino
    assert stat.S_ISFIFO(os.lstat(t / "fifo").st_mode)
    assert os.readlink(t / "link") == "relative/target"
    assert (t / "sub/file").read_bytes() == b"nested\n"
    assert (t / "wasdir").read_bytes() == b"was dir\n"
    assert (t / "empty").read_bytes() == b"" and not (t / "empty").is_symlink()


def test_restoring_over_existing_files_replaces_them_exactly(tmp_path: Path) -> None:
    env = make_env(tmp_path, MemoryStorage())
    src = tmp_path / "target"  # back up a tree, then mangle it in place and restore over it
    (src / "d").mkdir()
    (src / "a").write_bytes(b"short")
    (src / "b").write_bytes(b"independent")
    (src / "d/f").write_bytes(os.urandom(300_000))
    (src / "e").mkdir()
    os.symlink("somewhere", src / "l")
    os.chown(src / "a", 1000, 1000)
    os.chmod(src / "a", 0o4750)
    want = tree_state(src)
    snap = backup_dir(env.repo, src)
    os.chmod(src / "a", 0o600)
    (src / "a").write_bytes(b"a much longer content than before" * 100)
    os.unlink(src / "b")
    os.link(src / "a", src / "b")  # restoring "a" must not write through this hardlink into "b"
    (src / "d/f").write_bytes(b"tiny")
    os.rmdir(src / "e")
    (src / "e").write_bytes(b"a file where a directory was")
    os.unlink(src / "l")
    (src / "l").mkdir()
    (src / "l/inside").write_bytes(b"x")
    env.restore(snap)
    assert tree_state(src) == want
    env.assert_contained()


# ---------------------------------------------------------------- links and nodes


@pytest.mark.parametrize("target", ["../outside/keep", "OUTSIDE", "later", "d", "l", "d/../a", "a/", "."])
def test_hardlinks_outside_the_restored_files_are_refused(env: Env, target: str) -> None:
    target = str(env.outside / "keep") if target == "OUTSIDE" else target
    snap = (env.forge().file("a").dir("d").symlink("l", str(env.outside / "keep")).hardlink("h", target)
            .file("later").commit())
    env.refused(snap, UnsafeDataError, "'h'", "hardlink")


def test_hardlink_to_etc_passwd_is_refused(env: Env) -> None:
    snap = env.forge().hardlink("pw", "/etc/passwd").commit()
    env.refused(snap, UnsafeDataError, "'pw'")


def test_hardlink_through_a_symlinked_directory_is_refused(env: Env) -> None:
    snap = env.forge().symlink("l", str(env.outside)).hardlink("h", "l/keep").commit()
    env.refused(snap, UnsafeDataError, "'h'")


@pytest.mark.parametrize("kind", [CHARDEV, BLOCKDEV])
def test_device_nodes_need_allow_devices(env: Env, kind: str) -> None:
    snap = env.forge().add(Entry("dev", kind, mode=0o600, rdev=os.makedev(1, 3))).commit()
    env.refused(snap, UnsafeDataError, "'dev'", "--allow-devices")
    assert os.listdir(env.target) == []
    env.restore(snap, allow_devices=True)
    st = os.lstat(env.target / "dev")
    assert (stat.S_ISCHR(st.st_mode) if kind == CHARDEV else stat.S_ISBLK(st.st_mode))
    assert st.st_rdev == os.makedev(1, 3) and stat.S_IMODE(st.st_mode) == 0o600


def test_fifos_and_sockets_are_not_devices(env: Env) -> None:
    snap = env.forge().add(Entry("p", FIFO, mode=0o640)).add(Entry("s", SOCKET, mode=0o755)).commit()
    env.restore(snap)
    assert stat.S_ISFIFO(os.lstat(env.target / "p").st_mode)
    assert stat.S_ISSOCK(os.lstat(env.target / "s").st_mode)


# ---------------------------------------------------------------- tree structure


@pytest.mark.parametrize("second", [FILE, DIR, SYMLINK])
def test_duplicate_entries_are_refused(env: Env, second: str) -> None:
    forge = env.forge().file("a", b"first")
    if second == FILE:
        forge.file("a", b"second")
    elif second == DIR:
        forge.dir("a")
    else:
        forge.symlink("a", str(env.outside))
    env.refused(forge.commit(), UnsafeDataError, "'a'", "twice")


def test_second_root_is_refused(env: Env) -> None:
    snap = env.forge().file("a").add(Entry(".", DIR, mode=0o777)).commit()
    env.refused(snap, UnsafeDataError, "root")


def test_missing_root_is_refused(env: Env) -> None:
    snap = env.forge(root=False).file("a").commit()
    env.refused(snap, UnsafeDataError, "root")
    assert os.listdir(env.target) == []


@pytest.mark.parametrize("parent", [FILE, SYMLINK, FIFO, "absent"])
def test_entry_whose_parent_is_not_a_directory_is_refused(env: Env, parent: str) -> None:
    forge = env.forge()
    if parent == FILE:
        forge.file("p")
    elif parent == SYMLINK:
        forge.symlink("p", str(env.outside))
    elif parent == FIFO:
        forge.add(Entry("p", FIFO))
    forge.file("p/x", b"evil")
    env.refused(forge.commit(), UnsafeDataError, "'p/x'")


def test_out_of_order_catalog_still_lands_inside(env: Env) -> None:
    snap = env.forge().dir("a").dir("a/b").dir("c").file("a/b/x", b"late").file("c/y", b"y").commit()
    env.restore(snap)
    assert (env.target / "a/b/x").read_bytes() == b"late"


# ---------------------------------------------------------------- stored data


def backed_up(env: Env) -> tuple[Snapshot, str]:
    """A real snapshot of random data, and the id of one of its data blobs."""
    src = env.tmp / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(50_000))
    snap = backup_dir(env.repo, src)
    os.unlink(src / "f")
    src.rmdir()
    bid = next(b for b, r in env.repo.index.items() if r.type == BLOB_DATA)
    return snap, bid


def test_flipped_byte_in_a_pack_names_blob_and_pack(any_env: Env) -> None:
    snap, bid = backed_up(any_env)
    ref = any_env.repo.index[bid]
    key = pack_key(ref.pack)
    data = bytearray(any_env.storage.get(key))
    data[ref.offset + ref.length // 2] ^= 0x40
    any_env.storage.put(key, bytes(data), overwrite=True)
    any_env.refused(snap, CorruptDataError, bid, ref.pack)


def test_missing_pack_is_named(any_env: Env) -> None:
    snap, bid = backed_up(any_env)
    pack = any_env.repo.index[bid].pack
    any_env.storage.delete(pack_key(pack))
    any_env.refused(snap, CorruptDataError, pack, "missing")


def test_truncated_pack_is_named(any_env: Env) -> None:
    snap, bid = backed_up(any_env)
    ref = any_env.repo.index[bid]
    key = pack_key(ref.pack)
    any_env.storage.put(key, any_env.storage.get(key)[: ref.offset + 10], overwrite=True)
    any_env.refused(snap, CorruptDataError, ref.pack)


def test_blob_absent_from_every_index_is_named(env: Env) -> None:
    missing = blob_id(b"never stored")
    snap = env.forge().add(Entry("f", FILE, size=12, chunks=[missing])).commit()
    env.refused(snap, CorruptDataError, missing)


def bomb_frame(size: int, *, declared: bool) -> bytes:
    """A zstd frame inflating to ``size`` zero bytes, built without holding them."""
    out = bytearray()
    cobj = zstandard.ZstdCompressor(level=1, write_content_size=declared).compressobj(size=size if declared else -1)
    zeros = bytes(1 << 20)
    for _ in range(size >> 20):
        out += cobj.compress(zeros)
    return bytes(out + cobj.flush())


@pytest.mark.parametrize("declared", [True, False])
def test_decompression_bomb_fails_without_inflating(env: Env, declared: bool) -> None:
    claimed = b"six thousand bytes".ljust(6000, b".")
    bid = blob_id(claimed)
    forge = env.forge().add(Entry("bomb", FILE, size=len(claimed), chunks=[bid]))
    forge.blobs[bid] = (bomb_frame(1 << 30, declared=declared), len(claimed))
    snap = forge.commit()
    tracemalloc.start()
    try:
        env.refused(snap, CorruptDataError, bid)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20


def test_blob_claiming_a_huge_raw_length_is_refused_before_decompressing(env: Env) -> None:
    """An index row may claim any raw length: restore bounds it by the chunker's maximum."""
    content = bytes(200 << 20)
    bid = blob_id(content)
    forge = env.forge().add(Entry("big", FILE, size=len(content), chunks=[bid]))
    forge.blobs[bid] = (bomb_frame(len(content), declared=True), len(content))
    snap = forge.commit()
    del content
    tracemalloc.start()
    try:
        env.refused(snap, CorruptDataError, bid)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20


def test_blob_whose_content_does_not_match_its_id_is_refused(env: Env) -> None:
    forge = env.forge()
    bid = forge.blob(b"the real content")
    forge.blobs[bid] = (zstandard.ZstdCompressor().compress(b"other content!!!"), 16)
    snap = forge.add(Entry("f", FILE, size=16, chunks=[bid])).commit()
    env.refused(snap, CorruptDataError, bid, "hash")


def test_chunks_not_adding_up_to_the_size_are_refused(env: Env) -> None:
    forge = env.forge()
    bid = forge.blob(b"12345")
    snap = forge.add(Entry("f", FILE, size=9, chunks=[bid])).commit()
    env.refused(snap, CorruptDataError, "'f'")


def test_extents_not_matching_the_data_are_refused(env: Env) -> None:
    forge = env.forge()
    bid = forge.blob(b"12345")
    snap = forge.add(Entry("f", FILE, size=100, chunks=[bid], extents=[(10, 3)])).commit()
    env.refused(snap, CorruptDataError, "'f'")


def test_forged_manifest_is_refused(env: Env) -> None:
    snap = env.forge().file("a").commit()
    key = snapshot_key(snap.id)
    doc = json.loads(env.storage.get(key))
    doc["host"] = "elsewhere"
    env.storage.put(key, json.dumps(doc).encode(), overwrite=True)
    with pytest.raises(CorruptDataError, match=snap.id):
        env.repo.load_snapshot(snap.id)
    with pytest.raises(CorruptDataError, match=snap.id):
        env.repo.find_snapshot(snap.id[:12])


def test_catalog_blob_that_is_data_is_refused(env: Env) -> None:
    forge = env.forge()
    bid = forge.blob(b'{"p":".","t":"d","m":493,"u":0,"g":0,"mt":0}\n')
    forge.commit()
    snap = save(env.repo, (bid,), 1)
    env.refused(snap, CorruptDataError, bid)


def test_truncated_catalog_is_refused(env: Env) -> None:
    text = b'{"p":".","t":"d","m":493,"u":0,"g":0,"mt":0}\n{"p":"a","t":"d"'
    packs = PackWriter(env.repo)
    packs.add(blob_id(text), BLOB_META, zstandard.ZstdCompressor().compress(text), len(text))
    env.repo.write_index(packs.finish())
    snap = save(env.repo, (blob_id(text),), 2)
    env.refused(snap, CorruptDataError, "truncated")


BAD_LINES: list[str] = [
    "not json",
    "[1, 2]",
    '{"p": 1, "t": "f"}',
    '{"p": "a", "t": "f", "m": "420", "u": 0, "g": 0, "mt": 0, "s": 0, "c": []}',
    '{"p": "a", "t": "f", "m": true, "u": 0, "g": 0, "mt": 0, "s": 0, "c": []}',
    '{"p": "a", "t": "f", "m": 420, "u": -1, "g": 0, "mt": 0, "s": 0, "c": []}',
    '{"p": "a", "t": "f", "m": 420, "u": 0, "g": 0, "mt": 1.5, "s": 0, "c": []}',
    '{"p": "a", "t": "f", "m": 420, "u": 0, "g": 0, "mt": 0, "s": -1, "c": []}',
    '{"p": "a", "t": "f", "m": 420, "u": 0, "g": 0, "mt": 0, "s": 1, "c": "abc"}',
    '{"p": "a", "t": "f", "m": 420, "u": 0, "g": 0, "mt": 0, "s": 1, "c": ["ABC"]}',
    '{"p": "a", "t": "f", "m": 420, "u": 0, "g": 0, "mt": 0, "s": 5, "c": [], "e": [[0, 9]]}',
    '{"p": "a", "t": "f", "m": 420, "u": 0, "g": 0, "mt": 0, "s": 5, "c": [], "e": [["0", 1]]}',
    '{"p": "a", "t": "f", "m": 420, "u": 0, "g": 0, "mt": 0, "s": 0, "c": [], "x": {"user.a": "!!"}}',
    '{"p": "a", "t": "f", "m": 420, "u": 0, "g": 0, "mt": 0, "s": 0, "c": [], "x": ["user.a"]}',
    '{"p": "a", "t": "q", "m": 420, "u": 0, "g": 0, "mt": 0}',
    '{"p": "a", "t": "l", "m": 420, "u": 0, "g": 0, "mt": 0, "lt": 5}',
    '{"p": "a", "t": "c", "m": 420, "u": 0, "g": 0, "mt": 0, "r": "1"}',
    '{"p": "a\\u0000b", "t": "d", "m": 420, "u": 0, "g": 0, "mt": 0}',
    '{"p": "\\ud800", "t": "d", "m": 493, "u": 0, "g": 0, "mt": 0}',
    '{"p": "a", "t": "l", "m": 511, "u": 0, "g": 0, "mt": 0, "lt": "\\udfff"}',
    '{"p": "a", "t": "d", "m": 493, "u": 0, "g": 0, "mt": 0, "x": {"\\ud800": ""}}',
    '{"p": ' + "[" * 100_000 + "]" * 100_000 + "}",
]


@pytest.mark.parametrize("line", BAD_LINES, ids=range(len(BAD_LINES)))
def test_catalog_lines_with_wrong_types_are_refused(env: Env, line: str) -> None:
    snap = env.forge().add(line).commit()
    env.refused(snap, UnsafeDataError, "catalog")
