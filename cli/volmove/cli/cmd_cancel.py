"""volmove cancel: cancel a fleet job (a migration rolls back)."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from volmove.cli.cmd_jobs import ServiceOpt, client
from volmove.cli.common import JsonOpt, emit_json, run, stdout


def cancel(
    job: Annotated[str, typer.Argument(help="The job id (see `volmove jobs`).")],
    service: ServiceOpt = None, json_out: JsonOpt = False,
) -> None:
    """Cancel a job: a queued one never runs, a running one is stopped and cleaned up."""

    async def go() -> dict[str, Any]:
        async with client(service) as api:
            return await api.cancel(job)

    doc = run(go, json_out=json_out)
    if json_out:
        emit_json(doc)
        return
    if doc["phase"] == "cancelled":
        stdout.print(f"job {job} cancelled", markup=False)
    elif doc["phase"] in ("succeeded", "failed"):
        stdout.print(f"job {job} already ended: {doc['phase']}", markup=False)
    else:
        stdout.print(f"job {job}: cancel requested (it is {doc['phase']} on {doc['host']})", markup=False)
