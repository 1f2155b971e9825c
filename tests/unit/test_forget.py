"""Forget end to end on real manifests with chosen times; verified markers; the forget/prune/verify CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest

from tests.engine_helpers import backup_dir, new_repo
from tests.unit.test_prune import fill, open_fresh
from volmove.core.errors import ConflictError, UsageError
from volmove.core.forget import ForgetRequest, run_forget
from volmove.core.locks import held_lease
from volmove.core.policy.retention import RetentionPolicy
from volmove.core.repository import Repository
from volmove.core.snapshot import Snapshot
from volmove.core.storage.local import LocalStorage
from volmove.core.storage.memory import MemoryStorage
from volmove.core.verify import choose_packs, record_verified, verified_ids, verify

NOW = datetime(2026, 1, 1, 0, 0, tzinfo=UTC)
VOLMOVE = str(Path(sys.executable).with_name("volmove"))


def daily_year(repo: Repository, template: Snapshot, host: str = "h1", volume: str = "db") -> dict[date, str]:
    """A snapshot each day of 2025 at 03:00 UTC (one real catalog, 365 manifests); id by day."""
    ids = {}
    day = date(2025, 1, 1)
    while day.year == 2025:
        t = datetime(day.year, day.month, day.day, 3, tzinfo=UTC)
        snap = replace(template, time=t, host=host, volume=replace(template.volume, name=volume), id="")
        ids[day] = repo.save_snapshot(snap)
        day += timedelta(days=1)
    return ids


@pytest.fixture
def year(tmp_path: Path) -> tuple[Repository, dict[date, str]]:
    repo = new_repo(MemoryStorage())
    fill(tmp_path / "src", 1, files=1, size=10_000)
    template = backup_dir(repo, tmp_path / "src", "db")
    repo.storage.delete(f"snapshots/{template.id}")
    return repo, daily_year(repo, template)


def remaining(repo: Repository) -> set[str]:
    return set(repo.snapshot_ids())


def test_a_year_of_daily_backups_keeps_exactly_the_expected_set(year: tuple[Repository, dict[date, str]]) -> None:
    repo, ids = year
    record_verified(repo, ids[date(2025, 6, 15)], "restore-drill", NOW)  # the newest verified one
    policy = RetentionPolicy(keep_daily=7, keep_weekly=4, keep_monthly=12, keep_yearly=3)
    result = run_forget(repo, ForgetRequest(policy), clock=lambda: NOW)
    daily = {date(2025, 12, d) for d in range(25, 32)}
    weekly = {date(2025, 12, 31), date(2025, 12, 28), date(2025, 12, 21), date(2025, 12, 14)}  # ISO weeks end Sunday
    monthly = {(date(2025, m + 1, 1) - timedelta(days=1)) for m in range(1, 12)} | {date(2025, 12, 31)}
    yearly = {date(2025, 12, 31), date(2025, 1, 1)}  # counts left over: the oldest is kept too, as restic does
    expected = {ids[d] for d in daily | weekly | monthly | yearly} | {ids[date(2025, 6, 15)]}
    assert remaining(repo) == expected
    assert len(result.removed) == 365 - len(expected) == 365 - 22
    reasons = {v.snapshot.id: v.reasons for v in result.decision.keep}
    assert reasons[ids[date(2025, 6, 15)]] == ("newest verified snapshot",)
    assert reasons[ids[date(2025, 1, 1)]] == ("oldest yearly 2025",)
    assert "daily 2025-12-31" in reasons[ids[date(2025, 12, 31)]]
    assert verified_ids(repo) == {ids[date(2025, 6, 15)]}
    again = run_forget(repo, ForgetRequest(policy), clock=lambda: NOW)  # a policy is a fixed point
    assert again.removed == ()


def test_keep_within_and_dry_run(year: tuple[Repository, dict[date, str]]) -> None:
    repo, _ids = year
    req = ForgetRequest(RetentionPolicy(keep_within=timedelta(days=30)), dry_run=True)
    result = run_forget(repo, req, clock=lambda: NOW)
    assert len(result.decision.keep) == 30 and result.removed == ()
    assert len(remaining(repo)) == 365  # a dry run removes nothing


def test_filters_touch_only_their_snapshots(tmp_path: Path) -> None:
    repo = new_repo(MemoryStorage())
    fill(tmp_path / "src", 1, files=1, size=1000)
    template = backup_dir(repo, tmp_path / "src", "db")
    repo.storage.delete(f"snapshots/{template.id}")
    db = daily_year(repo, template, volume="db")
    web = daily_year(repo, template, volume="web")
    other = daily_year(repo, template, host="h2", volume="db")
    run_forget(repo, ForgetRequest(RetentionPolicy(keep_last=2), volume="db", host="h1"), clock=lambda: NOW)
    assert remaining(repo) == set(web.values()) | set(other.values()) | {db[date(2025, 12, 31)], db[date(2025, 12, 30)]}


def test_empty_policy_is_refused_before_anything(year: tuple[Repository, dict[date, str]]) -> None:
    repo, _ids = year
    with pytest.raises(UsageError, match="give at least one --keep option"):
        run_forget(repo, ForgetRequest(RetentionPolicy()))
    assert len(remaining(repo)) == 365


def test_forget_waits_for_no_one_and_says_who_holds_the_lock(year: tuple[Repository, dict[date, str]]) -> None:
    repo, _ids = year
    with held_lease(repo.storage, "shared", "backup"), \
            pytest.raises(ConflictError, match=r"locked by .* backup \(shared\)"):
        run_forget(repo, ForgetRequest(RetentionPolicy(keep_last=1), lock_wait=0))
    assert len(remaining(repo)) == 365


def test_forget_then_prune_reclaims_space(tmp_path: Path) -> None:
    storage = MemoryStorage()
    repo = new_repo(storage)
    for n in range(3):
        fill(tmp_path / f"d{n}", n, common=False)
        backup_dir(repo, tmp_path / f"d{n}", "db")
    req = ForgetRequest(RetentionPolicy(keep_last=1), prune=True, min_age=timedelta(0))
    preview = run_forget(repo, replace(req, dry_run=True))
    assert preview.prune is not None and preview.prune.packs_deleted == 2 and len(remaining(repo)) == 3
    result = run_forget(repo, req)
    assert result.prune is not None and result.prune.packs_deleted == 2 and result.prune.bytes_deleted > 0
    assert len(list(storage.list("data/"))) == 1
    assert verify(open_fresh(storage), open_fresh(storage).list_snapshots(), read_data=True).ok


def test_subset_choice_is_deterministic_and_sized() -> None:
    packs = {f"{n:064x}" for n in range(40)}
    assert choose_packs(packs, 10, "2026-01-01") == choose_packs(packs, 10, "2026-01-01")
    assert len(choose_packs(packs, 10, "x")) == 4
    assert len(choose_packs(packs, 0.1, "x")) == 1
    assert choose_packs(packs, None, "x") == packs
    assert choose_packs(packs, 10, "2026-01-01") != choose_packs(packs, 10, "2026-01-02")


# ------------------------------------------------------------------ the CLI


def cli(*args: str, repo: Path, check: int = 0) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "VOLMOVE_REPO": str(repo)}
    proc = subprocess.run([VOLMOVE, *args], capture_output=True, text=True, env=env, timeout=300)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == check, (proc.returncode, proc.stdout, proc.stderr)
    return proc


def test_cli_verify_marks_forget_keeps_prune_reclaims(tmp_path: Path) -> None:
    path = tmp_path / "repo"
    cli("init", repo=path)
    repo = Repository.open(LocalStorage(path))
    repo.load_index()
    snaps = []
    for n in range(4):
        fill(tmp_path / f"d{n}", n, common=False)
        snaps.append(backup_dir(repo, tmp_path / f"d{n}", "db"))
    verified = json.loads(cli("verify", snaps[0].id[:8], "--read-data", "--json", repo=path).stdout)
    assert verified["verified"] == [snaps[0].id]
    cli("verify", snaps[1].id[:8], "--read-data", repo=path)  # now the newest verified one
    out = json.loads(cli("forget", "--keep-last", "1", "--dry-run", "--json", repo=path).stdout)
    assert [(r["id"], r["action"]) for r in out["snapshots"]] == [
        (snaps[3].id, "keep"), (snaps[2].id, "remove"), (snaps[1].id, "keep"), (snaps[0].id, "remove")]
    assert out["snapshots"][2]["reasons"] == ["newest verified snapshot"]
    text = cli("forget", "--keep-last", "1", repo=path).stdout
    assert "removed 2" in text and "newest verified snapshot" in text
    assert {s.id for s in Repository.open(LocalStorage(path)).list_snapshots()} == {snaps[3].id, snaps[1].id}
    assert "2 packs, " in cli("prune", "--min-age", "0", repo=path).stdout
    assert json.loads(cli("prune", "--min-age", "0", "--json", repo=path).stdout)["packs_deleted"] == 0
    sub = json.loads(cli("verify", "--read-data", "--subset", "50%", "--json", repo=path).stdout)
    assert sub["ok"] and sub["packs_read"] == 1 and len(sub["verified"]) == 1
    err = cli("forget", repo=path, check=2).stderr
    assert err.startswith("volmove: error: refusing to remove every snapshot") and err.count("\n") == 1
    assert cli("verify", "--subset", "200%", "--read-data", repo=path, check=2).stderr.count("\n") == 1
