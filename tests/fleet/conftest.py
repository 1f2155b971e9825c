"""Fixtures of the multi-host harness (see harness.py)."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from tests.conftest import require_or_skip
from tests.fixtures.mqtt import Broker
from tests.fleet.harness import Fleet, cleanup_engine, prepare_engine, start_engine
from volmove.core.errors import VolmoveError
from volmove.core.repository import init_repository
from volmove.core.storage import open_storage

HOSTS = ("h1", "h2", "h3")
MakeFleet = Callable[..., Fleet]


@pytest.fixture(scope="session")
def engines() -> dict[str, str]:
    """Three independent Docker engines (host name -> DOCKER_HOST), each with the helper image."""
    try:
        urls = {h: start_engine(f"fleet-{h}") for h in HOSTS}
        for url in urls.values():
            asyncio.run(prepare_engine(url))
    except (subprocess.CalledProcessError, OSError, VolmoveError) as exc:
        require_or_skip(f"extra Docker engines ({exc})")
    return urls


def new_repo(url: str) -> str:
    init_repository(open_storage(url, create=True))
    return url


@pytest.fixture
async def make_fleet(engines: dict[str, str], tmp_path: Path) -> AsyncIterator[MakeFleet]:
    """``make_fleet(broker, repo=None, broker_env=None)``: a Fleet, stopped and cleaned after the test."""
    made: list[Fleet] = []

    def make(broker: Broker, repo: str | None = None, broker_env: dict[str, str] | None = None) -> Fleet:
        directory = tmp_path / f"fleet{len(made)}"
        directory.mkdir()
        fleet = Fleet(directory, broker, engines, repo or new_repo(str(directory / "repo")),
                      broker_env=dict(broker_env or {}))
        made.append(fleet)
        return fleet

    yield make
    for fleet in made:
        fleet.stop_all()
        print(fleet.logs())  # shown when the test failed
    for url in engines.values():
        await cleanup_engine(url)


@pytest.fixture
async def fleet(make_fleet: MakeFleet, mqtt_broker: Broker) -> Fleet:
    """Broker, service and a worker on each of three hosts, all online; the repository a shared directory."""
    f = make_fleet(mqtt_broker)
    return await started(f)


async def started(f: Fleet, hosts: tuple[str, ...] = HOSTS, **worker_env: str) -> Fleet:
    f.start_service()
    for host in hosts:
        f.start_worker(host, **worker_env)
    await f.wait_service()
    await f.wait_hosts(list(hosts))
    return f
