"""The repository format, version 1 (documented in docs/FORMAT.md).

Pure: object names, the config object, pack trailers and index objects, and
their validation.  Everything read back from storage is untrusted and is
checked here before use.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import blake3
import zstandard

from volmove.core.errors import CorruptDataError, RepositoryError

FORMAT_VERSION = 1
# Features this build understands; a repository naming any other is refused.
SUPPORTED_FEATURES: frozenset[str] = frozenset()

CONFIG_KEY = "config"
PACK_MAGIC = b"VMPACK01"
TRAILER = struct.Struct("<I8s")  # header length, magic
MAX_HEADER = 64 << 20
MAX_META_BYTES = 256 << 20  # a catalog/index object may not inflate beyond this

BLOB_DATA = "d"
BLOB_META = "m"
BLOB_TYPES = frozenset({BLOB_DATA, BLOB_META})


Hasher = Callable[[bytes | memoryview], str]


def object_id(data: bytes | memoryview) -> str:
    """The name of a stored object (pack, index, snapshot): SHA-256 of what names it."""
    return hashlib.sha256(data).hexdigest()


def _blake3_id(data: bytes | memoryview) -> str:
    return blake3.blake3(data).hexdigest()


# How a repository names its blobs (config ``hash``).  BLAKE3 hashes ~3x faster than SHA-256 here,
# which is most of what a backup of a slightly changed volume spends on its large files.
BLOB_HASHES: dict[str, Hasher] = {"sha256": object_id, "blake3": _blake3_id}
DEFAULT_HASH = "blake3"


_HEX_ID = re.compile(r"[0-9a-f]{64}")
_HEX_RUN = re.compile(r"[0-9a-f]*")


def is_hex_id(value: object) -> bool:
    return isinstance(value, str) and _HEX_ID.fullmatch(value) is not None


def pack_key(pack_id: str) -> str:
    return f"data/{pack_id[:2]}/{pack_id}"


def index_key(index_id: str) -> str:
    return f"index/{index_id}"


def snapshot_key(snapshot_id: str) -> str:
    return f"snapshots/{snapshot_id}"


def id_from_key(key: str) -> str:
    return key.rsplit("/", 1)[-1]


# Content-defined chunkers (config ``chunker.algorithm``); docs/FORMAT.md defines both.
CDC_RONOMON = "fastcdc-ronomon"  # fastcdc-py's; repositories whose config names no algorithm
CDC_2020 = "fastcdc-2020"  # pyfastcdc's: ~30% faster here, and it releases the GIL while it cuts
CHUNKER_LIMITS = {  # (min, avg, max) bounds of each parameter
    CDC_RONOMON: ((64, 1 << 24), (256, 1 << 26), (1024, 1 << 27)),
    CDC_2020: ((64, 1 << 20), (256, 1 << 22), (1024, 1 << 24)),
}


@dataclass(frozen=True)
class ChunkerParams:
    min_size: int = 32 * 1024
    avg_size: int = 128 * 1024
    max_size: int = 512 * 1024
    algorithm: str = CDC_2020


@dataclass(frozen=True)
class RepoConfig:
    id: str
    created: str
    version: int = FORMAT_VERSION
    features: tuple[str, ...] = ()
    chunker: ChunkerParams = field(default_factory=ChunkerParams)
    compression: str = "zstd"
    hash: str = DEFAULT_HASH

    @property
    def blob_id(self) -> Hasher:
        """The id of a blob's raw bytes in this repository."""
        return BLOB_HASHES[self.hash]

    def to_json(self) -> bytes:
        doc = {
            "volmove_repository": self.version,
            "id": self.id,
            "created": self.created,
            "features": list(self.features),
            "chunker": {"algorithm": self.chunker.algorithm, "min": self.chunker.min_size,
                        "avg": self.chunker.avg_size, "max": self.chunker.max_size},
            "compression": self.compression,
            "hash": self.hash,
        }
        return json.dumps(doc, indent=1).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> RepoConfig:
        doc = _load_json(raw, "repository config")
        version = doc.get("volmove_repository")
        if version != FORMAT_VERSION:
            raise RepositoryError(
                f"unsupported repository format version {version!r} (this volmove reads {FORMAT_VERSION})"
            )
        features = doc.get("features", [])
        unknown = set(features) - SUPPORTED_FEATURES if isinstance(features, list) else {"?"}
        if unknown:
            raise RepositoryError(
                f"repository needs features this volmove lacks: {', '.join(sorted(map(str, unknown)))}"
            )
        params = _chunker_params(doc.get("chunker"))
        hash_name = doc.get("hash")
        if doc.get("compression") != "zstd" or not isinstance(hash_name, str) or hash_name not in BLOB_HASHES:
            raise RepositoryError("repository uses a compression or hash this volmove does not know")
        return cls(id=str(doc.get("id")), created=str(doc.get("created")), features=tuple(features),
                   chunker=params, hash=str(hash_name))


class BlobRef(NamedTuple):  # one per blob in memory: a tuple is made 3x faster than a frozen dataclass
    """Where one blob lives: pack, offset and stored length, and its raw length."""

    pack: str
    offset: int
    length: int
    raw_length: int
    type: str


def encode_pack_header(blobs: list[tuple[str, str, int, int, int]]) -> bytes:
    """The trailer that makes a pack self-describing, so packs left by an
    interrupted backup can be indexed and reused later."""
    body = zstandard.ZstdCompressor(level=3).compress(json.dumps({"v": 1, "blobs": blobs}).encode())
    return body + TRAILER.pack(len(body), PACK_MAGIC)


def pack_id_matches(pack_id: str, data: bytes) -> bool:
    """Whether a whole pack bears its name: the hash of its header and trailer, or, for packs
    written by earlier versions, of the whole pack."""
    if len(data) >= TRAILER.size:
        hlen, magic = TRAILER.unpack(data[-TRAILER.size :])
        end = len(data) - TRAILER.size
        if magic == PACK_MAGIC and hlen <= end and object_id(memoryview(data)[end - hlen :]) == pack_id:
            return True
    return object_id(data) == pack_id


def decode_pack_header(pack_id: str, tail: bytes, pack_size: int) -> list[tuple[str, BlobRef]]:
    """Parse the header found at the end of a pack (``tail`` holds at least it)."""
    if len(tail) < TRAILER.size:
        raise CorruptDataError(f"pack {pack_id} is truncated")
    hlen, magic = TRAILER.unpack(tail[-TRAILER.size :])
    if magic != PACK_MAGIC or hlen > MAX_HEADER or hlen + TRAILER.size > min(len(tail), pack_size):
        raise CorruptDataError(f"pack {pack_id} has no valid header")
    header_start = pack_size - TRAILER.size - hlen
    body = tail[len(tail) - TRAILER.size - hlen : len(tail) - TRAILER.size]
    doc = _load_json(decompress_meta(body, f"pack {pack_id} header"), f"pack {pack_id} header")
    return _parse_blob_rows(pack_id, doc.get("blobs"), header_start)


def encode_index(packs: dict[str, list[tuple[str, str, int, int, int]]]) -> bytes:
    doc = {"v": 1, "packs": [{"id": pid, "blobs": rows} for pid, rows in sorted(packs.items())]}
    return zstandard.ZstdCompressor(level=3).compress(json.dumps(doc).encode())


def decode_index(index_id: str, raw: bytes) -> list[tuple[str, BlobRef]]:
    if object_id(raw) != index_id:
        raise CorruptDataError(f"index {index_id} does not match its hash")
    doc = _load_json(decompress_meta(raw, f"index {index_id}"), f"index {index_id}")
    packs = doc.get("packs")
    if not isinstance(packs, list):
        raise CorruptDataError(f"index {index_id} is malformed")
    out: list[tuple[str, BlobRef]] = []
    for pack in packs:
        if not isinstance(pack, dict) or not is_hex_id(pack.get("id")):
            raise CorruptDataError(f"index {index_id} is malformed")
        out.extend(_parse_blob_rows(pack["id"], pack.get("blobs"), 1 << 40))
    return out


def _parse_blob_rows(pack_id: str, rows: Any, limit: int) -> list[tuple[str, BlobRef]]:
    if not isinstance(rows, list):
        raise CorruptDataError(f"pack {pack_id}: malformed blob list")
    # The checks of is_hex_id and _nat, inlined and the ids checked in one match: an index
    # lists every blob of the repository, and each load of it reads them all.
    if not all(type(row) is list and len(row) == 5 and type(row[0]) is str and len(row[0]) == 64 for row in rows) \
            or not _HEX_RUN.fullmatch("".join(row[0] for row in rows)):
        raise CorruptDataError(f"pack {pack_id}: malformed blob entry")
    out = []
    types, top = BLOB_TYPES, 1 << 48
    for bid, btype, off, length, raw in rows:
        if not (btype in types and type(off) is int and type(length) is int and type(raw) is int
                and 0 <= off < top and 0 <= length < top and 0 <= raw < top):
            raise CorruptDataError(f"pack {pack_id}: malformed blob entry")
        if off + length > limit or raw > MAX_META_BYTES:
            raise CorruptDataError(f"pack {pack_id}: blob {bid} lies outside the pack")
        out.append((bid, BlobRef(pack_id, off, length, raw, btype)))
    return out


def decompress_meta(raw: bytes, what: str) -> bytes:
    return bounded_decompress(raw, MAX_META_BYTES, what)


def bounded_decompress(raw: bytes | memoryview, limit: int, what: str,
                       dctx: zstandard.ZstdDecompressor | None = None) -> bytes:
    """Decompress one zstd frame that may not inflate beyond ``limit`` bytes (with ``dctx``,
    a thread's own decompressor, when called once per chunk).

    A frame's declared content size makes zstandard ignore ``max_output_size``,
    so a forged size is checked first: stored data is hostile input."""
    try:
        declared = zstandard.frame_content_size(raw)
        if declared > limit:
            raise CorruptDataError(f"{what} claims {declared} bytes, more than the {limit} allowed")
        out: bytes = (dctx or zstandard.ZstdDecompressor()).decompress(raw, max_output_size=limit)
    except zstandard.ZstdError as exc:
        raise CorruptDataError(f"{what} cannot be decompressed: {exc}") from None
    if len(out) > limit:
        raise CorruptDataError(f"{what} inflates beyond {limit} bytes")
    return out


def _load_json(raw: bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise CorruptDataError(f"{what} is not valid JSON") from None
    if not isinstance(doc, dict):
        raise CorruptDataError(f"{what} is malformed")
    return doc


def _nat(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < (1 << 48)


def _chunker_params(doc: object) -> ChunkerParams:
    if not isinstance(doc, dict):
        raise RepositoryError("repository config: no chunker parameters")
    algorithm = doc.get("algorithm", CDC_RONOMON)
    if not isinstance(algorithm, str) or algorithm not in CHUNKER_LIMITS:
        raise RepositoryError(f"repository uses a chunker this volmove does not know: {algorithm!r}")
    lmin, lavg, lmax = CHUNKER_LIMITS[algorithm]
    params = ChunkerParams(_int(doc, "min", *lmin), _int(doc, "avg", *lavg), _int(doc, "max", *lmax), algorithm)
    if not params.min_size <= params.avg_size <= params.max_size:
        raise RepositoryError("repository config: chunker sizes must grow from min to avg to max")
    return params


def _int(doc: dict[str, Any], key: str, lo: int, hi: int) -> int:
    value = doc.get(key)
    if not isinstance(value, int) or not lo <= value <= hi:
        raise RepositoryError(f"repository config: bad chunker value {key}={value!r}")
    return value
