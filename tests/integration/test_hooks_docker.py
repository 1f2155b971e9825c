"""Consistency hooks on a real Docker engine: pre/post commands inside containers around a backup."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.fixtures.docker import IDLE, MakeContainer, MakeVolume
from tests.integration.test_cli_docker import acli, cli, fill, one_line_error, state_of
from volmove.core.docker import ContainerRef, DockerClient
from volmove.core.hooks import BackupHooks, HookError, exec_in

pytestmark = pytest.mark.docker
# The test image is a bare busybox: give it the usual commands (sh, echo, rm...) first.
WITH_SHELL = f"busybox --install -s /bin; {IDLE}"


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    path = tmp_path / "repo"
    cli("init", repo=path)
    return path


async def hooked(make_container: MakeContainer, client: DockerClient, volume: str,
                 **labels: str) -> ContainerRef:
    ctr = await make_container([volume], script=WITH_SHELL,
                               labels={f"volmove.hook.{k.replace('_', '-')}": v for k, v in labels.items()})
    deadline = time.monotonic() + 30
    while await exec_in(client, ctr.id, "true", bytearray()) != 0:  # until the shell is installed
        assert time.monotonic() < deadline
    return ctr


def _write_table(root: Path) -> None:
    (root / "table").write_text("rows")


async def test_pre_hook_output_is_in_the_snapshot_and_post_hook_cleans_up(
        docker_client: DockerClient, make_volume: MakeVolume, make_container: MakeContainer, repo: Path) -> None:
    vol = await make_volume()
    await fill(docker_client, vol, _write_table)
    await hooked(make_container, docker_client, vol,
                 pre_backup=f"echo 'dump of table' > /v/{vol}/dump.sql",
                 post_backup=f"rm /v/{vol}/dump.sql; echo done > /v/{vol}/post-ran")
    await acli("backup", vol, repo=repo)
    target = await make_volume()
    await acli("restore", vol, "--as", target, "--force", repo=repo)
    restored = await state_of(docker_client, target)
    assert b"dump.sql" in restored and b"post-ran" not in restored
    now = await state_of(docker_client, vol)
    assert b"dump.sql" not in now and b"post-ran" in now  # the post hook ran after the read


async def test_failing_pre_hook_fails_the_backup_with_its_output(
        docker_client: DockerClient, make_volume: MakeVolume, make_container: MakeContainer, repo: Path) -> None:
    vol = await make_volume()
    ctr = await hooked(make_container, docker_client, vol,
                       pre_backup="echo 'pg_dump: connection refused' >&2; exit 3",
                       post_backup=f"echo ran > /v/{vol}/post-ran")
    proc = await acli("backup", vol, repo=repo, check=10)
    line = one_line_error(proc)
    assert f"pre-backup hook in container {ctr.name} exited with 3: pg_dump: connection refused" in line
    assert json.loads((await acli("snapshots", "--json", repo=repo)).stdout) == []
    assert b"post-ran" not in await state_of(docker_client, vol)  # no post hook without a successful pre hook
    doc = json.loads((await acli("backup", vol, "--json", repo=repo, check=10)).stdout)
    assert doc["error"]["kind"] == "hook"


async def test_pre_hook_timeout_and_long_output(
        docker_client: DockerClient, make_volume: MakeVolume, make_container: MakeContainer, repo: Path) -> None:
    vol = await make_volume()
    await hooked(make_container, docker_client, vol, pre_backup="seq 1 50000; echo last words; sleep 60",
                 timeout="1")
    started = time.monotonic()
    line = one_line_error(await acli("backup", vol, repo=repo, check=10))
    assert time.monotonic() - started < 30
    assert "timed out after 1 s" in line and line.endswith("50000 last words")
    assert len(line) < 700  # long output is cut to its tail


async def test_failing_post_hook_is_reported_after_the_snapshot_is_saved(
        docker_client: DockerClient, make_volume: MakeVolume, make_container: MakeContainer, repo: Path) -> None:
    vol = await make_volume()
    await hooked(make_container, docker_client, vol, post_backup="echo cannot resume writes; exit 1")
    line = one_line_error(await acli("backup", vol, repo=repo, check=10))
    assert "post-backup hook" in line and "cannot resume writes" in line and "was saved" in line
    assert len(json.loads((await acli("snapshots", "--json", repo=repo)).stdout)) == 1


async def test_hooks_run_around_stopping_and_post_hooks_run_when_the_backup_fails(
        docker_client: DockerClient, make_volume: MakeVolume, make_container: MakeContainer) -> None:
    vol = await make_volume()
    first = await hooked(make_container, docker_client, vol, post_backup=f"echo 1 >> /v/{vol}/log")
    second = await hooked(make_container, docker_client, vol, pre_backup="exit 1",
                          post_backup=f"echo 2 >> /v/{vol}/log")
    hooks = BackupHooks(docker_client, [first, second])
    with pytest.raises(HookError, match="exited with 1"):
        async with hooks.around():
            raise AssertionError("the body must not run after a failed pre hook")
    assert await _read_log(docker_client, first, vol) == "1\n"  # only the one whose pre hook succeeded
    hooks = BackupHooks(docker_client, [first])
    with pytest.raises(RuntimeError):
        async with hooks.around():
            raise RuntimeError("the backup failed")
    assert await _read_log(docker_client, first, vol) == "1\n1\n"
    assert hooks.post_failure is None


async def _read_log(client: DockerClient, ctr: ContainerRef, vol: str) -> str:
    out = bytearray()
    assert await exec_in(client, ctr.id, f"cat /v/{vol}/log", out) == 0
    return out.decode()
