"""A repository names its blobs with the hash its config records (BLAKE3 for new ones,
SHA-256 for those made before); every object name stays SHA-256."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import blake3
import pytest

from tests.engine_helpers import backup_dir, config_doc, new_repo, restore_dir
from volmove.core.errors import RepositoryError
from volmove.core.format import CONFIG_KEY, RepoConfig
from volmove.core.repository import Repository
from volmove.core.storage.memory import MemoryStorage
from volmove.core.verify import compare_tree, verify


def test_new_repositories_use_blake3_and_record_it() -> None:
    assert json.loads(RepoConfig(id="x", created="now").to_json())["hash"] == "blake3"


@pytest.mark.parametrize("name", ["sha256", "blake3"])
def test_config_keeps_its_hash(name: str) -> None:
    assert RepoConfig.from_json(config_doc(hash=name)).hash == name


@pytest.mark.parametrize("value", ["md5", "", None, ["sha256"], 3])
def test_unknown_hash_is_refused(value: object) -> None:
    with pytest.raises(RepositoryError, match="hash"):
        RepoConfig.from_json(config_doc(hash=value))


@pytest.mark.parametrize(("name", "digest"), [("sha256", hashlib.sha256), ("blake3", blake3.blake3)])
def test_blob_ids_follow_the_config(tmp_path: Path, name: str, digest: type) -> None:
    src = tmp_path / "src"
    src.mkdir()
    content = b"some file content\n" * 1000
    (src / "f").write_bytes(content)
    storage = MemoryStorage()
    repo = new_repo(storage, name)
    snap = backup_dir(repo, src)
    assert json.loads(storage.get(CONFIG_KEY))["hash"] == name
    line = next(json.loads(raw) for raw in repo.read_catalog(snap) if json.loads(raw)["p"] == "f")
    assert line["c"] == [digest(content).hexdigest()]
    # Snapshots are named by SHA-256 whatever the blob hash.
    assert snap.id == hashlib.sha256(storage.get(f"snapshots/{snap.id}")).hexdigest()
    reopened = Repository.open(storage)
    reopened.load_index()
    assert verify(reopened, [snap], read_data=True).errors == []
    restore_dir(reopened, snap, tmp_path / "dst")
    assert (tmp_path / "dst/f").read_bytes() == content
    fd = os.open(src, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert compare_tree(reopened, snap, fd).differences == []
    finally:
        os.close(fd)
