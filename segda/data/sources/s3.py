"""s3://bucket/key objects through boto3: credentials, profiles and AWS_ENDPOINT_URL(_S3) the standard way.

A bounded read (one sample) is a presigned GET over the process's kept-alive HTTP pool: signing costs ~0.2 ms where
botocore's get_object costs ~1.5 ms of CPU, which matters at one request per sample. A bucket that refuses it
(another region, a policy) is read with botocore's own requests from then on. botocore makes one attempt per call:
retries are `segda.data.sources.resumable`'s.
"""

from __future__ import annotations

import os
import threading
import urllib.parse

from segda.data.sources import http
from segda.data.sources.resumable import Connector, Transient, range_header
from segda.log import SegdaError

HINT = "check credentials, bucket permissions, that the key exists, and AWS_ENDPOINT_URL for a non-AWS store"
_CLIENTS: dict = {}
_LOCK = threading.Lock()
_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_DEFAULT_REGION")
_PRESIGN_REFUSED: set[str] = set()
"""Buckets that answered a presigned GET with 400/403 (another region, a policy): read with botocore."""


def split(url: str) -> tuple[str, str]:
    parts = urllib.parse.urlsplit(url)
    if not parts.netloc or not parts.path.lstrip("/"):
        raise SegdaError(f"bad S3 URL {url}; expected s3://bucket/key")
    return parts.netloc, parts.path.lstrip("/")


def client(timeout: float):
    """One boto3 client per process (and per endpoint/credential environment, which tests change)."""
    # Keyed by pid: a client inherited through fork shares its parent's pooled sockets, which corrupts both.
    key = (os.getpid(), timeout, *map(os.environ.get, _ENV))
    with _LOCK:
        if key not in _CLIENTS:
            import boto3
            from botocore.config import Config

            # botocore >= 1.31 reads AWS_ENDPOINT_URL(_S3) itself, so no endpoint_url is passed here.
            # s3v4: presigned URLs must not use SigV2, which AWS refuses for buckets made since 2020.
            config = Config(connect_timeout=timeout, read_timeout=timeout, signature_version="s3v4",
                            retries={"mode": "standard", "max_attempts": 1})
            for stale in [k for k in _CLIENTS if k[0] != key[0]]:  # inherited from the parent process
                del _CLIENTS[stale]
            _CLIENTS[key] = boto3.session.Session().client("s3", config=config)
        return _CLIENTS[key]


def transient_errors() -> tuple:
    from botocore.exceptions import ConnectionError, HTTPClientError, IncompleteReadError, ResponseStreamingError

    # HTTPClientError covers ReadTimeoutError and ConnectionClosedError; botocore's ConnectionError covers
    # EndpointConnectionError and ConnectTimeoutError (an endpoint that is down or unreachable).
    return ConnectionError, HTTPClientError, IncompleteReadError, ResponseStreamingError


def connector(url: str, timeout: float, bounded: bool) -> Connector:
    """A bounded read goes through a presigned GET unless the bucket refused one before."""
    bucket, _ = split(url)
    plain = _botocore_connector(url, timeout)
    if not bounded or bucket in _PRESIGN_REFUSED:
        return plain

    def refused() -> Connector:
        _PRESIGN_REFUSED.add(bucket)
        return plain

    return http.connector(url, timeout, target=_presigner(url, timeout), refused=refused, hint=HINT)


def _botocore_connector(url: str, timeout: float) -> Connector:
    bucket, key = split(url)

    def connect(offset: int, end: int | None):
        from botocore.exceptions import ClientError, NoCredentialsError

        s3 = client(timeout)
        ranged = {"Range": range_header(offset, end)} if offset or end is not None else {}
        try:
            resp = s3.get_object(Bucket=bucket, Key=key, **ranged)
        except NoCredentialsError as e:
            raise SegdaError(f"{url}: no AWS credentials; set AWS_PROFILE or AWS_ACCESS_KEY_ID") from e
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            if code == "InvalidRange" and offset:
                return _Empty(), offset, offset, None
            if status >= 500 or status == 429 or code in ("SlowDown", "RequestTimeout", "Throttling"):
                raise Transient(f"S3 {code} (HTTP {status})") from e
            if code in ("NoSuchKey", "NoSuchBucket", "404"):
                raise SegdaError(f"{url} does not exist ({code}); check the bucket and key, and the endpoint "
                                 f"{s3.meta.endpoint_url} (set AWS_ENDPOINT_URL for a non-AWS store)") from e
            # Without s3:ListBucket, S3 answers a missing key with 403, so a typo can look like a permission error.
            raise SegdaError(f"{url}: S3 {code} (HTTP {status}); {HINT}") from e
        found = http.content_range(resp.get("ContentRange"))
        start, size = found or (0, resp.get("ContentLength"))
        return resp["Body"], start, size, resp.get("ETag")

    return connect


def _presigner(url: str, timeout: float):
    bucket, key = split(url)

    def sign() -> str:
        from botocore.exceptions import NoCredentialsError

        try:
            return client(timeout).generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key},
                                                          ExpiresIn=3600)
        except NoCredentialsError as e:
            raise SegdaError(f"{url}: no AWS credentials; set AWS_PROFILE or AWS_ACCESS_KEY_ID") from e

    return sign


class _Empty:
    def read(self, size: int = -1) -> bytes:
        return b""

    def close(self) -> None:
        pass
