"""A prune running while ten backups run loses nothing: every remaining snapshot restores.

Ten threads run the backup engine the way ``ops.backup_volume`` does: the index
is loaded first (as the CLI does), then, under the shared lease, reloaded and
used.  Their content is what forgotten snapshots held, so a backup that
deduplicated against a stale index would name packs the prune deletes.  The
prune uses a minimum age of zero: only the lease protects the backups.
"""

from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path

import pytest

from tests.engine_helpers import backup_dir, new_repo, tree_state
from tests.unit.test_prune import TreeState, check_repository, fill, open_fresh
from volmove.core.format import snapshot_key
from volmove.core.locks import held_lease
from volmove.core.prune import PruneOptions, PruneReport, run_prune
from volmove.core.storage.base import Storage

WORKERS = 10
ROUNDS = 3


def leased_backup(storage: Storage, src: Path, volume: str) -> str:
    repo = open_fresh(storage)  # loaded before the lease, as the CLI does
    with held_lease(storage, "shared", "backup", wait=120):
        repo.load_index()  # what backup_volume does first under its lease
        return backup_dir(repo, src, volume).id


def garbage(storage: Storage, tmp_path: Path) -> None:
    """Forgotten snapshots of what the workers will back up again, and of what nobody will."""
    repo = new_repo(storage)
    for n in range(WORKERS):
        fill(tmp_path / "old" / str(n), 1000 + n, files=2)
        storage.delete(snapshot_key(backup_dir(repo, tmp_path / "old" / str(n), f"v{n}").id))
    fill(tmp_path / "gone", 5000, common=False)
    storage.delete(snapshot_key(backup_dir(repo, tmp_path / "gone", "gone").id))


@pytest.mark.slow
def test_prune_while_ten_backups_run_loses_nothing(any_storage: Storage, tmp_path: Path) -> None:
    garbage(any_storage, tmp_path)
    expected: dict[str, TreeState] = {}
    committed = threading.Semaphore(0)
    pruned = threading.Event()
    after_prune: list[str] = []
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for r in range(ROUNDS):
                src = tmp_path / f"w{n}-{r}"
                fill(src, n if r != 1 else 1000 + n, files=2)  # round 1: the forgotten content again
                sid = leased_backup(any_storage, src, f"v{n}")
                expected[sid] = tree_state(src)
                if pruned.is_set():
                    after_prune.append(sid)
                committed.release()
        except BaseException as exc:
            errors.append(exc)

    reports: list[PruneReport] = []

    def pruner() -> None:
        for _ in range(WORKERS // 2):
            committed.acquire()  # start once some backups are done and the rest are running
        try:
            reports.append(run_prune(open_fresh(any_storage), PruneOptions(min_age=timedelta(0), lock_wait=300)))
        except BaseException as exc:
            errors.append(exc)
        pruned.set()

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(WORKERS)]
    threads.append(threading.Thread(target=pruner))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(expected) == WORKERS * ROUNDS
    assert after_prune  # the prune ran in the middle, not after everything
    assert reports[0].bytes_deleted > 0  # it did delete, at least what nobody backed up again
    assert list(any_storage.list("locks/")) == []
    check_repository(any_storage, expected, tmp_path / "restored")
