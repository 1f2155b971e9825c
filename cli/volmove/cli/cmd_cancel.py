"""volmove cancel: cancel a fleet job (a migration rolls back)."""

from __future__ import annotations

from typing import Annotated

import typer

from volmove.cli.cmd_jobs import ServiceOpt, ask
from volmove.cli.common import JsonOpt, stdout


def cancel(
    job: Annotated[str, typer.Argument(help="The job id (see `volmove jobs`).")],
    service: ServiceOpt = None, json_out: JsonOpt = False,
) -> None:
    """Cancel a job: a queued one never runs, a running one is stopped and cleaned up."""

    doc = ask(service, json_out, lambda api: api.cancel(job))
    if doc is None:
        return
    if doc["phase"] == "cancelled":
        stdout.print(f"job {job} cancelled", markup=False)
    elif doc["phase"] in ("succeeded", "failed"):
        stdout.print(f"job {job} already ended: {doc['phase']}", markup=False)
    else:
        stdout.print(f"job {job}: cancel requested (it is {doc['phase']} on {doc['host']})", markup=False)
