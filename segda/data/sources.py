"""Open shard and manifest URLs as byte streams that survive flaky networks.

Supported: local paths (plain or file://), http(s):// (standard library only), s3://bucket/key (boto3, with
credentials and AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3 taken from the environment the standard way) and, only when
the user opts in, pipe:COMMAND. Remote readers track their byte offset and, when a connection drops mid-body,
reconnect with `Range: bytes=OFFSET-`, so a multi-hour training run does not die on one reset socket and the consumer
sees the exact byte stream: nothing lost, nothing duplicated.

    with open_url("s3://bucket/gta5/train-000003.tar") as f: ...
    shards = expand_urls("https://host/gta5/train-{000000..000023}.tar")
"""

from __future__ import annotations

import http.client
import io
import os
import posixpath
import random
import re
import signal
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import BinaryIO, Callable

import braceexpand

from segda.data import keepalive
from segda.log import SegdaError, warn

SUPPORTED = "local paths, file://, http://, https://, s3:// and pipe: (opt-in)"
PIPE_REFUSED = (
    "pipe: URLs run shell commands and are disabled; set data.allow_pipe=true (or pass --allow-pipe) "
    "if you trust this URL"
)
MAX_BACKOFF = 20.0
"""Seconds; caps backoff * 2**attempt so a long outage is polled rather than waited out blindly."""
_BUFFER = 1 << 20
_CHUNK = 1 << 16
"""Bytes per network read: urllib3 (under boto3) discards a partly read chunk when the connection drops."""


def expand_urls(spec: str) -> list[str]:
    """Brace-expand a shard spec ("train-{000000..000023}.tar") into its URLs, in order."""
    urls = list(braceexpand.braceexpand(spec.strip()))
    if not urls or not all(urls):
        raise SegdaError(f"empty shard spec {spec!r}; give a path or URL such as shards/train-{{000000..000009}}.tar")
    return urls


def read_bytes(url: str, **kwargs) -> bytes:
    """The whole object (manifests, small JSON files); same keyword arguments as `open_url`."""
    with open_url(url, **kwargs) as f:
        return f.read()


def join_url(base: str, relative: str) -> str:
    """Resolve `relative` (a shard path in a manifest) against the manifest's own URL `base`."""
    if url_scheme(relative) or relative.startswith("/"):
        return relative  # already absolute
    scheme = url_scheme(base)
    if scheme in ("http", "https", "file"):
        return urllib.parse.urljoin(base, relative)
    if scheme == "s3":  # urljoin does not know s3://, so join the key by hand
        bucket, key = _split_s3(base)
        joined = posixpath.normpath(posixpath.join(posixpath.dirname(key), relative))
        if joined.startswith(".."):
            raise SegdaError(f"{relative!r} relative to {base} leaves bucket {bucket}; use a full s3:// URL")
        return f"s3://{bucket}/{joined}"
    if scheme:
        raise SegdaError(f"cannot resolve {relative!r} against {base}; give full URLs in the manifest")
    return os.path.normpath(os.path.join(os.path.dirname(base), relative))


def open_url(
    url: str, *, allow_pipe: bool = False, retries: int = 5, timeout: float = 30.0, backoff: float = 0.5
) -> BinaryIO:
    """A readable binary file object for `url`; remote ones retry and resume (see module docstring).

    Permanent failures (missing file or key, HTTP 4xx, access denied) raise SegdaError at once; transient ones
    (refused/reset connections, timeouts, HTTP 5xx/429) are retried `retries` times with exponential backoff.
    Every socket operation has `timeout`, so a dead server turns into an error instead of a hang.
    """
    scheme = url_scheme(url)
    if not scheme or scheme == "file":
        return _open_local(_local_path(url, scheme))
    if scheme == "pipe":
        if not allow_pipe:
            raise SegdaError(f"{PIPE_REFUSED}: {url}")
        return io.BufferedReader(_PipeReader(url.strip()[len("pipe:"):], timeout), _BUFFER)
    return io.BufferedReader(_remote(url, scheme, retries, timeout, backoff), _BUFFER)


def read_range(url: str, offset: int, size: int, *, expect_total: int | None = None, retries: int = 5,
               timeout: float = 30.0, backoff: float = 0.5) -> bytes:
    """Exactly bytes [offset, offset + size) of `url`: a seek for local files, one Range request for HTTP and S3
    (resumed like `open_url` if the connection drops). `expect_total`: the object's size the caller knows (from a
    manifest); a larger object was replaced since, and raises SegdaError. A shorter one (a truncated copy) raises
    EOFError only if the range runs past its end."""
    scheme = url_scheme(url)
    if not scheme or scheme == "file":
        path = _local_path(url, scheme)
        with _open_local(path) as f:
            total = os.fstat(f.fileno()).st_size
            f.seek(offset)
            data = f.read(size)
    elif scheme == "pipe":
        raise SegdaError(f"{url}: a pipe: command cannot be read by byte range; use files or http(s)/s3 URLs")
    else:
        with _remote(url, scheme, retries, timeout, backoff, offset, offset + size) as raw:
            data = _read_exactly(raw, size)
            total = raw.size
    if expect_total is not None and total is not None and total > expect_total:
        raise SegdaError(f"{url} is {total} bytes, its manifest says {expect_total}: the shard was replaced "
                         "after the manifest was written; re-create the shards or re-download the manifest")
    if len(data) != size:
        raise EOFError(f"{url} ends at byte {offset + len(data)}, before byte {offset + size}")
    return data


def _read_exactly(raw: io.RawIOBase, size: int) -> bytes:
    buf = bytearray(size)
    view, got = memoryview(buf), 0
    while got < size:
        n = raw.readinto(view[got:])
        if not n:
            break
        got += n
    return bytes(buf[:got])


def _local_path(url: str, scheme: str) -> str:
    return urllib.request.url2pathname(urllib.parse.urlsplit(url).path) if scheme else url


def local_path(url: str) -> str:
    """The filesystem path of a local path or file:// URL."""
    return _local_path(url, url_scheme(url))


def _remote(url: str, scheme: str, retries: int, timeout: float, backoff: float, start: int = 0,
            end: int | None = None) -> "_Resumable":
    if scheme in ("http", "https"):
        return _Resumable(url, _http_connector(url, timeout), retries, backoff, start=start, end=end)
    if scheme == "s3":
        # A bounded read (one sample) is a presigned GET over a kept-alive connection: signing costs ~0.2 ms where
        # botocore's get_object costs ~1.5 ms of CPU, which matters at one request per sample.
        connector = _s3_connector(url, timeout)
        if end is not None and _split_s3(url)[0] not in _PRESIGN_REFUSED:
            connector = _http_connector(url, timeout, _s3_presigner(url, timeout), fallback=connector)
        return _Resumable(url, connector, retries, backoff, _botocore_transient(), start, end)
    hint = "" if "://" in url else " (write a local path containing ':' as ./path)"
    raise SegdaError(f"unsupported URL scheme {scheme!r} in {url}; supported: {SUPPORTED}{hint}")


def url_scheme(url: str) -> str:
    """The one place a URL's scheme is read ("" for a local path): every check of a scheme goes through it, so
    "PIPE:..." or " pipe:..." cannot slip past a check that compares raw strings."""
    scheme = urllib.parse.urlsplit(url.strip()).scheme.lower()
    return "" if len(scheme) == 1 else scheme  # "C:\\shards" is a Windows drive, not a scheme


def _open_local(path: str) -> BinaryIO:
    try:
        return open(path, "rb")
    except FileNotFoundError:
        where = "" if os.path.isabs(path) else f" (relative to {os.getcwd()})"
        raise SegdaError(f"no such file: {path}{where}; check the path and that the shards were written") from None
    except OSError as e:
        raise SegdaError(f"cannot open {path}: {e.strerror}; check it is a readable file") from e


class _Transient(Exception):
    """A failure worth retrying: the connection dropped, or the server said "try again later"."""


_TRANSIENT: tuple[type[BaseException], ...] = (OSError, http.client.HTTPException, _Transient)
"""OSError covers refused/reset connections, socket timeouts and urllib's URLError."""

_Connector = Callable[[int, "int | None"], "tuple[BinaryIO, int, int | None, str | None]"]
"""(offset, end or None) -> (body, offset of its first byte, total size or None, ETag or None); raises SegdaError
if hopeless. `end` (exclusive) asks for a bounded Range; the body may run past it if the server ignores ranges."""


class _Resumable(io.RawIOBase):
    """One remote object read as a single byte stream, reconnecting at the current offset after a drop."""

    def __init__(self, url: str, connect: _Connector, retries: int, backoff: float, transient: tuple = (),
                 start: int = 0, end: int | None = None):
        self.url, self._connect, self._backoff = url, connect, backoff
        self._retries, self._transient = max(1, retries), _TRANSIENT + transient
        self._body, self._offset, self._size, self._etag = None, start, None, None
        self._end = end  # exclusive; None: to the end of the object
        self._failures = 0
        self._retrying(self._reconnect)  # connect now: a 404 or dead server surfaces in open_url, not later

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        return self._retrying(lambda: self._read_some(buf))

    def close(self) -> None:
        self._drop_body()
        super().close()

    @property
    def size(self) -> int | None:
        """The whole object's size in bytes, as the server reported it (None if it did not say)."""
        return self._size

    def _read_some(self, buf) -> int:
        limit = min(x for x in (self._size, self._end, float("inf")) if x is not None)
        if self._offset >= limit:
            return 0
        if self._body is None:
            self._reconnect()
        data = self._body.read(int(min(len(buf), _CHUNK, limit - self._offset)))
        if not data:
            # http.client returns b"" when the peer closes early instead of raising, so check the length.
            if limit != float("inf"):
                raise _Transient(f"connection closed at byte {self._offset} of {limit}")
            return 0
        buf[: len(data)] = data
        self._offset += len(data)
        self._failures = 0  # progress: each new stall gets the full retry budget
        return len(data)

    def _reconnect(self) -> None:
        self._drop_body()
        body, start, size, etag = self._connect(self._offset, self._end)
        # Splicing two versions of an object would silently corrupt a shard: refuse if it changed under us.
        resized = None not in (size, self._size) and size != self._size
        if (etag and self._etag and etag != self._etag) or resized:
            body.close()
            raise SegdaError(f"{self.url} changed while being read (ETag/size differ); rerun once uploads finish")
        self._etag = etag or self._etag
        self._size = size if size is not None else self._size
        if start > self._offset:
            body.close()
            raise SegdaError(f"{self.url}: asked for bytes from {self._offset}, server sent from {start}")
        self._body = body
        skip = self._offset - start  # the server ignored our Range (plain 200): discard what we already have
        while skip > 0:
            chunk = body.read(min(skip, _BUFFER))
            if not chunk:
                raise _Transient(f"connection closed while skipping to byte {self._offset}")
            skip -= len(chunk)

    def _retrying(self, op: Callable):
        while True:
            try:
                return op()
            except self._transient as e:
                self._drop_body()
                self._failures += 1
                if self._failures >= self._retries:
                    raise SegdaError(
                        f"giving up on {self.url} after {self._failures} attempts at byte {self._offset} "
                        f"(last error: {type(e).__name__}: {e}); check the URL, the network and the server"
                    ) from e
                delay = min(self._backoff * 2 ** (self._failures - 1), MAX_BACKOFF) * random.uniform(0.5, 1.0)
                # Said at once: a stalled server must not look like a hung run (data.timeout, data.retries).
                warn(f"{self.url}: {type(e).__name__}: {e} at byte {self._offset}; retrying in {delay:.1f} s "
                     f"(attempt {self._failures + 1} of {self._retries})")
                time.sleep(delay)  # jitter: many workers must not retry in lockstep

    def _drop_body(self) -> None:
        body, self._body = self._body, None
        if body is not None:
            try:
                body.close()
            except Exception:  # closing a broken connection may fail again; it is being discarded anyway
                pass


def _range_header(offset: int, end: int | None) -> str:
    return f"bytes={offset}-" if end is None else f"bytes={offset}-{end - 1}"


def _content_range(value: str | None) -> tuple[int, int | None] | None:
    match = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", (value or "").strip())
    return (int(match[1]), None if match[2] == "*" else int(match[2])) if match else None


def _http_connector(url: str, timeout: float, target: Callable[[], str] | None = None,
                    fallback: _Connector | None = None) -> _Connector:
    """Connect to `url` (or to what `target()` returns, e.g. a presigned URL; messages still name `url`).
    `fallback`: the connector for a redirect or a 400 (an S3 bucket in another region), instead of urllib's."""

    def connect(offset: int, end: int | None):
        headers = {"Range": _range_header(offset, end)} if offset or end is not None else {}
        address = target() if target else url
        resp = _pooled_get(address, headers, timeout, url) if keepalive.should_pool(address) else None
        if fallback is not None and (resp is None or resp.status in (400, 403)):
            if resp is not None:
                resp.close()
            _PRESIGN_REFUSED.add(_split_s3(url)[0])  # this bucket wants botocore's requests: ask it from now on
            return fallback(offset, end)
        if resp is None:  # a proxy or a redirect: urllib knows both
            resp = _urllib_get(address, headers, timeout)
        if resp.status == 416 and offset:  # nothing past offset: the drop happened right at the end
            resp.close()
            return io.BytesIO(), offset, offset, None
        if resp.status >= 400:
            resp.close()
            if resp.status >= 500 or resp.status in (408, 429):
                raise _Transient(f"HTTP {resp.status} {resp.reason}")
            hint = _S3_HINT if target else "check the URL and that you may read it"
            raise SegdaError(f"{url}: HTTP {resp.status} {resp.reason}; {hint}")
        if resp.status == 206:
            start_size = _content_range(resp.headers.get("Content-Range"))
            if start_size is None:
                resp.close()
                raise _Transient(f"206 without a usable Content-Range: {resp.headers.get('Content-Range')!r}")
            start, size = start_size
        else:
            length = resp.headers.get("Content-Length")
            start, size = 0, int(length) if length and length.isdigit() else None
        return resp, start, size, resp.headers.get("ETag")

    return connect


def _pooled_get(address: str, headers: dict, timeout: float, name: str):
    """A kept-alive GET of `address` (see segda.data.keepalive); None for a redirect, which urllib follows instead.
    Messages say `name`: a presigned address is a credential and is never printed."""
    try:
        resp = keepalive.get(address, headers, timeout)
    except ssl.SSLCertVerificationError as e:  # retrying cannot fix a certificate
        raise SegdaError(f"{name}: TLS certificate rejected ({e.verify_message}); check the host") from e
    if 300 <= resp.status < 400:
        resp.close()
        return None
    return resp


def _urllib_get(url: str, headers: dict, timeout: float):
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        return e  # an HTTPError is a response too: status, reason, headers, close()
    except urllib.error.URLError as e:
        if isinstance(e.reason, ssl.SSLCertVerificationError):  # retrying cannot fix a certificate
            raise SegdaError(f"{url}: TLS certificate rejected ({e.reason.verify_message}); check the host") from e
        raise


_S3_CLIENTS: dict = {}
_S3_LOCK = threading.Lock()
_S3_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_DEFAULT_REGION")


def _s3_client(timeout: float):
    """One boto3 client per process (and per endpoint/credential environment, which tests change)."""
    # Keyed by pid: a client inherited through fork shares its parent's pooled sockets, which corrupts both.
    key = (os.getpid(), timeout, *map(os.environ.get, _S3_ENV))
    with _S3_LOCK:
        if key not in _S3_CLIENTS:
            import boto3
            from botocore.config import Config

            # botocore >= 1.31 reads AWS_ENDPOINT_URL(_S3) itself, so no endpoint_url is passed here.
            # s3v4: presigned URLs must not use SigV2, which AWS refuses for buckets made since 2020.
            config = Config(connect_timeout=timeout, read_timeout=timeout, signature_version="s3v4",
                            retries={"mode": "standard", "max_attempts": 3})
            for stale in [k for k in _S3_CLIENTS if k[0] != key[0]]:  # inherited from the parent process
                del _S3_CLIENTS[stale]
            _S3_CLIENTS[key] = boto3.session.Session().client("s3", config=config)
        return _S3_CLIENTS[key]


def _split_s3(url: str) -> tuple[str, str]:
    parts = urllib.parse.urlsplit(url)
    if not parts.netloc or not parts.path.lstrip("/"):
        raise SegdaError(f"bad S3 URL {url}; expected s3://bucket/key")
    return parts.netloc, parts.path.lstrip("/")


def _botocore_transient() -> tuple:
    from botocore.exceptions import ConnectionError, HTTPClientError, IncompleteReadError, ResponseStreamingError

    # HTTPClientError covers ReadTimeoutError and ConnectionClosedError; botocore's ConnectionError covers
    # EndpointConnectionError and ConnectTimeoutError (an endpoint that is down or unreachable), which are not
    # HTTPClientErrors.
    return ConnectionError, HTTPClientError, IncompleteReadError, ResponseStreamingError


def _s3_connector(url: str, timeout: float) -> _Connector:
    bucket, key = _split_s3(url)

    def connect(offset: int, end: int | None):
        from botocore.exceptions import ClientError, NoCredentialsError

        client = _s3_client(timeout)
        ranged = {"Range": _range_header(offset, end)} if offset or end is not None else {}
        try:
            resp = client.get_object(Bucket=bucket, Key=key, **ranged)
        except NoCredentialsError as e:
            raise SegdaError(f"{url}: no AWS credentials; set AWS_PROFILE or AWS_ACCESS_KEY_ID") from e
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            if code == "InvalidRange" and offset:
                return io.BytesIO(), offset, offset, None
            if status >= 500 or status == 429 or code in ("SlowDown", "RequestTimeout", "Throttling"):
                raise _Transient(f"S3 {code} (HTTP {status})") from e
            if code in ("NoSuchKey", "NoSuchBucket", "404"):
                raise SegdaError(
                    f"{url} does not exist ({code}); check the bucket and key, and the endpoint "
                    f"{client.meta.endpoint_url} (set AWS_ENDPOINT_URL for a non-AWS store)"
                ) from e
            # Without s3:ListBucket, S3 answers a missing key with 403, so a typo can look like a permission error.
            raise SegdaError(
                f"{url}: S3 {code} (HTTP {status}); check credentials, bucket permissions and that the key exists"
            ) from e
        start_size = _content_range(resp.get("ContentRange"))
        start, size = start_size or (0, resp.get("ContentLength"))
        return resp["Body"], start, size, resp.get("ETag")

    return connect


_PRESIGN_REFUSED: set[str] = set()
"""Buckets that answered a presigned GET with 400/403 or a redirect (another region, a policy): read with botocore."""
_S3_HINT = "check credentials, bucket permissions, that the key exists, and AWS_ENDPOINT_URL for a non-AWS store"


def _s3_presigner(url: str, timeout: float) -> Callable[[], str]:
    bucket, key = _split_s3(url)

    def sign() -> str:
        from botocore.exceptions import NoCredentialsError

        try:
            return _s3_client(timeout).generate_presigned_url(
                "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=3600)
        except NoCredentialsError as e:
            raise SegdaError(f"{url}: no AWS credentials; set AWS_PROFILE or AWS_ACCESS_KEY_ID") from e

    return sign


class _PipeReader(io.RawIOBase):
    """stdout of a shell command; close() raises if the command failed."""

    def __init__(self, command: str, timeout: float):
        self.command, self._timeout, self._eof = command, timeout, False
        # The one sanctioned shell in segda: only reached when the user set allow_pipe for a URL they trust.
        self._proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE)

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        n = self._proc.stdout.readinto(buf)
        self._eof = self._eof or not n
        return n

    def close(self) -> None:
        if self.closed:
            return
        super().close()
        self._proc.stdout.close()
        try:
            status = self._proc.wait(timeout=self._timeout)
        except subprocess.TimeoutExpired:  # it ignored the closed pipe: stop it rather than hang
            self._proc.kill()
            status = self._proc.wait()
        # A reader that stops early closes the pipe and the command dies of SIGPIPE (or we kill it): not a failure.
        if status != 0 and (self._eof or status not in (-signal.SIGPIPE, 128 + signal.SIGPIPE, -signal.SIGKILL)):
            raise SegdaError(f"pipe command exited with status {status}: {self.command}; run it in a shell to see why")
