"""One behavioural contract, run against every Storage backend (memory, local, s3)."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

import pytest

from volmove.core.errors import ConflictError, CorruptDataError, NotFoundError
from volmove.core.storage.base import Storage
from volmove.core.storage.local import TMP_PREFIX, LocalStorage
from volmove.core.storage.memory import MemoryStorage
from volmove.core.storage.s3 import S3Storage


def test_put_get_round_trip(any_storage: Storage) -> None:
    any_storage.put("config", b"hello")
    any_storage.put("empty", b"")
    assert any_storage.get("config") == b"hello"
    assert any_storage.get("empty") == b""


@pytest.mark.parametrize("sizes", [[4095, 5000, 0, (1 << 20) + 123, 4], [1 << 20], [(1 << 20) - 1, 1], [7, 0, 9]],
                         ids=repr)
def test_put_parts_stores_their_concatenation(any_storage: Storage, sizes: list[int]) -> None:
    parts: list[bytes | memoryview] = [os.urandom(n) for n in sizes]
    parts[0] = memoryview(bytes(parts[0]))  # packs are made of views into zstd's buffers
    whole = b"".join(parts)
    for key in ("data/ab/parts", "index/parts"):  # a pack (written directly where it can be), anything else
        any_storage.put_parts(key, parts)
        assert any_storage.get(key) == whole
        with pytest.raises(ConflictError):
            any_storage.put_parts(key, parts)


def test_put_is_write_once(any_storage: Storage) -> None:
    any_storage.put("locks/a", b"first")
    with pytest.raises(ConflictError, match="locks/a"):
        any_storage.put("locks/a", b"second")
    assert any_storage.get("locks/a") == b"first"


def test_overwrite_replaces_or_creates(any_storage: Storage) -> None:
    any_storage.put("config", b"v1")
    any_storage.put("config", b"v2", overwrite=True)
    any_storage.put("fresh", b"new", overwrite=True)
    assert any_storage.get("config") == b"v2"
    assert any_storage.get("fresh") == b"new"


def test_get_range(any_storage: Storage) -> None:
    any_storage.put("data/ab/abcd", b"0123456789")
    assert any_storage.get_range("data/ab/abcd", 0, 10) == b"0123456789"
    assert any_storage.get_range("data/ab/abcd", 3, 4) == b"3456"
    assert any_storage.get_range("data/ab/abcd", 9, 1) == b"9"
    assert any_storage.get_range("data/ab/abcd", 4, 0) == b""


@pytest.mark.parametrize(("offset", "length"), [(8, 5), (10, 1), (50, 4)])
def test_get_range_short_read_is_corrupt(any_storage: Storage, offset: int, length: int) -> None:
    any_storage.put("data/ab/abcd", b"0123456789")
    with pytest.raises(CorruptDataError, match="data/ab/abcd"):
        any_storage.get_range("data/ab/abcd", offset, length)


def test_missing_key_errors_name_the_key(any_storage: Storage) -> None:
    key = "data/ff/ffee-missing"
    for call in (
        lambda: any_storage.get(key),
        lambda: any_storage.stat(key),
        lambda: any_storage.get_range(key, 0, 4),
        lambda: any_storage.get_range(key, 0, 0),
    ):
        with pytest.raises(NotFoundError, match=key):
            call()
    assert not any_storage.exists(key)


def test_exists_and_stat(any_storage: Storage) -> None:
    before = time.time()
    any_storage.put("snapshots/s1", b"x" * 1234)
    assert any_storage.exists("snapshots/s1")
    assert not any_storage.exists("snapshots/s")  # a prefix of a key is not a key
    info = any_storage.stat("snapshots/s1")
    assert (info.key, info.size) == ("snapshots/s1", 1234)
    # S3's Last-Modified has one-second resolution
    assert before - 2 <= info.mtime <= time.time() + 2


KEYS = {
    "config": 6,
    "data/ab/abcd": 1,
    "data/ab/abef": 2,
    "data/cd/cdef": 3,
    "snapshots/s1": 4,
    "snapshots/s2": 5,
}


@pytest.mark.parametrize(
    ("prefix", "expected"),
    [
        ("", set(KEYS)),
        ("data/", {"data/ab/abcd", "data/ab/abef", "data/cd/cdef"}),
        ("data/ab/", {"data/ab/abcd", "data/ab/abef"}),
        ("data/ab/abc", {"data/ab/abcd"}),
        ("dat", {"data/ab/abcd", "data/ab/abef", "data/cd/cdef"}),
        ("snapshots/", {"snapshots/s1", "snapshots/s2"}),
        ("nothing/", set()),
        ("data/zz/", set()),
    ],
)
def test_list_by_prefix(any_storage: Storage, prefix: str, expected: set[str]) -> None:
    for key, size in KEYS.items():
        any_storage.put(key, b"x" * size)
    infos = list(any_storage.list(prefix))
    assert sorted(i.key for i in infos) == sorted(expected)
    assert all(i.size == KEYS[i.key] for i in infos)


def test_list_beyond_one_page(any_storage: Storage) -> None:
    # S3 answers at most 1000 keys a request: the adapter must follow continuation tokens.
    keys = [f"data/{i % 7:02x}/{i:06d}" for i in range(1100)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: any_storage.put(k, b"."), keys))
    assert sorted(i.key for i in any_storage.list("data/")) == sorted(keys)


def test_delete(any_storage: Storage) -> None:
    any_storage.put("locks/x", b"1")
    any_storage.delete("locks/x")
    any_storage.delete("locks/x")  # absent: not an error
    any_storage.delete("never/was")
    assert not any_storage.exists("locks/x")
    with pytest.raises(NotFoundError):
        any_storage.get("locks/x")
    assert list(any_storage.list("locks/")) == []
    any_storage.put("locks/x", b"2")  # write-once again after a delete
    assert any_storage.get("locks/x") == b"2"


def test_large_object(any_storage: Storage) -> None:
    data = os.urandom(20 * 1024 * 1024)
    any_storage.put("packs/big", data)
    assert any_storage.stat("packs/big").size == len(data)
    assert any_storage.get("packs/big") == data
    mid = 13 * 1024 * 1024 + 7
    assert any_storage.get_range("packs/big", mid, 1024 * 1024) == data[mid : mid + 1024 * 1024]


def test_concurrent_puts_of_distinct_keys(any_storage: Storage) -> None:
    blobs = {f"data/{i:02x}/{i:064x}": os.urandom(1000 + i) for i in range(64)}
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda kv: any_storage.put(*kv), blobs.items()))
    with ThreadPoolExecutor(16) as pool:
        got = dict(zip(blobs, pool.map(any_storage.get, blobs), strict=True))
    assert got == blobs


def test_concurrent_write_once_has_one_winner(any_storage: Storage) -> None:
    def attempt(i: int) -> bool:
        try:
            any_storage.put("locks/exclusive", f"writer {i}".encode())
        except ConflictError:
            return False
        return True

    with ThreadPoolExecutor(16) as pool:
        won = [i for i, ok in enumerate(pool.map(attempt, range(32))) if ok]
    assert len(won) == 1
    assert any_storage.get("locks/exclusive") == f"writer {won[0]}".encode()


def _leave_interrupted_write(storage: Storage, request: pytest.FixtureRequest) -> int:
    """Leave what each backend's interrupted write leaves behind; return how many leftovers."""
    if isinstance(storage, MemoryStorage):
        return 0  # nothing can be half-written in memory
    if isinstance(storage, LocalStorage):
        # another host's temp file (so no pid check applies), ten seconds old
        tmp = storage.root / "data" / "ab" / f"{TMP_PREFIX}otherhost-1-1"
        tmp.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(b"partial")
        os.utime(tmp, (time.time() - 10, time.time() - 10))
        return 1
    assert isinstance(storage, S3Storage)
    client: Any = request.getfixturevalue("s3_client")
    prefix = urlsplit(storage.url).path.strip("/")
    client.create_multipart_upload(Bucket=storage.bucket, Key=f"{prefix}/data/ab/abcd")
    return 1


def test_cleanup_incomplete(any_storage: Storage, request: pytest.FixtureRequest) -> None:
    any_storage.put("data/ab/abcd", b"complete")
    leftovers = _leave_interrupted_write(any_storage, request)
    assert [i.key for i in any_storage.list("data/")] == ["data/ab/abcd"]  # leftovers are invisible
    assert any_storage.cleanup_incomplete(3600) == 0  # too young
    assert any_storage.cleanup_incomplete(0) == leftovers
    assert any_storage.cleanup_incomplete(0) == 0
    assert any_storage.get("data/ab/abcd") == b"complete"
