"""The local backend's write ordering: packs are synced in bulk, before anything can name them."""

from __future__ import annotations

from pathlib import Path

import pytest

from volmove.core.storage import local
from volmove.core.storage.local import LocalStorage


@pytest.fixture
def syncs(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    calls: list[Path] = []
    real = local._syncfs

    def record(root: Path) -> None:
        calls.append(root)
        real(root)  # the real call must work here too

    monkeypatch.setattr(local, "_syncfs", record)
    return calls


def test_packs_are_synced_once_before_the_index_that_names_them(tmp_path: Path, syncs: list[Path]) -> None:
    storage = LocalStorage(tmp_path)
    for i in range(3):
        storage.put(f"data/ab/ab{i}", b"pack %d" % i)
    assert syncs == []  # no flush of the disk per pack
    storage.put("index/1", b"names the packs")
    assert syncs == [tmp_path]
    storage.put("snapshots/1", b"names the index")  # fsynced itself; nothing deferred is left
    assert syncs == [tmp_path]
    assert [storage.get(f"data/ab/ab{i}") for i in range(3)] == [b"pack 0", b"pack 1", b"pack 2"]


def test_explicit_sync_and_nothing_to_sync(tmp_path: Path, syncs: list[Path]) -> None:
    storage = LocalStorage(tmp_path)
    storage.sync()
    storage.put("config", b"{}")
    assert syncs == []
    storage.put("data/00/00ff", b"x")
    storage.sync()
    storage.sync()
    assert syncs == [tmp_path]
