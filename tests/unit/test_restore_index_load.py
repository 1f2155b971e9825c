"""A restore loads the index while it sets up, and no load outlives a restore that failed first."""

from __future__ import annotations

import threading
import time
from typing import cast

import pytest

from tests.engine_helpers import new_repo
from volmove.core.docker import DockerClient
from volmove.core.errors import NotFoundError
from volmove.core.ops import RestoreRequest, restore_volume
from volmove.core.repository import Repository
from volmove.core.storage.memory import MemoryStorage


class SlowIndex(Repository):
    def __init__(self, repo: Repository) -> None:
        super().__init__(repo.storage, repo.config)
        self.loaded = threading.Event()

    def load_index(self) -> None:
        time.sleep(0.3)
        super().load_index()
        self.loaded.set()


async def test_a_restore_that_fails_first_still_waits_for_its_index_load() -> None:
    repo = SlowIndex(new_repo(MemoryStorage()))
    docker = cast(DockerClient, object())  # never reached: the snapshot is missing
    with pytest.raises(NotFoundError, match="no snapshot of volume 'nothing'"):
        await restore_volume(docker, repo, RestoreRequest("nothing"))
    assert repo.loaded.is_set()  # no thread outlives the operation that started it
