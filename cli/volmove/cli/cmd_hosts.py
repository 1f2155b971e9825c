"""volmove hosts: the fleet's hosts, online or offline, and their volumes."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer

from volmove.cli.cmd_jobs import ServiceOpt, ago, ask
from volmove.cli.common import JsonOpt, human_bytes, table
from volmove.service.client import ServiceClient

JSON = dict[str, Any]


def hosts(
    name: Annotated[str | None, typer.Argument(help="Show this host's volumes.")] = None,
    service: ServiceOpt = None, json_out: JsonOpt = False,
) -> None:
    """List the hosts the service knows, or one host's inventory."""

    async def request(api: ServiceClient) -> Any:  # one host's document, or the list of hosts
        return await api.host(name) if name else await api.hosts()

    doc = ask(service, json_out, request)
    if doc is None:
        return
    now = time.time()
    if name:
        table(["volume", "driver", "size", "containers", "running"], [_volume_row(v) for v in doc["inventory"] or []])
        return
    table(["host", "state", "since", "volumes", "active jobs"],
          [[h["name"], h["state"], ago(h["since"], now), _count(h["volumes"]), h["jobs_active"]] for h in doc])


def _count(n: int | None) -> str:
    return "?" if n is None else str(n)


def _volume_row(v: JSON) -> list[str]:
    size = human_bytes(v["size"]) if v.get("size", -1) >= 0 else "?"
    return [v["name"], v["driver"], size, ", ".join(v["containers"]) or "-", ", ".join(v["running"]) or "-"]
