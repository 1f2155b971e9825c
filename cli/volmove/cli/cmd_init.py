"""volmove init: create a repository."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer

from volmove.cli.common import JsonOpt, RepoOpt, emit_json, repo_url, run, stdout
from volmove.core.errors import UsageError
from volmove.core.format import BLOB_HASHES, DEFAULT_HASH
from volmove.core.repository import init_repository
from volmove.core.storage import open_storage

HashOpt = Annotated[str, typer.Option("--hash", help=f"how blobs are named: {', '.join(sorted(BLOB_HASHES))}")]


def init(repo: RepoOpt = None, hash_name: HashOpt = DEFAULT_HASH, json_out: JsonOpt = False) -> None:
    """Create a new, empty repository."""
    url = repo_url(repo)

    async def go() -> dict[str, str]:
        if hash_name not in BLOB_HASHES:
            raise UsageError(f"unknown hash {hash_name!r} (choose {' or '.join(sorted(BLOB_HASHES))})")
        storage = await asyncio.to_thread(open_storage, url, create=True)
        config = await asyncio.to_thread(init_repository, storage, None, hash_name)
        return {"repository": storage.url, "id": config.id, "version": str(config.version), "hash": config.hash}

    doc = run(go, json_out=json_out)
    if json_out:
        emit_json(doc)
    else:
        stdout.print(f"created repository {doc['id'][:8]} at {doc['repository']} (blob ids: {doc['hash']})")
