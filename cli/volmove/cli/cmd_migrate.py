"""volmove migrate: move a volume to another host of the fleet."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

import typer

from volmove.cli.cmd_jobs import ServiceOpt, client, follow
from volmove.cli.common import JsonOpt, emit_json, run, stdout

JSON = dict[str, Any]


@dataclass(frozen=True)
class MigrateOptions:
    volume: str
    to: str
    source: str | None
    force: bool
    remove_source: bool
    detach: bool


def migrate(
    volume: Annotated[str, typer.Argument(help="The volume to move.")],
    to: Annotated[str, typer.Option("--to", help="The host to move it to.")],
    source: Annotated[str | None, typer.Option("--from", help="The host it is on [default: the one that has it].")]
    = None,
    force: Annotated[bool, typer.Option("--force", help="Replace a volume of that name on the target.")] = False,
    remove_source: Annotated[bool, typer.Option("--remove-source",
                                                help="Remove the source volume once the target verified.")] = False,
    detach: Annotated[bool, typer.Option("--detach", "-d", help="Print the job id and return.")] = False,
    service: ServiceOpt = None, json_out: JsonOpt = False,
) -> None:
    """Stop the volume's containers, back it up, restore and verify it on the target, report the downtime.

    The source is kept unless --remove-source; on any failure it is intact and its containers run again.
    The stopped containers stay stopped on success (their inspect data is in the job's result).
    """
    opts = MigrateOptions(volume, to, source, force, remove_source, detach)
    doc = run(lambda: _migrate(opts, service, json_out), json_out=json_out)
    if json_out:
        emit_json(doc)
    elif detach:
        stdout.print(doc["id"], markup=False)
    else:
        _report(doc)


async def _migrate(opts: MigrateOptions, service: str | None, json_out: bool) -> JSON:
    async with client(service) as api:
        job = await api.migrate(opts.volume, opts.to, opts.source, force=opts.force,
                                remove_source=opts.remove_source)
        if opts.detach:
            return job
        return await follow(api, job, f"migrate {opts.volume} → {opts.to}", json_out)


def _report(job: JSON) -> None:
    r = job["result"]
    stdout.print(f"migrated volume {r['volume']} from {r['source']} to {r['target']} (job {job['id']}): "
                 f"snapshot {str(r['snapshot'])[:8]}, downtime {r['downtime_s']:.1f} s, total {r['total_s']:.1f} s",
                 markup=False)
    if r["stopped"]:
        names = ", ".join(c.get("Name", "?").lstrip("/") for c in r["containers"] if c.get("Id") in r["stopped"])
        stdout.print(f"containers stopped on {r['source']} and left stopped: {names}", markup=False)
    stdout.print(f"source volume {'removed' if r['source_removed'] else 'kept'} on {r['source']}", markup=False)
    for warning in r["warnings"]:
        stdout.print(f"warning: {warning}", markup=False)
