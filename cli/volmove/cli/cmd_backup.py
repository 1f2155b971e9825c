"""volmove backup: snapshot volumes into the repository."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

import typer

from volmove.cli.cmd_jobs import ServiceOpt, remote_backup
from volmove.cli.common import (
    DockerOpt,
    JsonOpt,
    RepoOpt,
    emit_json,
    human_bytes,
    open_repo,
    progress_bar,
    run,
    table,
)
from volmove.core.docker import DockerClient
from volmove.core.errors import UsageError
from volmove.core.ops import BackupRequest, backup_volume, container_volumes, prepare_host
from volmove.core.snapshot import Snapshot


def backup(
    volumes: Annotated[list[str] | None, typer.Argument(help="Volume names, or host paths of bind mounts.")] = None,
    tag: Annotated[list[str] | None, typer.Option("--tag", "-t", help="Tag the snapshots (repeatable).")] = None,
    stop: Annotated[bool, typer.Option("--stop", help="Stop the containers using a volume while it is read.")] = False,
    container: Annotated[str | None, typer.Option("--container", "-c",
                                                  help="Back up every volume of this container.")] = None,
    repo: RepoOpt = None, docker: DockerOpt = None, json_out: JsonOpt = False,
    host: Annotated[str | None, typer.Option("--host", help="Run on this fleet host, through the service.")] = None,
    service: ServiceOpt = None,
) -> None:
    """Back up Docker volumes: deduplicated, compressed, committed atomically."""
    if host or service:  # the fleet: the host's worker runs it
        return remote_backup(list(volumes or []), tuple(tag or ()), stop, container, host, service, json_out)

    async def go() -> list[Snapshot]:
        # The index loads inside the first backup, while its helper container starts.
        repository = await asyncio.to_thread(open_repo, repo, load_index=False)
        async with DockerClient.connect(docker) as client:
            names = list(volumes or [])
            if container:
                names += await container_volumes(client, container)
            if not names:
                raise UsageError("name at least one volume, or --container NAME")
            await prepare_host(client, repository, adopt=False)
            tags = tuple(tag or ()) + ((f"container={container}",) if container else ())
            snaps = []
            for i, name in enumerate(names):
                with progress_bar(f"backup {name}", json_out) as progress:
                    snaps.append(await backup_volume(client, repository, BackupRequest(name, tags, stop), progress,
                                                     adopt=i == 0))
            return snaps

    snaps = run(go, json_out=json_out)
    if json_out:
        emit_json([s.summary() for s in snaps])
        return
    table(["snapshot", "volume", "files", "size", "new", "stored", "time"], [_row(s) for s in snaps])


def _row(s: Snapshot) -> list[Any]:
    st = s.stats
    return [s.id[:8], s.volume.name, st.files, human_bytes(st.bytes), human_bytes(st.new_bytes),
            human_bytes(st.stored_bytes), f"{st.duration:.1f}s"]
