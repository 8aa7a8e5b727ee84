"""HTTP GETs over kept-alive connections, one pool per thread and process.

Sample-by-sample reading makes one Range request per sample. A fresh TCP (and TLS) connection for each would cost
a handshake per sample, so connections are reused: `get` takes an idle connection to the host (or opens one), and
the response hands it back when its body has been read to the end. A response abandoned half-read closes its
connection instead: the next request must not read the rest of the old body.

Used only where urllib would add nothing: not for hosts reached through a proxy from the environment
(`should_pool`), and redirects are left to the caller (urllib follows them).
"""

from __future__ import annotations

import http.client
import os
import ssl
import threading
import urllib.parse
import urllib.request

_LOCAL = threading.local()


def should_pool(url: str) -> bool:
    """False when the environment routes `url` through a proxy (urllib handles proxies; this module does not)."""
    parts = urllib.parse.urlsplit(url)
    proxies = urllib.request.getproxies()
    return parts.scheme not in proxies or bool(urllib.request.proxy_bypass(parts.hostname or ""))


def get(url: str, headers: dict[str, str], timeout: float) -> "PooledResponse":
    """Send GET `url`; raises OSError / http.client.HTTPException like http.client does."""
    parts = urllib.parse.urlsplit(url)
    key = (os.getpid(), parts.scheme, parts.netloc, timeout)
    idle = _idle()
    conn = idle.pop(key, None)
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    reused = conn is not None
    while True:
        if conn is None:
            conn = _connect(parts, timeout)
        try:
            conn.request("GET", target, headers=headers)
            return PooledResponse(conn.getresponse(), conn, key)
        except (OSError, http.client.HTTPException):
            conn.close()
            if not reused:
                raise
            # The server closed an idle connection (keep-alive timeout) before we used it: one fresh try.
            conn, reused = None, False


def _idle() -> dict:
    if not hasattr(_LOCAL, "idle"):
        _LOCAL.idle = {}
    return _LOCAL.idle


def _connect(parts: urllib.parse.SplitResult, timeout: float) -> http.client.HTTPConnection:
    if parts.scheme == "https":
        return http.client.HTTPSConnection(parts.netloc, timeout=timeout, context=ssl.create_default_context())
    return http.client.HTTPConnection(parts.netloc, timeout=timeout)


class PooledResponse:
    """An http.client response whose connection goes back to the pool once its body has been read to the end."""

    def __init__(self, response: http.client.HTTPResponse, conn: http.client.HTTPConnection, key: tuple):
        self._response, self._conn, self._key = response, conn, key
        self.status, self.reason, self.headers = response.status, response.reason, response.headers

    def read(self, size: int = -1) -> bytes:
        return self._response.read(size)

    def close(self) -> None:
        if self._conn is None:
            return
        finished = self._response.isclosed() or self._response.length == 0
        reusable = finished and not self._response.will_close
        self._response.close()
        if reusable:
            _idle()[self._key] = self._conn
        else:
            self._conn.close()
        self._conn = None
