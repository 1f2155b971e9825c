"""Consistency hooks: commands run inside a container around a backup (a database dump, say).

Labels on a running container that uses the volume:

* ``volmove.hook.pre-backup``: a shell command (``sh -c``) run before the volume
  is read; if it fails or times out, the backup fails with its output;
* ``volmove.hook.post-backup``: run afterwards, whatever happened, in every
  container whose pre hook succeeded (or that has none); its failure is
  reported once the snapshot is saved;
* ``volmove.hook.timeout``: seconds each command may take (default 60).

Pre hooks run before containers are stopped for the backup and post hooks
after they are started again.  Commands run through the engine's exec API.
"""

from __future__ import annotations

import asyncio
import json
import logging
import struct
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

from volmove.core.docker import ContainerRef, DockerClient, _run_to_end
from volmove.core.errors import DockerError, VolmoveError

log = logging.getLogger(__name__)

PRE_LABEL = "volmove.hook.pre-backup"
POST_LABEL = "volmove.hook.post-backup"
TIMEOUT_LABEL = "volmove.hook.timeout"
DEFAULT_TIMEOUT = 60.0
OUTPUT_KEPT = 64 << 10  # the tail of a command's output held in memory
OUTPUT_SHOWN = 400  # characters of it in an error message
_FRAME = struct.Struct(">BxxxI")  # the engine's stdout/stderr multiplexing header


class HookError(DockerError):
    """A hook command failed or timed out."""

    kind = "hook"


async def exec_in(docker: DockerClient, container_id: str, command: str, output: bytearray) -> int:
    """Run ``sh -c command`` in a running container and return its exit code.  Its output
    (stdout and stderr, the tail only) goes to ``output`` as it comes, so a caller whose
    deadline passes still has what it printed."""
    created = await docker._json(
        f"containers/{container_id}/exec", "POST",
        body={"Cmd": ["sh", "-c", command], "AttachStdout": True, "AttachStderr": True, "Tty": False},
        not_found=f"container {container_id} does not exist on {docker.host}",
        conflict=f"container {container_id} is not running on {docker.host}",
    )
    exec_id = str(created["Id"])
    await _read_output(docker, exec_id, output)
    return await _exit_code(docker, exec_id)


async def _read_output(docker: DockerClient, exec_id: str, sink: bytearray) -> None:
    response = await docker._open(
        f"exec/{exec_id}/start", "POST", params={}, headers={"Content-Type": "application/json"},
        data=json.dumps({"Detach": False, "Tty": False}),
    )
    try:
        buf = b""
        while chunk := await response.content.read(64 << 10):
            buf = _demux(buf + chunk, sink)
    finally:
        response.close()


def _demux(buf: bytes, sink: bytearray) -> bytes:
    """Move whole frames from ``buf`` to ``sink`` (keeping its tail); returns what is left."""
    while len(buf) >= _FRAME.size:
        _stream, size = _FRAME.unpack_from(buf)
        if len(buf) < _FRAME.size + size:
            break
        sink += buf[_FRAME.size : _FRAME.size + size]
        buf = buf[_FRAME.size + size :]
    del sink[:-OUTPUT_KEPT]
    return buf


async def _exit_code(docker: DockerClient, exec_id: str) -> int:
    # The stream ends with the process; the engine may take a moment to record its exit.
    while True:
        info = await docker._json(f"exec/{exec_id}/json")
        if not info.get("Running"):
            code = info.get("ExitCode")
            return code if isinstance(code, int) else -1
        await asyncio.sleep(0.02)


# ------------------------------------------------------------------ around a backup


@dataclass(frozen=True)
class HookCommand:
    container: ContainerRef
    label: str
    command: str
    timeout: float

    @property
    def what(self) -> str:
        return f"{self.label.rsplit('.', 1)[-1]} hook in container {self.container.name or self.container.id[:12]}"


def hook_command(container: ContainerRef, label: str) -> HookCommand | None:
    command = container.labels.get(label, "").strip()
    if not command:
        return None
    return HookCommand(container, label, command, _timeout(container))


def _timeout(container: ContainerRef) -> float:
    raw = container.labels.get(TIMEOUT_LABEL)
    try:
        value = float(raw) if raw is not None else DEFAULT_TIMEOUT
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise HookError(f"container {container.name}: label {TIMEOUT_LABEL}={raw!r} is not a number of seconds")
    return value


async def run_hook(docker: DockerClient, hook: HookCommand) -> None:
    """Run one hook; HookError with its output when it fails or times out."""
    output = bytearray()
    try:
        async with asyncio.timeout(hook.timeout):
            code = await exec_in(docker, hook.container.id, hook.command, output)
    except TimeoutError:
        # The engine cannot stop an exec: the command may still run in the container.
        raise HookError(f"{hook.what} timed out after {hook.timeout:g} s{_show(output)}") from None
    if code != 0:
        raise HookError(f"{hook.what} exited with {code}{_show(output)}")
    log.info("%s succeeded", hook.what)


def _show(output: bytes | bytearray) -> str:
    text = " ".join(output.decode(errors="replace").split())
    if not text:
        return " (no output)"
    return ": " + (text if len(text) <= OUTPUT_SHOWN else "…" + text[-OUTPUT_SHOWN:])


class BackupHooks:
    """The hooks of the containers using a volume, run around reading it."""

    def __init__(self, docker: DockerClient, containers: Sequence[ContainerRef]) -> None:
        self.docker = docker
        self.containers = [c for c in containers if c.running]  # a stopped container's data is at rest
        self.post_failure: HookError | None = None

    @asynccontextmanager
    async def around(self) -> AsyncIterator[None]:
        """Pre hooks, the body, then post hooks of every container whose pre hook succeeded."""
        ready: list[ContainerRef] = []
        succeeded = False
        try:
            for container in self.containers:
                pre = hook_command(container, PRE_LABEL)
                if pre is not None:
                    await run_hook(self.docker, pre)
                ready.append(container)
            yield
            succeeded = True
        finally:
            await _run_to_end(self._post(ready))
            if self.post_failure is not None and not succeeded:
                log.error("%s", self.post_failure)  # the body's error goes up; this one would be lost

    async def _post(self, containers: list[ContainerRef]) -> None:
        for container in reversed(containers):
            try:
                post = hook_command(container, POST_LABEL)
                if post is not None:
                    await run_hook(self.docker, post)
            except VolmoveError as exc:
                failure = exc if isinstance(exc, HookError) else HookError(str(exc))
                if self.post_failure is None:
                    self.post_failure = failure
                else:
                    log.error("%s", failure)  # only the first is raised

    def raise_post_failure(self, snapshot_id: str) -> None:
        """After the commit: the snapshot is good, but the user must hear of the failed post hook."""
        if self.post_failure is not None:
            raise HookError(f"{self.post_failure}; snapshot {snapshot_id[:8]} was saved")
