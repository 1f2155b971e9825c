"""volmove-worker: the agent that runs fleet jobs against this host's Docker engine.

    volmove-worker --host h1 --broker mqtt://broker:1883 --repo s3://bucket/repo

Every option has an environment variable (shown in --help). Exit codes are
those of volmove's errors (6: the broker refused the credentials).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from pathlib import Path

from volmove.core.daemon import run_daemon
from volmove.core.docker import DockerClient
from volmove.core.errors import VolmoveError
from volmove.core.fleet.mqtt import Backoff, BrokerConfig
from volmove.core.fleet.topics import DEFAULT_PREFIX, check_host
from volmove.core.ops import prepare_host
from volmove.core.repository import default_host
from volmove.workers import faults
from volmove.workers.agent import Agent, WorkerConfig
from volmove.workers.execute import open_repository

log = logging.getLogger("volmove.workers")


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(name) or default


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="volmove-worker", description="Run volmove fleet jobs on this Docker host.")
    p.add_argument("--host", default=_env("VOLMOVE_HOST"), help="this host's name in the fleet [$VOLMOVE_HOST]")
    p.add_argument("--broker", default=_env("VOLMOVE_BROKER", "mqtt://127.0.0.1:1883"),
                   help="mqtt://[user[:password]@]host:port or mqtts://… [$VOLMOVE_BROKER]")
    p.add_argument("--broker-user", default=_env("VOLMOVE_BROKER_USER"), help="[$VOLMOVE_BROKER_USER]")
    p.add_argument("--broker-password-file", default=_env("VOLMOVE_BROKER_PASSWORD_FILE"),
                   help="file holding the broker password [$VOLMOVE_BROKER_PASSWORD_FILE; "
                        "or $VOLMOVE_BROKER_PASSWORD]")
    p.add_argument("--broker-ca", default=_env("VOLMOVE_BROKER_CA"), help="CA file for mqtts:// [$VOLMOVE_BROKER_CA]")
    p.add_argument("--keepalive", type=int, default=int(_env("VOLMOVE_KEEPALIVE", "10") or 10),
                   help="MQTT keepalive in seconds; the host shows offline within 1.5x this [$VOLMOVE_KEEPALIVE]")
    p.add_argument("--repo", default=_env("VOLMOVE_REPO"), help="repository URL [$VOLMOVE_REPO]")
    p.add_argument("--docker", default=_env("DOCKER_HOST"), help="Docker engine URL [$DOCKER_HOST]")
    p.add_argument("--capacity", type=int, default=int(_env("VOLMOVE_WORKER_CAPACITY", "2") or 2),
                   help="jobs run at once on this host [$VOLMOVE_WORKER_CAPACITY]")
    p.add_argument("--state-dir", default=_env("VOLMOVE_STATE_DIR", "/var/lib/volmove"),
                   help="where job records and container journals live [$VOLMOVE_STATE_DIR]")
    p.add_argument("--topic-prefix", default=_env("VOLMOVE_TOPIC_PREFIX", DEFAULT_PREFIX))
    p.add_argument("--max-backoff", type=float, default=float(_env("VOLMOVE_MAX_BACKOFF", "30") or 30),
                   help="longest wait between reconnection attempts, seconds")
    return p


def config(args: argparse.Namespace) -> WorkerConfig:
    host = check_host(args.host or default_host())
    if not args.repo:
        raise VolmoveError("no repository: give --repo or set VOLMOVE_REPO")
    password = os.environ.get("VOLMOVE_BROKER_PASSWORD")
    if args.broker_password_file:
        password = Path(args.broker_password_file).read_text().strip()
    broker = BrokerConfig.from_url(args.broker, username=args.broker_user, password=password,
                                   ca_file=args.broker_ca, keepalive=args.keepalive)
    state = Path(args.state_dir) / "worker" / host
    return WorkerConfig(
        host=host, broker=broker, repo=args.repo, state_dir=state, docker_url=args.docker,
        capacity=max(1, args.capacity), prefix=args.topic_prefix, backoff=Backoff(maximum=args.max_backoff),
        faults=faults.parse(os.environ.get(faults.ENV, "")),
    )


async def serve(cfg: WorkerConfig) -> None:
    # Journals of stopped containers go next to the records, per host.
    os.environ["VOLMOVE_STATE_DIR"] = str(cfg.state_dir)
    repo = await asyncio.to_thread(open_repository, cfg.repo)  # fail fast on a wrong repository
    async with DockerClient.connect(cfg.docker_url) as docker:
        await prepare_host(docker, repo)
        agent = Agent(cfg, docker)
        await _run_until_signalled(agent)


async def _run_until_signalled(agent: Agent) -> None:
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()

    def stop() -> None:
        stopping.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    async with asyncio.TaskGroup() as tg:
        main = tg.create_task(agent.run(), name="agent")
        await _first(stopping, main)
        if not main.done():
            await agent.announce_offline()
            main.cancel()


async def _first(event: asyncio.Event, task: asyncio.Task[None]) -> None:
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait([waiter, task], return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    run_daemon("volmove-worker", lambda: serve(config(args)))
