"""Pack names: the hash of the header (new packs) or of the whole pack (older ones)."""

from __future__ import annotations

from volmove.core.format import encode_pack_header, object_id, pack_id_matches


def _pack() -> tuple[bytes, bytes]:
    blobs = b"frame-one" + b"frame-two"
    header = encode_pack_header([("a" * 64, "d", 0, 9, 20), ("b" * 64, "d", 9, 9, 20)])
    return blobs + header, header


def test_new_packs_are_named_by_their_header() -> None:
    pack, header = _pack()
    assert pack_id_matches(object_id(header), pack)


def test_older_packs_named_by_the_whole_pack_still_match() -> None:
    pack, _ = _pack()
    assert pack_id_matches(object_id(pack), pack)


def test_a_changed_header_or_a_foreign_object_does_not_match() -> None:
    pack, header = _pack()
    flipped = bytearray(pack)
    flipped[len(pack) - len(header) + 3] ^= 1
    assert not pack_id_matches(object_id(header), bytes(flipped))
    assert not pack_id_matches(object_id(header), b"short")
    assert not pack_id_matches(object_id(header), b"x" * 100)
