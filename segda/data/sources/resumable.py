"""The one retry layer of every remote read: a byte stream over one object that reconnects at its current offset.

A connector opens the object at a byte offset (an HTTP GET with a Range header, an S3 GetObject); when the
connection drops, stalls or the server says "try again later", `Resumable` connects again with
`Range: bytes=OFFSET-` after an exponential, jittered backoff, up to `retries` attempts per stall. The consumer
sees the exact byte stream: nothing lost, nothing duplicated. Below it, nothing retries (botocore is set to one
attempt, urllib3 to none), so a dead server costs `retries` attempts, not a product of three layers.
"""

from __future__ import annotations

import http.client
import io
import random
import time
from typing import BinaryIO, Callable

from segda.log import SegdaError, warn_limited

MAX_BACKOFF = 20.0
"""Seconds; caps backoff * 2**attempt so a long outage is polled rather than waited out blindly."""
CHUNK = 1 << 16
"""Bytes per network read: a read that makes less progress than this in `timeout` seconds counts as stalled."""


class Transient(Exception):
    """A failure worth retrying: the connection dropped or stalled, or the server said "try again later"."""


TRANSIENT: tuple[type[BaseException], ...] = (OSError, http.client.HTTPException, Transient)
"""OSError covers refused/reset connections and socket timeouts."""

Connector = Callable[[int, "int | None"], "tuple[BinaryIO, int, int | None, str | None]"]
"""(offset, end or None) -> (body, offset of its first byte, total size or None, ETag or None); raises SegdaError
if hopeless, Transient (or an OSError) if worth retrying. `end` (exclusive) asks for a bounded range; the body may
run past it if the server ignores ranges."""


class Resumable(io.RawIOBase):
    """One remote object read as a single byte stream, reconnecting at the current offset after a drop."""

    def __init__(self, url: str, connect: Connector, *, retries: int, timeout: float, backoff: float = 0.5,
                 transient: tuple = (), start: int = 0, end: int | None = None):
        self.url, self._connect, self._backoff, self._timeout = url, connect, backoff, timeout
        self._retries, self._transient = max(1, retries), TRANSIENT + transient
        self._body, self._offset, self._size, self._etag = None, start, None, None
        self._end = end  # exclusive; None: to the end of the object
        self._failures = 0
        self._window = (time.monotonic(), 0)  # (start, bytes since): the stall check
        self._retrying(self._reconnect)  # connect now: a 404 or a dead server surfaces in open_url, not later

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
        data = _read1(self._body, int(min(len(buf), CHUNK, limit - self._offset)))
        if not data:
            # a body that ends before its announced length was cut off
            if limit != float("inf"):
                raise Transient(f"connection closed at byte {self._offset} of {limit}")
            return 0
        buf[: len(data)] = data
        self._offset += len(data)
        self._progress(len(data))
        return len(data)

    def _progress(self, nbytes: int) -> None:
        """A trickle is a stall: less than CHUNK bytes in `timeout` seconds fails this attempt."""
        started, got = self._window
        got += nbytes
        now = time.monotonic()
        if got >= CHUNK:
            self._window, self._failures = (now, 0), 0  # progress: each new stall gets the full retry budget
        elif now - started > self._timeout:
            self._window = (now, 0)
            raise Transient(f"stalled: {got} bytes in {now - started:.0f} s (data.timeout {self._timeout:g} s)")
        else:
            self._window = (started, got)

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
        self._window = (time.monotonic(), 0)
        skip = self._offset - start  # the server ignored our Range (plain 200): discard what we already have
        while skip > 0:
            chunk = _read1(body, min(skip, 1 << 20))
            if not chunk:
                raise Transient(f"connection closed while skipping to byte {self._offset}")
            skip -= len(chunk)

    def _retrying(self, op: Callable):
        while True:
            try:
                return op()
            except self._transient as e:
                self._drop_body()
                self._failures += 1
                what = str(e) if isinstance(e, Transient) else f"{type(e).__name__}: {e}"
                if self._failures >= self._retries:
                    raise SegdaError(
                        f"giving up on {self.url} after {self._failures} attempts at byte {self._offset} (last "
                        f"error: {what}); check the URL, the network and the server (data.timeout, "
                        "data.retries)") from e
                delay = min(self._backoff * 2 ** (self._failures - 1), MAX_BACKOFF) * random.uniform(0.5, 1.0)
                # Said at once (a stalled server must not look like a hung run), but not a thousand times
                warn_limited("retry", f"{self.url}: {what} at byte {self._offset}; retrying in {delay:.1f} s "
                             f"(attempt {self._failures + 1} of {self._retries})")
                time.sleep(delay)  # jitter: many workers must not retry in lockstep

    def _drop_body(self) -> None:
        body, self._body = self._body, None
        if body is not None:
            try:
                body.close()
            except Exception:  # closing a broken connection may fail again; it is being discarded anyway
                pass


def _read1(body, size: int) -> bytes:
    """Up to `size` bytes, returning as soon as some arrived (a trickle shows as small reads, not one long one)."""
    read1 = getattr(body, "read1", None)
    return read1(size) if read1 is not None else body.read(size)


def range_header(offset: int, end: int | None) -> str:
    return f"bytes={offset}-" if end is None else f"bytes={offset}-{end - 1}"
