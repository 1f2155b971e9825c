"""The contenders: the tar | zstd reference, restic, and volmove (local directory or S3).

Each one backs up the source volume's data into a fresh repository per repetition,
restores it into a fresh volume, and (all but the reference) takes a second backup
after the data changed.  Set-up (``init``) is never timed; the backup and restore
commands are timed whole, start-up included, as a person would run them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tools import Docker, Timed, check, dir_bytes, last_json, timed


@dataclass(frozen=True)
class Sample:
    seconds: float
    cpu_seconds: float
    peak_rss: int
    stored_bytes: int | None = None  # what the tool says it added (compressed where it compresses)
    new_bytes: int | None = None  # the raw bytes of what it added, where the tool says
    repo_growth: int | None = None  # how much the local repository (or archive) grew, measured on disk
    engine_seconds: float | None = None  # the tool's own account of the work, start-up excluded
    skipped_files: int | None = None
    load: float = 0.0  # the 1-minute load average when the step ended: how busy the machine was

    @classmethod
    def of(cls, t: Timed, **extra: Any) -> Sample:
        return cls(t.seconds, t.cpu_seconds, t.peak_rss, load=os.getloadavg()[0], **extra)


@dataclass(frozen=True)
class Context:
    source: str  # the source volume's name
    source_dir: Path  # its mountpoint, read as root on the host
    work: Path  # where archives and local repositories go
    docker: Docker
    env: dict[str, str]


class Contender(Protocol):
    name: str
    incremental: bool

    def backup(self, rep: int) -> Sample: ...
    def restore(self, rep: int, target: str) -> Sample: ...  # creates volume ``target``
    def second_backup(self, rep: int) -> Sample: ...
    def discard(self, rep: int) -> None: ...  # repetition ``rep`` is measured in full: free its space


class Reference:
    """``tar -cf - -C DIR . | zstd -3 -T2 > file`` and ``zstd -d < file | tar -x -C DIR2``."""

    name = "tar|zstd -3 -T2"
    incremental = False

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def _archive(self, rep: int) -> Path:
        return self.ctx.work / f"reference-{rep}.tar.zst"

    def backup(self, rep: int) -> Sample:
        script = 'set -o pipefail; tar -cf - -C "$1" . | zstd -3 -T2 -q > "$2"'
        t = timed(["bash", "-c", script, "_", str(self.ctx.source_dir), str(self._archive(rep))])
        size = self._archive(rep).stat().st_size
        return Sample.of(t, stored_bytes=size, repo_growth=size)

    def restore(self, rep: int, target: str) -> Sample:
        dest = self.ctx.docker.create_volume(target)
        script = 'set -o pipefail; zstd -d -q < "$1" | tar -x -C "$2"'
        return Sample.of(timed(["bash", "-c", script, "_", str(self._archive(rep)), str(dest)]))

    def second_backup(self, rep: int) -> Sample:
        raise NotImplementedError("the reference has no incremental backup")

    def discard(self, rep: int) -> None:
        self._archive(rep).unlink(missing_ok=True)


class Restic:
    """restic into a local repository (its default repository version and compression)."""

    name = "restic"
    incremental = True

    def __init__(self, ctx: Context, binary: str) -> None:
        self.ctx = ctx
        self.binary = binary

    def _env(self, rep: int) -> dict[str, str]:
        return {**self.ctx.env, "RESTIC_PASSWORD": "volmove-bench",
                "RESTIC_REPOSITORY": str(self.ctx.work / f"restic-{rep}"),
                "RESTIC_CACHE_DIR": str(self.ctx.work / "restic-cache")}

    def backup(self, rep: int) -> Sample:
        check([self.binary, "init", "--quiet"], env=self._env(rep))
        return self._backup(rep)

    def _backup(self, rep: int) -> Sample:
        repo = self.ctx.work / f"restic-{rep}"
        before = dir_bytes(repo)
        t = timed([self.binary, "backup", "--json", "--host", "volmove-bench", str(self.ctx.source_dir)],
                  env=self._env(rep))
        summary = _restic_summary(t.stdout)
        return Sample.of(t, stored_bytes=int(summary.get("data_added", 0)), repo_growth=dir_bytes(repo) - before,
                         engine_seconds=float(summary.get("total_duration", 0.0)),
                         skipped_files=int(summary.get("files_unmodified", 0)))

    def restore(self, rep: int, target: str) -> Sample:
        dest = self.ctx.docker.create_volume(target)
        return Sample.of(timed([self.binary, "restore", "latest", "--target", str(dest)], env=self._env(rep)))

    def second_backup(self, rep: int) -> Sample:
        return self._backup(rep)

    def discard(self, rep: int) -> None:
        shutil.rmtree(self.ctx.work / f"restic-{rep}", ignore_errors=True)


def _restic_summary(stdout: str) -> dict[str, Any]:
    for line in reversed(stdout.splitlines()):
        if '"message_type":"summary"' in line.replace(" ", ""):
            doc: dict[str, Any] = json.loads(line)
            return doc
    raise ValueError(f"restic printed no summary: {stdout[-500:]!r}")


class Volmove:
    """The volmove CLI, into a local directory or an S3 repository (one per repetition)."""

    incremental = True

    def __init__(self, ctx: Context, binary: str, *, bucket: str | None = None) -> None:
        self.ctx = ctx
        self.binary = binary
        self.bucket = bucket
        self.name = "volmove s3" if bucket else "volmove local"

    def repo(self, rep: int) -> str:
        return f"s3://{self.bucket}/repo-{rep}" if self.bucket else str(self.ctx.work / f"volmove-{rep}")

    def _run(self, *args: str) -> Timed:
        return timed([self.binary, *args, "--json"], env=self.ctx.env)

    def backup(self, rep: int) -> Sample:
        check([self.binary, "init", "--repo", self.repo(rep), "--json"], env=self.ctx.env)
        return self._backup(rep)

    def _backup(self, rep: int) -> Sample:
        local = None if self.bucket else Path(self.repo(rep))
        before = dir_bytes(local) if local else 0
        t = self._run("backup", self.ctx.source, "--repo", self.repo(rep))
        stats = last_json(t.stdout)[0]["stats"]
        return Sample.of(t, stored_bytes=int(stats["stored_bytes"]), new_bytes=int(stats["new_bytes"]),
                         repo_growth=dir_bytes(local) - before if local else None,
                         engine_seconds=float(stats["duration"]), skipped_files=int(stats.get("skipped_files", 0)))

    def restore(self, rep: int, target: str) -> Sample:
        return Sample.of(self._run("restore", self.ctx.source, "--as", target, "--repo", self.repo(rep)))

    def second_backup(self, rep: int) -> Sample:
        return self._backup(rep)

    def compare(self, rep: int, volume: str) -> tuple[bool, list[str]]:
        """Does ``volume`` hold exactly the snapshot (types, modes, owners, mtimes, content)? And if not, why."""
        cmd = [self.binary, "compare", volume, "--of", self.ctx.source, "--repo", self.repo(rep), "--json"]
        res = subprocess.run(cmd, capture_output=True, text=True, env=self.ctx.env, check=False)
        try:
            doc = json.loads(res.stdout)
        except ValueError:
            return False, [f"compare exited {res.returncode}: {res.stderr.strip()[-300:]}"]
        return bool(doc.get("match")), list(doc.get("differences") or doc.get("error", {}).values())[:5]

    def discard(self, rep: int) -> None:
        if not self.bucket:
            shutil.rmtree(self.repo(rep), ignore_errors=True)


def find_binary(name: str, *candidates: Path) -> str | None:
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    return shutil.which(name)
