"""Volume operations: the data path joined to a Docker engine.

These are what the CLI runs on the local host and what a worker runs for the
control service.  Each takes an open DockerClient and Repository, reports
progress through a callback, and can be cancelled (asyncio cancellation is
passed to the data-path thread as an Event; cleanup always runs).
"""

from __future__ import annotations

import asyncio
import os
import tarfile
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast

from volmove.core.backup import BackupEngine, BackupResult, ParentCatalog, load_catalog_map
from volmove.core.docker import DATA_PATH, ContainerRef, DockerClient, HelperContainer, MountSpec, VolumeInfo
from volmove.core.errors import ConflictError, NotFoundError, UsageError
from volmove.core.fswalk import DIR_FLAGS, tree_size
from volmove.core.hooks import BackupHooks
from volmove.core.locks import repo_lease
from volmove.core.progress import ProgressFn, no_progress
from volmove.core.repository import Repository
from volmove.core.restore import Restorer, RestoreResult, target_is_empty
from volmove.core.snapshot import Snapshot, VolumeSpec
from volmove.core.tarsource import Pipe, tar_entries
from volmove.core.tarstream import snapshot_tar
from volmove.core.verify import CompareReport, compare_tree

T = TypeVar("T")
STOP_LABEL = "volmove.stop-during-backup"


def state_dir() -> Path:
    """Where journals of stopped containers live (survives a crash of this process)."""
    default = "/var/lib/volmove" if os.geteuid() == 0 else str(Path.home() / ".local/state/volmove")
    path = Path(os.environ.get("VOLMOVE_STATE_DIR", default))
    path.mkdir(parents=True, exist_ok=True)
    return path


async def run_cancellable(fn: Callable[[threading.Event], T], cancel: threading.Event | None = None) -> T:
    """Run blocking data-path work in a thread; cancelling the task asks it to stop
    (sets ``cancel``) and waits for it, so no thread outlives the operation that started it."""
    cancel = cancel or threading.Event()
    task = asyncio.ensure_future(asyncio.to_thread(fn, cancel))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        cancel.set()
        await _settled(task)  # the thread's CancelledByUser is expected: do not log it as unretrieved
        raise


async def _settled(task: asyncio.Future[Any]) -> None:
    """Wait for a task whose outcome is raised elsewhere or superseded, and mark that outcome
    retrieved: no thread outlives the operation that started it."""
    await asyncio.wait([task])
    if not task.cancelled():
        task.exception()


@asynccontextmanager
async def opened_root(helper: HelperContainer) -> AsyncIterator[int]:
    if helper.root is None:
        raise UsageError("this Docker engine is not on this machine: run volmove (or its worker) on the engine's host")
    fd = await asyncio.to_thread(os.open, helper.root, DIR_FLAGS)
    try:
        yield fd
    finally:
        os.close(fd)


# ---------------------------------------------------------------- backup


@dataclass(frozen=True)
class BackupRequest:
    volume: str  # a volume name, or a host path for a bind mount
    tags: tuple[str, ...] = ()
    stop: bool = False
    host: str = ""  # the name recorded in the snapshot; default: the engine's


async def describe_source(docker: DockerClient, name: str) -> tuple[VolumeSpec, MountSpec]:
    if name.startswith("/"):
        return VolumeSpec(name=name, driver="", kind="bind", source=name), MountSpec.bind(name)
    vol = await docker.inspect_volume(name)
    return VolumeSpec(name=vol.name, driver=vol.driver, options=vol.options, labels=vol.labels), MountSpec.volume(name)


async def containers_to_stop(docker: DockerClient, spec: VolumeSpec, stop: bool) -> list[ContainerRef]:
    """--stop or the label on the volume stops every user; the label on a container stops that one."""
    if spec.kind != "volume":
        return []
    users = await docker.containers_using(spec.name)
    if stop or spec.labels.get(STOP_LABEL) == "true":
        return users
    return [c for c in users if c.labels.get(STOP_LABEL) == "true"]


async def backup_volume(docker: DockerClient, repo: Repository, req: BackupRequest,
                        progress: ProgressFn = no_progress, *, adopt: bool = False) -> Snapshot:
    """Snapshot one volume.  ``adopt``: first index the packs a crashed run left (see
    prepare_host), here where it overlaps the helper's start instead of preceding it."""
    spec, mount = await describe_source(docker, req.volume)
    host = req.host or docker.host
    # Shared: backups run side by side, but never next to a prune deleting what they dedup against.
    async with repo_lease(repo, "shared", "backup") as lease:
        # The repository's side (index, parent catalog) loads while the containers stop and the helper starts.
        can_read = threading.Event()  # ends the parsing ahead: the walk starts
        base = asyncio.ensure_future(asyncio.to_thread(_backup_base, repo, spec.name, host, adopt, can_read))
        try:
            to_stop = await containers_to_stop(docker, spec, req.stop)
            hooks = BackupHooks(docker, await docker.containers_using(spec.name) if spec.kind == "volume" else [])
            journal = state_dir() / f"stopped-{os.getpid()}-{spec.name.replace('/', '_')}.json"
            started = datetime.now(UTC)
            finishing: asyncio.Future[BackupResult] | None = None
            # The helper starts before the hooks run and the containers stop, and goes after
            # they are back: its start and removal are no part of their downtime.
            async with docker.helper(mount, read_only=True) as helper, hooks.around(), \
                    docker.stopped(to_stop, journal):
                can_read.set()
                parent, parent_map = await base
                engine = await _read_volume(docker, repo, helper, parent, parent_map, progress)
                # The rest (the last batches, packs and index) needs neither the helper nor the
                # stopped containers: it runs while the helper goes and the containers start again.
                finishing = asyncio.ensure_future(run_cancellable(lambda _: engine.finish(), engine.cancel))
            result = await finishing
        finally:
            can_read.set()  # also when it never came up: the parsing ahead is for nothing then
            for task in (base, finishing):
                if task is not None:
                    await _settled(task)  # no thread outlives the lease
        snap = Snapshot(time=started, host=host, volume=spec, catalog=tuple(result.catalog), entries=result.entries,
                        stats=result.stats, tags=req.tags, parent=parent.id if parent else None)
        lease.check()  # a lapsed lease means a prune may have deleted blobs this snapshot names
        sid = await asyncio.to_thread(repo.save_snapshot, snap)  # the commit point
    hooks.raise_post_failure(sid)
    return replace(snap, id=sid)  # what was stored, without reading it back (a request on S3)


async def _read_volume(docker: DockerClient, repo: Repository, helper: HelperContainer, parent: Snapshot | None,
                       parent_map: ParentCatalog | None, progress: ProgressFn) -> _Reading:
    """Read the volume through the helper; the caller finishes the backup (``_Reading.finish``)."""
    if helper.root is None:
        return _Done(await _read_remote(docker, repo, helper, progress))
    engine = BackupEngine(repo, parent=parent_map, progress=progress)
    try:
        async with opened_root(helper) as fd:
            totals = await _progress_totals(fd, parent, progress)
            await run_cancellable(lambda _: engine.read(fd, totals), engine.cancel)
    except BaseException:
        engine.abort()  # idempotent: a failed read aborted already
        raise
    return engine


class _Reading(Protocol):
    cancel: threading.Event

    def finish(self) -> BackupResult: ...


@dataclass
class _Done:
    """A backup read and finished in one go (a remote engine's tar stream)."""

    result: BackupResult
    cancel: threading.Event = field(default_factory=threading.Event)

    def finish(self) -> BackupResult:
        return self.result


async def _read_remote(docker: DockerClient, repo: Repository, helper: HelperContainer,
                       progress: ProgressFn) -> BackupResult:
    """A remote engine: parse the tar of the helper's /data as it streams in."""
    pipe = Pipe()

    async def pump() -> None:
        async for chunk in docker.get_archive_stream(helper.id, DATA_PATH):
            if pipe.aborted.is_set():
                return
            await asyncio.to_thread(pipe.put, chunk)
        await asyncio.to_thread(pipe.put, None)  # only a complete stream is ended normally

    pumping = asyncio.ensure_future(pump())
    try:
        result = await run_cancellable(
            lambda cancel: BackupEngine(repo, progress=progress, cancel=cancel).run_stream(tar_entries(pipe)))
    finally:
        pipe.aborted.set()
        await asyncio.wait([pumping])
    pumping.result()  # a broken stream must fail the backup before anything is committed
    return result


async def _progress_totals(fd: int, parent: Snapshot | None,
                           progress: ProgressFn) -> tuple[int, int] | None:
    """Totals for the progress bar and ETA: nothing when no one watches, the parent
    snapshot's size as an estimate, else a stat-only walk (one more pass over the tree)."""
    if progress is no_progress:
        return None
    if parent is not None:
        return parent.stats.files, parent.stats.bytes
    return await asyncio.to_thread(tree_size, fd)


def _backup_base(repo: Repository, volume: str, host: str, adopt: bool,
                 can_read: threading.Event) -> tuple[Snapshot | None, ParentCatalog | None]:
    """The index as storage holds it now (a prune may have run since it was loaded)
    and the parent snapshot with its catalog, for change detection."""
    if adopt:
        repo.adopt_orphan_packs()  # loads the index too; under the backup's shared lease, no prune deletes packs
    else:
        repo.load_index()
    parent = _latest(repo, volume, host)
    if parent is None:
        return None, None
    catalog = load_catalog_map(repo, parent)
    catalog.parse_ahead(until=can_read)
    return parent, catalog


def _latest(repo: Repository, volume: str, host: str) -> Snapshot | None:
    snaps = [s for s in repo.list_snapshots(volume) if s.host == host]
    return snaps[-1] if snaps else None


async def container_volumes(docker: DockerClient, container: str) -> list[str]:
    """The volumes and bind mounts of a container (the data-container pattern)."""
    mounts = await docker.container_mounts(container)
    names = [m.source for m in mounts if m.type in ("volume", "bind") and m.source]
    if not names:
        raise NotFoundError(f"container {container} has no volumes")
    return names


# ---------------------------------------------------------------- restore


@dataclass(frozen=True)
class RestoreRequest:
    volume: str  # the volume whose snapshot to restore
    snapshot: str = "latest"
    as_name: str | None = None
    force: bool = False
    allow_devices: bool = False


@dataclass
class RestoreOutcome:
    snapshot: Snapshot
    volume: str
    created: bool
    result: RestoreResult = field(default_factory=RestoreResult)


async def restore_volume(docker: DockerClient, repo: Repository, req: RestoreRequest,
                         progress: ProgressFn = no_progress) -> RestoreOutcome:
    # The index is needed once the helper is up: it loads meanwhile (~0.1 s for 1 GiB, as long as
    # the helper's start).  It reads only index files not read yet, so a loaded repository costs a listing.
    index = asyncio.ensure_future(asyncio.to_thread(repo.load_index))
    try:
        return await _restore_volume(docker, repo, req, progress, index)
    finally:
        await _settled(index)  # awaited already, unless the restore failed first


async def _restore_volume(docker: DockerClient, repo: Repository, req: RestoreRequest, progress: ProgressFn,
                          index: Awaitable[None]) -> RestoreOutcome:
    snap = await asyncio.to_thread(repo.find_snapshot, req.snapshot, req.volume)
    target = req.as_name or snap.volume.name
    if target.startswith("/") or (snap.volume.kind != "volume" and not req.as_name):
        raise UsageError("a bind-mount snapshot is restored into a volume: give --as NAME")
    created = not await docker.volume_exists(target)
    if created:
        await _create_like(docker, target, snap.volume)
    try:
        result = await _restore_into(docker, repo, snap, target, req, progress, index)
    except BaseException:
        if created:  # never leave a half-restored volume that looks complete
            await asyncio.shield(docker.remove_volume(target, force=True))
        raise
    return RestoreOutcome(snap, target, created, result)


async def _create_like(docker: DockerClient, name: str, spec: VolumeSpec) -> VolumeInfo:
    driver = spec.driver if spec.kind == "volume" and spec.driver else "local"
    return await docker.create_volume(name, driver, spec.options, spec.labels)


async def _restore_into(docker: DockerClient, repo: Repository, snap: Snapshot, target: str,
                        req: RestoreRequest, progress: ProgressFn, index: Awaitable[None]) -> RestoreResult:
    async with docker.helper(MountSpec.volume(target), read_only=False) as helper:
        await index
        if helper.root is None:
            return await _restore_remote(docker, repo, snap, target, helper, req)
        async with opened_root(helper) as fd:
            if not req.force and not await asyncio.to_thread(target_is_empty, fd):
                raise _not_empty(target, docker)
            return await run_cancellable(
                lambda cancel: Restorer(repo, fd, allow_devices=req.allow_devices, progress=progress,
                                        cancel=cancel).run(snap))


def _not_empty(target: str, docker: DockerClient) -> ConflictError:
    return ConflictError(f"volume {target} is not empty on {docker.host}; use --force to restore over it")


async def _restore_remote(docker: DockerClient, repo: Repository, snap: Snapshot, target: str,
                          helper: HelperContainer, req: RestoreRequest) -> RestoreResult:
    """A remote engine: stream the snapshot as a tar into the helper's mount."""
    if not req.force and await _remote_has_entries(docker, helper):
        raise _not_empty(target, docker)
    stream = coalesce(snapshot_tar(repo, snap, allow_devices=req.allow_devices))
    await docker.put_archive_stream(helper.id, DATA_PATH, iterate_in_thread(stream))
    return RestoreResult(files=snap.stats.files, dirs=snap.stats.dirs, other=snap.stats.other, bytes=snap.stats.bytes)


async def _remote_has_entries(docker: DockerClient, helper: HelperContainer) -> bool:
    """Read the archive of /data only as far as its second member."""
    stream = cast(AsyncGenerator[bytes, None], docker.get_archive_stream(helper.id, DATA_PATH + "/."))
    head = b""
    async for chunk in stream:
        head += chunk
        if len(head) >= 4 * tarfile.BLOCKSIZE:
            break
    await stream.aclose()
    names = _tar_names(head)
    return any(n.strip("./") for n in names)


def _tar_names(head: bytes) -> list[str]:
    names = []
    for off in range(0, len(head) - tarfile.BLOCKSIZE + 1, tarfile.BLOCKSIZE):
        try:
            info = tarfile.TarInfo.frombuf(head[off : off + tarfile.BLOCKSIZE], "utf-8", "surrogateescape")
        except tarfile.HeaderError:
            continue
        names.append(info.name)
    return names


def coalesce(chunks: Iterator[bytes], size: int = 1 << 20) -> Iterator[bytes]:
    """Join small pieces (tar headers) so each thread hop carries a useful amount."""
    buf: list[bytes] = []
    held = 0
    for chunk in chunks:
        buf.append(chunk)
        held += len(chunk)
        if held >= size:
            yield b"".join(buf)
            buf, held = [], 0
    if buf:
        yield b"".join(buf)


async def iterate_in_thread(chunks: Iterator[bytes]) -> AsyncIterator[bytes]:
    """Drive a blocking generator from the event loop, one item per thread hop."""
    done = object()
    while True:
        item = await asyncio.to_thread(next, chunks, done)
        if item is done:
            return
        assert isinstance(item, bytes)
        yield item


# ---------------------------------------------------------------- inventory


@dataclass(frozen=True)
class VolumeRow:
    name: str
    driver: str
    size: int
    containers: tuple[str, ...]
    running: tuple[str, ...]
    dangling: bool
    labels: dict[str, str]
    last_backup: str | None
    age_seconds: float | None

    def as_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}


async def list_volume_rows(docker: DockerClient, repo: Repository | None, now: datetime) -> list[VolumeRow]:
    volumes = await docker.list_volumes()
    sizes = await docker.volume_sizes()
    latest = await asyncio.to_thread(_latest_by_volume, repo) if repo else {}
    rows = []
    for vol in sorted(volumes, key=lambda v: v.name):
        users = await docker.containers_using(vol.name)
        snap = latest.get(vol.name)
        rows.append(VolumeRow(
            name=vol.name, driver=vol.driver, size=sizes.get(vol.name, -1),
            containers=tuple(u.name for u in users), running=tuple(u.name for u in users if u.running),
            dangling=not users, labels=vol.labels, last_backup=snap.id if snap else None,
            age_seconds=(now - snap.time).total_seconds() if snap else None,
        ))
    return rows


def _latest_by_volume(repo: Repository) -> dict[str, Snapshot]:
    out: dict[str, Snapshot] = {}
    for snap in repo.list_snapshots():
        out[snap.volume.name] = snap  # sorted by time: the last one wins
    return out


async def prepare_host(docker: DockerClient, repo: Repository, *, adopt: bool = True) -> None:
    """Finish what a crashed run left: restart containers it stopped, remove its
    helpers, and (unless a backup will do it, see backup_volume) reuse the packs
    it uploaded but never indexed.  A restore needs no adoption: the blobs of a
    committed snapshot are indexed before its manifest is written."""
    await docker.recover_journals(state_dir())
    await docker.cleanup_helpers()
    await asyncio.to_thread(repo.storage.cleanup_incomplete, 3600.0)
    if not adopt:
        return
    try:
        async with repo_lease(repo, "shared", "adopt", wait=0):  # never index a pack a prune is deleting
            await asyncio.to_thread(repo.adopt_orphan_packs)
    except ConflictError:
        pass  # a prune or forget is running: adopting can wait for a later run


async def compare_volume(docker: DockerClient, repo: Repository, volume: str, snapshot: str = "latest",
                         of_volume: str | None = None) -> tuple[Snapshot, CompareReport]:
    """Compare a volume's current contents with a snapshot (of ``of_volume``, default the same name)."""
    snap = await asyncio.to_thread(repo.find_snapshot, snapshot, of_volume or volume)
    _spec, mount = await describe_source(docker, volume)
    async with docker.helper(mount, read_only=True) as helper, opened_root(helper) as fd:
        report = await run_cancellable(lambda _cancel: compare_tree(repo, snap, fd))
    return snap, report
