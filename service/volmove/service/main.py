"""volmove-service: the control service (hosts, inventories, jobs, migrations).

    volmove-service --broker mqtt://broker:1883 --db /var/lib/volmove/service.db --listen 127.0.0.1:8470

One TaskGroup at the root runs the MQTT session, the engine, the clock tick,
the publisher and the HTTP API; SIGTERM cancels it and waits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from volmove.core.daemon import run_daemon
from volmove.core.errors import UnreachableError, UsageError
from volmove.core.fleet.jobs import Timing
from volmove.core.fleet.mqtt import Backoff, BrokerConfig, Link
from volmove.core.fleet.topics import DEFAULT_PREFIX, Topics
from volmove.service.api import Api
from volmove.service.automation import Automation, AutomationConfig, add_arguments, automation_config
from volmove.service.engine import Engine, Incoming, Tick
from volmove.service.store import Store

log = logging.getLogger("volmove.service")
PUBLISH_IN_FLIGHT = 200


@dataclass(frozen=True)
class ServiceConfig:
    broker: BrokerConfig
    db: Path
    listen_host: str = "127.0.0.1"
    listen_port: int = 8470
    prefix: str = DEFAULT_PREFIX
    timing: Timing = field(default_factory=Timing)
    tick: float = 0.5
    token: str | None = None
    backoff: Backoff = field(default_factory=Backoff)
    automation: AutomationConfig = field(default_factory=AutomationConfig)


class Service:
    def __init__(self, cfg: ServiceConfig) -> None:
        self.cfg = cfg
        self.topics = Topics(cfg.prefix)
        self.store = Store(cfg.db)
        self.engine = Engine(self.store, self.topics, cfg.timing)
        self.link = Link(
            cfg.broker, "volmove-service", on_message=self._on_message, backoff=cfg.backoff,
            subscriptions=[self.topics.all_hosts(k) for k in ("status", "inventory", "events")],
        )
        self.port = cfg.listen_port  # the bound port (useful with port 0)
        self.automation = Automation(self.engine, cfg.db, cfg.automation, lambda: self.link.connected.is_set())

    async def _on_message(self, topic: str, payload: bytes, _retain: bool) -> None:
        await self.engine.inbox.put(Incoming(topic, payload))

    async def run(self) -> None:
        await self.engine.load()
        await self.automation.load()
        runner = await self._start_http()
        try:
            async with asyncio.TaskGroup() as tg:
                for name, coro in (("mqtt", self.link.run()), ("engine", self.engine.run()),
                                   ("tick", self._tick()), ("publisher", self._publisher()),
                                   *self.automation.tasks()):
                    tg.create_task(_forever(name, coro), name=name)
        finally:
            await asyncio.shield(runner.cleanup())
            self.automation.close()
            self.store.close()

    async def _start_http(self) -> web.AppRunner:
        app = Api(self.engine, self.link.connected.is_set).app(self.cfg.token)
        self.automation.register(app)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, self.cfg.listen_host, self.cfg.listen_port)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise UsageError(f"cannot listen on {self.cfg.listen_host}:{self.cfg.listen_port}: {exc}") from None
        server = getattr(site, "_server", None)
        if server is not None and server.sockets:
            self.port = server.sockets[0].getsockname()[1]
        log.info("API on http://%s:%d", self.cfg.listen_host, self.port)
        return runner

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.tick)
            await self.engine.inbox.put(Tick())

    async def _publisher(self) -> None:
        """Sends in order; many in flight at once, so PUBACK round trips do not limit throughput."""
        slots = asyncio.Semaphore(PUBLISH_IN_FLIGHT)
        async with asyncio.TaskGroup() as tg:
            while True:
                topic, payload = await self.engine.outbox.get()
                await self.link.connected.wait()
                await slots.acquire()
                tg.create_task(self._publish(topic, payload, slots))

    async def _publish(self, topic: str, payload: bytes, slots: asyncio.Semaphore) -> None:
        try:
            await self.link.publish(topic, payload)
        except UnreachableError as exc:
            log.info("a message to %s was not sent (%s); the job machine sends it again", topic, exc)
        finally:
            slots.release()


async def _forever(name: str, coro: Coroutine[Any, Any, Any]) -> None:
    await coro
    raise RuntimeError(f"task {name} stopped unexpectedly")


def parser() -> argparse.ArgumentParser:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="volmove-service", description="The volmove fleet's control service.")
    p.add_argument("--broker", default=env("VOLMOVE_BROKER", "mqtt://127.0.0.1:1883"), help="[$VOLMOVE_BROKER]")
    p.add_argument("--broker-user", default=env("VOLMOVE_BROKER_USER"), help="[$VOLMOVE_BROKER_USER]")
    p.add_argument("--broker-password-file", default=env("VOLMOVE_BROKER_PASSWORD_FILE"),
                   help="[$VOLMOVE_BROKER_PASSWORD_FILE; or $VOLMOVE_BROKER_PASSWORD]")
    p.add_argument("--broker-ca", default=env("VOLMOVE_BROKER_CA"), help="CA file for mqtts:// [$VOLMOVE_BROKER_CA]")
    p.add_argument("--keepalive", type=int, default=int(env("VOLMOVE_KEEPALIVE") or 10))
    p.add_argument("--db", default=env("VOLMOVE_SERVICE_DB", "/var/lib/volmove/service.db"),
                   help="SQLite database [$VOLMOVE_SERVICE_DB]")
    p.add_argument("--listen", default=env("VOLMOVE_SERVICE_LISTEN", "127.0.0.1:8470"),
                   help="HOST:PORT of the HTTP API [$VOLMOVE_SERVICE_LISTEN]")
    p.add_argument("--topic-prefix", default=env("VOLMOVE_TOPIC_PREFIX", DEFAULT_PREFIX))
    p.add_argument("--ack-timeout", type=float, default=float(env("VOLMOVE_ACK_TIMEOUT") or 5.0),
                   help="seconds before a job a worker has not confirmed is sent again")
    p.add_argument("--max-backoff", type=float, default=float(env("VOLMOVE_MAX_BACKOFF") or 30.0))
    add_arguments(p)
    return p


def config(args: argparse.Namespace) -> ServiceConfig:
    password = os.environ.get("VOLMOVE_BROKER_PASSWORD")
    if args.broker_password_file:
        password = Path(args.broker_password_file).read_text().strip()
    broker = BrokerConfig.from_url(args.broker, username=args.broker_user, password=password,
                                   ca_file=args.broker_ca, keepalive=args.keepalive)
    host, _, port = args.listen.rpartition(":")
    if not port.isdigit():
        raise UsageError(f"invalid --listen {args.listen!r}: use HOST:PORT")
    Path(args.db).parent.mkdir(parents=True, exist_ok=True)
    return ServiceConfig(broker=broker, db=Path(args.db), listen_host=host or "127.0.0.1", listen_port=int(port),
                         prefix=args.topic_prefix, timing=Timing(ack_timeout=args.ack_timeout),
                         token=os.environ.get("VOLMOVE_SERVICE_TOKEN") or None,
                         backoff=Backoff(maximum=args.max_backoff), automation=automation_config(args))


async def serve(cfg: ServiceConfig) -> None:
    service = Service(cfg)
    main = asyncio.ensure_future(service.run())
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, main.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await main


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    run_daemon("volmove-service", lambda: serve(config(args)))
