"""What the benchmark runs things with: timed subprocesses, Docker volumes, S3 buckets."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

S3_ENV_FILES = ("/tmp/volmove-ceph/s3.env", "/tmp/ceph-s3/s3.env")  # scripts/s3-server.sh writes the first


class BenchError(Exception):
    """A step of the benchmark failed; the message says which and why."""


@dataclass(frozen=True)
class Timed:
    seconds: float  # wall clock
    cpu_seconds: float  # user + system of the process and everything it waited for
    peak_rss: int  # bytes: the largest resident set of the process or any waited-for descendant
    stdout: str


def timed(cmd: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: Path | None = None) -> Timed:
    """Run ``cmd`` to its end: wall time, CPU time and peak RSS (wait4's rusage, which takes the
    maximum over the process and the children it reaped: a pipeline's peak under ``bash -c``)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(list(cmd), stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                env=dict(env) if env is not None else None, cwd=cwd)
        _pid, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    if proc.returncode != 0:
        raise BenchError(f"{shlex.join(cmd)} exited {proc.returncode}: {stderr.strip()[-2000:] or stdout[-2000:]}")
    return Timed(seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024, stdout)


def check(cmd: Sequence[str], *, env: Mapping[str, str] | None = None) -> str:
    """Run an untimed set-up or clean-up step; its stdout."""
    res = subprocess.run(list(cmd), capture_output=True, text=True, env=dict(env) if env is not None else None,
                         stdin=subprocess.DEVNULL, check=False)
    if res.returncode != 0:
        raise BenchError(f"{shlex.join(cmd)} exited {res.returncode}: {res.stderr.strip()[-2000:]}")
    return res.stdout


def tool_version(cmd: Sequence[str]) -> str:
    try:
        res = subprocess.run(list(cmd), capture_output=True, text=True, check=False)
    except FileNotFoundError:
        return "missing"
    return (res.stdout or res.stderr).strip().splitlines()[0] if (res.stdout or res.stderr).strip() else "?"


# ---------------------------------------------------------------- files


def tree_totals(root: Path) -> tuple[int, int]:
    """(regular files, their bytes) under ``root``."""
    files = size = 0
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            st = os.lstat(os.path.join(dirpath, name))
            if not os.path.islink(os.path.join(dirpath, name)):
                files += 1
                size += st.st_size
    return files, size


def dir_bytes(root: Path) -> int:
    return tree_totals(root)[1] if root.exists() else 0


def warm_up(root: Path) -> float:
    """Read every file once so that every contender sees the same warm page cache; seconds taken."""
    start = time.perf_counter()
    buf = bytearray(1 << 20)
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                continue
            with open(path, "rb", buffering=0) as f:
                while f.readinto(buf):
                    pass
    return time.perf_counter() - start


# ---------------------------------------------------------------- Docker


@dataclass(frozen=True)
class Docker:
    label: str  # key=value put on every volume the benchmark creates

    def create_volume(self, name: str) -> Path:
        check(["docker", "volume", "create", "--label", self.label, name])
        return self.mountpoint(name)

    def mountpoint(self, name: str) -> Path:
        path = Path(check(["docker", "volume", "inspect", "-f", "{{.Mountpoint}}", name]).strip())
        if not path.is_dir():
            raise BenchError(f"volume {name}'s mountpoint {path} is not readable here: run as root on the Docker host")
        return path

    def remove_volume(self, name: str) -> None:
        subprocess.run(["docker", "volume", "rm", "-f", name], capture_output=True, check=False)

    def remove_labelled(self) -> list[str]:
        names = check(["docker", "volume", "ls", "-q", "--filter", f"label={self.label}"]).split()
        for name in names:
            self.remove_volume(name)
        return names


# ---------------------------------------------------------------- quiet machine

QUIET_BUSY = 0.15  # share of the CPUs busy (iowait included) below which the machine counts as quiet
QUIET_WINDOW = 0.5
QUIET_MAX_WAIT = 20.0


def _cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies over all CPUs; idle alone counts as not busy."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(fields) - fields[3], sum(fields)


def settle() -> float:
    """Wait until the machine is quiet (what one step leaves behind, such as the S3
    server compacting what it just stored or the kernel writing back, must not land
    on the next contender); returns the seconds waited."""
    start = time.monotonic()
    while time.monotonic() - start < QUIET_MAX_WAIT:
        busy0, total0 = _cpu_times()
        time.sleep(QUIET_WINDOW)
        busy1, total1 = _cpu_times()
        if total1 > total0 and (busy1 - busy0) / (total1 - total0) < QUIET_BUSY:
            break
    return time.monotonic() - start


# ---------------------------------------------------------------- S3


def s3_env(env_file: str | None) -> dict[str, str]:
    """The S3 server's settings: an env file of ``export K=V`` lines, or AWS_* already set."""
    if env_file:
        if not Path(env_file).is_file():
            raise BenchError(f"no S3 env file at {env_file}")
        return _parse_env_file(Path(env_file))
    found = [Path(c) for c in (os.environ.get("VOLMOVE_BENCH_S3_ENV", ""), *S3_ENV_FILES) if c and Path(c).is_file()]
    for path in found:  # a file left by a server that has since stopped is skipped
        env = _parse_env_file(path)
        if _answers(env.get("AWS_ENDPOINT_URL", "")):
            return env
    if found:
        raise BenchError(f"--s3: no S3 server answers at the endpoints of {', '.join(map(str, found))}")
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        return {}
    raise BenchError("--s3: no S3 settings found; give --s3-env FILE or set AWS_ACCESS_KEY_ID, "
                     "AWS_SECRET_ACCESS_KEY and AWS_ENDPOINT_URL")


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=3).close()
    except urllib.error.HTTPError:
        return True  # an S3 error document is an answer
    except (OSError, ValueError):
        return False
    return True


def _parse_env_file(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip().removeprefix("export ").strip()
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            out[key.strip()] = value.strip().strip("'\"")
    if "S3_ENDPOINT_URL" in out and "AWS_ENDPOINT_URL" not in out:
        out["AWS_ENDPOINT_URL"] = out["S3_ENDPOINT_URL"]
    return out


def remove_bucket(bucket: str, env: Mapping[str, str]) -> int:
    """Delete every object, every unfinished multipart upload and the bucket; objects removed."""
    import boto3  # only --s3 needs it (the venv that runs volmove has it)

    session = boto3.session.Session(aws_access_key_id=env.get("AWS_ACCESS_KEY_ID"),
                                    aws_secret_access_key=env.get("AWS_SECRET_ACCESS_KEY"),
                                    region_name=env.get("AWS_DEFAULT_REGION") or "us-east-1")
    client: Any = session.client("s3", endpoint_url=env.get("AWS_ENDPOINT_URL") or env.get("S3_ENDPOINT_URL"))
    removed = 0
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
                removed += len(keys)
        for upload in client.list_multipart_uploads(Bucket=bucket).get("Uploads", []):
            client.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
        client.delete_bucket(Bucket=bucket)
    except client.exceptions.NoSuchBucket:
        pass
    return removed


def last_json(stdout: str) -> Any:
    """The document a ``--json`` command printed (the whole output, or its last JSON line)."""
    try:
        return json.loads(stdout)
    except ValueError:
        for line in reversed(stdout.splitlines()):
            if line.startswith("{"):
                return json.loads(line)
    raise BenchError(f"no JSON in output: {stdout[-500:]!r}")
