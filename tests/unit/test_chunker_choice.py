"""New repositories chunk with FastCDC 2020; those whose config names no algorithm keep
fastcdc-py's (ronomon) chunker, so their data keeps deduplicating."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.engine_helpers import backup_dir, config_doc, restore_dir
from volmove.core.chunker import chunk_all
from volmove.core.errors import RepositoryError
from volmove.core.format import CDC_2020, CDC_RONOMON, CONFIG_KEY, ChunkerParams, RepoConfig
from volmove.core.repository import Repository, init_repository
from volmove.core.storage.memory import MemoryStorage


def test_new_repositories_record_fastcdc_2020() -> None:
    doc = json.loads(RepoConfig(id="x", created="now").to_json())
    assert doc["chunker"] == {"algorithm": CDC_2020, "min": 32768, "avg": 131072, "max": 524288}


def test_a_config_without_algorithm_is_an_older_repository() -> None:
    params = RepoConfig.from_json(config_doc(chunker={"min": 32768, "avg": 131072, "max": 524288})).chunker
    assert params == ChunkerParams(32768, 131072, 524288, CDC_RONOMON)


@pytest.mark.parametrize("chunker", [
    {"algorithm": "rabin", "min": 32768, "avg": 131072, "max": 524288},
    {"algorithm": None, "min": 32768, "avg": 131072, "max": 524288},
    {"algorithm": CDC_2020, "min": 32768, "avg": 131072, "max": 32 << 20},  # beyond what it supports
    {"algorithm": CDC_2020, "min": 131072, "avg": 32768, "max": 524288},  # not growing
    {"algorithm": CDC_2020, "min": "32768", "avg": 131072, "max": 524288},
    [32768, 131072, 524288],
    None,
])
def test_bad_chunker_configs_are_refused(chunker: object) -> None:
    with pytest.raises(RepositoryError):
        RepoConfig.from_json(config_doc(chunker=chunker))


def test_the_algorithms_cut_differently() -> None:
    data = os.urandom(4 << 20)
    a = [len(c) for c in chunk_all(data, ChunkerParams(algorithm=CDC_2020))]
    b = [len(c) for c in chunk_all(data, ChunkerParams(algorithm=CDC_RONOMON))]
    assert sum(a) == sum(b) == len(data) and a != b


@pytest.mark.parametrize("algorithm", [CDC_2020, CDC_RONOMON])
def test_backups_use_the_repository_chunker(tmp_path: Path, algorithm: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    content = os.urandom(3 << 20)
    (src / "f").write_bytes(content)
    storage = MemoryStorage()
    init_repository(storage, ChunkerParams(algorithm=algorithm))
    assert json.loads(storage.get(CONFIG_KEY))["chunker"]["algorithm"] == algorithm
    repo = Repository.open(storage)
    repo.load_index()
    snap = backup_dir(repo, src)
    expected = [repo.blob_id(c) for c in chunk_all(content, ChunkerParams(algorithm=algorithm))]
    line = next(json.loads(raw) for raw in repo.read_catalog(snap) if json.loads(raw)["p"] == "f")
    assert line["c"] == expected
    restore_dir(repo, snap, tmp_path / "dst")
    assert (tmp_path / "dst/f").read_bytes() == content
