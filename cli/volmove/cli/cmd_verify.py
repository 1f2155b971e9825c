"""volmove verify: check that snapshots are complete and, optionally, intact."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Annotated

import typer

from volmove.cli.common import (
    JsonOpt,
    RepoOpt,
    emit_json,
    fail,
    human_bytes,
    open_repo,
    progress_bar,
    run,
    stderr,
    stdout,
)
from volmove.core.errors import CorruptDataError, UsageError, VolmoveError
from volmove.core.ops import run_cancellable
from volmove.core.repository import Repository
from volmove.core.verify import VerifyReport, record_verified, verify


def verify_cmd(
    snapshot: Annotated[str | None, typer.Argument(help="Snapshot id or prefix [default: all].")] = None,
    read_data: Annotated[bool, typer.Option("--read-data", help="Download and check every blob.")] = False,
    subset: Annotated[str | None, typer.Option(
        "--subset", help="With --read-data: read only this share of the packs, e.g. 10%, chosen anew each day.",
    )] = None,
    repo: RepoOpt = None, json_out: JsonOpt = False,
) -> None:
    """Verify snapshots: catalogs, index, and with --read-data every byte.

    Snapshots whose every pack was read and found intact are marked verified;
    retention never removes the newest verified snapshot of a volume."""
    share = _percent(subset, json_out) if subset is not None else None
    if share is not None and not read_data:
        fail("--subset needs --read-data", UsageError.exit_code, UsageError.kind, json_out)

    async def go() -> VerifyReport:
        repository = await asyncio.to_thread(open_repo, repo)
        if snapshot:
            snaps = [await asyncio.to_thread(repository.find_snapshot, snapshot)]
        else:
            snaps = await asyncio.to_thread(repository.list_snapshots)
        now = datetime.now(UTC)
        with progress_bar("verify", json_out) as progress:
            report = await run_cancellable(
                lambda cancel: verify(repository, snaps, read_data=read_data, subset=share,
                                      seed=now.date().isoformat(), progress=progress, cancel=cancel))
        if read_data:
            await asyncio.to_thread(_record, repository, report.passed, now)
        return report

    report = run(go, json_out=json_out)
    doc = {"ok": report.ok, "snapshots": report.snapshots, "entries": report.entries, "blobs": report.blobs,
           "packs_read": report.packs_read, "bytes_read": report.bytes_read, "errors": report.errors,
           "subset": share, "verified": report.passed if read_data else []}
    if json_out:
        emit_json(doc)
    else:
        for err in report.errors:
            stdout.print(f"error: {err}", markup=False)
        read = f", read {report.packs_read} packs ({human_bytes(report.bytes_read)})" if read_data else ""
        stdout.print(f"checked {report.snapshots} snapshots, {report.entries} entries, {report.blobs} blobs{read}")
        if read_data:
            stdout.print(f"{len(report.passed)} snapshots verified completely")
    if not report.ok:
        code = CorruptDataError.exit_code
        fail(f"{len(report.errors)} problems found", code, CorruptDataError.kind, json_out=False)


def _percent(text: str, json_out: bool) -> float:
    try:
        value = float(text.strip().removesuffix("%"))
    except ValueError:
        value = -1.0
    if not 0 < value <= 100:
        fail(f"--subset {text!r} is not a percentage in (0, 100]", UsageError.exit_code, UsageError.kind, json_out)
    return value


def _record(repo: Repository, passed: list[str], now: datetime) -> None:
    try:
        for sid in passed:
            record_verified(repo, sid, "read-data", now)
    except VolmoveError as exc:  # verifying needs only read access to the repository
        stderr.print(f"warning: could not record which snapshots were verified: {exc}", markup=False)
