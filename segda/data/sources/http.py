"""http(s):// objects over urllib3: one connection pool per process, kept-alive connections (one Range request per
sample must not cost a handshake per sample), proxies from the environment, redirects followed by hand.

urllib3 retries nothing here (`retries=False`): the one retry layer is `segda.data.sources.resumable`. Redirects
are followed at most MAX_REDIRECTS times and never to another scheme. Compressed answers (Content-Encoding) are
refused, naming the encoding: byte ranges count the stored bytes, which a decompressed body no longer has.
"""

from __future__ import annotations

import os
import re
import ssl
import threading
import urllib.parse
import urllib.request
from typing import Callable

import urllib3

from segda.data.sources.resumable import Connector, Transient, range_header
from segda.log import SegdaError

MAX_REDIRECTS = 5
TRANSIENT = (urllib3.exceptions.HTTPError,)
"""What a body read may raise when the connection drops or times out (urllib3's ProtocolError, ReadTimeoutError)."""
_POOLS: dict = {}
_LOCK = threading.Lock()


def pool(url: str, timeout: float):
    """The process's connection pool for `url` (a ProxyManager where the environment routes it through a proxy).
    Keyed by pid: a pool inherited through fork shares its parent's sockets, which corrupts both."""
    proxy = proxy_for(url)
    key = (os.getpid(), proxy, timeout)
    with _LOCK:
        if key not in _POOLS:
            for stale in [k for k in _POOLS if k[0] != key[0]]:
                del _POOLS[stale]
            options = dict(timeout=urllib3.Timeout(connect=timeout, read=timeout), retries=False, maxsize=16,
                           block=False)
            _POOLS[key] = urllib3.ProxyManager(proxy, **options) if proxy else urllib3.PoolManager(**options)
        return _POOLS[key]


def proxy_for(url: str) -> str | None:
    """The proxy the environment (http_proxy, https_proxy, no_proxy) routes `url` through, if any."""
    parts = urllib.parse.urlsplit(url)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if not proxy or urllib.request.proxy_bypass(parts.hostname or ""):
        return None
    return proxy


def connector(url: str, timeout: float, target: Callable[[], str] | None = None,
              refused: Callable[[], Connector] | None = None, hint: str = "") -> Connector:
    """Open `url` (or what `target()` returns, e.g. a presigned URL; messages always name `url`, never a
    credential) at a byte offset. `refused`: the connector to fall back on for a 400/403 (an S3 bucket that wants
    botocore's own requests)."""

    def connect(offset: int, end: int | None):
        headers = {"Accept-Encoding": "identity"}
        if offset or end is not None:
            headers["Range"] = range_header(offset, end)
        resp = get(target() if target else url, headers, timeout, url)
        if refused is not None and resp.status in (400, 403):
            discard(resp)
            return refused()(offset, end)
        if resp.status == 416 and offset:  # nothing past offset: the drop happened right at the end
            discard(resp)
            return _Empty(), offset, offset, None
        if resp.status >= 400:
            discard(resp)
            if resp.status >= 500 or resp.status in (408, 429):
                raise Transient(f"HTTP {resp.status} {resp.reason}")
            raise SegdaError(f"{url}: HTTP {resp.status} {resp.reason}; {hint or 'check the URL and that you may read it'}")
        encoding = resp.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            discard(resp)
            raise SegdaError(f"{url}: the server compressed the answer (Content-Encoding: {encoding}); serve shards and "
                             "manifests as stored, without compression (byte ranges count the stored bytes)")
        if resp.status == 206:
            found = content_range(resp.headers.get("Content-Range"))
            if found is None:
                discard(resp)
                raise Transient(f"206 without a usable Content-Range: {resp.headers.get('Content-Range')!r}")
            start, size = found
        else:
            length = resp.headers.get("Content-Length")
            start, size = 0, int(length) if length and length.isdigit() else None
        return _Body(resp), start, size, resp.headers.get("ETag")

    return connect


def get(address: str, headers: dict, timeout: float, name: str):
    """GET `address`, following up to MAX_REDIRECTS redirects within its scheme. Messages say `name`."""
    scheme = urllib.parse.urlsplit(address).scheme
    for _ in range(MAX_REDIRECTS + 1):
        try:
            resp = pool(address, timeout).request("GET", address, headers=headers, preload_content=False,
                                                  redirect=False, decode_content=False)
        except urllib3.exceptions.SSLError as e:
            if isinstance(getattr(e, "__context__", None), ssl.SSLCertVerificationError) or "CERTIFICATE" in str(e):
                raise SegdaError(f"{name}: TLS certificate rejected ({e}); check the host") from e
            raise Transient(f"TLS error: {e}") from e
        except urllib3.exceptions.ProxyError as e:
            raise Transient(f"the proxy {proxy_for(address)} (from the environment) failed: "
                            f"{_root_cause(getattr(e, 'original_error', None) or e)}") from e
        except urllib3.exceptions.HTTPError as e:  # timeouts, refused or reset connections
            raise Transient(_root_cause(e)) from e
        if resp.status not in (301, 302, 303, 307, 308):
            return resp
        location = resp.headers.get("Location", "")
        discard(resp)
        following = urllib.parse.urljoin(address, location)
        if urllib.parse.urlsplit(following).scheme != scheme:
            raise SegdaError(f"{name}: the server redirects to {following.split('?')[0]}, another scheme: refused "
                             "(point segda at the final URL if you trust it)")
        address = following
    raise SegdaError(f"{name}: more than {MAX_REDIRECTS} redirects (a redirect loop?); point segda at the final URL")


def discard(resp) -> None:
    """Done with an answer we do not read: a short body is drained so its connection can serve the next request,
    a long one (or one of unknown length) closes its connection instead."""
    remaining = resp.length_remaining
    if remaining is not None and remaining <= 1 << 16:
        resp.drain_conn()
        resp.release_conn()
    else:
        resp.close()


def _root_cause(error: BaseException) -> str:
    """The innermost OS-level error urllib3 wrapped ("ConnectionRefusedError: ..."), else its own."""
    seen = error
    while True:
        inner = getattr(seen, "reason", None) or seen.__context__
        if inner is None or inner is seen or not isinstance(inner, BaseException):
            break
        seen = inner
    return f"{type(seen).__name__}: {seen}"


def content_range(value: str | None) -> tuple[int, int | None] | None:
    match = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", (value or "").strip())
    return (int(match[1]), None if match[2] == "*" else int(match[2])) if match else None


class _Body:
    """A urllib3 response as a body: read1 for small reads, and close() that keeps the connection for reuse when
    the body was read to its end (a half-read one is dropped, so no next request reads the rest of this one)."""

    def __init__(self, resp):
        self.resp = resp

    def read1(self, size: int) -> bytes:
        return self.resp.read1(size)

    def read(self, size: int = -1) -> bytes:
        return self.resp.read(size if size >= 0 else None)

    def close(self) -> None:
        if self.resp.isclosed() or self.resp.length_remaining == 0:
            self.resp.release_conn()
        else:
            self.resp.close()


class _Empty:
    def read1(self, size: int) -> bytes:
        return b""

    read = read1

    def close(self) -> None:
        pass
