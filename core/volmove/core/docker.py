"""The Docker engine adapter: volumes, containers, the helper container, archive streams.

Every aiodocker/aiohttp exception is translated here into ``volmove.core.errors``.
Requests go through one raw seam (``_json`` / ``_open``) on aiodocker's request
layer: its typed wrappers add nothing for these calls, and the archive endpoints
must be streamed, which its public API cannot do (``get_archive`` reads it all).

The data path reads a volume through a short-lived *helper* container that
mounts it at ``/data``; on a local engine the host reaches it as
``/proc/<pid>/root/data``, otherwise through the archive endpoints.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import re
import secrets
import shutil
import socket
import struct
import tarfile
import tempfile
import time
from collections.abc import AsyncIterator, Coroutine, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal, NamedTuple, Self

import aiodocker
import aiohttp

from volmove.core.errors import (
    ConflictError,
    DockerError,
    NotFoundError,
    UnreachableError,
    UsageError,
    VolmoveError,
)
from volmove.core.files import write_json_durably
from volmove.core.procs import pid_exists

log = logging.getLogger(__name__)

JSON = dict[str, Any]

DEFAULT_URL = "unix:///var/run/docker.sock"
DEFAULT_HELPER_IMAGE = "volmove-helper:1"
HELPER_IMAGE_ENV = "VOLMOVE_HELPER_IMAGE"
HELPER_LABEL = "volmove.helper"
OWNER_LABEL = "volmove.owner"
OWNER_PROCESS_LABEL = "volmove.owner-process"  # boot id/pid namespace/start time
HELPER_CMD = ["busybox", "sleep", "2147483647"]
DATA_PATH = "/data"
BUSYBOX_FALLBACK = Path("/bin/busybox")
CONNECT_TIMEOUT = 10.0
STOP_GRACE = 10  # seconds between SIGTERM and SIGKILL on stop
FOREIGN_HELPER_MAX_AGE = 3600.0
CHUNK = 256 * 1024
JOURNAL_VERSION = 1
_PT_INTERP = 3

# Docker's own rule for volume and container names (ids match it too); checking it
# keeps a name from turning into another API path.
_NAME_RE = re.compile(r"^/?[a-zA-Z0-9][a-zA-Z0-9_.-]*$")
_RUNNING_STATES = frozenset({"running", "restarting"})

_HELPER_DOCKERFILE = """\
FROM scratch
COPY busybox /bin/busybox
ENV PATH=/bin
LABEL volmove.helper-image="1"
CMD ["busybox", "sleep", "2147483647"]
"""


# --------------------------------------------------------------------- values


class MountInfo(NamedTuple):
    """One mount of a container; ``source`` is the volume name, or the host path of a bind."""

    type: str
    source: str
    destination: str
    rw: bool

    @classmethod
    def from_api(cls, m: JSON) -> MountInfo:
        kind = str(m.get("Type", ""))
        source = m.get("Name") if kind == "volume" else m.get("Source")
        return cls(kind, str(source or ""), str(m.get("Destination", "")), bool(m.get("RW", False)))


@dataclass(frozen=True)
class VolumeInfo:
    name: str
    driver: str
    options: dict[str, str]
    labels: dict[str, str]
    mountpoint: str
    created: str
    scope: str

    @classmethod
    def from_api(cls, v: JSON) -> VolumeInfo:
        return cls(
            name=v["Name"], driver=v.get("Driver", ""), options=dict(v.get("Options") or {}),
            labels=dict(v.get("Labels") or {}), mountpoint=v.get("Mountpoint", ""),
            created=v.get("CreatedAt", ""), scope=v.get("Scope", ""),
        )


@dataclass(frozen=True)
class ContainerRef:
    id: str
    name: str
    running: bool
    labels: dict[str, str] = field(default_factory=dict)
    mounts: tuple[MountInfo, ...] = ()

    @classmethod
    def from_list(cls, c: JSON) -> ContainerRef:
        names = c.get("Names") or [""]
        return cls(
            id=c["Id"], name=names[0].lstrip("/"), running=c.get("State") in _RUNNING_STATES,
            labels=dict(c.get("Labels") or {}),
            mounts=tuple(MountInfo.from_api(m) for m in c.get("Mounts") or []),
        )

    @classmethod
    def from_inspect(cls, c: JSON) -> ContainerRef:
        return cls(
            id=c["Id"], name=c.get("Name", "").lstrip("/"),
            running=c.get("State", {}).get("Status") in _RUNNING_STATES,
            labels=dict(c.get("Config", {}).get("Labels") or {}),
            mounts=tuple(MountInfo.from_api(m) for m in c.get("Mounts") or []),
        )


@dataclass(frozen=True)
class MountSpec:
    """What the helper mounts at /data: a named volume or a host path."""

    type: Literal["volume", "bind"]
    source: str

    @classmethod
    def volume(cls, name: str) -> MountSpec:
        return cls("volume", name)

    @classmethod
    def bind(cls, path: str | Path) -> MountSpec:
        return cls("bind", str(path))

    def to_api(self, read_only: bool) -> JSON:
        spec: JSON = {"Type": self.type, "Source": self.source, "Target": DATA_PATH, "ReadOnly": read_only}
        if self.type == "volume":
            # NoCopy: never seed the volume with image content.
            spec["VolumeOptions"] = {"NoCopy": True}
        return spec


@dataclass(frozen=True)
class HelperContainer:
    id: str
    pid: int
    root: Path | None  # /proc/<pid>/root/data when the host can reach it, else None


# ------------------------------------------------------------ owner processes


@dataclass(frozen=True)
class Owner:
    """A volmove process: host name, boot, pid namespace, pid and start time.

    Host names are not unique, and processes in other pid namespaces (containers
    sharing the engine) have the same host name but another /proc: an owner is
    judged dead only if it lived in this very process space. The start time
    tells a reused pid from the original.
    """

    host: str
    pid: int
    start: int | None = None
    boot: str = ""
    pidns: str = ""

    @classmethod
    def current(cls) -> Owner:
        pid = os.getpid()
        return cls(socket.gethostname(), pid, _proc_stat(pid)[1], _boot_id(), _pid_namespace())

    @classmethod
    def from_labels(cls, labels: Mapping[str, str]) -> Owner | None:
        host, _, pid = labels.get(OWNER_LABEL, "").rpartition(":")
        boot, _, rest = labels.get(OWNER_PROCESS_LABEL, "").partition("/")
        pidns, _, start = rest.partition("/")
        if not host or not pid.isdigit():
            return None
        return cls(host, int(pid), int(start) if start.isdigit() else None, boot, pidns)

    def labels(self) -> dict[str, str]:
        return {
            OWNER_LABEL: f"{self.host}:{self.pid}",
            OWNER_PROCESS_LABEL: f"{self.boot}/{self.pidns}/{self.start or ''}",
        }

    def in_this_process_space(self) -> bool:
        here = (socket.gethostname(), _boot_id(), _pid_namespace())
        return bool(self.boot and self.pidns) and (self.host, self.boot, self.pidns) == here

    def is_dead_here(self) -> bool:
        """True only when the owner ran in this process space and is certainly gone."""
        if not self.in_this_process_space() or self.pid <= 0:
            return False
        state, start = _proc_stat(self.pid)
        if state is None:
            return not pid_exists(self.pid)
        return state == "Z" or (None not in (start, self.start) and start != self.start)

    def rebooted_since(self) -> bool:
        """This host (by name) has rebooted since the owner ran, so the owner is gone."""
        return bool(self.boot) and self.host == socket.gethostname() and self.boot != _boot_id()


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid").removeprefix("pid:[").removesuffix("]")
    except OSError:
        return ""


def _proc_stat(pid: int) -> tuple[str | None, int | None]:
    """(state, start time in clock ticks) from /proc/<pid>/stat, or Nones."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None, None
    fields = stat.rpartition(")")[2].split()  # comm may hold spaces and ")"
    return fields[0], int(fields[19])


# ------------------------------------------------------------------- journals


@dataclass(frozen=True)
class Journal:
    """Containers a process stopped, so a later process can restart them if it dies."""

    owner: Owner
    engine_id: str
    engine: str
    containers: list[dict[str, str]]
    created: float
    version: int = JOURNAL_VERSION

    @classmethod
    def load(cls, path: Path) -> Journal:
        raw = json.loads(path.read_text())
        return cls(
            owner=Owner(**raw["owner"]), engine_id=raw["engine_id"], engine=raw["engine"],
            containers=raw["containers"], created=raw["created"], version=raw["version"],
        )

    def save(self, path: Path) -> None:
        write_json_durably(path, asdict(self))

    def refs(self) -> list[ContainerRef]:
        return [ContainerRef(c["id"], c["name"], running=False) for c in self.containers]


# --------------------------------------------------------------- helper image


def find_busybox() -> Path:
    """A statically linked busybox: the helper image is FROM scratch, no libc."""
    found = shutil.which("busybox")
    for candidate in (Path(found) if found else None, BUSYBOX_FALLBACK):
        if candidate is not None and candidate.is_file() and is_static_elf(candidate):
            return candidate.resolve()
    raise UsageError(
        "the helper image needs a statically linked busybox: run `apt-get install busybox-static`"
    )


def is_static_elf(path: Path) -> bool:
    """An ELF executable without a PT_INTERP program header (no dynamic loader)."""
    with path.open("rb") as f:
        head = f.read(64)
        if len(head) < 64 or head[:4] != b"\x7fELF":
            return False
        end = "<" if head[5] == 1 else ">"
        # e_phoff, e_phentsize and e_phnum sit at other offsets in 32-bit headers.
        fmt, off_at, size_at = ("Q", 32, 54) if head[4] == 2 else ("I", 28, 42)
        (phoff,) = struct.unpack_from(end + fmt, head, off_at)
        entsize, count = struct.unpack_from(end + "HH", head, size_at)
        f.seek(phoff)
        table = f.read(entsize * count)
    if len(table) < entsize * count:
        return False
    return all(struct.unpack_from(end + "I", table, i * entsize)[0] != _PT_INTERP for i in range(count))


def _write_build_context(out: IO[bytes], busybox: Path) -> None:
    with tarfile.open(fileobj=out, mode="w") as tar:
        dockerfile = _HELPER_DOCKERFILE.encode()
        info = tarfile.TarInfo("Dockerfile")
        info.size = len(dockerfile)
        tar.addfile(info, io.BytesIO(dockerfile))
        info = tar.gettarinfo(str(busybox), arcname="busybox")
        info.mode, info.uid, info.gid, info.uname, info.gname = 0o755, 0, 0, "root", "root"
        with busybox.open("rb") as f:
            tar.addfile(info, f)
    out.seek(0)


def _proc_root(pid: int, hostname: str) -> Path | None:
    """The helper's /data seen from the host, if /proc/<pid> really is that container.

    Fails closed when volmove runs in another pid namespace or on another machine.
    """
    base = Path(f"/proc/{pid}/root")
    try:
        seen = (base / "etc" / "hostname").read_text().strip()
    except OSError:
        return None
    return base / DATA_PATH.lstrip("/") if pid > 0 and seen == hostname else None


def _checked_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise UsageError(f"invalid Docker object name {name!r}")
    return name.lstrip("/")


# --------------------------------------------------------------------- client


class DockerClient:
    """One Docker engine. ``async with DockerClient.connect(url) as docker:``."""

    def __init__(
        self, url: str | None = None, *, helper_image: str | None = None,
        connect_timeout: float = CONNECT_TIMEOUT,
    ) -> None:
        self.url = url or os.environ.get("DOCKER_HOST") or DEFAULT_URL
        self.is_local = self.url.startswith("unix://")
        self.helper_image = helper_image or os.environ.get(HELPER_IMAGE_ENV) or DEFAULT_HELPER_IMAGE
        self.connect_timeout = connect_timeout
        self.host = self.url  # replaced by the engine's host name once connected
        self.engine_id = ""
        self._api: aiodocker.Docker | None = None
        self._helper_ready = False

    @classmethod
    def connect(cls, url: str | None = None, **kwargs: Any) -> DockerClient:
        """A client for ``url`` (None: $DOCKER_HOST, else the local socket); opened by ``async with``."""
        return cls(url, **kwargs)

    async def __aenter__(self) -> Self:
        return await self.open()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def open(self) -> Self:
        """Connect and check the engine answers, so a wrong URL fails here and fast."""
        try:
            # sock_connect bounds each connection attempt; no read timeout, as
            # stops and streams may legitimately take long.
            self._api = aiodocker.Docker(
                url=self.url, timeout=aiohttp.ClientTimeout(sock_connect=self.connect_timeout)
            )
        except ValueError as exc:
            raise UsageError(f"invalid Docker engine URL {self.url!r}: {exc}") from exc
        try:
            info = await self._ping()
        except BaseException:
            await self.close()
            raise
        self.host, self.engine_id = str(info.get("Name") or self.url), str(info.get("ID", ""))
        return self

    async def close(self) -> None:
        if self._api is not None:
            api, self._api = self._api, None
            await api.close()

    async def _ping(self) -> JSON:
        try:
            async with asyncio.timeout(self.connect_timeout):
                info: JSON = await self._json("info")
                return info
        except TimeoutError:
            raise UnreachableError(
                f"cannot reach the Docker engine at {self.url}: no answer within {self.connect_timeout:g} s"
            ) from None

    # ------------------------------------------------------- request seam

    @property
    def _docker(self) -> aiodocker.Docker:
        if self._api is None:
            raise UsageError("DockerClient is not open (use `async with DockerClient.connect(...)`)")
        return self._api

    @contextlib.contextmanager
    def _errors(self, not_found: str | None = None, conflict: str | None = None) -> Iterator[None]:
        """Translate aiodocker/aiohttp exceptions into volmove errors."""
        try:
            yield
        except aiodocker.exceptions.DockerError as exc:
            raise self._translate(exc.status, str(exc.message).strip(), not_found, conflict) from exc
        except (aiohttp.ClientConnectionError, ConnectionError) as exc:
            raise self._unreachable(str(exc)) from exc
        except aiohttp.ClientError as exc:
            raise DockerError(f"Docker engine at {self.host}: {exc}") from exc

    def _translate(self, status: int, message: str, not_found: str | None, conflict: str | None) -> VolmoveError:
        if status == 900:  # aiodocker's code for "could not connect"
            return self._unreachable(message)
        if status == 404:
            return NotFoundError(not_found or f"{message} (on {self.host})")
        if status == 409:
            return ConflictError(conflict or f"{message} (on {self.host})")
        return DockerError(f"Docker engine on {self.host}: {message}")

    def _unreachable(self, reason: str) -> UnreachableError:
        # aiodocker wraps the cause as "Cannot connect to Docker Engine via URL [cause]".
        if reason.startswith("Cannot connect to Docker Engine via"):
            reason = reason.partition(" [")[2].removesuffix("]") or reason
        return UnreachableError(f"cannot reach the Docker engine at {self.url} ({reason})")

    async def _json(
        self, path: str, method: str = "GET", *, params: Mapping[str, str] | None = None,
        body: Any = None, not_found: str | None = None, conflict: str | None = None,
    ) -> Any:
        with self._errors(not_found, conflict):
            return await self._docker._query_json(path, method, params=params, data=body)

    async def _open(
        self, path: str, method: str, *, params: Mapping[str, str], headers: Mapping[str, str],
        data: Any = None, not_found: str | None = None,
    ) -> aiohttp.ClientResponse:
        """A raw response the caller must close; for bodies that are streamed."""
        with self._errors(not_found):
            response: aiohttp.ClientResponse = await self._docker._do_query(
                path, method, params=params, headers=headers, data=data
            )
            return response

    # ------------------------------------------------------------ volumes

    def _no_volume(self, name: str) -> str:
        return f"volume {name} does not exist on {self.host}"

    async def inspect_volume(self, name: str) -> VolumeInfo:
        data = await self._json(f"volumes/{_checked_name(name)}", not_found=self._no_volume(name))
        return VolumeInfo.from_api(data)

    async def volume_exists(self, name: str) -> bool:
        try:
            await self.inspect_volume(name)
        except NotFoundError:
            return False
        return True

    async def create_volume(
        self, name: str, driver: str = "local", options: Mapping[str, str] | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> VolumeInfo:
        """Create a new volume; ConflictError if it exists.

        The engine answers "created" for an existing name (it returns that volume),
        so existence is checked first; two racing creators can both succeed.
        """
        exists = f"volume {name} already exists on {self.host}"
        if await self.volume_exists(name):
            raise ConflictError(exists)
        body = {"Name": name, "Driver": driver, "DriverOpts": dict(options or {}), "Labels": dict(labels or {})}
        return VolumeInfo.from_api(await self._json("volumes/create", "POST", body=body, conflict=exists))

    async def remove_volume(self, name: str, force: bool = False) -> None:
        await self._json(
            f"volumes/{_checked_name(name)}", "DELETE", params={"force": "1" if force else "0"},
            not_found=self._no_volume(name), conflict=f"volume {name} is in use on {self.host}",
        )

    async def list_volumes(self) -> list[VolumeInfo]:
        data = await self._json("volumes")
        return [VolumeInfo.from_api(v) for v in data.get("Volumes") or []]

    async def volume_sizes(self) -> dict[str, int]:
        """Bytes used per volume from /system/df; -1 when the engine does not know."""
        data = await self._json("system/df")
        return {v["Name"]: int((v.get("UsageData") or {}).get("Size", -1)) for v in data.get("Volumes") or []}

    # --------------------------------------------------------- containers

    async def inspect_container(self, name: str) -> JSON:
        """The raw inspect document (kept in backups as a record)."""
        data: JSON = await self._json(
            f"containers/{_checked_name(name)}/json",
            not_found=f"container {name} does not exist on {self.host}",
        )
        return data

    async def container_mounts(self, name: str) -> list[MountInfo]:
        return list(ContainerRef.from_inspect(await self.inspect_container(name)).mounts)

    async def containers_using(self, volume_name: str) -> list[ContainerRef]:
        """Containers, running or not, that mount the volume; volmove's helpers excluded."""
        data = await self._json(
            "containers/json", params={"all": "1", "filters": json.dumps({"volume": [volume_name]})}
        )
        refs = [ContainerRef.from_list(c) for c in data]
        # The engine's filter also matches mount destinations; keep real users only.
        return [
            r for r in refs
            if r.labels.get(HELPER_LABEL) != "1"
            and any(m.type == "volume" and m.source == volume_name for m in r.mounts)
        ]

    async def stop_containers(self, refs: Sequence[ContainerRef], grace: int = STOP_GRACE) -> None:
        for ref in refs:
            await self._stop(ref, grace)

    async def start_containers(self, refs: Sequence[ContainerRef]) -> None:
        for ref in refs:
            await self._start(ref)

    async def _stop(self, ref: ContainerRef, grace: int) -> None:
        await self._json(
            f"containers/{_checked_name(ref.id)}/stop", "POST", params={"t": str(grace)},
            not_found=f"container {ref.name or ref.id} does not exist on {self.host}",
        )

    async def _start(self, ref: ContainerRef) -> None:
        await self._json(
            f"containers/{_checked_name(ref.id)}/start", "POST",
            not_found=f"container {ref.name or ref.id} does not exist on {self.host}",
        )

    async def _current(self, refs: Sequence[ContainerRef]) -> list[ContainerRef]:
        """Fresh state of each container; those removed meanwhile are dropped."""
        fresh = []
        for ref in refs:
            with contextlib.suppress(NotFoundError):
                fresh.append(ContainerRef.from_inspect(await self.inspect_container(ref.id)))
        return fresh

    @contextlib.asynccontextmanager
    async def stopped(
        self, refs: Sequence[ContainerRef], journal: Path | None = None, grace: int = STOP_GRACE
    ) -> AsyncIterator[list[ContainerRef]]:
        """Stop those of ``refs`` that run; on exit start exactly those again.

        Yields the stopped containers. The journal is written before anything is
        stopped and removed once all are running again, so ``recover_journals``
        can finish the job if this process dies in between.
        """
        running = [r for r in await self._current(refs) if r.running]
        if journal is not None and running:
            await asyncio.to_thread(self._journal(running).save, journal)
        stops: list[tuple[ContainerRef, asyncio.Future[None]]] = []
        try:
            for ref in running:
                stops.append((ref, asyncio.ensure_future(self._stop(ref, grace))))
                # Shielded: a stop the engine has begun must end before the undo starts it again.
                await asyncio.shield(stops[-1][1])
            yield running
        except BaseException:
            await _run_to_end(self._undo_stops(stops, journal, quiet=True))
            raise
        await _run_to_end(self._undo_stops(stops, journal, quiet=False))

    def _journal(self, refs: Sequence[ContainerRef]) -> Journal:
        return Journal(
            owner=Owner.current(), engine_id=self.engine_id, engine=self.url,
            containers=[{"id": r.id, "name": r.name} for r in refs], created=time.time(),
        )

    async def _undo_stops(
        self, stops: list[tuple[ContainerRef, asyncio.Future[None]]], journal: Path | None, quiet: bool
    ) -> None:
        if stops:
            await asyncio.wait([task for _, task in stops])
        failed = await self._start_each([ref for ref, _ in reversed(stops)])
        if journal is not None and not failed:
            await asyncio.to_thread(journal.unlink, missing_ok=True)
        if failed and not quiet:
            names = ", ".join(r.name or r.id for r in failed)
            kept = f"; journal kept at {journal}" if journal else ""
            raise DockerError(f"could not restart containers on {self.host}: {names}{kept}")

    async def _start_each(self, refs: Sequence[ContainerRef]) -> list[ContainerRef]:
        """Start every container, carrying on past failures; returns the failed ones."""
        failed = []
        for ref in refs:
            try:
                await self._start(ref)
            except NotFoundError:
                log.warning("container %s was removed while stopped; not restarted", ref.name or ref.id)
            except VolmoveError as exc:
                log.error("could not restart container %s: %s", ref.name or ref.id, exc)
                failed.append(ref)
        return failed

    async def recover_journals(self, directory: Path) -> list[str]:
        """Restart containers left stopped by a dead volmove process on this host and engine.

        Returns the ids started. A journal stays when its owner may be alive, it
        belongs to another engine, or a restart failed.
        """
        restarted: list[str] = []
        for path in await asyncio.to_thread(lambda: sorted(directory.glob("*.json"))):
            journal = await asyncio.to_thread(self._recoverable, path)
            if journal is None:
                continue
            refs = journal.refs()
            failed = await self._start_each(refs)
            restarted += [r.id for r in refs if r not in failed]
            if not failed:
                await asyncio.to_thread(path.unlink, missing_ok=True)
        return restarted

    def _recoverable(self, path: Path) -> Journal | None:
        try:
            journal = Journal.load(path)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring unreadable journal %s: %s", path, exc)
            return None
        if journal.engine_id != self.engine_id:
            return None
        # A journal is local state of this host, so a reboot since also means its owner is gone.
        owner = journal.owner
        return journal if owner.is_dead_here() or owner.rebooted_since() else None

    # ------------------------------------------------------------- helper

    async def ensure_helper_image(self, image: str | None = None) -> bool:
        """Build the helper image locally when missing (no registry); True if built."""
        image = image or self.helper_image
        if await self._image_exists(image):
            return False
        busybox = find_busybox()
        with tempfile.TemporaryFile() as context:
            await asyncio.to_thread(_write_build_context, context, busybox)
            with self._errors():
                await self._docker.images.build(
                    fileobj=context, encoding="identity", tag=image, rm=True, forcerm=True
                )
        log.info("built helper image %s on %s from %s", image, self.host, busybox)
        return True

    async def _image_exists(self, image: str) -> bool:
        try:
            await self._json(f"images/{image}/json")
        except NotFoundError:
            return False
        return True

    @contextlib.asynccontextmanager
    async def helper(
        self, mount: MountSpec, read_only: bool, labels: Mapping[str, str] | None = None
    ) -> AsyncIterator[HelperContainer]:
        """A running helper with ``mount`` at /data, force-removed on exit whatever happens."""
        if mount.type == "volume":
            await self.inspect_volume(mount.source)  # the engine would create a missing volume
        if not self._helper_ready:
            await self.ensure_helper_image()
            self._helper_ready = True
        name = f"volmove-helper-{secrets.token_hex(6)}"
        create = asyncio.ensure_future(self._create(name, self._helper_config(mount, read_only, labels)))
        try:
            container_id = await asyncio.shield(create)
            yield await self._start_helper(container_id)
        finally:
            await _run_to_end(self._discard_helper(create, name))

    def _helper_config(self, mount: MountSpec, read_only: bool, labels: Mapping[str, str] | None) -> JSON:
        return {
            "Image": self.helper_image,
            "Cmd": HELPER_CMD,
            # No network, and none of the engine's network set-up either: the runtime gives the helper a
            # fresh namespace holding only a loopback.  "none" alone has the engine build a sandbox for it,
            # which doubled the helper's start here (0.24 s vs 0.11 s).
            "NetworkDisabled": True,
            "Labels": {**(labels or {}), HELPER_LABEL: "1", **Owner.current().labels()},
            "HostConfig": {
                "Mounts": [mount.to_api(read_only)],
                "NetworkMode": "none",
                "CapDrop": ["ALL"],
                "SecurityOpt": ["no-new-privileges"],
                "LogConfig": {"Type": "none", "Config": {}},
            },
        }

    async def _create(self, name: str, config: JSON) -> str:
        data = await self._json("containers/create", "POST", params={"name": name}, body=config)
        return str(data["Id"])

    async def _start_helper(self, container_id: str) -> HelperContainer:
        await self._start(ContainerRef(container_id, container_id, running=False))
        info = await self.inspect_container(container_id)
        pid = int(info["State"]["Pid"])
        root = _proc_root(pid, info["Config"]["Hostname"]) if self.is_local else None
        return HelperContainer(container_id, pid, root)

    async def _discard_helper(self, create: asyncio.Future[str], name: str) -> None:
        # Let an in-flight create finish, or the remove could run before it and miss it.
        await asyncio.wait([create])
        if not create.cancelled():
            create.exception()  # already reported to the caller; mark it retrieved
        await self._force_remove(name)

    async def _force_remove(self, ref: str) -> None:
        try:
            await self._json(f"containers/{_checked_name(ref)}", "DELETE", params={"force": "1"})
        except (NotFoundError, ConflictError):
            pass  # gone already, or its removal is in progress
        except VolmoveError as exc:
            log.warning("could not remove helper container %s: %s", ref, exc)

    async def cleanup_helpers(
        self, foreign_max_age: float = FOREIGN_HELPER_MAX_AGE, labels: Mapping[str, str] | None = None
    ) -> list[str]:
        """Remove helpers whose owner is dead; those of owners elsewhere once older than the max age.

        ``labels`` narrows it to helpers that also carry these labels.
        """
        wanted = [f"{HELPER_LABEL}=1", *(f"{k}={v}" for k, v in (labels or {}).items())]
        data = await self._json(
            "containers/json", params={"all": "1", "filters": json.dumps({"label": wanted})}
        )
        now = time.time()
        stale = [c["Id"] for c in data if _helper_is_stale(c, now, foreign_max_age)]
        for container_id in stale:
            await self._force_remove(container_id)
        return stale

    # ------------------------------------------------------ archive streams

    async def get_archive_stream(self, container_id: str, path: str) -> AsyncIterator[bytes]:
        """A tar of ``path`` in the container, chunk by chunk, never whole in memory."""
        response = await self._open(
            f"containers/{_checked_name(container_id)}/archive", "GET", params={"path": path},
            # aiohttp asks for gzip by default, and dockerd then gzips the tar: ~20x slower.
            headers={"Accept-Encoding": "identity"},
        )
        try:
            while True:
                with self._errors():
                    chunk = await response.content.read(CHUNK)
                if not chunk:
                    return
                yield chunk
        finally:
            response.close()

    async def put_archive_stream(self, container_id: str, path: str, chunks: AsyncIterator[bytes]) -> None:
        """Extract a streamed tar into ``path`` (an existing directory) in the container."""
        source_errors: list[Exception] = []

        async def body() -> AsyncIterator[bytes]:
            try:
                async for chunk in chunks:
                    yield chunk
            except Exception as exc:
                source_errors.append(exc)
                raise

        try:
            response = await self._open(
                f"containers/{_checked_name(container_id)}/archive", "PUT", params={"path": path},
                headers={"Content-Type": "application/x-tar"}, data=body(),
            )
        except VolmoveError:
            if source_errors:  # the request failed because our source did: report that
                raise source_errors[0] from None
            raise
        response.close()


async def _run_to_end(cleanup: Coroutine[Any, Any, None]) -> None:
    """Run cleanup to its end even if cancelled meanwhile, then let the cancellation through.

    A bare shield returns at the first cancel and leaves the cleanup running on
    its own, where asyncio.run() cancels it in turn while tearing the loop down.
    """
    task = asyncio.ensure_future(cleanup)
    interrupted: asyncio.CancelledError | None = None
    while not task.done():
        try:
            await asyncio.wait([task])  # unlike await, wait() never cancels the task
        except asyncio.CancelledError as exc:
            interrupted = exc
    if interrupted is None:
        return await task
    if not task.cancelled() and task.exception() is not None:
        log.error("cleanup failed after cancellation: %s", task.exception())
    raise interrupted


def _helper_is_stale(container: JSON, now: float, foreign_max_age: float) -> bool:
    owner = Owner.from_labels(container.get("Labels") or {})
    if owner is not None and owner.in_this_process_space():
        return owner.is_dead_here()
    return now - float(container.get("Created", now)) > foreign_max_age
