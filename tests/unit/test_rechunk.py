"""Guided re-chunking gives exactly the chunks of chunking the whole file again."""

from __future__ import annotations

import hashlib
import random

import pytest

from volmove.core.chunker import chunk_bytes
from volmove.core.format import CDC_2020, CDC_RONOMON, ChunkerParams
from volmove.core.rechunk import guided_chunks, old_layout

ALGORITHMS = [CDC_2020, CDC_RONOMON]


def small(algorithm: str) -> ChunkerParams:
    return ChunkerParams(min_size=2048, avg_size=8192, max_size=32768, algorithm=algorithm)


def _sid(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def _rechunk(old_data: bytes, new_data: bytes, params: ChunkerParams) -> tuple[list[str], int]:
    """The ids guided re-chunking gives for new_data, and how many old chunks it reused."""
    old = old_layout([(_sid(c), len(c)) for c in chunk_bytes(old_data, params)])

    def still_there(k: int) -> bool:
        c = old[k]
        return _sid(new_data[c.offset : c.offset + c.length]) == c.id

    ids, reused = [], 0
    for old_chunk, data in guided_chunks(old, still_there, lambda off, n: new_data[off : off + n], params):
        if old_chunk is None:
            ids.append(_sid(data))
        else:
            ids.append(old_chunk.id)
            reused += 1
    return ids, reused


def _mutations(rng: random.Random, data: bytes) -> list[bytes]:
    n = len(data)
    at = rng.randrange(n)
    overwrite = bytearray(data)
    for _ in range(3):
        off = rng.randrange(max(1, n - 4096))
        overwrite[off : off + 4096] = rng.randbytes(4096)
    return [
        bytes(overwrite),
        data[:at] + rng.randbytes(rng.randint(1, 5000)) + data[at:],  # insertion: boundaries move
        data[:at] + data[at + rng.randint(1, 5000) :],  # deletion
        data + rng.randbytes(rng.randint(1, 40000)),  # growth past the old last chunk
        data[: rng.randrange(n)],  # truncation
        data[: n - 10],
        data[:0],
        data,  # unchanged
        rng.randbytes(n),  # all new
    ]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("seed", range(12))
def test_equals_chunking_the_whole_file(seed: int, algorithm: str) -> None:
    params = small(algorithm)
    rng = random.Random(seed)
    text = b" ".join(rng.choice([b"alpha", b"beta", b"gamma", b"delta", b"\n"]) for _ in range(60000))
    data = text[: rng.randint(1, len(text))] if seed % 3 else rng.randbytes(rng.randint(1, 400000))
    for new in _mutations(rng, data):
        ids, _ = _rechunk(data, new, params)
        assert ids == [_sid(c) for c in chunk_bytes(new, params)]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_an_overwrite_reuses_all_but_the_chunks_it_touches(algorithm: str) -> None:
    rng = random.Random(7)
    data = rng.randbytes(1 << 20)
    new = bytearray(data)
    new[500_000:504_096] = rng.randbytes(4096)
    ids, reused = _rechunk(data, bytes(new), small(algorithm))
    assert len(ids) - reused <= 3
    assert reused >= len(ids) - 3 > 20


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_with_the_real_parameters(algorithm: str) -> None:
    params = ChunkerParams(algorithm=algorithm)
    rng = random.Random(3)
    data = rng.randbytes(6 << 20)
    new = bytearray(data)
    for off in (0, 1 << 20, (3 << 20) + 77, len(data) - 65536):
        new[off : off + 65536] = rng.randbytes(65536)
    ids, reused = _rechunk(data, bytes(new), params)
    assert ids == [_sid(c) for c in chunk_bytes(bytes(new), params)]
    assert reused >= len(ids) - 10
