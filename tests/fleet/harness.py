"""A multi-host harness: independent Docker engines as hosts, a real worker
process per host, the real service, a real Mosquitto, all on this machine.

Engines come from ``scripts/docker-engine.sh start-host NAME`` (kept running
between sessions, like hosts that stay powered on); processes are started per
test and stopped by their pid.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiodocker

from tests.fixtures.mqtt import Broker, free_port
from volmove.core.docker import DockerClient
from volmove.core.errors import VolmoveError
from volmove.service.client import ServiceClient

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
ENGINE_SCRIPT = ROOT / "scripts" / "docker-engine.sh"
KEEPALIVE = 2  # seconds: the host shows offline within 1.5x this after a silent death
# Other test runs may share these engines: everything a run makes carries its own id.
RUN = secrets.token_hex(3)
TEST_LABELS = {"volmove.test": "1", "volmove.fleet-test": RUN}
WRITER = ("trap 'exit 0' TERM; i=0; while true; do i=$((i+1)); echo $i > /data/counter; "
          "echo line $i >> /data/log; usleep 20000; done")
T = TypeVar("T")


def uniq(name: str) -> str:
    """A volume name of this test run."""
    return f"{name}-{RUN}"


def start_engine(name: str) -> str:
    out = subprocess.run(["sh", str(ENGINE_SCRIPT), "start-host", name], check=True, capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1]


async def prepare_engine(url: str) -> None:
    async with DockerClient.connect(url, connect_timeout=10) as docker:
        await docker.ensure_helper_image()


async def wait_for(check: Callable[[], Awaitable[T | None]], within: float, what: str,
                   interval: float = 0.05) -> T:
    deadline = time.monotonic() + within
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(interval)


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.popen.pid, sig)

    def stop(self, timeout: float = 15.0) -> None:
        self.signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.popen.wait()

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass
class Fleet:
    dir: Path
    broker: Broker
    engines: Mapping[str, str]  # host name -> DOCKER_HOST
    repo: str
    service_port: int = field(default_factory=free_port)
    workers: dict[str, Proc] = field(default_factory=dict)
    service: Proc | None = None
    broker_env: dict[str, str] = field(default_factory=dict)

    @property
    def service_url(self) -> str:
        return f"http://127.0.0.1:{self.service_port}"

    def env(self, **extra: str) -> dict[str, str]:
        env = {**os.environ, "VOLMOVE_BROKER": self.broker.url, "VOLMOVE_REPO": self.repo,
               "VOLMOVE_KEEPALIVE": str(KEEPALIVE), "VOLMOVE_MAX_BACKOFF": "1", "VOLMOVE_LOG": "INFO",
               **self.broker_env, **extra}
        env.pop("VOLMOVE_SERVICE", None)
        return env

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> Proc:
        log = self.dir / f"{name}.log"
        with log.open("ab") as out:  # the child keeps its own descriptor
            popen = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        return Proc(name, popen, log)

    def start_worker(self, host: str, capacity: int = 4, **env: str) -> Proc:
        if host in self.workers:
            self.workers[host].stop()  # reap the previous one (it may have been killed)
        proc = self._spawn(f"worker-{host}", [str(BIN / "volmove-worker"), "--host", host, "--capacity", str(capacity)],
                           self.env(DOCKER_HOST=self.engines[host], VOLMOVE_STATE_DIR=str(self.dir / "state"), **env))
        self.workers[host] = proc
        return proc

    def start_service(self, **env: str) -> Proc:
        if self.service is not None:
            self.service.stop()
        argv = [str(BIN / "volmove-service"), "--db", str(self.dir / "service.db"),
                "--listen", f"127.0.0.1:{self.service_port}", "--ack-timeout", "2"]
        self.service = self._spawn("service", argv, self.env(**env))
        return self.service

    def client(self) -> ServiceClient:
        return ServiceClient(self.service_url, timeout=10)

    async def wait_service(self) -> None:
        async def up() -> bool:
            try:
                async with self.client() as api:
                    await api.hosts()
                return True
            except Exception:
                return False
        await wait_for(up, 20, "the service's API")

    async def wait_hosts(self, names: list[str], state: str = "online", within: float = 20) -> list[dict[str, Any]]:
        async def ready() -> list[dict[str, Any]] | None:
            async with self.client() as api:
                hosts = {h["name"]: h for h in await api.hosts()}
            ok = all(n in hosts and hosts[n]["state"] == state and
                     (state != "online" or hosts[n]["volumes"] is not None) for n in names)
            return list(hosts.values()) if ok else None
        return await wait_for(ready, within, f"hosts {names} {state}")

    def stop_all(self) -> None:
        for proc in [*self.workers.values(), *([self.service] if self.service else [])]:
            proc.stop()

    def logs(self) -> str:
        procs = [*self.workers.values(), *([self.service] if self.service else [])]
        return "\n".join(f"--- {p.name}\n{p.output()[-4000:]}" for p in procs)

    def cli(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        env = {**self.env(), "VOLMOVE_SERVICE": self.service_url}
        out = subprocess.run([str(BIN / "volmove"), *args], env=env, capture_output=True, text=True, timeout=timeout)
        if check and out.returncode != 0:
            raise AssertionError(f"volmove {' '.join(args)} exited {out.returncode}: {out.stderr}\n{self.logs()}")
        return out

    def cli_proc(self, *args: str) -> subprocess.Popen[str]:
        """A long-running command (``jobs --watch``): stop it with terminate()."""
        env = {**self.env(), "VOLMOVE_SERVICE": self.service_url}
        return subprocess.Popen([str(BIN / "volmove"), *args], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True)

    def cli_json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "--json").stdout)


# ------------------------------------------------------------- volumes on engines


async def make_volume(url: str, name: str, files: Mapping[str, bytes] | None = None,
                      labels: Mapping[str, str] | None = None) -> None:
    async with DockerClient.connect(url) as docker:
        await docker.create_volume(name, labels={**TEST_LABELS, **(labels or {})})
    if files:
        script = " && ".join(f"printf '%s' '{data.decode()}' > /data/{path}" for path, data in files.items())
        await run_once(url, name, script)


async def run_once(url: str, volume: str, script: str) -> str:
    """Run a busybox shell with the volume at /data, wait for it, return its output."""
    async with aiodocker.Docker(url=url) as api:
        config = _config(volume, script)
        ctr = await api.containers.create(config)
        try:
            await ctr.start()
            await ctr.wait()
            return "".join(await ctr.log(stdout=True, stderr=True))
        finally:
            await ctr.delete(force=True)


async def start_writer(url: str, volume: str) -> str:
    async with aiodocker.Docker(url=url) as api:
        ctr = await api.containers.create(_config(volume, WRITER), name=f"writer-{volume}")
        await ctr.start()
        return str(ctr.id)


def _config(volume: str, script: str) -> dict[str, Any]:
    return {"Image": "volmove-helper:1", "Cmd": ["busybox", "sh", "-c", script], "Labels": TEST_LABELS,
            "HostConfig": {"Mounts": [{"Type": "volume", "Source": volume, "Target": "/data"}],
                           "NetworkMode": "none"}}


async def checksums(url: str, volume: str) -> str:
    """Every file's path, mode and md5 in the volume: equal strings mean equal data."""
    return await run_once(url, volume, "cd /data && find . | sort | while read f; do "
                                       "if [ -f \"$f\" ]; then md5sum \"$f\"; else echo \"$f\"; fi; done")


async def container_running(url: str, container: str) -> bool:
    async with aiodocker.Docker(url=url) as api:
        info = await api.containers.container(container).show()
        return bool(info["State"]["Running"])


async def volume_exists(url: str, name: str) -> bool:
    async with DockerClient.connect(url) as docker:
        return await docker.volume_exists(name)


async def cleanup_engine(url: str) -> None:
    """Remove what fleet tests made on an engine: their containers, then their volumes."""
    async with aiodocker.Docker(url=url) as api:
        flt = {"label": [f"volmove.fleet-test={RUN}"]}
        for ctr in await api.containers.list(all=True, filters=flt):
            await ctr.delete(force=True)
        vols = await api.volumes.list(filters=flt)
    async with DockerClient.connect(url) as docker:
        for vol in vols.get("Volumes") or []:
            with contextlib.suppress(VolmoveError):
                await docker.remove_volume(vol["Name"], force=True)
