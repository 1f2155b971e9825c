"""The host's inventory (volumes with size, driver, labels and users), kept current
from Docker's event stream, with a periodic refresh as a safety net."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime

import aiohttp

from volmove.core.docker import DockerClient
from volmove.core.errors import UnreachableError, VolmoveError
from volmove.core.fleet.protocol import Inventory, VolumeEntry
from volmove.core.fleet.schedule import SCHEDULE_LABEL
from volmove.core.ops import VolumeRow, list_volume_rows

log = logging.getLogger(__name__)

DEBOUNCE = 0.5  # events come in bursts (a container start emits several)
EVENT_FILTERS = json.dumps({"type": ["volume", "container"]})
Publish = Callable[[Inventory], Awaitable[None]]


async def build(docker: DockerClient, host: str) -> Inventory:
    rows = await list_volume_rows(docker, None, datetime.now(UTC))
    volumes = [VolumeEntry(r.name, r.driver, r.size, dict(r.labels), r.containers, r.running,
                           await _container_schedules(docker, r)) for r in rows]
    return Inventory(host, time.time(), tuple(volumes))


async def _container_schedules(docker: DockerClient, row: VolumeRow) -> tuple[str, ...]:
    """The schedule labels of the volume's containers: the service selects volumes by them."""
    if not row.containers:
        return ()
    users = await docker.containers_using(row.name)
    return tuple(sorted({u.labels[SCHEDULE_LABEL] for u in users if u.labels.get(SCHEDULE_LABEL)}))


def relevant(event: object) -> bool:
    """Whether an engine event can change the inventory; volmove's own helpers cannot."""
    if not isinstance(event, dict):
        return False
    attrs = (event.get("Actor") or {}).get("Attributes") or {}
    if attrs.get("volmove.helper") == "1":
        return False
    return not (event.get("Type") == "volume" and event.get("Action") in ("mount", "unmount"))


async def docker_events(url: str) -> AsyncIterator[None]:
    """One item per relevant volume or container event; ends when the stream breaks.

    Only unix-socket engines are watched; elsewhere the periodic refresh serves.
    """
    if not url.startswith("unix://"):
        await asyncio.Event().wait()
    connector = aiohttp.UnixConnector(path=url.removeprefix("unix://"))
    timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
    try:
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session, \
                session.get("http://docker/events", params={"filters": EVENT_FILTERS}) as response:
            async for line in response.content:
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if relevant(event):
                    yield
    except (aiohttp.ClientError, OSError) as exc:
        raise UnreachableError(f"Docker event stream at {url} broke: {exc}") from None


class InventoryWatcher:
    def __init__(self, docker: DockerClient, host: str, publish: Publish, interval: float = 60.0) -> None:
        self.docker = docker
        self.host = host
        self.publish = publish
        self.interval = interval
        self.current: Inventory | None = None
        self._changed = asyncio.Event()

    async def refresh(self, force: bool = False) -> None:
        try:
            inv = await build(self.docker, self.host)
        except VolmoveError as exc:
            log.warning("inventory of %s failed: %s", self.host, exc)
            return
        if force or self.current is None or inv.volumes != self.current.volumes:
            self.current = inv
            await self.publish(inv)

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._watch_events(), name="docker-events")
            while True:
                await self.refresh()
                try:
                    async with asyncio.timeout(self.interval):
                        await self._changed.wait()
                except TimeoutError:
                    pass
                await asyncio.sleep(DEBOUNCE)
                self._changed.clear()

    async def _watch_events(self) -> None:
        while True:
            try:
                async for _ in docker_events(self.docker.url):
                    self._changed.set()
            except UnreachableError as exc:
                log.warning("%s; retrying", exc)
            self._changed.set()  # something may have changed while we were not watching
            await asyncio.sleep(2.0)
