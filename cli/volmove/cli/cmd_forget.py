"""volmove forget: remove snapshots a retention policy does not keep."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

import typer

from volmove.cli.cmd_prune import LockWaitOpt, MinAgeOpt, print_report
from volmove.cli.common import JsonOpt, RepoOpt, emit_json, open_repo, run, stdout, table
from volmove.core.forget import ForgetRequest, ForgetResult, run_forget
from volmove.core.ops import run_cancellable
from volmove.core.policy.retention import RetentionPolicy, Verdict, parse_duration
from volmove.core.prune import parse_age


def forget(
    keep_last: Annotated[int | None, typer.Option("--keep-last", min=0, help="Keep the N newest.")] = None,
    keep_hourly: Annotated[int | None, typer.Option("--keep-hourly", min=0, help="Keep the newest of N hours.")] = None,
    keep_daily: Annotated[int | None, typer.Option("--keep-daily", min=0, help="Keep the newest of N days.")] = None,
    keep_weekly: Annotated[int | None, typer.Option("--keep-weekly", min=0, help="... of N ISO weeks.")] = None,
    keep_monthly: Annotated[int | None, typer.Option("--keep-monthly", min=0, help="... of N months.")] = None,
    keep_yearly: Annotated[int | None, typer.Option("--keep-yearly", min=0, help="... of N years.")] = None,
    keep_within: Annotated[str | None, typer.Option(
        "--keep-within", help="Keep all within this long of the newest, e.g. 30d, 1y6m (m = months).")] = None,
    keep_tag: Annotated[list[str] | None, typer.Option("--keep-tag", help="Keep every snapshot with this tag.")] = None,
    volume: Annotated[str | None, typer.Option("--volume", help="Only this volume's snapshots.")] = None,
    host: Annotated[str | None, typer.Option("--host", help="Only this host's snapshots.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", "-n", help="Only show what would be removed.")] = False,
    prune: Annotated[bool, typer.Option("--prune", help="Prune right after, under the same lock.")] = False,
    min_age: MinAgeOpt = "1h",
    lock_wait: LockWaitOpt = None,
    repo: RepoOpt = None, json_out: JsonOpt = False,
) -> None:
    """Apply a retention policy per host and volume; prints every snapshot with keep or remove and why.

    The newest snapshot and the newest verified one of every volume are always kept."""

    async def go() -> ForgetResult:
        policy = RetentionPolicy(
            keep_last, keep_hourly, keep_daily, keep_weekly, keep_monthly, keep_yearly,
            parse_duration(keep_within) if keep_within else None, frozenset(keep_tag or ()))
        req = ForgetRequest(policy, volume, host, dry_run, prune, parse_age(min_age), lock_wait)
        repository = await asyncio.to_thread(open_repo, repo, load_index=False)
        return await run_cancellable(lambda cancel: run_forget(repository, req, cancel=cancel))

    result = run(go, json_out=json_out)
    rows = _rows(result)
    if json_out:
        emit_json({"dry_run": dry_run, "snapshots": rows, "kept": len(result.decision.keep),
                   "removed": len(result.decision.remove),
                   "prune": result.prune.as_dict() if result.prune else None})
        return
    table(["snapshot", "time", "host", "volume", "action", "reasons"],
          [[r["short_id"], r["time"][:19].replace("T", " "), r["host"], r["volume"], r["action"],
            ", ".join(r["reasons"])] for r in rows])
    verb = "would remove" if dry_run else "removed"
    stdout.print(f"kept {len(result.decision.keep)} snapshots, {verb} {len(result.decision.remove)}", markup=False)
    if result.prune:
        print_report(result.prune)


def _rows(result: ForgetResult) -> list[dict[str, Any]]:
    verdicts = [("keep", v) for v in result.decision.keep] + [("remove", v) for v in result.decision.remove]
    # Grouped by host and volume, newest first: the order the policy reads them in.
    verdicts.sort(key=lambda av: (av[1].snapshot.host, av[1].snapshot.volume, -av[1].snapshot.utc.timestamp()))
    return [_row(action, verdict) for action, verdict in verdicts]


def _row(action: str, v: Verdict) -> dict[str, Any]:
    s = v.snapshot
    return {"id": s.id, "short_id": s.id[:8], "time": s.utc.isoformat(), "host": s.host, "volume": s.volume,
            "action": action, "reasons": list(v.reasons), "verified": s.verified}
