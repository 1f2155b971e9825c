"""volmove schedule ls|add|rm|run: scheduled backups and restore drills, run by the service."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import typer

from volmove.cli.cmd_jobs import ServiceOpt, ask
from volmove.cli.common import JsonOpt, stdout, table
from volmove.core.fleet.schedule import KEEP_RULES, ScheduleDef

JSON = dict[str, Any]
schedule_app = typer.Typer(help="Scheduled backups and restore drills (run by the service for every host).",
                           no_args_is_help=True)



def _keep(unit: str) -> Any:
    return typer.Option(min=0, help=f"Keep the newest snapshot of each of this many {unit}s.")


def _selector(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not key:
            raise typer.BadParameter(f"--selector {item!r}: use LABEL=VALUE, or LABEL for any value")
        out[key] = value if sep else "*"
    return out


def definition(name: str, cron: str, *, jitter: str, volumes: list[str], selector: list[str], hosts: list[str],
               drill_on: str | None, keep: dict[str, int], keep_within: str | None, tags: list[str],
               stop: bool) -> JSON:
    """The schedule as the API takes it, checked here first for a quick, local error."""
    counts = {rule: n for rule, n in keep.items() if n}
    doc: JSON = {"name": name, "cron": cron, "kind": "drill" if drill_on else "backup", "jitter": jitter,
                 "volumes": volumes, "selector": _selector(selector), "hosts": hosts, "on": drill_on,
                 "keep": {**counts, **({"within": keep_within} if keep_within else {})} or None,
                 "tags": tags, "stop": stop}
    ScheduleDef.parse(doc)
    return doc


@schedule_app.command("add")
def add(
    name: Annotated[str, typer.Argument(help="The schedule's name (a-z, 0-9, '.', '_', '-').")],
    cron: Annotated[str, typer.Option("--cron", help="When: \"0 3 * * *\", @daily, \"@every 6h\" (UTC).")],
    jitter: Annotated[str, typer.Option(help="Spread each volume's start by up to this, e.g. 10m.")] = "0",
    volume: Annotated[list[str] | None, typer.Option("--volume", "-v", help="A volume by name (repeatable).")] = None,
    selector: Annotated[list[str] | None, typer.Option(
        "--selector", "-l", help="Volumes with this label: LABEL=VALUE or LABEL (repeatable; all must match).")] = None,
    host: Annotated[list[str] | None, typer.Option("--host", help="Only these hosts (repeatable).")] = None,
    drill_on: Annotated[str | None, typer.Option(
        "--drill-on", help="A restore drill, not a backup: restore the latest snapshot on this host, "
                           "compare it, remove it.")] = None,
    keep_last: Annotated[int, typer.Option(min=0, help="Keep this many newest snapshots.")] = 0,
    keep_hourly: Annotated[int, _keep("hour")] = 0,
    keep_daily: Annotated[int, _keep("day")] = 0,
    keep_weekly: Annotated[int, _keep("week")] = 0,
    keep_monthly: Annotated[int, _keep("month")] = 0,
    keep_yearly: Annotated[int, _keep("year")] = 0,
    keep_within: Annotated[str | None, typer.Option(help="Keep everything this recent, e.g. 30d.")] = None,
    tag: Annotated[list[str] | None, typer.Option("--tag", "-t", help="Tag the snapshots (repeatable).")] = None,
    stop: Annotated[bool, typer.Option("--stop", help="Stop the volume's containers during the backup.")] = False,
    service: ServiceOpt = None, json_out: JsonOpt = False,
) -> None:
    """Add a schedule. Volumes are also selected by a volmove.schedule=NAME label on them or their containers."""
    counts = dict(zip(KEEP_RULES, (keep_last, keep_hourly, keep_daily, keep_weekly, keep_monthly, keep_yearly),
                      strict=True))

    doc = ask(service, json_out, lambda api: api.add_schedule(definition(
        name, cron, jitter=jitter, volumes=volume or [], selector=selector or [], hosts=host or [],
        drill_on=drill_on, keep=counts, keep_within=keep_within, tags=tag or [], stop=stop)))
    if doc is None:
        return
    stdout.print(f"schedule {doc['name']} added: {doc['kind']} at {doc['cron']!r}", markup=False)


@schedule_app.command("ls")
def ls(service: ServiceOpt = None, json_out: JsonOpt = False) -> None:
    """List the schedules, the volumes each covers, and their next and last runs."""

    docs = ask(service, json_out, lambda api: api.schedules())
    if docs is None:
        return
    table(["schedule", "kind", "cron", "source", "selects", "host", "volume", "next run", "last run", "note"],
          [row for d in docs for row in _rows(d)])


def _rows(doc: JSON) -> list[list[str]]:
    head = [doc["name"], doc["kind"], doc["cron"] + (f" ~{doc['jitter']}s" if doc["jitter"] else ""), doc["source"],
            _selects(doc)]
    if not doc["targets"]:
        return [[*head, "-", "-", "-", "-", "no volume selected yet"]]
    return [[*head, t["runs_on"], t["volume"], _when(t.get("next_run")), _when(t.get("last_run")),
             t.get("waiting") or ""] for t in doc["targets"]]


def _selects(doc: JSON) -> str:
    parts = [*doc["volumes"], *(f"{k}={v}" if v != "*" else k for k, v in doc["selector"].items())]
    if doc["source"] != "label":
        parts.append(f"label volmove.schedule={doc['name']}")
    return ", ".join(parts)


def _when(iso: str | None) -> str:
    return datetime.fromisoformat(iso).strftime("%Y-%m-%d %H:%M:%S") if iso else "-"


@schedule_app.command("rm")
def rm(name: Annotated[str, typer.Argument(help="The schedule to remove.")],
       service: ServiceOpt = None, json_out: JsonOpt = False) -> None:
    """Remove a schedule added with `volmove schedule add` (running jobs go on)."""

    if ask(service, json_out, lambda api: api.remove_schedule(name)) is None:
        return
    stdout.print(f"schedule {name} removed", markup=False)


@schedule_app.command("run")
def run_now(name: Annotated[str, typer.Argument(help="The schedule to run now.")],
            service: ServiceOpt = None, json_out: JsonOpt = False) -> None:
    """Start a schedule's jobs now, for every volume it covers (its cron times are unchanged)."""

    docs = ask(service, json_out, lambda api: api.run_schedule(name))
    if docs is None:
        return
    table(["host", "volume", "job", "note"], [[d["host"], d["volume"], d["job"] or "-", d["reason"]] for d in docs])
