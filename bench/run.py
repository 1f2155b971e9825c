#!/usr/bin/env python3
"""volmove's benchmark: backup, restore and a second backup after a 1% change, side by side
with ``tar | zstd -3 -T2`` (the reference) and restic, on the same data in the same run.

    sudo .venv/bin/python bench/run.py [--size 1GiB] [--repeat 3] [--s3] [--json out.json]

Needs root on a Docker host (it reads and writes volumes through their mountpoints), docker,
tar, zstd and, for its column, restic.  bench/README.md says what is measured and how.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from contenders import Contender, Context, Reference, Restic, Sample, Volmove, find_binary
from dataset import GiB, Layout, Mutation, generate, mutate
from report import render, summarize
from tools import BenchError, Docker, remove_bucket, s3_env, settle, tool_version, tree_totals, warm_up

ROOT = Path(__file__).resolve().parent.parent
UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
         "kib": 1024, "mib": 1024**2, "gib": 1024**3}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 300MiB, 1GiB)")
    return int(float(m.group(1)) * UNITS[m.group(2).lower()])


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=parse_size, default=GiB, help="size of the data set (default 1GiB)")
    p.add_argument("--repeat", type=int, default=3, help="timings per measurement; the median is reported")
    p.add_argument("--s3", action="store_true", help="also measure volmove against the S3 server")
    p.add_argument("--s3-env", help="env file of the S3 server (default: $VOLMOVE_BENCH_S3_ENV, "
                                    "/tmp/volmove-ceph/s3.env, /tmp/ceph-s3/s3.env: the first whose server "
                                    "answers; or the AWS_* variables)")
    p.add_argument("--json", type=Path, help="write every sample, the summary and the verdicts here")
    p.add_argument("--seed", type=int, default=1, help="seed of the data set")
    p.add_argument("--workdir", type=Path, help="archives and local repositories (default: a temp dir in /var/tmp)")
    p.add_argument("--volmove", help="the volmove command (default: .venv/bin/volmove of this checkout)")
    p.add_argument("--no-restic", action="store_true", help="leave restic out")
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    return args


@dataclass
class Results:
    samples: dict[str, dict[str, list[Sample]]] = field(default_factory=dict)
    checks: list[dict[str, Any]] = field(default_factory=list)

    def add(self, contender: str, op: str, sample: Sample) -> None:
        self.samples.setdefault(contender, {}).setdefault(op, []).append(sample)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.id = secrets.token_hex(4)
        self.docker = Docker(f"volmove.bench={self.id}")
        self.work = Path(tempfile.mkdtemp(prefix=f"volmove-bench-{self.id}-", dir=args.workdir or "/var/tmp"))
        self.source = f"volmove-bench-{self.id}"
        self.bucket = f"volmove-bench-{self.id}" if args.s3 else None
        self.env = {**os.environ, **(s3_env(args.s3_env) if args.s3 else {})}
        self.results = Results()
        self.contenders: list[Contender] = []
        self.layout = Layout()
        self.mutation = Mutation()
        self.info: dict[str, Any] = {}

    # -------------------------------------------------------------- phases

    def run(self) -> dict[str, Any]:
        source_dir = self.docker.create_volume(self.source)
        self.contenders = self._contenders(Context(self.source, source_dir, self.work, self.docker, self.env))
        self._generate(source_dir)
        self._full_phase(source_dir)
        self._change(source_dir)
        self._second_phase()
        return self._document()

    def _contenders(self, ctx: Context) -> list[Contender]:
        volmove = self.args.volmove or find_binary("volmove", ROOT / ".venv/bin/volmove")
        if not volmove:
            raise BenchError("no volmove command: install it (scripts/install.sh) or give --volmove")
        out: list[Contender] = [Reference(ctx)]
        restic = None if self.args.no_restic else shutil.which("restic")
        if restic:
            out.append(Restic(ctx, restic))
        elif not self.args.no_restic:
            log("restic not found (apt-get install restic): its column is left out")
        out.append(Volmove(ctx, volmove))
        if self.bucket:
            out.append(Volmove(ctx, volmove, bucket=self.bucket))
        self.info["tools"] = {"volmove": volmove, "restic": tool_version([restic or "restic", "version"]),
                              "zstd": tool_version(["zstd", "--version"]), "tar": tool_version(["tar", "--version"])}
        return out

    def _generate(self, source_dir: Path) -> None:
        start = time.perf_counter()
        self.layout = generate(source_dir, self.args.size, self.args.seed)
        os.sync()
        log(f"data set: {len(self.layout.files)} files, {mb(self.layout.total_bytes)} MB in volume {self.source} "
            f"({time.perf_counter() - start:.1f}s to generate)")
        log(f"warm-up read: {warm_up(source_dir):.1f}s")

    def _full_phase(self, source_dir: Path) -> None:
        restored = []
        for rep in range(self.args.repeat):
            for c in rotated(self.contenders, rep):
                self._measure(c.name, "backup", c.backup, rep)
            for c in rotated(self.contenders, rep):
                target = f"{self.source}-{slug(c.name)}-r{rep}"
                self._measure(c.name, "restore", c.restore, rep, target)
                if rep == 0:
                    self._check_restore(c, target)
                restored.append(target)
                if not c.incremental:
                    c.discard(rep)
        # Removed only now: for a minute or more after 20,000 files are deleted, ext4 scans past
        # their inodes whenever it allocates one, and the next restore would pay for it.
        for target in restored:
            self.docker.remove_volume(target)

    def _change(self, source_dir: Path) -> None:
        self.mutation = mutate(source_dir, self.layout, self.args.seed)
        os.sync()
        m = self.mutation
        log(f"changed {mb(m.changed_bytes)} MB: {m.overwrites} overwrites of 64 KiB in {m.files_overwritten} "
            f"large files, appends to {m.appends} small files; warm-up read: {warm_up(source_dir):.1f}s")

    def _second_phase(self) -> None:
        incremental = [c for c in self.contenders if c.incremental]
        for rep in range(self.args.repeat):
            for c in rotated(incremental, rep):
                self._measure(c.name, "second backup", c.second_backup, rep)
                c.discard(rep)

    def _measure(self, name: str, op: str, step: Callable[..., Sample], *args: Any) -> None:
        os.sync()  # nobody pays for the previous contender's writeback
        waited = settle()  # nor for background work it left running
        if waited > 5:
            log(f"  (waited {waited:.0f}s for the machine to go quiet)")
        sample = step(*args)
        os.sync()
        self.results.add(name, op, sample)
        stored = f", stored {mb(sample.stored_bytes)} MB" if sample.stored_bytes is not None else ""
        log(f"  {name:<16} {op:<14} {sample.seconds:7.2f}s  peak RSS {sample.peak_rss / 2**20:6.0f} MiB{stored}")

    def _check_restore(self, c: Contender, target: str) -> None:
        files, size = tree_totals(self.docker.mountpoint(target))
        ok = files == len(self.layout.files) and size == self.layout.total_bytes
        check: dict[str, Any] = {"contender": c.name, "files": files, "bytes": size, "complete": ok}
        if isinstance(c, Volmove):
            check["compare"], check["differences"] = c.compare(0, target)
            ok = ok and check["compare"]
        self.results.checks.append(check)
        if not ok:
            log(f"WARNING: {c.name}'s restore does not match the source: {check}")

    # -------------------------------------------------------------- output

    def _document(self) -> dict[str, Any]:
        summary, verdicts = summarize(self.results.samples, self.layout.total_bytes)
        return {
            "config": {"size": self.args.size, "repeat": self.args.repeat, "seed": self.args.seed, "s3": self.args.s3},
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "loadavg": os.getloadavg(),
                        "volmove_commit": git_commit(), **self.info},
            "dataset": {"files": len(self.layout.files), "bytes": self.layout.total_bytes,
                        "small_files": len(self.layout.small), "large_files": len(self.layout.large)},
            "change": {**asdict(self.mutation), "changed_bytes": self.mutation.changed_bytes},
            "restore_checks": self.results.checks,
            "samples": {name: {op: [asdict(s) for s in ss] for op, ss in ops.items()}
                        for name, ops in self.results.samples.items()},
            "summary": summary,
            "targets": verdicts,
        }

    def cleanup(self) -> None:
        removed = self.docker.remove_labelled()
        shutil.rmtree(self.work, ignore_errors=True)
        if self.bucket:
            try:
                remove_bucket(self.bucket, self.env)
            except Exception as exc:
                log(f"could not remove bucket {self.bucket}: {exc}")
        log(f"cleaned up: volumes {', '.join(removed) or '-'}, {self.work}" + (f", s3://{self.bucket}"
                                                                                if self.bucket else ""))


def rotated(items: list[Contender], n: int) -> list[Contender]:
    """Each repetition starts with another contender, so none always runs first or last."""
    k = n % len(items) if items else 0
    return items[k:] + items[:k]


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.1f}"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def git_commit() -> str:
    res = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         check=False)
    return res.stdout.strip() or "?"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        log("run as root: the benchmark reads and writes volumes through their mountpoints")
        return 2
    bench = None
    try:
        bench = Bench(args)  # settles the S3 server first: a missing one fails before any timing
        doc = bench.run()
    except BenchError as exc:
        log(f"bench: error: {exc}")
        return 1
    except KeyboardInterrupt:
        log("bench: interrupted")
        return 130
    finally:
        if bench is not None:
            bench.cleanup()
    print(render(doc))
    if args.json:
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
