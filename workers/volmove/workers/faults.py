"""Fault injection for tests: ``VOLMOVE_WORKER_FAULTS="restore=fail-midway,backup=delay:3"``.

Actions: ``fail`` (before the job touches anything), ``fail-midway`` (from the
data path's first progress report with bytes done, so the operation cleans up
as after a real mid-way error) and ``delay:SECONDS`` (before the job runs;
cancellable). Unset in production: an empty mapping.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from volmove.core.errors import StorageError, UsageError
from volmove.core.progress import Progress, ProgressFn

ENV = "VOLMOVE_WORKER_FAULTS"


def parse(spec: str) -> dict[str, str]:
    faults = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        kind, _, action = item.partition("=")
        if action not in ("fail", "fail-midway") and not action.startswith("delay:"):
            raise UsageError(f"invalid fault {item!r} in ${ENV}")
        faults[kind] = action
    return faults


async def run(faults: Mapping[str, str], kind: str, progress: ProgressFn,
              body: Callable[[ProgressFn], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
    action = faults.get(kind, "")
    if action.startswith("delay:"):
        await asyncio.sleep(float(action.partition(":")[2]))
    if action == "fail":
        raise StorageError(f"injected fault: {kind} fails")
    if action == "fail-midway":
        return await body(_failing(progress, kind))
    return await body(progress)


def _failing(progress: ProgressFn, kind: str) -> ProgressFn:
    def report(p: Progress) -> None:
        progress(p)
        if p.bytes_done > 0:
            raise StorageError(f"injected fault: {kind} fails mid-way after {p.bytes_done} bytes")
    return report
