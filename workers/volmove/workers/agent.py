"""The worker agent: one MQTT session, the host's inventory, and the jobs it runs.

Jobs run in the root TaskGroup, not inside the MQTT session, so a running job
survives a broker outage; what it reports waits in an outbox and its result
in its durable record, re-sent after every reconnect until the service
acknowledges it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from volmove.core.docker import DockerClient
from volmove.core.errors import UnreachableError, VolmoveError
from volmove.core.fleet import protocol as P
from volmove.core.fleet.mqtt import Backoff, BrokerConfig, Link, WillMessage
from volmove.core.fleet.topics import DEFAULT_PREFIX, Topics
from volmove.core.progress import Progress, ProgressFn
from volmove.workers import faults
from volmove.workers.execute import JobContext, execute
from volmove.workers.inventory import InventoryWatcher
from volmove.workers.records import JobRecord, RecordStore

log = logging.getLogger(__name__)
VERSION = "1"


@dataclass(frozen=True)
class WorkerConfig:
    host: str
    broker: BrokerConfig
    repo: str
    state_dir: Path
    docker_url: str | None = None
    capacity: int = 2
    prefix: str = DEFAULT_PREFIX
    progress_interval: float = 1.0
    inventory_interval: float = 60.0
    result_resend: float = 10.0
    backoff: Backoff = field(default_factory=Backoff)
    faults: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Outgoing:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False


async def forever(name: str, coro: Coroutine[Any, Any, Any]) -> None:
    """Run a task that should never end; its ending is a bug worth stopping for."""
    await coro
    log.error("task %s stopped", name)
    raise RuntimeError(f"task {name} stopped unexpectedly")


class Agent:
    def __init__(self, cfg: WorkerConfig, docker: DockerClient) -> None:
        self.cfg = cfg
        self.docker = docker
        self.topics = Topics(cfg.prefix)
        self.session = uuid.uuid4().hex
        self.store = RecordStore(cfg.state_dir / "jobs")
        self.records: dict[str, JobRecord] = {}
        self.unacked: dict[str, P.JobResult] = {}
        self.running: dict[str, asyncio.Task[dict[str, Any]]] = {}
        self.slots = asyncio.Semaphore(cfg.capacity)
        self.outbox: dict[tuple[str, str], Outgoing] = {}
        self.wake = asyncio.Event()
        self.last_progress: dict[str, float] = {}
        self.executions = 0  # jobs actually run by this process (tests count effects with it)
        self.stopping = False
        self._tg: asyncio.TaskGroup | None = None
        self.link = Link(
            cfg.broker, f"volmove-worker-{cfg.host}",
            subscriptions=[self.topics.cmd(cfg.host), self.topics.status(cfg.host)],
            on_message=self._on_message, on_connect=self._on_connect, backoff=cfg.backoff,
            will=WillMessage(self.topics.status(cfg.host), P.encode(self._status("offline"))),
        )
        self.inventory = InventoryWatcher(docker, cfg.host, self._publish_inventory, cfg.inventory_interval)

    # ------------------------------------------------------------------ life

    async def run(self) -> None:
        waiting = await self._recover()
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            tg.create_task(forever("mqtt", self.link.run()), name="mqtt")
            tg.create_task(forever("outbox", self._publisher()), name="outbox")
            tg.create_task(forever("inventory", self.inventory.run()), name="inventory")
            tg.create_task(forever("resend", self._resend_results()), name="resend")
            for rec in waiting:
                self._spawn(rec, P.parse_params(rec.kind, rec.params))

    async def announce_offline(self) -> None:
        """On a graceful stop: say so now rather than leave it to the Will (which a clean disconnect suppresses)."""
        self.stopping = True
        try:
            async with asyncio.timeout(2.0):
                await self.link.publish(self.topics.status(self.cfg.host), P.encode(self._status("offline")),
                                        retain=True)
        except (TimeoutError, UnreachableError):
            pass

    async def _recover(self) -> list[JobRecord]:
        """Load the records; a job that was running when the last process died failed."""
        self.records = await asyncio.to_thread(self.store.load_all)
        await asyncio.to_thread(self.store.prune, self.records, time.time())
        waiting = []
        for rec in list(self.records.values()):
            if rec.state == "running":
                error = P.JobError("interrupted", "the worker restarted during the job", transient=True)
                await self._finish(rec, P.JobResult(rec.job, rec.attempt, "failed", {}, error))
            elif rec.state == "done" and not rec.acked and rec.result:
                self.unacked[rec.job] = P.JobResult.parse(rec.result)
            elif rec.state == "accepted":
                waiting.append(rec)
        return waiting

    def _status(self, state: str) -> P.Status:
        return P.Status(self.cfg.host, "online" if state == "online" else "offline", self.session, time.time(),
                        self.cfg.capacity, VERSION)

    # ------------------------------------------------------------ outbound

    def _send(self, key: tuple[str, str], msg: P.Message, *, qos: int = 1, retain: bool = False,
              topic: str | None = None) -> None:
        """Queue a message; a newer one with the same key replaces an unsent older one."""
        self.outbox.pop(key, None)  # re-inserting keeps per-job order: newest last
        self.outbox[key] = Outgoing(topic or self.topics.events(self.cfg.host), P.encode(msg), qos, retain)
        self.wake.set()

    async def _publisher(self) -> None:
        while True:
            await self.wake.wait()
            self.wake.clear()
            await self.link.connected.wait()
            await self._drain()

    async def _drain(self) -> None:
        while self.outbox:
            key, out = next(iter(self.outbox.items()))
            try:
                await self.link.publish(out.topic, out.payload, qos=out.qos, retain=out.retain)
            except UnreachableError as exc:
                log.info("publish deferred: %s", exc)
                self.wake.set()  # try again once reconnected
                await asyncio.sleep(0.2)
                return
            if self.outbox.get(key) is out:
                del self.outbox[key]

    async def _on_connect(self) -> None:
        await self.link.publish(self.topics.status(self.cfg.host), P.encode(self._status("online")), retain=True)
        if self.inventory.current is not None:
            await self._publish_inventory(self.inventory.current)
        for rec in self.records.values():
            if rec.state == "running":
                self._send((rec.job, "started"), P.JobStarted(rec.job, rec.attempt))
        self._resend_unacked()

    def _resend_unacked(self) -> None:
        for result in self.unacked.values():
            self._send((result.job, "result"), result)

    async def _resend_results(self) -> None:
        """Results stay unacknowledged when the service was away: send them again now and then."""
        while True:
            await asyncio.sleep(self.cfg.result_resend)
            if self.link.connected.is_set():
                self._resend_unacked()

    async def _publish_inventory(self, inv: P.Inventory) -> None:
        self._send(("inventory", ""), inv, retain=True, topic=self.topics.inventory(self.cfg.host))

    # ------------------------------------------------------------- inbound

    async def _on_message(self, topic: str, payload: bytes, retain: bool) -> None:
        try:
            msg = P.decode(payload)
        except P.ProtocolError as exc:
            self._reject(payload, exc)
            return
        if isinstance(msg, P.Status):
            self._on_own_status(msg)
        elif isinstance(msg, P.RunJob):
            await self._on_run(msg)
        elif isinstance(msg, P.CancelJob):
            await self._on_cancel(msg)
        elif isinstance(msg, P.AckResult):
            await self._on_ack(msg)

    def _reject(self, payload: bytes, exc: P.ProtocolError) -> None:
        """A job we cannot parse fails with the reason, when its id can be read at all."""
        log.warning("rejected a message: %s", exc)
        try:
            doc = json.loads(payload)
            job, attempt = P.job_id(doc.get("job")), int(doc.get("attempt", 1))
        except (ValueError, TypeError, AttributeError, P.ProtocolError):
            return
        if doc.get("type") == P.RunJob.type and 1 <= attempt <= 1000:
            error = P.JobError("protocol", f"the worker on {self.cfg.host} rejected the job: {exc}")
            self._send((job, "result"), P.JobResult(job, attempt, "failed", {}, error))

    def _on_own_status(self, msg: P.Status) -> None:
        # A stale Will (an earlier session's, or one the broker sent on a takeover) must not leave us offline.
        if msg.state == "offline" and self.link.connected.is_set() and not self.stopping:
            self._send(("status", ""), self._status("online"), retain=True, topic=self.topics.status(self.cfg.host))

    async def _on_run(self, msg: P.RunJob) -> None:
        rec = self.records.get(msg.job)
        if rec is not None and not (rec.cancelled and rec.attempt == 0) and rec.attempt >= msg.attempt:
            self._answer_again(rec, msg)
            return
        rec = JobRecord(msg.job, msg.attempt, msg.kind, P.params_dict(msg.params), msg.deadline,
                        cancelled=rec is not None and rec.cancelled)
        await self._save(rec)  # durable before we say so: a redelivery now finds it
        self._send((rec.job, "accepted"), P.JobAccepted(rec.job, rec.attempt))
        self._spawn(rec, msg.params)

    def _answer_again(self, rec: JobRecord, msg: P.RunJob) -> None:
        """A redelivered or re-sent job: report where it is, never run it again."""
        if rec.attempt > msg.attempt:
            return  # a stale attempt
        if rec.state == "done" and rec.result is not None:
            result = P.JobResult.parse(rec.result)
            self.unacked[rec.job] = result
            self._send((rec.job, "result"), result)
            return
        self._send((rec.job, "accepted"), P.JobAccepted(rec.job, rec.attempt))
        if rec.state == "running":
            self._send((rec.job, "started"), P.JobStarted(rec.job, rec.attempt))

    async def _on_cancel(self, msg: P.CancelJob) -> None:
        rec = self.records.get(msg.job)
        if rec is None:  # before the job itself: remember, so it never starts
            await self._save(JobRecord(msg.job, 0, "", {}, 0.0, state="done", cancelled=True, acked=True))
            return
        if rec.state == "done":
            self._resend_unacked()
            return
        await self._save(rec.evolve(cancelled=True))
        task = self.running.get(msg.job)
        if task is not None:
            task.cancel()

    async def _on_ack(self, msg: P.AckResult) -> None:
        rec = self.records.get(msg.job)
        self.unacked.pop(msg.job, None)
        if rec is not None and rec.attempt == msg.attempt and rec.state == "done" and not rec.acked:
            await self._save(rec.evolve(acked=True))

    async def _save(self, rec: JobRecord) -> None:
        self.records[rec.job] = rec
        await asyncio.to_thread(self.store.save, rec)

    # ---------------------------------------------------------------- jobs

    def _spawn(self, rec: JobRecord, params: P.JobParams) -> None:
        assert self._tg is not None
        self._tg.create_task(self._run_job(rec, params), name=f"job-{rec.job}")

    async def _run_job(self, rec: JobRecord, params: P.JobParams) -> None:
        try:
            async with self.slots:  # the per-host concurrency cap
                result = await self._start_and_execute(rec.job, params)
        except asyncio.CancelledError:  # this process is stopping
            error = P.JobError("interrupted", "the worker stopped during the job", transient=True)
            await asyncio.shield(self._finish(self.records[rec.job], P.JobResult(rec.job, rec.attempt, "failed",
                                                                                   {}, error)))
            raise
        await asyncio.shield(self._finish(self.records[rec.job], result))

    async def _start_and_execute(self, job: str, params: P.JobParams) -> P.JobResult:
        rec = self.records[job]
        if rec.cancelled:
            return P.JobResult(job, rec.attempt, "cancelled", {}, P.JobError("cancelled", "cancelled before it ran"))
        await self._save(rec.evolve(state="running"))
        self._send((job, "started"), P.JobStarted(job, rec.attempt))
        self.executions += 1
        return await self._execute(self.records[job], params)

    async def _execute(self, rec: JobRecord, params: P.JobParams) -> P.JobResult:
        progress = self._progress_fn(rec)
        ctx = JobContext(rec.job, self.cfg.host, self.docker, self.cfg.repo, progress)
        body = faults.run(self.cfg.faults, rec.kind, progress,
                          lambda fn: execute(JobContext(ctx.job, ctx.host, ctx.docker, ctx.repo_url, fn), params))
        inner = asyncio.create_task(_with_deadline(rec.deadline, body))
        self.running[rec.job] = inner
        try:
            await asyncio.wait([inner])
        except asyncio.CancelledError:
            inner.cancel()
            await asyncio.wait([inner])
            raise
        finally:
            self.running.pop(rec.job, None)
            self.last_progress.pop(rec.job, None)
        return _result_of(rec, inner)

    def _progress_fn(self, rec: JobRecord) -> ProgressFn:
        loop = asyncio.get_running_loop()

        def report(p: Progress) -> None:  # called from the data path's threads
            doc = p.as_dict()
            loop.call_soon_threadsafe(self._on_progress, rec, doc)
        return report

    def _on_progress(self, rec: JobRecord, doc: dict[str, Any]) -> None:
        now = time.monotonic()
        if now - self.last_progress.get(rec.job, 0.0) < self.cfg.progress_interval and doc["phase"] != "done":
            return  # a modest rate: the bar needs about one update a second
        self.last_progress[rec.job] = now
        self._send((rec.job, "progress"), P.JobProgress(rec.job, rec.attempt, doc), qos=0)

    async def _finish(self, rec: JobRecord, result: P.JobResult) -> None:
        await self._save(rec.evolve(state="done", result=result.body()))
        self.unacked[rec.job] = result
        self.outbox.pop((rec.job, "progress"), None)
        self._send((rec.job, "result"), result)


async def _with_deadline(deadline: float, body: Coroutine[Any, Any, dict[str, Any]]) -> dict[str, Any]:
    """Deadlines belong to the caller: the worker bounds each job, not the adapters."""
    async with asyncio.timeout(max(0.0, deadline - time.time())):
        return await body


def _result_of(rec: JobRecord, task: asyncio.Task[dict[str, Any]]) -> P.JobResult:
    if task.cancelled():
        return P.JobResult(rec.job, rec.attempt, "cancelled", {}, P.JobError("cancelled", "cancelled by request"))
    exc = task.exception()
    if exc is None:
        return P.JobResult(rec.job, rec.attempt, "succeeded", task.result())
    return P.JobResult(rec.job, rec.attempt, "failed", {}, job_error(exc))


def job_error(exc: BaseException) -> P.JobError:
    if isinstance(exc, VolmoveError):
        return P.JobError(exc.kind, exc.message, exc.transient)
    if isinstance(exc, TimeoutError):
        return P.JobError("deadline", "the job's deadline passed", transient=True)
    log.error("job failed with an unexpected error", exc_info=exc)
    return P.JobError("internal", f"{type(exc).__name__}: {exc}")
