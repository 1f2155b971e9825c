"""volmove volumes: this host's volumes and their backup state."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from volmove.cli.common import DockerOpt, JsonOpt, RepoOpt, emit_json, human_bytes, open_repo, run, table
from volmove.core.docker import DockerClient
from volmove.core.errors import RepositoryError
from volmove.core.ops import VolumeRow, list_volume_rows
from volmove.core.repository import Repository


def volumes(repo: RepoOpt = None, docker: DockerOpt = None, json_out: JsonOpt = False) -> None:
    """List volumes: size, containers using them, dangling or not, age of the last backup."""

    async def go() -> list[VolumeRow]:
        repository: Repository | None
        try:
            repository = await asyncio.to_thread(open_repo, repo, load_index=False)
        except RepositoryError:
            repository = None  # no repository yet: every volume is simply never backed up
        async with DockerClient.connect(docker) as client:
            return await list_volume_rows(client, repository, datetime.now(UTC))

    rows = run(go, json_out=json_out)
    if json_out:
        emit_json([r.as_dict() for r in rows])
        return
    table(["volume", "driver", "size", "containers", "dangling", "last backup"],
          [[r.name, r.driver, human_bytes(r.size) if r.size >= 0 else "?", ",".join(r.containers) or "-",
            "yes" if r.dangling else "no", _age(r.age_seconds)] for r in rows])


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"
