"""Run one validated job against the local Docker engine and the repository.

Each kind is a small function from typed parameters to a JSON result; errors
are volmove errors and become the job's failure. Cancellation is asyncio
cancellation (the data path stops its thread and cleans up).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any

from volmove.core.docker import ContainerRef, DockerClient
from volmove.core.errors import ConflictError, NotFoundError
from volmove.core.fleet.protocol import (
    BackupParams,
    DrillParams,
    ForgetParams,
    JobParams,
    RemoveVolumeParams,
    RestoreParams,
    StartContainersParams,
    StopContainersParams,
    VerifyParams,
)
from volmove.core.ops import BackupRequest, RestoreRequest, backup_volume, compare_volume, restore_volume
from volmove.core.progress import ProgressFn
from volmove.core.repository import Repository
from volmove.core.storage import open_storage
from volmove.workers import scheduled

JSON = dict[str, Any]
MAX_DIFFERENCES = 50


@dataclass(frozen=True)
class JobContext:
    job: str
    host: str  # the fleet's name for this host, recorded in snapshots
    docker: DockerClient
    repo_url: str
    progress: ProgressFn


def open_repository(url: str) -> Repository:
    """A fresh view per job: other hosts add blobs and snapshots meanwhile."""
    repo = Repository.open(open_storage(url))
    repo.load_index()
    return repo


async def _repo(ctx: JobContext) -> Repository:
    return await asyncio.to_thread(open_repository, ctx.repo_url)


async def backup(ctx: JobContext, p: BackupParams) -> JSON:
    repo = await _repo(ctx)
    req = BackupRequest(p.volume, (*p.tags, f"job={ctx.job}"), p.stop, host=ctx.host)
    snap = await backup_volume(ctx.docker, repo, req, ctx.progress)
    return {"snapshot": snap.id, "volume": p.volume, "stats": asdict(snap.stats)}


async def restore(ctx: JobContext, p: RestoreParams) -> JSON:
    target = p.as_name or p.volume
    exists = await ctx.docker.volume_exists(target)
    if exists and p.create_only:
        raise ConflictError(f"volume {target} already exists on {ctx.host}; not overwritten")
    if exists and p.replace:
        await ctx.docker.remove_volume(target)  # refused while a container uses it
    repo = await _repo(ctx)
    out = await restore_volume(ctx.docker, repo, RestoreRequest(p.volume, p.snapshot, p.as_name, p.force),
                               ctx.progress)
    return {"snapshot": out.snapshot.id, "volume": out.volume, "created": out.created, "files": out.result.files,
            "bytes": out.result.bytes, "warnings": list(out.result.warnings)}


async def verify(ctx: JobContext, p: VerifyParams) -> JSON:
    repo = await _repo(ctx)
    snap, report = await compare_volume(ctx.docker, repo, p.volume, p.snapshot, p.of_volume)
    return {"snapshot": snap.id, "volume": p.volume, "ok": report.ok, "checked": report.checked,
            "differences": report.differences[:MAX_DIFFERENCES]}


async def remove_volume(ctx: JobContext, p: RemoveVolumeParams) -> JSON:
    try:
        await ctx.docker.remove_volume(p.volume)
    except NotFoundError:
        return {"volume": p.volume, "removed": False}  # already gone: the goal holds
    return {"volume": p.volume, "removed": True}


async def stop_containers(ctx: JobContext, p: StopContainersParams) -> JSON:
    """Stop the running users of a volume; on failure start again those it stopped."""
    users = await ctx.docker.containers_using(p.volume)
    inspected = [await ctx.docker.inspect_container(u.id) for u in users]
    stopped: list[ContainerRef] = []
    try:
        for ref in (u for u in users if u.running):
            await ctx.docker.stop_containers([ref])
            stopped.append(ref)
    except BaseException:
        await asyncio.shield(_start_quietly(ctx.docker, stopped))
        raise
    return {"volume": p.volume, "stopped": [r.id for r in stopped], "names": [r.name for r in stopped],
            "containers": inspected}


async def _start_quietly(docker: DockerClient, refs: list[ContainerRef]) -> None:
    for ref in refs:
        with contextlib.suppress(Exception):
            await docker.start_containers([ref])


async def start_containers(ctx: JobContext, p: StartContainersParams) -> JSON:
    """Start those of the given containers that are not running (a repeat is a no-op)."""
    started, missing = [], []
    for cid in p.containers:
        try:
            ref = ContainerRef.from_inspect(await ctx.docker.inspect_container(cid))
        except NotFoundError:
            missing.append(cid)
            continue
        if not ref.running:
            await ctx.docker.start_containers([ref])
            started.append(ref.id)
    return {"started": started, "missing": missing}


RUNNERS: dict[type, Callable[[JobContext, Any], Awaitable[JSON]]] = {
    BackupParams: backup,
    RestoreParams: restore,
    VerifyParams: verify,
    RemoveVolumeParams: remove_volume,
    StopContainersParams: stop_containers,
    StartContainersParams: start_containers,
    DrillParams: scheduled.drill,
    ForgetParams: scheduled.forget,
}


async def execute(ctx: JobContext, params: JobParams) -> JSON:
    return await RUNNERS[type(params)](ctx, params)
