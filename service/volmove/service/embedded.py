"""One host, no broker: the service and a worker in one process (``volmove serve``).

The two talk through an in-process bus with the parts of MQTT they rely on —
topic filters with ``+`` and ``#``, retained messages delivered on
subscription, one ordered queue per subscriber — so the service, its
scheduler and the worker run unchanged; only their ``Link`` is swapped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from volmove.core.docker import DockerClient
from volmove.core.errors import UnreachableError
from volmove.core.fleet.mqtt import BrokerConfig, Link
from volmove.core.fleet.topics import check_host
from volmove.core.ops import prepare_host
from volmove.service.automation import AutomationConfig
from volmove.service.main import Service, ServiceConfig
from volmove.workers.agent import Agent, WorkerConfig
from volmove.workers.execute import open_repository

log = logging.getLogger(__name__)
LOCAL_BROKER = BrokerConfig.from_url("mqtt://in-process")  # never dialled: only named in log lines


def matches(pattern: str, topic: str) -> bool:
    """MQTT topic filter matching: ``+`` is one level, a final ``#`` any number (also none)."""
    want, have = pattern.split("/"), topic.split("/")
    for i, part in enumerate(want):
        if part == "#":
            return True
        if i >= len(have) or (part != "+" and part != have[i]):
            return False
    return len(want) == len(have)


class LocalBus:
    def __init__(self) -> None:
        self.links: list[LocalLink] = []
        self.retained: dict[str, bytes] = {}

    def attach(self, link: Link) -> LocalLink:
        """A bus link with the callbacks and subscriptions of ``link`` (made for a broker)."""
        local = LocalLink(self, link)
        self.links.append(local)
        return local

    def publish(self, topic: str, payload: bytes, retain: bool) -> None:
        if retain:
            if payload:
                self.retained[topic] = payload
            else:
                self.retained.pop(topic, None)  # MQTT: an empty retained message clears the topic
        for link in self.links:
            if link.wants(topic):
                link.queue.put_nowait((topic, payload, False))


class LocalLink(Link):
    def __init__(self, bus: LocalBus, like: Link) -> None:
        super().__init__(like.cfg, like.client_id, subscriptions=like.subscriptions, on_message=like.on_message,
                         on_connect=like.on_connect, will=like.will, backoff=like.backoff)
        self.bus = bus
        self.queue: asyncio.Queue[tuple[str, bytes, bool]] = asyncio.Queue()  # filled from the start: nothing lost

    def wants(self, topic: str) -> bool:
        return any(matches(p, topic) for p in self.subscriptions)

    async def run(self) -> NoReturn:
        for topic, payload in list(self.bus.retained.items()):
            if self.wants(topic):
                self.queue.put_nowait((topic, payload, True))
        self.connections += 1
        self.connected.set()
        if self.on_connect is not None:
            await self.on_connect()
        while True:
            topic, payload, retain = await self.queue.get()
            if self.on_message is not None:
                await self.on_message(topic, payload, retain)

    async def connect_once(self) -> None:
        return None

    async def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        if not self.connected.is_set():
            raise UnreachableError("the in-process bus is not started yet")
        self.bus.publish(topic, payload, retain)


# ------------------------------------------------------------------ serve


@dataclass(frozen=True)
class ServeConfig:
    host: str
    repo: str
    state_dir: Path
    docker_url: str | None = None
    listen_host: str = "127.0.0.1"
    listen_port: int = 8470
    token: str | None = None
    capacity: int = 2
    automation: AutomationConfig = field(default_factory=AutomationConfig)


def service_config(cfg: ServeConfig) -> ServiceConfig:
    return ServiceConfig(broker=LOCAL_BROKER, db=cfg.state_dir / "service.db", listen_host=cfg.listen_host,
                         listen_port=cfg.listen_port, token=cfg.token, automation=cfg.automation)


def worker_config(cfg: ServeConfig) -> WorkerConfig:
    return WorkerConfig(host=check_host(cfg.host), broker=LOCAL_BROKER, repo=cfg.repo,
                        state_dir=cfg.state_dir / "worker" / cfg.host, docker_url=cfg.docker_url,
                        capacity=cfg.capacity)


class OneHost:
    """The service (scheduler, API, metrics) and this host's worker, joined by a LocalBus."""

    def __init__(self, cfg: ServeConfig, docker: DockerClient) -> None:
        bus = LocalBus()
        self.service = Service(service_config(cfg))
        self.service.link = bus.attach(self.service.link)
        self.agent = Agent(worker_config(cfg), docker)
        self.agent.link = bus.attach(self.agent.link)

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.service.run(), name="service")
            tg.create_task(self.agent.run(), name="worker")


async def prepare(cfg: ServeConfig, docker: DockerClient) -> None:
    """What the worker does before it starts: a wrong repository fails here, with its own message."""
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    os.environ["VOLMOVE_STATE_DIR"] = str(cfg.state_dir / "worker" / cfg.host)  # container journals, per host
    repo = await asyncio.to_thread(open_repository, cfg.repo)
    await prepare_host(docker, repo)


async def serve(cfg: ServeConfig) -> None:
    """Run until SIGTERM or SIGINT; then stop everything and return."""
    async with DockerClient.connect(cfg.docker_url) as docker:
        await prepare(cfg, docker)
        main = asyncio.ensure_future(OneHost(cfg, docker).run())
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, main.cancel)
        log.info("serving host %s on http://%s:%d (no broker)", cfg.host, cfg.listen_host, cfg.listen_port)
        with contextlib.suppress(asyncio.CancelledError):
            await main
