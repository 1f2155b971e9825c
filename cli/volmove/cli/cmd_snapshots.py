"""volmove snapshots: list what the repository holds."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer

from volmove.cli.common import JsonOpt, RepoOpt, emit_json, human_bytes, open_repo, run, table
from volmove.core.snapshot import Snapshot


def snapshots(
    volume: Annotated[str | None, typer.Argument(help="Only this volume's snapshots.")] = None,
    host: Annotated[str | None, typer.Option("--host", help="Only snapshots taken on this host.")] = None,
    repo: RepoOpt = None, json_out: JsonOpt = False,
) -> None:
    """List snapshots, oldest first."""

    async def go() -> list[Snapshot]:
        repository = await asyncio.to_thread(open_repo, repo, load_index=False)
        snaps = await asyncio.to_thread(repository.list_snapshots, volume)
        return [s for s in snaps if host is None or s.host == host]

    snaps = run(go, json_out=json_out)
    if json_out:
        emit_json([s.summary() for s in snaps])
        return
    table(["snapshot", "time", "host", "volume", "files", "size", "tags"],
          [[s.id[:8], s.time.strftime("%Y-%m-%d %H:%M:%S"), s.host, s.volume.name, s.stats.files,
            human_bytes(s.stats.bytes), ",".join(s.tags)] for s in snaps])
