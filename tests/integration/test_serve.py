"""`volmove serve`: one host, no broker — the scheduler, the API, /metrics and a
worker in one process, on the real Docker engine and a local-directory repository."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import pytest

from tests.fixtures.docker import MakeVolume
from tests.fixtures.mqtt import free_port
from tests.fleet.harness import wait_for
from tests.fleet.schedule_harness import ID, FakeClock, sample
from volmove.core.docker import DockerClient
from volmove.core.fleet.jobs import Job, Phase
from volmove.core.repository import Repository, init_repository
from volmove.core.storage import open_storage
from volmove.service.automation import AutomationConfig
from volmove.service.client import ServiceClient
from volmove.service.embedded import LocalBus, OneHost, ServeConfig, matches, prepare

pytestmark = [pytest.mark.docker, pytest.mark.timeout(180)]
BIN = Path(sys.executable).parent
HOST = f"solo-{ID}"


def new_repo(path: Path) -> str:
    init_repository(open_storage(str(path), create=True))
    return str(path)


@pytest.fixture
async def one_host(docker_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[OneHost]:
    monkeypatch.setenv("VOLMOVE_STATE_DIR", str(tmp_path / "state"))  # prepare() points it at the worker's
    clock = FakeClock(datetime(2026, 11, 20, 2, tzinfo=UTC))
    cfg = ServeConfig(host=HOST, repo=new_repo(tmp_path / "repo"), state_dir=tmp_path / "state",
                      docker_url=docker_url, listen_port=free_port(),
                      automation=AutomationConfig(clock=clock, interval=3600))
    async with DockerClient.connect(docker_url) as docker:
        await prepare(cfg, docker)
        one = OneHost(cfg, docker)
        task = asyncio.create_task(one.run())
        try:
            yield one
        finally:
            task.cancel()
            await asyncio.wait([task])


def test_topic_filters_match_like_mqtt() -> None:
    assert matches("volmove/v1/hosts/+/status", "volmove/v1/hosts/h1/status")
    assert not matches("volmove/v1/hosts/+/status", "volmove/v1/hosts/h1/events")
    assert not matches("volmove/v1/hosts/+/status", "volmove/v1/hosts/h1/status/x")
    assert matches("volmove/#", "volmove/v1/cmd/h1") and matches("volmove/v1/#", "volmove/v1")
    assert matches("volmove/v1/cmd/h1", "volmove/v1/cmd/h1") and not matches("volmove/v1/cmd/h1", "volmove/v1/cmd")


async def test_the_bus_keeps_retained_messages_for_later_subscribers() -> None:
    from volmove.core.fleet.mqtt import BrokerConfig, Link

    got: list[tuple[str, bytes, bool]] = []

    async def on_message(topic: str, payload: bytes, retain: bool) -> None:
        got.append((topic, payload, retain))

    bus = LocalBus()
    sender = bus.attach(Link(BrokerConfig(), "a"))
    sender.connected.set()
    await sender.publish("t/h1/status", b"up", retain=True)
    await sender.publish("t/h1/events", b"e1")  # nobody subscribed yet: gone, as with MQTT
    receiver = bus.attach(Link(BrokerConfig(), "b", subscriptions=["t/+/status", "t/+/events"],
                               on_message=on_message))
    await sender.publish("t/h1/events", b"e2")
    task = asyncio.create_task(receiver.run())
    await wait_for(lambda: _count(got, 2), 5, "two messages")
    task.cancel()
    await asyncio.wait([task])
    # e2 was queued when it was published (the link exists, as a persistent session); the retained one on start
    assert got == [("t/h1/events", b"e2", False), ("t/h1/status", b"up", True)]


async def _count(items: list[tuple[str, bytes, bool]], n: int) -> bool:
    return len(items) >= n


async def test_serve_runs_a_scheduled_backup_without_a_broker(one_host: OneHost, make_volume: MakeVolume) -> None:
    service, clock = one_host.service, one_host.service.cfg.automation.clock
    assert isinstance(clock, FakeClock)
    volume = await make_volume("served")
    url = f"http://127.0.0.1:{one_host.service.cfg.listen_port}"
    await wait_for(lambda: _listed(service.engine, volume), 30, f"{volume} in the inventory")
    async with ServiceClient(url) as api:
        await api.add_schedule({"name": "solo", "cron": "0 3 * * *", "volumes": [volume]})
        await service.automation.scheduler.tick()
        clock.set("2026-11-20T03:00:30")
        (fired,) = [s for s in await service.automation.scheduler.tick() if s.action == "fire"]
        job = await _done(service.engine, fired.state.last_job or "")
        listed = await api.schedules()
    assert job.phase is Phase.SUCCEEDED and job.host == HOST
    (snap,) = Repository.open(open_storage(one_host.agent.cfg.repo)).list_snapshots(volume)
    assert snap.id == job.result["snapshot"] and "schedule=solo" in snap.tags
    assert listed[0]["targets"][0]["last_job"] == job.id
    text = await scrape(url, "volmove_backup_last_success_timestamp_seconds", host=HOST, volume=volume)
    assert sample(text, "volmove_backup_last_success_timestamp_seconds", host=HOST, volume=volume) == \
        pytest.approx(job.finished_at)
    assert sample(text, "volmove_host_up", host=HOST) == 1 and sample(text, "volmove_broker_connected") == 1


async def scrape(url: str, name: str, **labels: str) -> str:
    """GET /metrics until a sample is there: the service records a job's ending just after it stores it."""
    async def text() -> str | None:
        async with aiohttp.ClientSession() as http, http.get(url + "/metrics") as resp:
            body = await resp.text()
        return body if sample(body, name, **labels) is not None else None
    return await wait_for(text, 10, f"{name} {labels} in /metrics")


async def _listed(engine: object, volume: str) -> bool:
    host = getattr(engine, "hosts", {}).get(HOST)
    return bool(host and host.online and host.inventory and host.inventory.volume(volume))


async def _done(engine: object, job_id: str) -> Job:
    async def ended() -> Job | None:
        job: Job | None = getattr(engine, "jobs", {}).get(job_id)
        return job if job is not None and job.terminal else None
    return await wait_for(ended, 60, f"job {job_id}", interval=0.1)


@pytest.mark.slow
async def test_volmove_serve_as_a_command(docker_url: str, tmp_path: Path, make_volume: MakeVolume) -> None:
    volume = await make_volume("cmd")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "VOLMOVE_REPO": new_repo(tmp_path / "repo"), "VOLMOVE_STATE_DIR": str(tmp_path / "state"),
           "DOCKER_HOST": docker_url, "VOLMOVE_HOST": HOST, "VOLMOVE_SERVICE": url}
    env.pop("VOLMOVE_BROKER", None)
    log = (tmp_path / "serve.log").open("wb")
    proc = await asyncio.create_subprocess_exec(str(BIN / "volmove"), "serve", "--listen", f"127.0.0.1:{port}",
                                                env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        await wait_for(lambda: _inventory_lists(url, volume), 60, "the served host's inventory")
        await cli("schedule", "add", "daily", "--cron", "@daily", "--volume", volume, "--keep-last", "3", env=env)
        (started,) = json.loads(await cli("schedule", "run", "daily", "--json", env=env))
        async with ServiceClient(url) as api:
            job = await api.wait(started["job"])
        assert job["phase"] == "succeeded", job
        text = await scrape(url, "volmove_backup_last_bytes", host=HOST, volume=volume)
        assert sample(text, "volmove_backup_last_bytes", host=HOST, volume=volume) == 0
        ls = json.loads(await cli("schedule", "ls", "--json", env=env))
        assert ls[0]["name"] == "daily" and ls[0]["keep"] == {"last": 3}
        shown = await cli("schedule", "ls", env=env)
        assert "daily" in shown and "@daily" in shown
        await cli("schedule", "rm", "daily", env=env)
        assert json.loads(await cli("schedule", "ls", "--json", env=env)) == []
    finally:
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), 20)
        log.close()
    assert code == 0, (tmp_path / "serve.log").read_text()


async def cli(*args: str, env: dict[str, str]) -> str:
    proc = await asyncio.create_subprocess_exec(str(BIN / "volmove"), *args, env=env, stdout=subprocess.PIPE,
                                                stderr=subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode == 0, f"volmove {' '.join(args)}: {err.decode()}"
    return out.decode()


async def _inventory_lists(url: str, volume: str) -> bool:
    try:
        async with ServiceClient(url, timeout=2) as api:
            inventory = (await api.host(HOST))["inventory"] or []
    except Exception:
        return False
    return any(v["name"] == volume for v in inventory)
