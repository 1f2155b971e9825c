"""volmove jobs: the fleet's jobs, once or live (--watch). Also what the fleet
commands share: the --service option and following a job to its end."""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from volmove.cli.common import JsonOpt, emit_json, human_bytes, progress_bar, run, stdout, table
from volmove.core.errors import UsageError
from volmove.core.progress import Progress
from volmove.core.repository import default_host
from volmove.service.client import TERMINAL, ServiceClient, job_error, service_url

if TYPE_CHECKING:
    from rich.table import Table

T = TypeVar("T")

JSON = dict[str, Any]
ServiceOpt = Annotated[str | None, typer.Option("--service", envvar="VOLMOVE_SERVICE",
                                                help="URL of the volmove service, e.g. http://127.0.0.1:8470")]


def client(service: str | None) -> ServiceClient:
    url = service_url(service)
    if not url:
        raise UsageError("no volmove service configured: give --service URL or set VOLMOVE_SERVICE")
    return ServiceClient(url)


def ask(service: str | None, json_out: bool, request: Callable[[ServiceClient], Awaitable[T]]) -> T | None:
    """One request to the service: its answer, or None once it was printed for --json."""

    async def go() -> T:
        async with client(service) as api:
            return await request(api)

    doc = run(go, json_out=json_out)
    if json_out:
        emit_json(doc)
        return None
    return doc


def progress_of(doc: JSON) -> Progress:
    p = doc.get("progress") or {}
    return Progress(str(p.get("phase") or p.get("step") or doc.get("phase", "")), int(p.get("bytes_done", 0)),
                    int(p.get("bytes_total", 0)), int(p.get("files_done", 0)), int(p.get("files_total", 0)))


async def follow(api: ServiceClient, job: JSON, label: str, json_out: bool) -> JSON:
    """Wait for a job with a live bar on a terminal; raise its error if it did not succeed."""
    with progress_bar(label, json_out) as bar:
        def update(doc: JSON) -> None:
            if doc["id"] == job["id"] or doc.get("parent") == job["id"]:
                bar(progress_of(doc))
        final = job if job["phase"] in TERMINAL else await api.wait(job["id"], update)
    if final["phase"] != "succeeded":
        raise job_error(final)
    return final


def ago(t: float | None, now: float) -> str:
    if not t:
        return "-"
    s = max(0, int(now - t))
    return f"{s}s ago" if s < 120 else f"{s // 60}m ago" if s < 7200 else f"{s // 3600}h ago"


def job_row(j: JSON, now: float) -> list[str]:
    p = j.get("progress") or {}
    done, total = p.get("bytes_done") or 0, p.get("bytes_total") or 0
    prog = f"{human_bytes(done)}/{human_bytes(total)}" if total else str(p.get("step") or p.get("phase") or "")
    err = (j.get("error") or {}).get("message", "") if j["phase"] in ("failed", "cancelled") else ""
    target = j["params"].get("volume", "") if isinstance(j.get("params"), dict) else ""
    return [j["id"], j["kind"], j["host"], target, j["phase"], prog, ago(j["created"], now), err[:60]]


COLUMNS = ["job", "kind", "host", "volume", "phase", "progress", "created", "error"]


def _table(docs: list[JSON]) -> Table:
    from rich.table import Table

    now = time.time()
    t = Table(*COLUMNS, box=None, header_style="bold")
    for j in sorted(docs, key=lambda d: d["created"], reverse=True):
        t.add_row(*job_row(j, now))
    return t


async def _watch(api: ServiceClient, initial: list[JSON], json_out: bool,
                 show: Callable[[dict[str, JSON]], None]) -> None:
    docs = {j["id"]: j for j in initial}
    if json_out:  # the state at start first, so a script that starts late misses no job's phase
        for doc in initial:
            print(json.dumps(doc, default=str), flush=True)
    async for doc in api.watch():
        if json_out:
            print(json.dumps(doc, default=str), flush=True)
            continue
        if doc.get("parent") is None:
            docs[doc["id"]] = doc
            show(docs)


def jobs(
    everything: Annotated[bool, typer.Option("--all", "-a", help="Include jobs that ended over an hour ago.")] = False,
    children: Annotated[bool, typer.Option("--children", help="Include the steps of migrations.")] = False,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Keep showing changes until interrupted.")] = False,
    service: ServiceOpt = None, json_out: JsonOpt = False,
) -> None:
    """List the fleet's jobs with their phase and progress."""

    async def go() -> list[JSON]:
        async with client(service) as api:
            docs = await api.jobs(everything=everything, children=children)
            if watch:
                await _watch_live(api, docs, json_out)
            return docs

    docs = run(go, json_out=json_out)
    if json_out:
        emit_json(docs)
        return
    now = time.time()
    table(COLUMNS, [job_row(j, now) for j in docs])


async def _watch_live(api: ServiceClient, docs: list[JSON], json_out: bool) -> None:
    if json_out:
        await _watch(api, docs, True, lambda _d: None)
        return
    from rich.live import Live

    with Live(_table(docs), console=stdout.real, auto_refresh=False) as live:
        await _watch(api, docs, False, lambda d: live.update(_table(list(d.values())), refresh=True))


# ------------------------------------------------- backup and restore on a fleet host


def fleet_host(host: str | None) -> str:
    return host or default_host()


def remote_backup(volumes: list[str], tags: tuple[str, ...], stop: bool, container: str | None, host: str | None,
                  service: str | None, json_out: bool) -> None:
    """`volmove backup --host H`: one backup job per volume, run by H's worker."""
    if container:
        raise typer.BadParameter("--container works on the local host only; name the volumes")
    if not volumes:
        raise typer.BadParameter("name at least one volume")

    async def go() -> list[JSON]:
        async with client(service) as api:
            done = []
            for volume in volumes:
                params = {"volume": volume, "tags": list(tags), "stop": stop}
                job = await api.submit("backup", fleet_host(host), params)
                done.append(await follow(api, job, f"backup {volume} on {job['host']}", json_out))
            return done

    finished = run(go, json_out=json_out)
    if json_out:
        emit_json([{**j["result"], "job": j["id"], "host": j["host"]} for j in finished])
        return
    table(["snapshot", "volume", "host", "files", "size", "new", "stored", "time"],
          [_backup_row(j) for j in finished])


def _backup_row(job: JSON) -> list[str]:
    r, st = job["result"], job["result"].get("stats", {})
    return [str(r["snapshot"])[:8], r["volume"], job["host"], str(st.get("files", "")), human_bytes(st.get("bytes", 0)),
            human_bytes(st.get("new_bytes", 0)), human_bytes(st.get("stored_bytes", 0)),
            f"{st.get('duration', 0.0):.1f}s"]


def remote_restore(volume: str, snapshot: str, as_name: str | None, force: bool, allow_devices: bool,
                   host: str | None, service: str | None, json_out: bool) -> None:
    """`volmove restore --on H`: a restore job run by H's worker."""
    if allow_devices:
        raise typer.BadParameter("--allow-devices works on the local host only")

    async def go() -> JSON:
        async with client(service) as api:
            params = {"volume": volume, "snapshot": snapshot, "as_name": as_name, "force": force}
            job = await api.submit("restore", fleet_host(host), params)
            return await follow(api, job, f"restore {as_name or volume} on {job['host']}", json_out)

    job = run(go, json_out=json_out)
    r = job["result"]
    if json_out:
        emit_json({**r, "job": job["id"], "host": job["host"]})
        return
    for warning in r.get("warnings", []):
        stdout.print(f"warning: {warning}", markup=False)
    stdout.print(f"restored snapshot {str(r['snapshot'])[:8]} into volume {r['volume']} on {job['host']}: "
                 f"{r['files']} files, {human_bytes(r['bytes'])} (job {job['id']})", markup=False)
