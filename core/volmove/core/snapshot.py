"""Snapshot manifests: the commit point of a backup.

A manifest names everything needed to restore: the volume's description, the
catalog's chunks and statistics.  Its id is the SHA-256 of its bytes, so a
manifest cannot be altered without changing its name.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from volmove.core.errors import CorruptDataError
from volmove.core.format import is_hex_id, object_id

SNAPSHOT_VERSION = 1


@dataclass(frozen=True)
class VolumeSpec:
    """What is needed to recreate the volume elsewhere."""

    name: str
    driver: str = "local"
    options: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    kind: str = "volume"  # "volume" or "bind"
    source: str = ""  # the host path of a bind mount


@dataclass(frozen=True)
class SnapshotStats:
    files: int = 0
    dirs: int = 0
    other: int = 0
    bytes: int = 0  # logical size of regular files
    new_bytes: int = 0  # raw bytes of chunks this snapshot added
    stored_bytes: int = 0  # compressed bytes this snapshot added
    chunks: int = 0
    new_chunks: int = 0
    skipped_files: int = 0  # unchanged files taken from the parent without reading
    duration: float = 0.0


@dataclass(frozen=True)
class Snapshot:
    time: datetime
    host: str
    volume: VolumeSpec
    catalog: tuple[str, ...]
    entries: int
    stats: SnapshotStats
    tags: tuple[str, ...] = ()
    parent: str | None = None
    id: str = ""

    def to_json(self) -> bytes:
        doc: dict[str, Any] = {
            "volmove_snapshot": SNAPSHOT_VERSION,
            "time": self.time.astimezone(UTC).isoformat(),
            "host": self.host,
            "volume": asdict(self.volume),
            "tags": list(self.tags),
            "parent": self.parent,
            "catalog": list(self.catalog),
            "entries": self.entries,
            "stats": asdict(self.stats),
        }
        return json.dumps(doc, indent=1, sort_keys=True).encode()

    def summary(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "short_id": self.id[:8],
            "time": self.time.astimezone(UTC).isoformat(),
            "host": self.host,
            "volume": self.volume.name,
            "tags": list(self.tags),
            "parent": self.parent,
            "stats": asdict(self.stats),
        }

    @classmethod
    def from_json(cls, snapshot_id: str, raw: bytes) -> Snapshot:
        if object_id(raw) != snapshot_id:
            raise CorruptDataError(f"snapshot {snapshot_id} does not match its hash")
        try:
            doc = json.loads(raw)
            return cls._from_doc(snapshot_id, doc)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise CorruptDataError(f"snapshot {snapshot_id} is malformed: {exc}") from None

    @classmethod
    def _from_doc(cls, snapshot_id: str, doc: dict[str, Any]) -> Snapshot:
        if doc["volmove_snapshot"] != SNAPSHOT_VERSION:
            raise ValueError(f"unsupported snapshot version {doc['volmove_snapshot']!r}")
        catalog = tuple(doc["catalog"])
        if not all(is_hex_id(c) for c in catalog):
            raise ValueError("bad catalog chunk id")
        vol = doc["volume"]
        volume = VolumeSpec(
            name=_s(vol["name"]), driver=_s(vol["driver"]), options=_sdict(vol["options"]),
            labels=_sdict(vol["labels"]), kind=_s(vol["kind"]), source=str(vol.get("source", "")),
        )
        stats = SnapshotStats(**{k: v for k, v in doc["stats"].items() if k in SnapshotStats.__dataclass_fields__})
        parent = doc.get("parent")
        return cls(
            id=snapshot_id, time=datetime.fromisoformat(doc["time"]), host=_s(doc["host"]), volume=volume,
            catalog=catalog, entries=int(doc["entries"]), stats=stats, tags=tuple(map(_s, doc["tags"])),
            parent=parent if is_hex_id(parent) else None,
        )


def _s(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError("expected a string")
    return value


def _sdict(value: object) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ValueError("expected a mapping of strings")
    return dict(value)
