"""S3-only behaviour against the real server: how failures reach the user, HTTPS, multipart leftovers."""

from __future__ import annotations

import socket
import time
import uuid
from typing import Any

import pytest

from tests.conftest import require_or_skip
from tests.fixtures.s3 import S3Env, empty_and_delete_bucket
from volmove.core.errors import (
    AuthError,
    NotFoundError,
    RepositoryError,
    StorageError,
    UnreachableError,
    UsageError,
)
from volmove.core.storage.s3 import S3Storage

pytestmark = pytest.mark.s3


def test_wrong_secret_key_is_an_auth_error_without_retrying(
    s3_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-key-0000000000000000000000")
    start = time.monotonic()
    with pytest.raises(AuthError, match="secret key refused by http"):
        S3Storage.from_url(s3_url)
    assert time.monotonic() - start < 5


def test_unknown_access_key_is_an_auth_error(s3_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "NOSUCHACCESSKEY00000")
    with pytest.raises(AuthError, match="access key"):
        S3Storage.from_url(s3_url)


def test_missing_bucket_is_a_repository_error(s3_env: S3Env, s3_client: Any) -> None:
    bucket = f"volmove-missing-{uuid.uuid4().hex[:12]}"
    with pytest.raises(RepositoryError, match=f"bucket {bucket} does not exist"):
        S3Storage.from_url(f"s3://{bucket}/repo")
    try:
        storage = S3Storage.from_url(f"s3://{bucket}/repo", create=True)
        storage.put("config", b"x")
        storage.close()
        again = S3Storage.from_url(f"s3://{bucket}/repo", create=True)  # exists already: fine
        assert again.get("config") == b"x"
        again.close()
    finally:
        empty_and_delete_bucket(s3_client, bucket)


def test_unreachable_endpoint_names_it(s3_env: S3Env, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    start = time.monotonic()
    with pytest.raises(UnreachableError, match=f"S3 endpoint {endpoint} is unreachable"):
        S3Storage.from_url("s3://volmove-test/repo")
    assert time.monotonic() - start < 10


def test_key_outside_repository_reads_as_not_found(s3_url: str, s3_client: Any, s3_bucket: str) -> None:
    s3_client.put_object(Bucket=s3_bucket, Key="config", Body=b"outside the prefix")
    storage = S3Storage.from_url(s3_url)
    with pytest.raises(NotFoundError, match="object config not found in s3://"):
        storage.get("config")
    assert list(storage.list("")) == []


def test_invalid_urls_are_usage_errors() -> None:
    for url in ("s3://", "s3:///prefix", "http://bucket/prefix"):
        with pytest.raises(UsageError):
            S3Storage.from_url(url)


@pytest.fixture
def https_endpoint(s3_env: S3Env) -> tuple[str, str]:
    if "S3_HTTPS_ENDPOINT_URL" not in s3_env or "S3_CA_BUNDLE" not in s3_env:
        require_or_skip("S3 HTTPS endpoint (S3_HTTPS_ENDPOINT_URL, S3_CA_BUNDLE)")
    return s3_env["S3_HTTPS_ENDPOINT_URL"], s3_env["S3_CA_BUNDLE"]


def test_https_with_ca_bundle(
    https_endpoint: tuple[str, str], s3_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    endpoint, ca_bundle = https_endpoint
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_CA_BUNDLE", ca_bundle)
    storage = S3Storage.from_url(s3_url)
    assert storage.endpoint.startswith("https://")
    # PutObject is what this Ceph refuses over HTTPS when boto3 sends its default checksums
    storage.put("data/ab/abcd", b"over tls" * 1000)
    assert storage.get("data/ab/abcd") == b"over tls" * 1000
    assert [i.key for i in storage.list("data/")] == ["data/ab/abcd"]
    storage.close()


def test_https_with_unknown_certificate_fails_clearly(
    https_endpoint: tuple[str, str], s3_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", https_endpoint[0])
    monkeypatch.delenv("AWS_CA_BUNDLE", raising=False)
    with pytest.raises(StorageError, match="TLS connection to https://"):
        S3Storage.from_url(s3_url)


def test_cleanup_aborts_interrupted_multipart_upload(s3_url: str, s3_bucket: str, s3_client: Any) -> None:
    storage = S3Storage.from_url(s3_url)
    ours = s3_client.create_multipart_upload(Bucket=s3_bucket, Key="repo/packs/interrupted")
    s3_client.upload_part(
        Bucket=s3_bucket, Key="repo/packs/interrupted", UploadId=ours["UploadId"], PartNumber=1,
        Body=b"p" * 1024,
    )
    # another tool's upload in the same bucket, outside the repository: not ours to abort
    theirs = s3_client.create_multipart_upload(Bucket=s3_bucket, Key="elsewhere/file")

    assert storage.cleanup_incomplete(3600) == 0
    assert storage.cleanup_incomplete(0) == 1
    left = s3_client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", [])
    assert [u["UploadId"] for u in left] == [theirs["UploadId"]]
    assert list(storage.list("")) == []
