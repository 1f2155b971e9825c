"""The Docker adapter against a real engine: no mocks."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiodocker
import pytest

from tests.fixtures.docker import MakeContainer, MakeVolume, force_remove, unique
from volmove.core import docker as docker_mod
from volmove.core.docker import (
    CHUNK,
    HELPER_CMD,
    ContainerRef,
    DockerClient,
    HelperContainer,
    Journal,
    MountInfo,
    MountSpec,
    Owner,
    find_busybox,
    is_static_elf,
)
from volmove.core.errors import ConflictError, NotFoundError, UnreachableError, UsageError

pytestmark = pytest.mark.docker

MiB = 1024 * 1024


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


async def running(client: DockerClient, ref: ContainerRef) -> bool:
    return ContainerRef.from_inspect(await client.inspect_container(ref.id)).running


# ---------------------------------------------------------------- connection


@pytest.mark.parametrize("url", ["unix:///nonexistent/docker.sock", "tcp://127.0.0.1:1"])
async def test_unreachable_engine_fails_fast(url: str) -> None:
    started = time.monotonic()
    with pytest.raises(UnreachableError, match="cannot reach the Docker engine at"):
        async with DockerClient.connect(url):
            pass
    assert time.monotonic() - started < 2


async def test_silent_engine_fails_after_connect_timeout() -> None:
    """A server that accepts but never answers must not hang the caller."""
    accepted: list[asyncio.StreamWriter] = []
    server = await asyncio.start_server(lambda _, writer: accepted.append(writer), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    started = time.monotonic()
    try:
        with pytest.raises(UnreachableError, match="no answer within"):
            async with DockerClient.connect(f"tcp://127.0.0.1:{port}", connect_timeout=0.5):
                pass
    finally:
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()
    assert time.monotonic() - started < 3


async def test_client_knows_its_engine(docker_client: DockerClient) -> None:
    assert docker_client.is_local
    assert docker_client.host and docker_client.engine_id


# ------------------------------------------------------------------- volumes


async def test_missing_volume_is_not_found(docker_client: DockerClient) -> None:
    name = unique("vmtest-missing")
    with pytest.raises(NotFoundError, match=f"volume {name} does not exist on "):
        await docker_client.inspect_volume(name)
    with pytest.raises(NotFoundError):
        await docker_client.remove_volume(name)
    with pytest.raises(NotFoundError):
        async with docker_client.helper(MountSpec.volume(name), read_only=True):
            pass
    assert not await docker_client.volume_exists(name)  # the helper did not create it


async def test_volume_lifecycle(docker_client: DockerClient, make_volume: MakeVolume) -> None:
    name = await make_volume(labels={"app": "db"})
    info = await docker_client.inspect_volume(name)
    assert (info.name, info.driver, info.labels["app"], info.scope) == (name, "local", "db", "local")
    with pytest.raises(ConflictError, match="already exists"):
        await docker_client.create_volume(name)
    assert name in {v.name for v in await docker_client.list_volumes()}
    assert (await docker_client.volume_sizes())[name] >= -1
    await docker_client.remove_volume(name)
    assert not await docker_client.volume_exists(name)


async def test_volume_in_use_cannot_be_removed(
    docker_client: DockerClient, make_volume: MakeVolume, make_container: MakeContainer
) -> None:
    name = await make_volume()
    await make_container([name], running=False)
    with pytest.raises(ConflictError, match="in use"):
        await docker_client.remove_volume(name)


async def test_invalid_names_are_refused(docker_client: DockerClient) -> None:
    with pytest.raises(UsageError):
        await docker_client.inspect_volume("../containers/json")


# ---------------------------------------------------------------- containers


async def test_containers_using_a_volume(
    docker_client: DockerClient, make_volume: MakeVolume, make_container: MakeContainer, tmp_path: Path
) -> None:
    vol, other = await make_volume(), await make_volume()
    up = await make_container([vol], binds={str(tmp_path): "/host"})
    down = await make_container([vol], running=False)
    await make_container([other])
    async with docker_client.helper(MountSpec.volume(vol), read_only=True):
        users = await docker_client.containers_using(vol)  # helpers are not users
    assert {(r.id, r.running) for r in users} == {(up.id, True), (down.id, False)}
    mounts = await docker_client.container_mounts(up.name)
    assert MountInfo("volume", vol, f"/v/{vol}", True) in mounts
    assert MountInfo("bind", str(tmp_path), "/host", True) in mounts
    assert (await docker_client.inspect_container(up.name))["Id"] == up.id
    with pytest.raises(NotFoundError, match="container nope-"):
        await docker_client.inspect_container(unique("nope"))


# -------------------------------------------------------------- helper image


async def test_helper_image_is_built_when_missing(docker_url: str, raw_docker: aiodocker.Docker) -> None:
    # A tag of its own: the shared one may be in use by tests running alongside.
    image = f"{unique('volmove-helper-test')}:1"
    async with DockerClient.connect(docker_url, helper_image=image) as client:
        try:
            assert await client.ensure_helper_image() is True
            assert await client.ensure_helper_image() is False
            async with client.helper(MountSpec.bind("/etc"), read_only=True) as helper:
                assert (await client.inspect_container(helper.id))["Config"]["Image"] == image
        finally:
            await raw_docker.images.delete(image, force=True)


def test_busybox_must_be_static(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert is_static_elf(find_busybox())
    assert not is_static_elf(Path(sys.executable).resolve())  # dynamically linked
    (tmp_path / "busybox").write_text("#!/bin/sh\n")
    assert not is_static_elf(tmp_path / "busybox")
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(docker_mod, "BUSYBOX_FALLBACK", tmp_path / "absent")
    with pytest.raises(UsageError, match="apt-get install busybox-static"):
        find_busybox()


# -------------------------------------------------------------------- helper


async def test_helper_is_confined_and_labelled(docker_client: DockerClient, make_volume: MakeVolume) -> None:
    vol = await make_volume()
    async with docker_client.helper(MountSpec.volume(vol), read_only=True, labels={"job": "7"}) as helper:
        info = await docker_client.inspect_container(helper.id)
        # No network: a namespace of its own that holds only a loopback interface.
        assert os.readlink(f"/proc/{helper.pid}/ns/net") != os.readlink("/proc/self/ns/net")
        assert await asyncio.to_thread(_network_devices, helper.pid) == ["lo"]
    assert info["Config"]["NetworkDisabled"] is True
    host = info["HostConfig"]
    assert (host["NetworkMode"], host["CapDrop"], host["LogConfig"]["Type"]) == ("none", ["ALL"], "none")
    assert host["SecurityOpt"] == ["no-new-privileges"]
    assert info["Config"]["Cmd"] == HELPER_CMD
    labels = info["Config"]["Labels"]
    assert labels["volmove.helper"] == "1" and labels["job"] == "7"
    assert labels["volmove.owner"] == f"{socket.gethostname()}:{os.getpid()}"
    assert [(m["Name"], m["Destination"], m["RW"]) for m in info["Mounts"]] == [(vol, "/data", False)]


def _network_devices(pid: int) -> list[str]:
    lines = Path(f"/proc/{pid}/net/dev").read_text().splitlines()[2:]  # after two header lines
    return [line.split(":")[0].strip() for line in lines]


async def test_read_only_helper_reads_but_cannot_write(
    docker_client: DockerClient, make_volume: MakeVolume
) -> None:
    vol = await make_volume()
    async with docker_client.helper(MountSpec.volume(vol), read_only=False) as rw:
        assert rw.root is not None
        (rw.root / "f.txt").write_text("hello")
    async with docker_client.helper(MountSpec.volume(vol), read_only=True) as ro:
        assert ro.root == Path(f"/proc/{ro.pid}/root/data")
        assert (ro.root / "f.txt").read_text() == "hello"
        with pytest.raises(OSError) as caught:
            (ro.root / "new.txt").write_text("no")
        assert caught.value.errno == errno.EROFS


async def test_files_written_through_a_helper_are_in_the_volume(
    docker_client: DockerClient, make_volume: MakeVolume, make_container: MakeContainer
) -> None:
    vol = await make_volume()
    async with docker_client.helper(MountSpec.volume(vol), read_only=False) as rw:
        assert rw.root is not None
        (rw.root / "dir").mkdir()
        (rw.root / "dir" / "f.bin").write_bytes(b"\x00\x01data")
        os.utime(rw.root / "dir" / "f.bin", ns=(1, 1_234_567_891))
        os.chown(rw.root / "dir" / "f.bin", 1234, 5678)
    async with docker_client.helper(MountSpec.volume(vol), read_only=True) as ro:
        assert ro.root is not None
        st = (ro.root / "dir" / "f.bin").stat()
        assert (st.st_mtime_ns, st.st_uid, st.st_gid) == (1_234_567_891, 1234, 5678)
        assert (ro.root / "dir" / "f.bin").read_bytes() == b"\x00\x01data"
    # And an ordinary container sees the same file.
    reader = await make_container([vol], script=f"busybox cat /v/{vol}/dir/f.bin > /v/{vol}/copy")
    await _wait_exit(docker_client, reader)
    async with docker_client.helper(MountSpec.volume(vol), read_only=True) as ro:
        assert ro.root is not None
        assert (ro.root / "copy").read_bytes() == b"\x00\x01data"


async def _wait_exit(client: DockerClient, ref: ContainerRef) -> None:
    for _ in range(100):
        if not await running(client, ref):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{ref.name} did not exit")


async def test_helper_on_a_bind_mount(docker_client: DockerClient, tmp_path: Path) -> None:
    (tmp_path / "x").write_text("bound")
    async with docker_client.helper(MountSpec.bind(tmp_path), read_only=True) as helper:
        assert helper.root is not None
        assert (helper.root / "x").read_text() == "bound"


async def test_helper_is_removed_on_error_and_on_cancel(
    docker_client: DockerClient, make_volume: MakeVolume
) -> None:
    vol = await make_volume()
    seen: list[HelperContainer] = []
    with pytest.raises(RuntimeError):
        async with docker_client.helper(MountSpec.volume(vol), read_only=True) as helper:
            seen.append(helper)
            raise RuntimeError("boom")

    inside = asyncio.Event()

    async def hold() -> None:
        async with docker_client.helper(MountSpec.volume(vol), read_only=True) as helper:
            seen.append(helper)
            inside.set()
            await asyncio.sleep(3600)

    task = asyncio.create_task(hold())
    await inside.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task  # returns only once the helper is gone
    for helper in seen:
        with pytest.raises(NotFoundError):
            await docker_client.inspect_container(helper.id)


async def test_cleanup_removes_helpers_of_dead_owners_only(
    docker_client: DockerClient, raw_docker: aiodocker.Docker, helper_image: str
) -> None:
    me = Owner.current()
    owners = {
        "dead": dataclasses.replace(me, pid=dead_pid(), start=None),
        "alive": me,
        "other-host": dataclasses.replace(me, host="some-other-host", pid=dead_pid()),
        "other-container": dataclasses.replace(me, pidns="4026599999", pid=dead_pid()),
    }
    # Only our own fakes: helpers of other users of this engine must be left alone.
    run = {"volmove.test-run": unique("cleanup")}
    ids = {}
    for key, owner in owners.items():
        labels = {"volmove.helper": "1", **run, **owner.labels()}
        config: dict[str, Any] = {"Image": helper_image, "Cmd": HELPER_CMD, "Labels": labels}
        ids[key] = (await raw_docker.containers.create(config, name=unique("vmtest-helper"))).id
    try:
        assert await docker_client.cleanup_helpers(labels=run) == [ids["dead"]]
        with pytest.raises(NotFoundError):
            await docker_client.inspect_container(ids["dead"])
        # Owners whose liveness cannot be told go by age ("older than an hour").
        removed = await docker_client.cleanup_helpers(foreign_max_age=0, labels=run)
        assert sorted(removed) == sorted([ids["other-host"], ids["other-container"]])
    finally:
        for container_id in ids.values():
            await force_remove(raw_docker, container_id)


def test_owner_is_dead_only_when_certain() -> None:
    me = Owner.current()
    assert me.start is not None and me.boot and me.pidns
    assert not me.is_dead_here()
    assert dataclasses.replace(me, pid=dead_pid()).is_dead_here()
    assert dataclasses.replace(me, start=me.start + 1).is_dead_here()  # the pid was reused
    assert not dataclasses.replace(me, host="some-other-host", pid=dead_pid()).is_dead_here()
    assert not dataclasses.replace(me, pidns="4026599999", pid=dead_pid()).is_dead_here()
    assert not dataclasses.replace(me, boot="", pid=dead_pid()).is_dead_here()  # unknown
    assert dataclasses.replace(me, boot="an-earlier-boot").rebooted_since()
    assert not me.rebooted_since()
    assert Owner.from_labels(me.labels()) == me


# ------------------------------------------------------------------- stopped()


async def three_users(make_volume: MakeVolume, make_container: MakeContainer) -> list[ContainerRef]:
    """Two running containers and one stopped one, all using one volume."""
    vol = await make_volume()
    return [
        await make_container([vol]),
        await make_container([vol]),
        await make_container([vol], running=False),
    ]


async def test_stopped_restarts_exactly_those_it_stopped(
    docker_client: DockerClient, make_volume: MakeVolume, make_container: MakeContainer, tmp_path: Path
) -> None:
    a, b, idle = await three_users(make_volume, make_container)
    journal = tmp_path / "journals" / "job.json"
    async with docker_client.stopped([a, b, idle], journal, grace=2) as stopped:
        assert {r.id for r in stopped} == {a.id, b.id}
        assert not any([await running(docker_client, r) for r in (a, b, idle)])
        assert {c["id"] for c in Journal.load(journal).containers} == {a.id, b.id}
    assert [await running(docker_client, r) for r in (a, b, idle)] == [True, True, False]
    assert not journal.exists()


async def test_stopped_restarts_when_the_body_raises(
    docker_client: DockerClient, make_volume: MakeVolume, make_container: MakeContainer, tmp_path: Path
) -> None:
    a, b, idle = await three_users(make_volume, make_container)
    journal = tmp_path / "job.json"
    with pytest.raises(RuntimeError, match="boom"):
        async with docker_client.stopped([a, b, idle], journal, grace=2):
            raise RuntimeError("boom")
    assert [await running(docker_client, r) for r in (a, b, idle)] == [True, True, False]
    assert not journal.exists()


async def test_stopped_restarts_when_cancelled(
    docker_client: DockerClient, make_volume: MakeVolume, make_container: MakeContainer
) -> None:
    a, b, idle = await three_users(make_volume, make_container)
    inside = asyncio.Event()

    async def job() -> None:
        async with docker_client.stopped([a, b, idle], grace=2):
            inside.set()
            await asyncio.sleep(3600)

    task = asyncio.create_task(job())
    await inside.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task  # returns only once the containers run again
    assert [await running(docker_client, r) for r in (a, b, idle)] == [True, True, False]


CRASHING_JOB = """
import asyncio, sys
from pathlib import Path
from volmove.core.docker import ContainerRef, DockerClient

async def main(url, container, journal):
    async with DockerClient.connect(url) as docker:
        ref = ContainerRef.from_inspect(await docker.inspect_container(container))
        async with docker.stopped([ref], Path(journal), grace=2):
            print("stopped", flush=True)
            await asyncio.sleep(3600)

asyncio.run(main(*sys.argv[1:]))
"""


async def test_journal_recovery_after_the_owner_died(
    docker_client: DockerClient, docker_url: str, make_volume: MakeVolume,
    make_container: MakeContainer, tmp_path: Path,
) -> None:
    vol = await make_volume()
    victim, bystander = await make_container([vol]), await make_container([vol])
    journals = tmp_path / "journals"
    job = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CRASHING_JOB, docker_url, victim.id, str(journals / "dead.json"),
        stdout=asyncio.subprocess.PIPE,
    )
    assert job.stdout is not None
    assert await asyncio.wait_for(job.stdout.readline(), 30) == b"stopped\n"
    job.kill()  # SIGKILL: no finally runs
    await job.wait()
    assert not await running(docker_client, victim)

    # Journals of a live owner (this process) or of another engine must be left alone.
    await docker_client.stop_containers([bystander], grace=2)
    docker_client._journal([bystander]).save(journals / "alive.json")
    dead = dataclasses.replace(Owner.current(), pid=dead_pid())
    orphan = dataclasses.replace(docker_client._journal([bystander]), owner=dead)
    dataclasses.replace(orphan, engine_id="another-engine").save(journals / "elsewhere.json")

    assert await docker_client.recover_journals(journals) == [victim.id]
    assert await running(docker_client, victim)
    assert not await running(docker_client, bystander)
    assert sorted(p.name for p in journals.iterdir()) == ["alive.json", "elsewhere.json"]


# ------------------------------------------------------------ archive streams


def sample_tree() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, extra in [
            ("tree", tarfile.DIRTYPE, b""),
            ("tree/a.txt", tarfile.REGTYPE, b"alpha\n"),
            ("tree/sub", tarfile.DIRTYPE, b""),
            ("tree/sub/b.bin", tarfile.REGTYPE, bytes(range(256)) * 100),
            ("tree/link", tarfile.SYMTYPE, b""),
        ]:
            info = tarfile.TarInfo(name)
            info.type, info.size, info.mtime, info.uid, info.gid = kind, len(extra), 1_600_000_000, 42, 43
            info.mode = {tarfile.DIRTYPE: 0o755, tarfile.SYMTYPE: 0o777}.get(kind, 0o640)
            info.linkname = "a.txt" if kind == tarfile.SYMTYPE else ""
            tar.addfile(info, io.BytesIO(extra))
    return buf.getvalue()


async def chunked(data: bytes, size: int) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def tar_entries(data: bytes, strip: str = "") -> dict[str, tuple[int, int, int, int, bytes, str]]:
    entries = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for m in tar.getmembers():
            content = tar.extractfile(m).read() if m.isfile() else b""  # type: ignore[union-attr]
            entries[m.name.removeprefix(strip)] = (m.type[0], m.mode & 0o7777, m.uid, m.gid, content, m.linkname)
    return entries


async def test_archive_round_trip(docker_client: DockerClient, make_volume: MakeVolume) -> None:
    vol, tree = await make_volume(), sample_tree()
    async with docker_client.helper(MountSpec.volume(vol), read_only=False) as helper:
        await docker_client.put_archive_stream(helper.id, "/data", chunked(tree, 1000))
        got = b"".join([c async for c in docker_client.get_archive_stream(helper.id, "/data/tree")])
        assert helper.root is not None
        assert (helper.root / "tree" / "sub" / "b.bin").stat().st_mtime == 1_600_000_000
    assert tar_entries(got) == tar_entries(tree)


async def test_archive_errors_are_translated(docker_client: DockerClient, make_volume: MakeVolume) -> None:
    vol = await make_volume()
    async with docker_client.helper(MountSpec.volume(vol), read_only=True) as helper:
        with pytest.raises(NotFoundError, match="/nope"):
            async for _ in docker_client.get_archive_stream(helper.id, "/nope"):
                pass

        async def broken() -> AsyncIterator[bytes]:
            yield sample_tree()[:1024]
            raise ValueError("source failed")

        with pytest.raises(ValueError, match="source failed"):
            await docker_client.put_archive_stream(helper.id, "/data", broken())


def rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.mark.slow
async def test_archives_stream_without_loading_them(docker_client: DockerClient, make_volume: MakeVolume) -> None:
    size, vol = 200 * MiB, await make_volume()
    async with docker_client.helper(MountSpec.volume(vol), read_only=False) as helper:
        base, peak = rss(), 0

        async def big_tar() -> AsyncIterator[bytes]:
            nonlocal peak
            info = tarfile.TarInfo("big.bin")
            info.size = size
            yield info.tobuf(format=tarfile.GNU_FORMAT)
            for _ in range(size // MiB):
                peak = max(peak, rss())
                yield bytes(MiB)
            yield bytes(1024)  # end-of-archive blocks

        await docker_client.put_archive_stream(helper.id, "/data", big_tar())
        assert helper.root is not None
        assert (helper.root / "big.bin").stat().st_size == size
        assert peak - base < 64 * MiB

        total, chunks, peak = 0, 0, 0
        async for chunk in docker_client.get_archive_stream(helper.id, "/data/big.bin"):
            assert len(chunk) <= CHUNK
            total, chunks, peak = total + len(chunk), chunks + 1, max(peak, rss())
        assert total > size and chunks > size // CHUNK
        assert peak - base < 64 * MiB


async def test_journal_file_is_json(docker_client: DockerClient, tmp_path: Path) -> None:
    ref = ContainerRef("abc", "name", running=True)
    docker_client._journal([ref]).save(tmp_path / "j.json")
    raw = json.loads((tmp_path / "j.json").read_text())
    assert raw["owner"]["pid"] == os.getpid() and raw["containers"] == [{"id": "abc", "name": "name"}]
    assert raw["engine_id"] == docker_client.engine_id
