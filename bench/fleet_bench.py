"""How many jobs a second the control service sustains with many workers.

    .venv/bin/python bench/fleet_bench.py --workers 100 --jobs 3000

Starts a Mosquitto broker and a volmove-service (unless --broker/--service
name running ones), then 100 lightweight simulated workers in this process:
real MQTT clients with their own session, Last Will, status and inventory,
that answer each job with accepted, started and a result, idempotently. Jobs
are submitted through the HTTP API; the figure is jobs finished (succeeded,
as the service recorded them) per second, from the first submission to the
last result.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from volmove.core.fleet import protocol as P
from volmove.core.fleet.mqtt import BrokerConfig, Link, WillMessage
from volmove.core.fleet.topics import Topics
from volmove.service.client import TERMINAL, ServiceClient

BIN = Path(sys.executable).parent
TOPICS = Topics()


class SimWorker:
    """A worker that does nothing but answer: measures the service and the broker, not Docker."""

    def __init__(self, host: str, broker: BrokerConfig) -> None:
        self.host = host
        self.done: dict[str, P.JobResult] = {}
        status = P.Status(host, "offline", host, time.time())
        self.link = Link(broker, f"sim-{host}", subscriptions=[TOPICS.cmd(host)], on_message=self.on_message,
                         on_connect=self.on_connect, will=WillMessage(TOPICS.status(host), P.encode(status)))

    async def on_connect(self) -> None:
        now = time.time()
        await self.link.publish(TOPICS.status(self.host), P.encode(P.Status(self.host, "online", self.host, now, 4)),
                                retain=True)
        await self.link.publish(TOPICS.inventory(self.host), P.encode(P.Inventory(self.host, now, ())), retain=True)

    async def on_message(self, _topic: str, payload: bytes, _retain: bool) -> None:
        msg = P.decode(payload)
        if isinstance(msg, P.RunJob):
            result = self.done.get(msg.job) or P.JobResult(msg.job, msg.attempt, "succeeded", {"simulated": True})
            if msg.job not in self.done:
                self.done[msg.job] = result
                await self._send(P.JobAccepted(msg.job, msg.attempt))
                await self._send(P.JobStarted(msg.job, msg.attempt))
            await self._send(result)

    async def _send(self, msg: P.Message) -> None:
        with contextlib.suppress(Exception):
            await self.link.publish(TOPICS.events(self.host), P.encode(msg))


@contextlib.contextmanager
def services(args: argparse.Namespace, tmp: Path) -> Iterator[tuple[str, str]]:
    procs: list[subprocess.Popen[bytes]] = []
    broker, service = args.broker, args.service
    try:
        if not broker:
            port = _free_port()
            (tmp / "m.conf").write_text(f"user root\nlistener {port} 127.0.0.1\nallow_anonymous true\n"
                                        f"max_queued_messages 100000\nmax_inflight_messages 1000\n")
            procs.append(subprocess.Popen(["/usr/sbin/mosquitto", "-c", str(tmp / "m.conf")],
                                          stderr=subprocess.DEVNULL))
            broker = f"mqtt://127.0.0.1:{port}"
        if not service:
            port = _free_port()
            procs.append(subprocess.Popen([str(BIN / "volmove-service"), "--broker", broker, "--db",
                                           str(tmp / "service.db"), "--listen", f"127.0.0.1:{port}"],
                                          env={"VOLMOVE_LOG": "WARNING", "PATH": "/usr/bin:/bin"}))
            service = f"http://127.0.0.1:{port}"
        yield broker, service
    finally:
        for proc in reversed(procs):
            proc.terminate()
            proc.wait()


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_hosts(api: ServiceClient, n: int) -> None:
    while True:
        with contextlib.suppress(Exception):
            hosts = await api.hosts()
            if sum(h["state"] == "online" for h in hosts if h["name"].startswith("sim")) >= n:
                return
        await asyncio.sleep(0.2)


async def count_finished(api: ServiceClient, ids: set[str], total: int, done: asyncio.Event,
                         phases: dict[str, str]) -> None:
    async for doc in api.watch():
        if doc["phase"] in TERMINAL:
            phases[doc["id"]] = doc["phase"]
            if len(phases) >= total and ids <= phases.keys():
                done.set()
                return


async def bench(args: argparse.Namespace, broker_url: str, service_url: str) -> None:
    broker = BrokerConfig.from_url(broker_url, keepalive=10)
    workers = [SimWorker(f"sim{i:03d}", broker) for i in range(args.workers)]
    async with asyncio.TaskGroup() as tg, ServiceClient(service_url, timeout=60) as api:
        links = [tg.create_task(w.link.run()) for w in workers]
        await wait_hosts(api, args.workers)
        ids: set[str] = set()
        done = asyncio.Event()
        phases: dict[str, str] = {}
        counter = tg.create_task(count_finished(api, ids, args.jobs, done, phases))
        await asyncio.sleep(0.5)  # the watch stream is open before the first job
        started = time.monotonic()
        slots = asyncio.Semaphore(args.concurrency)

        async def submit(i: int) -> None:
            async with slots:
                job = await api.submit("backup", workers[i % len(workers)].host, {"volume": "v"})
                ids.add(job["id"])

        await asyncio.gather(*(submit(i) for i in range(args.jobs)))
        submitted = time.monotonic() - started
        await done.wait()
        elapsed = time.monotonic() - started
        ok = sum(phases[i] == "succeeded" for i in ids)
        print(f"workers={args.workers} jobs={args.jobs} succeeded={ok} submitted_in={submitted:.2f}s "
              f"finished_in={elapsed:.2f}s -> {args.jobs / elapsed:.0f} jobs/s")
        counter.cancel()
        for link in links:
            link.cancel()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=100)
    p.add_argument("--jobs", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=32, help="API requests in flight")
    p.add_argument("--broker", help="mqtt://host:port of a running broker [default: start one]")
    p.add_argument("--service", help="URL of a running service [default: start one]")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="fleet-bench-"))
    try:
        with services(args, tmp) as (broker, service), contextlib.suppress(asyncio.CancelledError):
            asyncio.run(bench(args, broker, service))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
