"""volmove verify: check that snapshots are complete and, optionally, intact."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer
from volmove.cli.common import JsonOpt, RepoOpt, emit_json, fail, human_bytes, open_repo, progress_bar, run, stdout
from volmove.core.errors import CorruptDataError
from volmove.core.ops import run_cancellable
from volmove.core.verify import VerifyReport, verify


def verify_cmd(
    snapshot: Annotated[str | None, typer.Argument(help="Snapshot id or prefix [default: all].")] = None,
    read_data: Annotated[bool, typer.Option("--read-data", help="Download and check every blob.")] = False,
    repo: RepoOpt = None, json_out: JsonOpt = False,
) -> None:
    """Verify snapshots: catalogs, index, and with --read-data every byte."""

    async def go() -> VerifyReport:
        repository = await asyncio.to_thread(open_repo, repo)
        if snapshot:
            snaps = [await asyncio.to_thread(repository.find_snapshot, snapshot)]
        else:
            snaps = await asyncio.to_thread(repository.list_snapshots)
        with progress_bar("verify", json_out) as progress:
            return await run_cancellable(
                lambda cancel: verify(repository, snaps, read_data=read_data, progress=progress, cancel=cancel))

    report = run(go, json_out=json_out)
    doc = {"ok": report.ok, "snapshots": report.snapshots, "entries": report.entries, "blobs": report.blobs,
           "packs_read": report.packs_read, "bytes_read": report.bytes_read, "errors": report.errors}
    if json_out:
        emit_json(doc)
    else:
        for err in report.errors:
            stdout.print(f"error: {err}", markup=False)
        read = f", read {report.packs_read} packs ({human_bytes(report.bytes_read)})" if read_data else ""
        stdout.print(f"checked {report.snapshots} snapshots, {report.entries} entries, {report.blobs} blobs{read}")
    if not report.ok:
        code = CorruptDataError.exit_code
        fail(f"{len(report.errors)} problems found", code, CorruptDataError.kind, json_out=False)
