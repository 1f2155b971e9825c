"""Catalog blobs fetched ahead from a slow store: same lines, same order, bounded concurrency."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.engine_helpers import Overlap, backup_dir, new_repo
from volmove.core.errors import CorruptDataError
from volmove.core.format import pack_key
from volmove.core.repository import fetched_ahead
from volmove.core.storage.memory import MemoryStorage


class _Counting(Overlap):
    def __init__(self, delay: float = 0.0, fail: str | None = None) -> None:
        super().__init__()
        self.delay, self.fail = delay, fail
        self.started: list[str] = []

    def __call__(self, key: str) -> bytes:
        with self.call():
            self.started.append(key)
            time.sleep(self.delay)
            if key == self.fail:
                raise CorruptDataError(f"{key} is bad")
            return key.encode()


@pytest.mark.parametrize("ahead", [0, 1, 3, 50])
def test_results_come_in_order_with_at_most_ahead_running(ahead: int) -> None:
    keys = [f"k{i}" for i in range(20)]
    fetch = _Counting(delay=0.002)
    assert list(fetched_ahead(fetch, keys, ahead)) == [k.encode() for k in keys]
    assert fetch.most <= max(ahead, 1)
    if ahead > 1:
        assert fetch.most > 1  # they did overlap


def test_a_failure_surfaces_at_its_place_and_a_reader_that_stops_leaves_nothing_running() -> None:
    keys = [f"k{i}" for i in range(20)]
    fetch = _Counting(fail="k5")
    got = []
    with pytest.raises(CorruptDataError, match="k5 is bad"):
        for data in fetched_ahead(fetch, keys, 4):
            got.append(data)
    assert got == [f"k{i}".encode() for i in range(5)]
    slow = _Counting(delay=0.01)
    reader = fetched_ahead(slow, keys, 4)
    assert next(reader) == b"k0"
    reader.close()
    assert slow.running == 0 and len(slow.started) <= 6  # k0..k4 and at most one more queued


class _SlowStore(MemoryStorage):
    prefers_whole_objects = True


def test_a_catalog_read_ahead_is_the_catalog(tmp_path: Path) -> None:
    for i in range(2000):
        (tmp_path / f"file-{i:04}-{'x' * 200}").write_bytes(b"%d" % i)
    storage = _SlowStore()
    repo = new_repo(storage)
    snap = backup_dir(repo, tmp_path)
    assert len(snap.catalog) >= 3  # several blobs, so some are fetched ahead
    lines = list(repo.read_catalog(snap))
    storage.prefers_whole_objects = False
    assert list(repo.read_catalog(snap)) == lines and len(lines) == 2001
    # A missing catalog blob is still named when it is fetched ahead.
    storage.prefers_whole_objects = True
    storage.delete(pack_key(repo.index[snap.catalog[-1]].pack))
    with pytest.raises(CorruptDataError, match="missing"):
        list(repo.read_catalog(snap))
