"""volmove compare: does a volume hold exactly what a snapshot says?"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

import typer

from volmove.cli.common import DockerOpt, JsonOpt, RepoOpt, emit_json, fail, open_repo, run, stdout
from volmove.core.docker import DockerClient
from volmove.core.errors import ConflictError
from volmove.core.ops import compare_volume


def compare(
    volume: Annotated[str, typer.Argument(help="The volume to check.")],
    snapshot: Annotated[str, typer.Option("--snapshot", "-s", help="Snapshot id (or prefix), or 'latest'.")] = "latest",
    of: Annotated[str | None, typer.Option("--of", help="Take the snapshot of this volume [default: VOLUME].")] = None,
    repo: RepoOpt = None, docker: DockerOpt = None, json_out: JsonOpt = False,
) -> None:
    """Compare a volume with a snapshot: types, modes, owners, mtimes, xattrs and content."""

    async def go() -> dict[str, Any]:
        repository = await asyncio.to_thread(open_repo, repo)
        async with DockerClient.connect(docker) as client:
            snap, report = await compare_volume(client, repository, volume, snapshot, of)
        return {"volume": volume, "snapshot": snap.id, "match": report.ok, "checked": report.checked,
                "differences": report.differences}

    doc = run(go, json_out=json_out)
    if json_out:
        emit_json(doc)
    else:
        for diff in doc["differences"]:
            stdout.print(f"differs: {diff}", markup=False)
        verdict = "matches" if doc["match"] else "does NOT match"
        stdout.print(f"volume {volume} {verdict} snapshot {doc['snapshot'][:8]} ({doc['checked']} entries)")
    if not doc["match"]:
        fail(f"volume {volume} differs from the snapshot", ConflictError.exit_code, "differs", json_out=False)
