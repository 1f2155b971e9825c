"""Index and pack-header rows are hostile input: every row is checked before it is used."""

from __future__ import annotations

from typing import Any

import pytest

from volmove.core.errors import CorruptDataError
from volmove.core.format import (
    BLOB_DATA,
    BLOB_META,
    BlobRef,
    decode_index,
    decode_pack_header,
    encode_index,
    encode_pack_header,
    object_id,
)

PACK = "1" * 64
A, B = "a" * 64, "0123456789abcdef" * 4


def _index(rows: list[Any]) -> tuple[str, bytes]:
    raw = encode_index({PACK: rows})
    return object_id(raw), raw


def test_good_rows_decode_to_blob_refs() -> None:
    index_id, raw = _index([[A, BLOB_DATA, 0, 10, 20], [B, BLOB_META, 10, 5, 7]])
    assert decode_index(index_id, raw) == [(A, BlobRef(PACK, 0, 10, 20, BLOB_DATA)),
                                           (B, BlobRef(PACK, 10, 5, 7, BLOB_META))]
    assert decode_index(*_index([])) == []


@pytest.mark.parametrize("row", [
    "not a row", [A, BLOB_DATA, 0, 10], [A, BLOB_DATA, 0, 10, 20, 0],
    [A.upper(), BLOB_DATA, 0, 10, 20], [A[:-1], BLOB_DATA, 0, 10, 20], [A + "0", BLOB_DATA, 0, 10, 20],
    ["g" * 64, BLOB_DATA, 0, 10, 20], [7, BLOB_DATA, 0, 10, 20], [None, BLOB_DATA, 0, 10, 20],
    [A, "x", 0, 10, 20], [A, BLOB_DATA, True, 10, 20], [A, BLOB_DATA, 0, 1.0, 20], [A, BLOB_DATA, 0, 10, "20"],
    [A, BLOB_DATA, -1, 10, 20], [A, BLOB_DATA, 0, -10, 20], [A, BLOB_DATA, 0, 10, 1 << 48],
    [A, BLOB_DATA, 0, 10, (256 << 20) + 1], [A, BLOB_DATA, 1 << 40, 1, 20],
], ids=repr)
def test_a_bad_row_anywhere_refuses_the_index(row: Any) -> None:
    for rows in ([row], [[B, BLOB_DATA, 0, 1, 1], row], [row, [B, BLOB_DATA, 0, 1, 1]]):
        with pytest.raises(CorruptDataError):
            decode_index(*_index(rows))


def test_pack_header_rows_must_lie_before_the_header() -> None:
    def header(rows: list[Any], data_size: int) -> list[tuple[str, BlobRef]]:
        tail = encode_pack_header(rows)
        return decode_pack_header(PACK, tail, data_size + len(tail))

    assert header([[A, BLOB_DATA, 0, 10, 20]], 10) == [(A, BlobRef(PACK, 0, 10, 20, BLOB_DATA))]
    with pytest.raises(CorruptDataError):
        header([[A, BLOB_DATA, 0, 11, 20]], 10)
