"""volmove prune: delete the data no snapshot references."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer

from volmove.cli.common import JsonOpt, RepoOpt, emit_json, human_bytes, open_repo, run, stdout
from volmove.core.ops import run_cancellable
from volmove.core.prune import PruneOptions, PruneReport, parse_age, run_prune

MinAgeOpt = Annotated[str, typer.Option(
    "--min-age", help="Keep unreferenced data younger than this (d, h, m=minutes, s), e.g. 1h.")]
LockWaitOpt = Annotated[float | None, typer.Option(
    "--lock-wait", min=0, help="Seconds to wait for running backups and prunes (default 600, or $VOLMOVE_LOCK_WAIT).")]


def prune(
    min_age: MinAgeOpt = "1h",
    dry_run: Annotated[bool, typer.Option("--dry-run", "-n", help="Only report what would be deleted.")] = False,
    lock_wait: LockWaitOpt = None,
    repo: RepoOpt = None, json_out: JsonOpt = False,
) -> None:
    """Delete packs no snapshot references, under an exclusive repository lock; report the space reclaimed."""

    async def go() -> PruneReport:
        opts = PruneOptions(parse_age(min_age), dry_run, lock_wait)
        repository = await asyncio.to_thread(open_repo, repo, load_index=False)
        return await run_cancellable(lambda cancel: run_prune(repository, opts, cancel=cancel))

    report = run(go, json_out=json_out)
    if json_out:
        emit_json(report.as_dict())
    else:
        print_report(report)


def print_report(r: PruneReport) -> None:
    verb = "would delete" if r.dry_run else "deleted"
    stdout.print(f"{r.snapshots} snapshots reference {r.packs_kept} of {r.packs} packs; "
                 f"{verb} {r.packs_deleted} packs, {human_bytes(r.bytes_deleted)} reclaimed", markup=False)
    if r.unused_bytes:
        stdout.print(f"{human_bytes(r.unused_bytes)} unused inside packs that are still needed", markup=False)
    if r.young_packs:
        stdout.print(f"kept {r.young_packs} unreferenced packs ({human_bytes(r.young_bytes)}) younger than --min-age",
                     markup=False)
