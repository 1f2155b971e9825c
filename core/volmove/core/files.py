"""Small local state files (journals of stopped containers, worker job records)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_json_durably(path: Path, doc: Any) -> None:
    """Write atomically and durably: a crash leaves the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # not matched by *.json: readers never see it
    with tmp.open("w") as f:
        json.dump(doc, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
