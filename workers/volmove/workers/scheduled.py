"""Jobs the service's scheduler sends besides backups: restore drills and retention.

A drill restores a snapshot into a scratch volume of its own, compares the
result with the snapshot's catalog, removes the scratch volume whatever
happens, and marks the snapshot verified (``verified/<id>``, docs/FORMAT.md)
only when every file matched.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from volmove.core.docker import DockerClient
from volmove.core.errors import CorruptDataError, NotFoundError, VolmoveError
from volmove.core.fleet.protocol import KEEP_COUNTS, DrillParams, ForgetParams
from volmove.core.fleet.schedule import DRILL_LABEL, policy_of
from volmove.core.forget import ForgetRequest, run_forget
from volmove.core.ops import RestoreRequest, compare_volume, restore_volume, run_cancellable
from volmove.core.repository import Repository
from volmove.core.snapshot import Snapshot
from volmove.core.storage import open_storage
from volmove.core.verify import record_verified

if TYPE_CHECKING:  # execute.py imports this module
    from volmove.workers.execute import JobContext

JSON = dict[str, Any]
MAX_DIFFERENCES = 20


def scratch_name(job: str) -> str:
    return f"volmove-drill-{job}"  # one per job: a retried attempt reuses (and first empties) it


def _open(url: str) -> Repository:
    repo = Repository.open(open_storage(url))
    repo.load_index()
    return repo


def _snapshot(repo: Repository, p: DrillParams) -> Snapshot:
    if p.snapshot != "latest" or p.from_host is None:
        return repo.find_snapshot(p.snapshot, p.volume)
    snaps = [s for s in repo.list_snapshots(p.volume) if s.host == p.from_host]
    if not snaps:
        raise NotFoundError(f"no snapshot of volume {p.volume} from host {p.from_host} in {repo.storage.url}")
    return snaps[-1]


async def drill(ctx: JobContext, p: DrillParams) -> JSON:
    repo = await asyncio.to_thread(_open, ctx.repo_url)
    snap = await asyncio.to_thread(_snapshot, repo, p)
    scratch = scratch_name(ctx.job)
    await _fresh_scratch(ctx.docker, scratch, ctx.job)
    try:
        out = await restore_volume(ctx.docker, repo, RestoreRequest(p.volume, snap.id, as_name=scratch),
                                   ctx.progress)
        _, report = await compare_volume(ctx.docker, repo, scratch, snap.id, of_volume=p.volume)
    finally:
        await asyncio.shield(_remove_quietly(ctx.docker, scratch))
    if not report.ok:
        shown = "; ".join(report.differences[:5])
        raise CorruptDataError(f"restore drill of {p.volume} (snapshot {snap.id[:12]}) on {ctx.host}: "
                               f"{len(report.differences)} difference(s) from the catalog: {shown}")
    await asyncio.to_thread(record_verified, repo, snap.id, "restore-drill", datetime.now(UTC))
    return {"volume": p.volume, "snapshot": snap.id, "from_host": snap.host, "scratch": scratch, "ok": True,
            "checked": report.checked, "files": out.result.files, "bytes": out.result.bytes, "removed": True}


async def _fresh_scratch(docker: DockerClient, scratch: str, job: str) -> None:
    """Created here with only the drill label: never the source's labels (a schedule label would select it)."""
    with contextlib.suppress(NotFoundError):
        await docker.remove_volume(scratch, force=True)  # an earlier attempt of this job left it
    await docker.create_volume(scratch, labels={DRILL_LABEL: job})


async def _remove_quietly(docker: DockerClient, scratch: str) -> None:
    # If this fails, the service removes it later: it sees a finished drill's volume in the inventory.
    with contextlib.suppress(VolmoveError):
        await docker.remove_volume(scratch, force=True)


async def forget(ctx: JobContext, p: ForgetParams) -> JSON:
    repo = await asyncio.to_thread(_open, ctx.repo_url)
    req = ForgetRequest(policy_of({k: getattr(p, k) for k in KEEP_COUNTS}, p.keep_within), volume=p.volume,
                        host=p.host)
    result = await run_cancellable(lambda cancel: run_forget(repo, req, cancel=cancel))
    return {"volume": p.volume, "host": p.host, "kept": list(result.decision.keep_ids),
            "removed": list(result.removed)}
