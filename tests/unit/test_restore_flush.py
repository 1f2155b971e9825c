"""A restore is durable when it returns: its target's file system is synced while it runs and
once at the end, and a write-back error fails it with one line."""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.engine_helpers import backup_dir, new_repo, restore_dir, tree_state
from volmove.core import restore
from volmove.core.errors import CancelledByUser, StorageError
from volmove.core.files import syncfs
from volmove.core.repository import Repository
from volmove.core.snapshot import Snapshot
from volmove.core.storage.memory import MemoryStorage

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="restoring owners needs root")


class Syncs:
    """Records each sync (thread, target, whether the restore had written its last entry), then syncs."""

    def __init__(self, fail: Callable[[str], bool] = lambda thread: False) -> None:
        self.calls: list[tuple[str, str, bool]] = []
        self.fail = fail
        self.background = threading.Event()
        self.entries_done = False

    def __call__(self, fd: int) -> None:
        thread = threading.current_thread().name
        self.calls.append((thread, os.readlink(f"/proc/self/fd/{fd}"), self.entries_done))
        if thread == "restore-flush":
            self.background.set()
        if self.fail(thread):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        syncfs(fd)


def small_snapshot(tmp_path: Path) -> tuple[Repository, Snapshot, Path]:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(40):
        (src / f"f{i:02d}").write_bytes(os.urandom(2000 + i))
    repo = new_repo(MemoryStorage())
    return repo, backup_dir(repo, src), src


def hold_until_synced(monkeypatch: pytest.MonkeyPatch, syncs: Syncs) -> None:
    """The restore waits at its tenth entry for a background sync, and notes when it is done with entries."""
    apply, close_dirs = restore.Restorer._apply, restore.Restorer._close_dirs
    seen = [0]

    def held_apply(self: restore.Restorer, job: restore._Job) -> None:
        seen[0] += 1
        if seen[0] == 10:
            assert syncs.background.wait(10), "no sync in the background while restoring"
        apply(self, job)

    def noted_close_dirs(self: restore.Restorer, *, apply: bool) -> None:
        close_dirs(self, apply=apply)
        syncs.entries_done = True

    monkeypatch.setattr(restore.Restorer, "_apply", held_apply)
    monkeypatch.setattr(restore.Restorer, "_close_dirs", noted_close_dirs)
    monkeypatch.setattr(restore, "FLUSH_EVERY", 0.01)


def flush_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "restore-flush"]


def test_syncfs_syncs_a_file_system_and_names_a_bad_descriptor(tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        syncfs(fd)
    finally:
        os.close(fd)
    with pytest.raises(OSError) as info:
        syncfs(fd)  # closed now
    assert info.value.errno == errno.EBADF


def test_the_target_is_synced_while_restoring_and_once_after_the_last_entry(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo, snap, src = small_snapshot(tmp_path)
    syncs = Syncs()
    monkeypatch.setattr(restore, "syncfs", syncs)
    hold_until_synced(monkeypatch, syncs)
    dst = tmp_path / "dst"
    restore_dir(repo, snap, dst)
    assert tree_state(dst) == tree_state(src)
    assert {target for _, target, _ in syncs.calls} == {str(dst)}
    assert ("restore-flush", str(dst), False) in syncs.calls
    assert syncs.calls[-1] == (threading.current_thread().name, str(dst), True)  # the last one, by the restorer
    assert not flush_threads()


@pytest.mark.parametrize("failing", ["restore-flush", "final"])
def test_a_write_back_error_fails_the_restore_in_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str) -> None:
    repo, snap, _ = small_snapshot(tmp_path)
    main = threading.current_thread().name
    syncs = Syncs(fail=lambda thread: thread == (failing if failing != "final" else main))
    monkeypatch.setattr(restore, "syncfs", syncs)
    hold_until_synced(monkeypatch, syncs)
    with pytest.raises(StorageError, match=r"^cannot write the restored data out: Input/output error$"):
        restore_dir(repo, snap, tmp_path / "dst")


def test_a_failed_restore_does_not_wait_for_a_sync_and_leaves_no_thread(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo, snap, _ = small_snapshot(tmp_path)
    release = threading.Event()
    started = threading.Event()

    def slow_sync(fd: int) -> None:
        started.set()
        release.wait(10)

    monkeypatch.setattr(restore, "syncfs", slow_sync)
    monkeypatch.setattr(restore, "FLUSH_EVERY", 0.01)
    cancel = threading.Event()
    apply = restore.Restorer._apply

    def cancel_once_syncing(self: restore.Restorer, job: restore._Job) -> None:
        assert started.wait(10)
        cancel.set()
        apply(self, job)

    monkeypatch.setattr(restore.Restorer, "_apply", cancel_once_syncing)
    monkeypatch.setattr(restore, "AHEAD_ENTRIES", 5)  # entries are still to be read when it is cancelled
    begun = time.monotonic()
    with pytest.raises(CancelledByUser):
        restore_dir(repo, snap, tmp_path / "dst", cancel=cancel)
    assert time.monotonic() - begun < 5  # the sync under way (held for 10 s) was not waited for
    release.set()
    for thread in flush_threads():
        thread.join(5)
    assert not flush_threads()
