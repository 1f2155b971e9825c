"""The volmove CLI against a real Docker engine (and the real S3 server where marked)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.engine_helpers import tree_state
from tests.fixtures.docker import MakeContainer, MakeVolume
from tests.unit.test_roundtrip import make_tree
from volmove.core.docker import DockerClient, MountSpec

pytestmark = pytest.mark.docker
VOLMOVE = str(Path(sys.executable).with_name("volmove"))


def cli(*args: str, repo: Path | str | None = None, env: dict[str, str] | None = None,
        check: int | None = 0) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {})}
    if repo is not None:
        full_env["VOLMOVE_REPO"] = str(repo)
    proc = subprocess.run([VOLMOVE, *args], capture_output=True, text=True, env=full_env, timeout=600)
    assert "Traceback" not in proc.stderr, proc.stderr
    if check is not None:
        assert proc.returncode == check, (proc.returncode, proc.stdout, proc.stderr)
    return proc


async def acli(*args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(cli, *args, **kw)


def spawn(argv: list[str], env: dict[str, str], stderr: int) -> subprocess.Popen[str]:
    """Start a CLI run to interrupt (starting a process does not block the loop)."""
    return subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=stderr, text=True)


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("volmove: error: ")
    return lines[0]


@asynccontextmanager
async def volume_root(client: DockerClient, volume: str, read_only: bool = False) -> AsyncIterator[Path]:
    async with client.helper(MountSpec.volume(volume), read_only=read_only) as helper:
        assert helper.root is not None
        yield helper.root


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    path = tmp_path / "repo"
    cli("init", repo=path)
    return path


async def fill(client: DockerClient, volume: str, writer: Callable[[Path], None]) -> None:
    async with volume_root(client, volume) as root:
        await asyncio.to_thread(writer, root)


async def state_of(client: DockerClient, volume: str) -> dict[bytes, tuple[object, ...]]:
    async with volume_root(client, volume, read_only=True) as root:
        return await asyncio.to_thread(tree_state, root)


async def test_round_trip_through_volumes_is_exact(docker_client: DockerClient, make_volume: MakeVolume,
                                                   repo: Path) -> None:
    src = await make_volume(labels={"app": "demo"})
    await fill(docker_client, src, make_tree)
    out = json.loads((await acli("backup", src, "--json", repo=repo)).stdout)
    assert out[0]["volume"] == src and out[0]["stats"]["files"] > 5
    target = f"{src}-restored"
    try:
        await acli("restore", src, "--as", target, repo=repo)
        assert await state_of(docker_client, target) == await state_of(docker_client, src)
        info = await docker_client.inspect_volume(target)
        assert info.labels.get("app") == "demo"  # driver, options and labels recreated
        await acli("compare", target, "--of", src, repo=repo)
        verify = json.loads((await acli("verify", "--read-data", "--json", repo=repo)).stdout)
        assert verify["ok"] and verify["packs_read"] >= 1
    finally:
        await docker_client.remove_volume(target, force=True)


async def test_restore_refuses_non_empty_target_unless_forced(docker_client: DockerClient,
                                                              make_volume: MakeVolume, repo: Path) -> None:
    src, target = await make_volume(), await make_volume()
    await fill(docker_client, src, lambda root: (root / "a").write_text("from snapshot"))
    await fill(docker_client, target, lambda root: (root / "a").write_text("precious"))
    await acli("backup", src, repo=repo)
    proc = await acli("restore", src, "--as", target, repo=repo, check=4)
    assert "not empty" in one_line_error(proc)
    assert (await state_of(docker_client, target))[b"a"][4] == len("precious")
    await acli("restore", src, "--as", target, "--force", repo=repo)
    assert (await state_of(docker_client, target))[b"a"][4] == len("from snapshot")


async def test_second_backup_skips_unchanged_files(docker_client: DockerClient, make_volume: MakeVolume,
                                                   repo: Path) -> None:
    vol = await make_volume()
    await fill(docker_client, vol, lambda root: [(root / f"f{i}").write_bytes(os.urandom(50_000)) for i in range(20)])
    await acli("backup", vol, repo=repo)
    await fill(docker_client, vol, lambda root: (root / "f3").write_bytes(os.urandom(50_000)))
    reported = json.loads((await acli("backup", vol, "--json", repo=repo)).stdout)[0]
    second = reported["stats"]
    assert second["skipped_files"] == 19
    assert second["new_bytes"] == 50_000
    # What the backup reports is the snapshot as stored (it is not read back).
    assert json.loads((await acli("snapshots", "--json", repo=repo)).stdout)[-1] == reported


async def _started_at(client: DockerClient, ref_id: str) -> str:
    return str((await client.inspect_container(ref_id))["State"]["StartedAt"])


async def test_stop_restarts_exactly_the_running_users(docker_client: DockerClient, make_volume: MakeVolume,
                                                       make_container: MakeContainer, repo: Path) -> None:
    vol = await make_volume()
    running = await make_container([vol])
    stopped = await make_container([vol], running=False)
    before = await _started_at(docker_client, running.id)
    await acli("backup", vol, "--stop", repo=repo)
    after = await docker_client.inspect_container(running.id)
    assert after["State"]["Running"] and after["State"]["StartedAt"] != before  # it was stopped, then started
    assert not (await docker_client.inspect_container(stopped.id))["State"]["Running"]


async def test_the_helper_starts_and_goes_outside_the_downtime(docker_client: DockerClient, make_volume: MakeVolume,
                                                               make_container: MakeContainer, repo: Path) -> None:
    vol = await make_volume()
    user = await make_container([vol])
    since = time.time()
    await acli("backup", vol, "--stop", repo=repo)
    events = await _container_events(docker_client.url, since)
    helper = [e for e in events if e["Actor"]["Attributes"].get("volmove.helper") == "1"]
    mine = [e for e in events if e["id"] == user.id]
    when = {(who, e["Action"]): e["timeNano"] for who, group in (("helper", helper), ("user", mine)) for e in group}
    assert when[("helper", "start")] < when[("user", "die")] < when[("user", "start")] < when[("helper", "destroy")]


async def _container_events(url: str, since: float) -> list[dict[str, Any]]:
    until = time.time() + 0.5  # events are stamped by the engine: leave it a moment
    out = await asyncio.to_thread(subprocess.run, [
        "docker", "-H", url, "events", "--since", f"{since:.3f}", "--until", f"{until:.3f}",
        "--filter", "type=container", "--format", "{{json .}}"], capture_output=True, text=True, check=True)
    return [json.loads(line) for line in out.stdout.splitlines()]


async def test_stop_label_on_a_container(docker_client: DockerClient, make_volume: MakeVolume,
                                         make_container: MakeContainer, repo: Path) -> None:
    vol = await make_volume()
    labelled = await make_container([vol], labels={"volmove.stop-during-backup": "true"})
    other = await make_container([vol])
    before = {c.id: await _started_at(docker_client, c.id) for c in (labelled, other)}
    await acli("backup", vol, repo=repo)
    assert await _started_at(docker_client, labelled.id) != before[labelled.id]
    assert await _started_at(docker_client, other.id) == before[other.id]


async def test_container_volumes_and_bind_mounts(docker_client: DockerClient, make_volume: MakeVolume,
                                                 make_container: MakeContainer, repo: Path, tmp_path: Path) -> None:
    v1, v2 = await make_volume(), await make_volume()
    bind = tmp_path / "bind"
    bind.mkdir()
    (bind / "host-file").write_text("from the host")
    ctr = await make_container([v1, v2], binds={str(bind): "/srv"}, running=False)
    out = json.loads((await acli("backup", "--container", ctr.name, "--json", repo=repo)).stdout)
    assert sorted(s["volume"] for s in out) == sorted([v1, v2, str(bind)])
    assert all(f"container={ctr.name}" in s["tags"] for s in out)
    target = await make_volume()
    await acli("restore", str(bind), "--as", target, "--force", repo=repo)
    assert (await state_of(docker_client, target))[b"host-file"][4] == len("from the host")


async def test_bad_input_gives_one_line_and_distinct_codes(repo: Path, tmp_path: Path) -> None:
    assert "does not exist" in one_line_error(await acli("backup", "no-such-volume-xyz", repo=repo, check=3))
    proc = await acli("backup", "v", "--docker", "unix:///nonexistent.sock", repo=repo, check=5)
    assert "cannot reach the Docker engine" in one_line_error(proc)
    proc = await acli("snapshots", repo=tmp_path / "not-a-repo", check=8)
    assert "volmove init" in one_line_error(proc)
    proc = await acli("restore", "no-such-volume-xyz", repo=repo, check=3)
    assert "no snapshot" in one_line_error(proc)
    proc = await acli("backup", repo=repo, check=2)
    one_line_error(proc)
    doc = json.loads((await acli("backup", "no-such-volume-xyz", "--json", repo=repo, check=3)).stdout)
    assert doc["error"]["kind"] == "not_found"


async def test_full_disk_during_restore_is_one_clear_error(docker_client: DockerClient, make_volume: MakeVolume,
                                                           repo: Path) -> None:
    src = await make_volume()
    await fill(docker_client, src, lambda root: (root / "big").write_bytes(os.urandom(8 << 20)))
    await acli("backup", src, repo=repo)
    small = f"{src}-tiny"
    await docker_client.create_volume(small, "local", {"type": "tmpfs", "device": "tmpfs", "o": "size=2m"},
                                      {"volmove.test": "1"})
    try:
        proc = await acli("restore", src, "--as", small, "--force", repo=repo, check=9)
        assert "no space left" in one_line_error(proc)
    finally:
        await docker_client.remove_volume(small, force=True)


async def test_a_corrupt_index_fails_the_restore_and_leaves_no_volume(
        docker_client: DockerClient, make_volume: MakeVolume, repo: Path) -> None:
    # The index loads while the target volume is created and its helper starts: its error must
    # still be the restore's, and the volume created for it must go.
    src = await make_volume()
    await fill(docker_client, src, lambda root: (root / "f").write_bytes(b"data" * 1000))
    await acli("backup", src, repo=repo)
    (index,) = (repo / "index").iterdir()
    raw = bytearray(index.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    index.write_bytes(bytes(raw))
    target = f"{src}-from-corrupt"
    proc = await acli("restore", src, "--as", target, repo=repo, check=7)
    assert f"index {index.name} does not match its hash" in one_line_error(proc)
    assert not await docker_client.volume_exists(target)


def _wait_for(pred: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def _big_volume_writer(root: Path) -> None:
    # Incompressible and unique (~30 packs), so that a backup is still running after its first packs.
    for i in range(6):
        with open(root / f"big{i}", "wb") as f:
            for _ in range(40):
                f.write(os.urandom(1 << 20))


async def _helpers_of_dead_owners(client: DockerClient) -> int:
    return len(await client.cleanup_helpers())


async def test_kill_9_mid_backup_leaves_no_partial_snapshot(docker_client: DockerClient, make_volume: MakeVolume,
                                                            repo: Path) -> None:
    vol = await make_volume()
    await fill(docker_client, vol, _big_volume_writer)
    env = {**os.environ, "VOLMOVE_REPO": str(repo)}
    proc = spawn([VOLMOVE, "backup", vol], env, stderr=subprocess.DEVNULL)
    await asyncio.to_thread(_wait_for, lambda: any((repo / "data").rglob("*")) and
                            len([p for p in (repo / "data").rglob("*") if p.is_file()]) >= 3)
    proc.kill()
    proc.wait()
    listed = json.loads((await acli("snapshots", "--json", repo=repo)).stdout)
    assert listed == []  # nothing partial is visible
    out = json.loads((await acli("backup", vol, "--json", repo=repo)).stdout)[0]["stats"]
    # The packs of the killed run were adopted, not uploaded again.
    assert out["new_bytes"] < out["bytes"]
    async with DockerClient.connect() as fresh:
        assert await _helpers_of_dead_owners(fresh) == 0  # the second run already removed the leftover helper
    await acli("compare", vol, repo=repo)  # the source is untouched and matches the committed snapshot


async def test_ctrl_c_mid_backup_restarts_containers(docker_client: DockerClient, make_volume: MakeVolume,
                                                     make_container: MakeContainer, repo: Path) -> None:
    vol = await make_volume()
    await fill(docker_client, vol, _big_volume_writer)
    ctr = await make_container([vol])
    env = {**os.environ, "VOLMOVE_REPO": str(repo)}
    proc = spawn([VOLMOVE, "backup", vol, "--stop"], env, stderr=subprocess.PIPE)

    async def is_stopped() -> bool:
        return not (await docker_client.inspect_container(ctr.id))["State"]["Running"]

    deadline = time.monotonic() + 60
    while not await is_stopped():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    _, err = await asyncio.to_thread(proc.communicate, timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err
    assert (await docker_client.inspect_container(ctr.id))["State"]["Running"]
    assert json.loads((await acli("snapshots", "--json", repo=repo)).stdout) == []


@pytest.mark.s3
async def test_s3_round_trip_and_errors(docker_client: DockerClient, make_volume: MakeVolume, s3_url: str) -> None:
    src = await make_volume()
    await fill(docker_client, src, make_tree)
    await acli("init", repo=s3_url)
    await acli("backup", src, repo=s3_url)
    target = await make_volume()
    await acli("restore", src, "--as", target, "--force", repo=s3_url)
    assert await state_of(docker_client, target) == await state_of(docker_client, src)
    bad = {"AWS_SECRET_ACCESS_KEY": "wrong-secret-key-0000000000000000000000"}
    assert one_line_error(await acli("snapshots", repo=s3_url, env=bad, check=6))
    missing = s3_url.replace("s3://", "s3://no-such-bucket-", 1)
    assert "does not exist" in one_line_error(await acli("snapshots", repo=missing, check=8))


async def test_backup_of_a_restored_copy_stores_no_new_data(docker_client: DockerClient, make_volume: MakeVolume,
                                                            repo: Path) -> None:
    src = await make_volume()
    await fill(docker_client, src, lambda root: [(root / f"f{i}").write_bytes(os.urandom(300_000)) for i in range(10)])
    first = json.loads((await acli("backup", src, "--json", repo=repo)).stdout)[0]["stats"]
    target = await make_volume()
    await acli("restore", src, "--as", target, "--force", repo=repo)
    again = json.loads((await acli("backup", target, "--json", repo=repo)).stdout)[0]["stats"]
    assert again["skipped_files"] == 0  # a different volume: every file was read...
    assert again["new_bytes"] == 0  # ...and every chunk was already stored
    assert again["stored_bytes"] < first["stored_bytes"] / 100


async def test_volumes_lists_users_and_last_backup(docker_client: DockerClient, make_volume: MakeVolume,
                                                   make_container: MakeContainer, repo: Path) -> None:
    used, dangling = await make_volume(), await make_volume()
    ctr = await make_container([used])
    await fill(docker_client, used, lambda root: (root / "f").write_bytes(b"x" * 5000))
    await acli("backup", used, repo=repo)
    rows = {r["name"]: r for r in json.loads((await acli("volumes", "--json", repo=repo)).stdout)}
    assert rows[used]["containers"] == [ctr.name] and rows[used]["running"] == [ctr.name]
    assert not rows[used]["dangling"] and rows[dangling]["dangling"]
    assert rows[used]["last_backup"] is not None and 0 <= rows[used]["age_seconds"] < 600
    assert rows[dangling]["last_backup"] is None


async def test_containers_stopped_by_a_killed_run_are_restarted_by_the_next(
        docker_client: DockerClient, make_volume: MakeVolume, make_container: MakeContainer, repo: Path,
        tmp_path: Path) -> None:
    vol = await make_volume()
    await fill(docker_client, vol, _big_volume_writer)
    ctr = await make_container([vol])
    env = {**os.environ, "VOLMOVE_REPO": str(repo), "VOLMOVE_STATE_DIR": str(tmp_path / "state")}
    proc = spawn([VOLMOVE, "backup", vol, "--stop"], env, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while (await docker_client.inspect_container(ctr.id))["State"]["Running"]:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    proc.kill()  # no finally runs: only the journal knows the container was stopped by volmove
    await asyncio.to_thread(proc.wait)
    assert not (await docker_client.inspect_container(ctr.id))["State"]["Running"]
    other = await make_volume()
    await acli("backup", other, repo=repo, env={"VOLMOVE_STATE_DIR": str(tmp_path / "state")})
    assert (await docker_client.inspect_container(ctr.id))["State"]["Running"]
    assert not list((tmp_path / "state").glob("*.json"))  # the journal is gone once it is done
