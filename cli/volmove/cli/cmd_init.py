"""volmove init: create a repository."""

from __future__ import annotations

import asyncio

from volmove.cli.common import JsonOpt, RepoOpt, emit_json, repo_url, run, stdout
from volmove.core.repository import init_repository
from volmove.core.storage import open_storage


def init(repo: RepoOpt = None, json_out: JsonOpt = False) -> None:
    """Create a new, empty repository."""
    url = repo_url(repo)

    async def go() -> dict[str, str]:
        storage = await asyncio.to_thread(open_storage, url, create=True)
        config = await asyncio.to_thread(init_repository, storage)
        return {"repository": storage.url, "id": config.id, "version": str(config.version)}

    doc = run(go, json_out=json_out)
    if json_out:
        emit_json(doc)
    else:
        stdout.print(f"created repository {doc['id'][:8]} at {doc['repository']}")
