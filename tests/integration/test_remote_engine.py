"""A Docker engine the host cannot reach through /proc (a TCP endpoint): the
archive-endpoint path is used instead, and must give the same volume."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.docker import MakeVolume
from tests.integration.test_cli_docker import acli, fill, one_line_error
from volmove.core.docker import DockerClient

pytestmark = pytest.mark.docker
LISTING = ("cd /d && find . | sort | while read -r f; do "
           "stat -c '%n %f %u %g %s %Y' \"$f\"; [ -f \"$f\" ] && [ ! -L \"$f\" ] && sha256sum \"$f\"; done; true")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def remote_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An extra dockerd reached only over TCP on 127.0.0.1."""
    if shutil.which("dockerd") is None:
        pytest.skip("dockerd not installed")
    root = tmp_path_factory.mktemp("remote-docker")
    url = f"tcp://127.0.0.1:{_free_port()}"
    log = open(root / "log", "wb")  # noqa: SIM115 - closed at teardown
    proc = subprocess.Popen(
        ["dockerd", "--host", url, "--data-root", str(root / "data"), "--exec-root", f"/run/vm-remote-{os.getpid()}",
         "--pidfile", str(root / "pid"), "--bridge", "none", "--iptables=false"], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 60
        while subprocess.run(["docker", "-H", url, "version"], capture_output=True).returncode != 0:
            assert proc.poll() is None and time.monotonic() < deadline, (root / "log").read_text()[-2000:]
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def listing(url: str, volume: str) -> str:
    out = subprocess.run(["docker", "-H", url, "run", "--rm", "--network", "none", "-v", f"{volume}:/d:ro",
                          "volmove-helper:1", "busybox", "sh", "-c", LISTING], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout


def _without_root_mtime(text: str) -> list[str]:
    return [line.rsplit(" ", 1)[0] if line.startswith(". ") else line for line in text.splitlines()]


def _tree(root: Path) -> None:
    (root / "dir/sub").mkdir(parents=True)
    (root / "dir/file").write_bytes(os.urandom(300_000))
    (root / "setuid").write_text("x")
    os.chown(root / "setuid", 42, 43)
    os.chmod(root / "setuid", 0o4750)
    os.symlink("/etc/hostname", root / "abs-link")
    os.link(root / "dir/file", root / "hard")


async def test_restore_onto_a_remote_engine(remote_engine: str, docker_client: DockerClient,
                                            make_volume: MakeVolume, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    await acli("init", repo=repo)
    src = await make_volume()
    await fill(docker_client, src, _tree)
    await acli("backup", src, repo=repo)
    async with DockerClient.connect(remote_engine) as remote:
        assert not remote.is_local
        await remote.ensure_helper_image()
        try:
            await acli("restore", src, "-H", remote_engine, repo=repo)
            want = await asyncio.to_thread(listing, docker_client.url, src)
            got = await asyncio.to_thread(listing, remote_engine, src)
            # The engine's extractor does not apply the mtime of the target directory itself.
            assert _without_root_mtime(got) == _without_root_mtime(want) and "setuid" in got
            proc = await acli("restore", src, "-H", remote_engine, repo=repo, check=4)
            assert "not empty" in one_line_error(proc)
        finally:
            await remote.remove_volume(src, force=True)


async def test_backup_from_a_remote_engine(remote_engine: str, docker_client: DockerClient,
                                           make_volume: MakeVolume, tmp_path: Path) -> None:
    """Read through the archive endpoint; restoring locally gives the same volume back."""
    repo = tmp_path / "repo"
    await acli("init", repo=repo)
    src = await make_volume()
    await fill(docker_client, src, _tree)
    await acli("backup", src, repo=repo)
    async with DockerClient.connect(remote_engine) as remote:
        await remote.ensure_helper_image()
        try:
            await acli("restore", src, "-H", remote_engine, repo=repo)  # put it on the remote engine
            out = await acli("backup", src, "-H", remote_engine, "--json", "--tag", "remote", repo=repo)
            stats = json.loads(out.stdout)[0]["stats"]
            assert stats["files"] == 2 and stats["new_bytes"] == 0  # same content, same chunks
            copy = await make_volume()
            snap = json.loads(out.stdout)[0]["id"]
            await acli("restore", src, "--snapshot", snap, "--as", copy, "--force", repo=repo)
            want = await asyncio.to_thread(listing, docker_client.url, src)
            got = await asyncio.to_thread(listing, docker_client.url, copy)
            assert _without_root_mtime(got) == _without_root_mtime(want)
        finally:
            await remote.remove_volume(src, force=True)
