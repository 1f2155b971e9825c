"""volmove restore: write a snapshot back into a volume."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer

from volmove.cli.cmd_jobs import ServiceOpt, remote_restore
from volmove.cli.common import DockerOpt, JsonOpt, RepoOpt, emit_json, human_bytes, open_repo, progress_bar, run, stdout
from volmove.core.docker import DockerClient
from volmove.core.ops import RestoreOutcome, RestoreRequest, prepare_host, restore_volume


def restore(
    volume: Annotated[str, typer.Argument(help="The volume whose snapshot to restore.")],
    snapshot: Annotated[str, typer.Option("--snapshot", "-s", help="Snapshot id (or prefix), or 'latest'.")] = "latest",
    as_name: Annotated[str | None, typer.Option("--as", help="Restore into a new volume of this name.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Restore into a volume that is not empty.")] = False,
    allow_devices: Annotated[bool, typer.Option("--allow-devices", help="Recreate device nodes.")] = False,
    repo: RepoOpt = None, docker: DockerOpt = None, json_out: JsonOpt = False,
    on: Annotated[str | None, typer.Option("--on", help="Run on this fleet host, through the service.")] = None,
    service: ServiceOpt = None,
) -> None:
    """Restore a snapshot into a volume on this Docker host (created when missing)."""
    if on or service:  # the fleet: the host's worker runs it
        return remote_restore(volume, snapshot, as_name, force, allow_devices, on, service, json_out)

    async def go() -> RestoreOutcome:
        repository = await asyncio.to_thread(open_repo, repo, load_index=False)  # restore_volume loads it
        async with DockerClient.connect(docker) as client:
            await prepare_host(client, repository, adopt=False)  # a snapshot's blobs are all indexed
            req = RestoreRequest(volume, snapshot, as_name, force, allow_devices)
            with progress_bar(f"restore {as_name or volume}", json_out) as progress:
                return await restore_volume(client, repository, req, progress)

    out = run(go, json_out=json_out)
    doc = {"snapshot": out.snapshot.id, "volume": out.volume, "created": out.created, "files": out.result.files,
           "bytes": out.result.bytes, "warnings": out.result.warnings}
    if json_out:
        emit_json(doc)
        return
    for warning in out.result.warnings:
        stdout.print(f"warning: {warning}", markup=False)
    stdout.print(f"restored snapshot {out.snapshot.id[:8]} into volume {out.volume}: "
                 f"{out.result.files} files, {human_bytes(out.result.bytes)}", markup=False)
