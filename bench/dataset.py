"""The benchmark's data set: deterministic, mixed, and a database-like 1% change to it.

For a total size S the set holds, roughly:
  - incompressible binary in large files (db/), as a database's table files   ~40%
  - compressible text, log-like lines from a vocabulary (logs/)               ~30%
  - compressible JSON lines (json/)                                           ~18%
  - 20,000 small files per GiB (small/), text, JSON and binary, 64 B-32 KiB   ~10%

Every file's content comes from a generator seeded by (seed, path), so the same
seed gives the same bytes whatever the order of generation, and no two blocks
repeat: deduplication finds nothing that a real volume would not offer.
"""

from __future__ import annotations

import math
import os
import random
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
BLOCK = 1 * MiB
SMALL_PER_GIB = 20_000
SMALL_MIN, SMALL_MAX = 64, 32 * KiB
FILES_PER_DIR = 100
WRITE_SIZE = 64 * KiB
APPENDED_FILES = 50

Generator = Callable[[random.Random, int], bytes]


def _vocabulary() -> list[str]:
    """256 tokens (one per byte value): common words repeated, rarer ones, numbers and line breaks."""
    rng = random.Random("volmove-bench-vocabulary")
    letters = "etaoinshrdlucmfwypvbgkjqxz"
    rare = ["".join(rng.choices(letters, k=rng.randint(3, 11))) for _ in range(150)]
    common = ["the", "of", "and", "to", "in", "is", "for", "request", "user", "volume", "ok", "error",
              "backup", "GET", "POST", "status=200", "status=404", "took", "ms", "id"]
    numbers = [str(rng.randint(0, 99999)) for _ in range(40)]
    tokens = common * 3 + rare + numbers
    tokens = tokens[:248] + ["\n"] * 8
    return tokens


VOCAB = _vocabulary()


def text_bytes(rng: random.Random, n: int) -> bytes:
    """Log-like prose: about 3x compressible with zstd -3."""
    out = bytearray()
    while len(out) < n:
        words = [VOCAB[b] for b in rng.randbytes(max(64, (n - len(out)) // 5))]
        out += " ".join(words).encode()
    return bytes(out[:n])


def json_bytes(rng: random.Random, n: int) -> bytes:
    """JSON lines of small records: about 3-4x compressible."""
    out = bytearray()
    while len(out) < n:
        count = max(8, (n - len(out)) // 160)
        ints = array("I", rng.randbytes(4 * 4 * count))
        recs = [
            f'{{"id":{ints[4 * i]},"user":"{VOCAB[ints[4 * i + 1] & 0x7F]}","score":{ints[4 * i + 2] % 100000 / 100},'
            f'"tags":["{VOCAB[ints[4 * i + 3] & 0x7F]}","{VOCAB[(ints[4 * i + 3] >> 8) & 0x7F]}"],'
            f'"active":{"true" if ints[4 * i + 1] & 0x100 else "false"},"region":"eu-{ints[4 * i + 2] % 7}"}}\n'
            for i in range(count)
        ]
        out += "".join(recs).encode()
    return bytes(out[:n])


def binary_bytes(rng: random.Random, n: int) -> bytes:
    """Incompressible."""
    return rng.randbytes(n)


GENERATORS: dict[str, Generator] = {".log": text_bytes, ".txt": text_bytes, ".json": json_bytes,
                                    ".dat": binary_bytes, ".bin": binary_bytes}


def generator_for(path: str) -> Generator:
    return GENERATORS[os.path.splitext(path)[1]]


@dataclass(frozen=True)
class FileSpec:
    path: str  # relative to the volume's root
    size: int


@dataclass
class Layout:
    files: list[FileSpec] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def large(self) -> list[FileSpec]:
        return [f for f in self.files if not f.path.startswith("small/")]

    @property
    def small(self) -> list[FileSpec]:
        return [f for f in self.files if f.path.startswith("small/")]


def _split(prefix: str, ext: str, total: int, max_file: int) -> list[FileSpec]:
    """``total`` bytes in at least two files of at most ``max_file`` bytes."""
    count = max(2, math.ceil(total / max_file))
    base = total // count
    return [FileSpec(f"{prefix}-{i:03d}{ext}", base + (total - base * count if i == 0 else 0)) for i in range(count)]


def _small_files(rng: random.Random, count: int) -> list[FileSpec]:
    exts = [".txt"] * 5 + [".json"] * 3 + [".bin"] * 2
    lo, hi = math.log(SMALL_MIN), math.log(SMALL_MAX)
    return [FileSpec(f"small/d{i // FILES_PER_DIR:04d}/f{i:05d}{exts[i % len(exts)]}",
                     int(math.exp(rng.uniform(lo, hi)))) for i in range(count)]


def plan(size: int, seed: int) -> Layout:
    """What to write for a data set of about ``size`` bytes."""
    rng = random.Random(f"{seed}:plan")
    small = _small_files(rng, max(100, round(SMALL_PER_GIB * size / GiB)))
    rest = max(0, size - sum(f.size for f in small))
    layout = Layout()
    layout.files += _split("db/table", ".dat", rest * 44 // 100, 64 * MiB)
    layout.files += _split("logs/app", ".log", rest * 34 // 100, 16 * MiB)
    layout.files += _split("json/events", ".json", rest - rest * 44 // 100 - rest * 34 // 100, 8 * MiB)
    layout.files += small
    return layout


def _blocks(gen: Generator, rng: random.Random, size: int) -> Iterator[bytes]:
    done = 0
    while done < size:
        n = min(BLOCK, size - done)
        yield gen(rng, n)
        done += n


def write_file(root: Path, spec: FileSpec, seed: int) -> None:
    path = root / spec.path
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"{seed}:{spec.path}")
    with open(path, "wb") as f:
        for block in _blocks(generator_for(spec.path), rng, spec.size):
            f.write(block)


def generate(root: Path, size: int, seed: int) -> Layout:
    """Write the data set under ``root`` (an empty directory, e.g. a volume's mountpoint)."""
    layout = plan(size, seed)
    for spec in layout.files:
        write_file(root, spec, seed)
    (root / "empty-dir").mkdir(exist_ok=True)
    return layout


@dataclass
class Mutation:
    overwrites: int = 0
    overwritten_bytes: int = 0
    files_overwritten: int = 0
    appends: int = 0
    appended_bytes: int = 0

    @property
    def changed_bytes(self) -> int:
        return self.overwritten_bytes + self.appended_bytes


def _overwrite(path: Path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def mutate(root: Path, layout: Layout, seed: int, fraction: float = 0.01) -> Mutation:
    """Change ``fraction`` of the data the way a database does: scattered 64 KiB page
    overwrites inside the large files (weighted by size, 4 KiB aligned), plus appends
    to 50 small files."""
    rng = random.Random(f"{seed}:mutate")
    large = layout.large
    writes = max(1, round(fraction * layout.total_bytes / WRITE_SIZE))
    touched: set[str] = set()
    out = Mutation()
    for spec in rng.choices(large, weights=[f.size for f in large], k=writes):
        offset = rng.randrange(0, max(1, spec.size - WRITE_SIZE)) // (4 * KiB) * (4 * KiB)
        _overwrite(root / spec.path, offset, generator_for(spec.path)(rng, WRITE_SIZE))
        touched.add(spec.path)
        out.overwrites += 1
        out.overwritten_bytes += WRITE_SIZE
    for spec in rng.sample([f for f in layout.small if not f.path.endswith(".bin")], APPENDED_FILES):
        data = generator_for(spec.path)(rng, rng.randint(256, 4 * KiB))
        with open(root / spec.path, "ab") as f:
            f.write(data)
        out.appends += 1
        out.appended_bytes += len(data)
    out.files_overwritten = len(touched)
    return out
