"""An S3 backend (AWS or any S3-compatible server such as Ceph RGW), on boto3.

Endpoint, credentials, region and CA bundle come from the standard AWS
configuration (environment, profile files).  Every botocore exception is
translated here into a volmove error, so nothing above this module sees boto.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectionError,
    IncompleteReadError,
    NoCredentialsError,
    ParamValidationError,
    PartialCredentialsError,
    ReadTimeoutError,
    ResponseStreamingError,
    SSLError,
)

from volmove.core.errors import (
    AuthError,
    ConflictError,
    CorruptDataError,
    NotFoundError,
    RepositoryError,
    StorageError,
    TransientStorageError,
    UnreachableError,
    UsageError,
    VolmoveError,
)
from volmove.core.files import libc
from volmove.core.storage.base import ObjectInfo

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

_CONFIG = Config(
    # boto3 >= 1.36 sends CRC checksums by default, which Ceph RGW rejects over HTTPS
    # (MissingContentLength); Content-MD5 gives us integrity on PUT instead.
    request_checksum_calculation="when_required",
    response_checksum_validation="when_required",
    max_pool_connections=16,
    # Few attempts: a refused key or a dead endpoint must fail fast, not back off for minutes.
    retries={"mode": "standard", "total_max_attempts": 3},
    connect_timeout=5,
    read_timeout=60,
)

_AUTH_CODES = frozenset(
    {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "RequestTimeTooSkewed",
     "InvalidToken", "ExpiredToken", "AllAccessDisabled", "403"}
)
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NotFound", "404"})
_TRANSIENT_CODES = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "ServiceUnavailable",
     "InternalError", "OperationAborted", "ConditionalRequestConflict"}
)
_GONE_UPLOAD_CODES = frozenset({"NoSuchUpload", "NoSuchKey", "404"})


def _endpoint_from_env() -> str | None:
    """boto3 reads AWS_ENDPOINT_URL(_S3) itself; S3_ENDPOINT_URL is our fallback name."""
    if os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3"):
        return None
    return os.environ.get("S3_ENDPOINT_URL") or None


def _error_code(exc: ClientError) -> tuple[str, int]:
    code = str(exc.response.get("Error", {}).get("Code", ""))
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
    return code, status


_M_ARENA_MAX = -8  # glibc's mallopt parameter
_ARENAS = 2


@functools.cache
def _limit_malloc_arenas() -> None:
    """glibc gives threads that allocate at the same time arenas of their own (up to 8 per CPU)
    and keeps what each frees; with boto3's upload threads beside the chunk pool, an S3 backup's
    peak RSS ranged 203-245 MB over three runs here, and 182-213 MB over four with this cap, no slower."""
    with contextlib.suppress(AttributeError):  # not glibc: its allocator is left as it is
        libc().mallopt(_M_ARENA_MAX, _ARENAS)


class S3Storage:
    # Each request costs a round trip: readers should fetch whole packs, not one blob at a time.
    prefers_whole_objects = True

    def __init__(
        self, bucket: str, prefix: str = "", *, create: bool = False, endpoint_url: str | None = None
    ) -> None:
        _limit_malloc_arenas()
        if not bucket:
            raise UsageError("S3 repository URL needs a bucket: s3://bucket/prefix")
        self.bucket = bucket
        prefix = prefix.strip("/")
        self.url = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
        self._prefix = f"{prefix}/" if prefix else ""
        endpoint_url = endpoint_url or _endpoint_from_env()
        self.endpoint = endpoint_url or "the configured S3 endpoint"
        self._client = self._make_client(endpoint_url)
        self.endpoint = self._client.meta.endpoint_url
        try:
            if create:
                self._create_bucket()
            else:
                self._check_bucket()
        except VolmoveError:
            self._client.close()
            raise

    @classmethod
    def from_url(cls, url: str, *, create: bool = False) -> S3Storage:
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc:
            raise UsageError(f"invalid S3 repository URL {url!r}: use s3://bucket/prefix")
        return cls(parts.netloc, parts.path, create=create)

    def _make_client(self, endpoint_url: str | None) -> S3Client:
        config = _CONFIG
        if endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3"):
            # S3-compatible servers rarely have wildcard DNS for virtual-hosted buckets.
            config = config.merge(Config(s3={"addressing_style": "path"}))
        try:
            with self._translating():
                # A session of our own: the default session is not safe to share across threads.
                return boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=config)
        except ValueError as exc:  # botocore's "Invalid endpoint: ..."
            raise UsageError(f"invalid S3 endpoint {endpoint_url!r}: {exc}") from exc

    # -- bucket ---------------------------------------------------------------

    def _check_bucket(self) -> None:
        # A GET rather than HEAD: its error body tells a wrong key from a missing bucket.
        with self._translating():
            self._client.list_objects_v2(Bucket=self.bucket, Prefix=self._prefix, MaxKeys=1)

    def _create_bucket(self) -> None:
        try:
            self._check_bucket()
            return
        except RepositoryError:
            pass
        region = self._client.meta.region_name
        kwargs: dict[str, Any] = {}
        if region and region != "us-east-1":  # us-east-1 refuses an explicit constraint
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
        try:
            with self._translating():
                self._client.create_bucket(Bucket=self.bucket, **kwargs)
        except ConflictError:
            pass  # created by a concurrent init of ours

    # -- objects ----------------------------------------------------------------

    def put_parts(self, key: str, parts: Sequence[bytes | memoryview], *, overwrite: bool = False) -> None:
        self.put(key, b"".join(parts), overwrite=overwrite)

    def put(self, key: str, data: bytes, *, overwrite: bool = False) -> None:
        md5 = base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()
        kwargs: dict[str, Any] = {} if overwrite else {"IfNoneMatch": "*"}
        with self._translating(key):
            self._client.put_object(
                Bucket=self.bucket, Key=self._prefix + key, Body=data, ContentMD5=md5, **kwargs
            )

    def get(self, key: str) -> bytes:
        with self._translating(key):
            resp = self._client.get_object(Bucket=self.bucket, Key=self._prefix + key)
            # botocore checks the body against Content-Length (IncompleteReadError).
            return resp["Body"].read()

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        if length <= 0:
            self.stat(key)  # still NotFoundError for an absent key
            return b""
        try:
            with self._translating(key):
                resp = self._client.get_object(
                    Bucket=self.bucket, Key=self._prefix + key, Range=f"bytes={offset}-{offset + length - 1}"
                )
                data = resp["Body"].read()
                if resp["ResponseMetadata"]["HTTPStatusCode"] == 200:  # server ignored the Range
                    data = data[offset : offset + length]
        except _RangeNotSatisfiable:
            data = b""
        if len(data) != length:
            raise CorruptDataError(f"object {key} is shorter than expected")
        return data

    def exists(self, key: str) -> bool:
        try:
            self.stat(key)
        except NotFoundError:
            return False
        return True

    def stat(self, key: str) -> ObjectInfo:
        with self._translating(key):
            resp = self._client.head_object(Bucket=self.bucket, Key=self._prefix + key)
        return ObjectInfo(key, resp["ContentLength"], resp["LastModified"].timestamp())

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        pages = self._client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self._prefix + prefix
        )
        skip = len(self._prefix)
        with self._translating():
            for page in pages:
                for obj in page.get("Contents", []):
                    yield ObjectInfo(obj["Key"][skip:], obj["Size"], obj["LastModified"].timestamp())

    def delete(self, key: str) -> None:
        # S3 answers 204 for an absent key too, which is what the protocol wants.
        with self._translating(key):
            self._client.delete_object(Bucket=self.bucket, Key=self._prefix + key)

    # -- interrupted writes -------------------------------------------------------

    def cleanup_incomplete(self, older_than: float) -> int:
        """Abort multipart uploads under the prefix initiated ``older_than`` seconds ago or more."""
        cutoff = time.time() - older_than
        stale = [(key, upload_id) for key, upload_id, initiated in self._uploads() if initiated <= cutoff]
        return sum(self._abort(key, upload_id) for key, upload_id in stale)

    def _uploads(self) -> Iterator[tuple[str, str, float]]:
        pages = self._client.get_paginator("list_multipart_uploads").paginate(
            Bucket=self.bucket, Prefix=self._prefix
        )
        with self._translating():
            for page in pages:
                for up in page.get("Uploads", []):
                    yield up["Key"], up["UploadId"], up["Initiated"].timestamp()

    def _abort(self, key: str, upload_id: str) -> bool:
        try:
            self._client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except ClientError as exc:
            # Aborted meanwhile by another cleaner; RGW then says NoSuchKey, not NoSuchUpload.
            if _error_code(exc)[0] in _GONE_UPLOAD_CODES:
                return False
            raise self._translate(exc, key) from exc
        except BotoCoreError as exc:
            raise self._translate(exc, key) from exc
        return True

    def close(self) -> None:
        self._client.close()

    # -- error translation ------------------------------------------------------------

    @contextmanager
    def _translating(self, key: str | None = None) -> Iterator[None]:
        try:
            yield
        except (ClientError, BotoCoreError) as exc:
            raise self._translate(exc, key) from exc

    def _translate(self, exc: Exception, key: str | None) -> VolmoveError:
        if isinstance(exc, ClientError):
            return self._client_error(exc, key)
        return self._transport_error(exc)

    def _client_error(self, exc: ClientError, key: str | None) -> VolmoveError:
        code, status = _error_code(exc)
        if code == "NoSuchBucket":
            return RepositoryError(f"bucket {self.bucket} does not exist at {self.endpoint}")
        if code == "InvalidRange" or status == 416:
            return _RangeNotSatisfiable(f"range outside object {key}")
        if code in _AUTH_CODES or status == 403:
            return AuthError(self._auth_message(code))
        if key is not None and (code in _NOT_FOUND_CODES or status == 404):
            return NotFoundError(f"object {key} not found in {self.url}")
        if code == "PreconditionFailed" or status == 412:
            return ConflictError(f"object {key} already exists")
        if code in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            return ConflictError(f"bucket {self.bucket} already exists")
        what = f"object {key}" if key else self.url
        if code in _TRANSIENT_CODES or status >= 500:
            return TransientStorageError(f"S3 server error on {what}: {code or status}")
        return StorageError(f"S3 request on {what} failed: {code or status} {exc}")

    def _auth_message(self, code: str) -> str:
        if code == "InvalidAccessKeyId":
            return f"S3 access key refused by {self.endpoint}: unknown key id (check AWS_ACCESS_KEY_ID)"
        if code == "SignatureDoesNotMatch":
            return f"S3 secret key refused by {self.endpoint} (check AWS_SECRET_ACCESS_KEY)"
        if code == "RequestTimeTooSkewed":
            return f"{self.endpoint} refused the request: this machine's clock is wrong"
        return f"access to {self.url} denied by {self.endpoint} ({code or 'forbidden'})"

    def _transport_error(self, exc: Exception) -> VolmoveError:
        if isinstance(exc, SSLError):
            return StorageError(f"TLS connection to {self.endpoint} failed (set AWS_CA_BUNDLE?): {exc}")
        if isinstance(exc, ConnectionError | ConnectionClosedError):
            return UnreachableError(f"S3 endpoint {self.endpoint} is unreachable: {exc}")
        if isinstance(exc, ReadTimeoutError | ResponseStreamingError | IncompleteReadError):
            return TransientStorageError(f"S3 transfer from {self.endpoint} broke off: {exc}")
        if isinstance(exc, NoCredentialsError | PartialCredentialsError):
            return AuthError("no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
        if isinstance(exc, ParamValidationError):
            return UsageError(f"invalid S3 request for {self.url}: {exc}")
        return StorageError(f"S3 request to {self.endpoint} failed: {exc}")


class _RangeNotSatisfiable(StorageError):
    """416: the range starts past the end; get_range reports that as a short object."""
