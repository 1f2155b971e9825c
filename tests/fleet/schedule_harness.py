"""Helpers for schedule tests: the real service run in the test's process, so its
scheduler's clock is the test's (the workers, broker and engines stay real
processes), a webhook receiver, and reading Prometheus text."""

from __future__ import annotations

import asyncio
import io
import re
import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
from aiohttp import web

from tests.fleet.harness import Fleet, wait_for
from volmove.core.fleet import schedule as S
from volmove.core.fleet.jobs import Job, Timing
from volmove.core.fleet.mqtt import Backoff, BrokerConfig
from volmove.core.fleet.protocol import VolumeEntry
from volmove.service.automation import AutomationConfig
from volmove.service.main import Service, ServiceConfig
from volmove.service.metrics import Alerting

JSON = dict[str, Any]
ID = secrets.token_hex(3)  # the engines are shared: names and label values of this run carry it


def uname(name: str) -> str:
    return f"{name}-{ID}"


class FakeClock:
    """The scheduler's clock; only the test moves it."""

    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def set(self, text: str) -> None:
        self.now = datetime.fromisoformat(text).replace(tzinfo=UTC)

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


@dataclass
class LiveService:
    service: Service
    task: asyncio.Task[None]
    clock: FakeClock
    url: str

    @property
    def engine(self) -> Any:
        return self.service.engine

    async def tick(self) -> list[S.Step]:
        async with _bounded("a scheduler pass"):
            return await self.service.automation.scheduler.tick()

    async def stop(self) -> None:
        self.task.cancel()
        async with _bounded("the service to stop"):
            await asyncio.wait([self.task])

    def jobs(self, kind: str | None = None, volume: str | None = None) -> list[Job]:
        return sorted((j for j in self.engine.jobs.values() if kind in (None, j.kind)
                       and volume in (None, j.params.get("volume"))), key=lambda j: j.created)

    async def done(self, job_id: str, within: float = 90) -> Job:
        async def ended() -> Job | None:
            job: Job | None = self.engine.jobs.get(job_id)
            return job if job is not None and job.terminal else None
        return await wait_for(ended, within, f"job {job_id} to end", interval=0.1)

    async def inventory_has(self, host: str, volume: str, within: float = 20,
                            where: Callable[[VolumeEntry], bool] = lambda _v: True) -> VolumeEntry:
        async def listed() -> VolumeEntry | None:
            h = self.engine.hosts.get(host)
            entry = h.inventory.volume(volume) if h is not None and h.inventory is not None else None
            return entry if entry is not None and where(entry) else None
        return await wait_for(listed, within, f"{volume} in {host}'s inventory")

    async def get(self, path: str) -> tuple[int, str]:
        async with aiohttp.ClientSession() as http, http.get(self.url + path) as resp:
            return resp.status, await resp.text()

    async def metrics(self, until: str | None = None, **labels: str) -> str:
        """GET /metrics; with ``until``, again until that sample is there (an ending is recorded just
        after the engine stores it)."""
        async def scrape() -> str | None:
            status, text = await self.get("/metrics")
            assert status == 200
            return text if until is None or sample(text, until, **labels) is not None else None
        return await wait_for(scrape, 10, f"{until} {labels} in /metrics")


@asynccontextmanager
async def _bounded(what: str, within: float = 60) -> AsyncIterator[None]:
    """Fail instead of hanging the suite, with every task's stack to say where it waited."""
    try:
        async with asyncio.timeout(within):
            yield
    except TimeoutError:
        stacks = io.StringIO()
        for task in asyncio.all_tasks():
            task.print_stack(limit=8, file=stacks)
        raise AssertionError(f"timed out after {within}s waiting for {what}; tasks:\n{stacks.getvalue()}") from None


async def start_service(fleet: Fleet, clock: FakeClock, hosts: tuple[str, ...] = (), **automation: Any) -> LiveService:
    """The service in this process; its scheduler only moves when the test calls ``tick``."""
    automation.setdefault("alerting", Alerting())
    cfg = ServiceConfig(
        broker=BrokerConfig.from_url(fleet.broker.url, keepalive=2), db=fleet.dir / "service.db",
        listen_port=fleet.service_port, timing=Timing(ack_timeout=2), backoff=Backoff(maximum=1),
        automation=AutomationConfig(clock=clock, interval=3600, **automation))
    service = Service(cfg)
    live = LiveService(service, asyncio.create_task(service.run()), clock, fleet.service_url)
    await fleet.wait_service()
    await wait_for(lambda: _online(live, hosts), 30, f"hosts {hosts} online with inventories")
    return live


async def _online(live: LiveService, hosts: tuple[str, ...]) -> bool:
    known = live.engine.hosts
    return all(h in known and known[h].online and known[h].inventory is not None for h in hosts)


# ----------------------------------------------------------------- webhook


@dataclass
class Receiver:
    url: str
    bodies: list[JSON] = field(default_factory=list)

    async def event(self, name: str, within: float = 30, **match: Any) -> JSON:
        def found() -> JSON | None:
            return next((b for b in self.bodies if b.get("event") == name
                         and all(b.get(k) == v for k, v in match.items())), None)

        async def check() -> JSON | None:
            return found()
        return await wait_for(check, within, f"a {name} webhook {match}")


@asynccontextmanager
async def webhook_receiver() -> AsyncIterator[Receiver]:
    """A tiny HTTP server on 127.0.0.1 that keeps every JSON body POSTed to it."""
    receiver = Receiver("")

    async def post(request: web.Request) -> web.Response:
        receiver.bodies.append(await request.json())
        return web.Response(status=204)

    app = web.Application()
    app.add_routes([web.post("/hook", post)])
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    receiver.url = f"http://127.0.0.1:{port}/hook"
    try:
        yield receiver
    finally:
        await runner.cleanup()


# ----------------------------------------------------------------- metrics


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in Prometheus text, or None if it is not there."""
    for line in text.splitlines():
        m = re.fullmatch(rf"{re.escape(name)}(?:\{{(.*)\}})? (\S+)", line)
        if m and dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m[1] or "")) == labels:
            return float(m[2])
    return None
