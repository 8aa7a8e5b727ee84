"""Open shard and manifest URLs as byte streams that survive flaky networks, one module per scheme:

    local.py      local paths and file:// (regular files only)
    http.py       http(s):// over urllib3 (one pool per process, proxies, redirects within the scheme)
    s3.py         s3://bucket/key through boto3 (credentials and AWS_ENDPOINT_URL the standard way)
    pipe.py       pipe:COMMAND, only when the user opts in (data.allow_pipe)
    resumable.py  the one retry layer: reconnect at the current byte offset after a drop or a stall

    with open_url("s3://bucket/gta5/train-000003.tar", timeout=30, retries=5) as f: ...
    data = read_range("https://host/gta5/train-000003.tar", offset, size)     # one sample: a Range request
    shards = expand_urls("https://host/gta5/train-{000000..000023}.tar")
"""

from __future__ import annotations

import io
import itertools
import os
import posixpath
import re
import urllib.parse
from typing import BinaryIO

import braceexpand

from segda.data.sources import http, local, s3
from segda.data.sources.pipe import PIPE_REFUSED, PipeReader
from segda.data.sources.resumable import Resumable
from segda.log import SegdaError

__all__ = ["SUPPORTED", "PIPE_REFUSED", "open_url", "read_range", "read_bytes", "expand_urls", "join_url",
           "url_scheme", "local_path", "is_remote"]

SUPPORTED = "local paths, file://, http://, https://, s3:// and pipe: (opt-in)"
REMOTE = ("http", "https", "s3")
MAX_URLS = 100_000
"""A shard pattern may expand to at most this many URLs (a typo like {0..99999999} must not fill the memory)."""
MAX_READ_BYTES = 256 << 20
"""read_bytes (manifests, small JSON files) refuses objects larger than this."""
_BUFFER = 1 << 20


def url_scheme(url: str) -> str:
    """The one place a URL's scheme is read ("" for a local path): every check of a scheme goes through it, so
    "PIPE:..." or " pipe:..." cannot slip past a check that compares raw strings."""
    scheme = urllib.parse.urlsplit(url.strip()).scheme.lower()
    return "" if len(scheme) == 1 else scheme  # "C:\\shards" is a Windows drive, not a scheme


def is_remote(url: str) -> bool:
    return url_scheme(url) in REMOTE


def local_path(url: str) -> str:
    """The filesystem path of a local path or file:// URL."""
    return local.path_of(url, url_scheme(url))


def expand_urls(spec: str) -> list[str]:
    """Brace-expand a shard spec ("train-{000000..000023}.tar") into its URLs, in order (at most MAX_URLS)."""
    if _expansion_bound(spec) > MAX_URLS:  # braceexpand builds a whole range before yielding any of it
        raise SegdaError(f"the shard pattern {spec!r} expands to more than {MAX_URLS:,} URLs: check its braces")
    urls = list(itertools.islice(braceexpand.braceexpand(spec.strip()), MAX_URLS + 1))
    if len(urls) > MAX_URLS:
        raise SegdaError(f"the shard pattern {spec!r} expands to more than {MAX_URLS:,} URLs: check its braces")
    if not urls or not all(urls):
        raise SegdaError(f"empty shard spec {spec!r}; give a path or URL such as shards/train-{{000000..000009}}.tar")
    return urls


_RANGE = re.compile(r"\{(-?\d+)\.\.(-?\d+)(?:\.\.(-?\d+))?\}|\{([a-zA-Z])\.\.([a-zA-Z])\}")


def _expansion_bound(spec: str) -> int:
    """At least as many URLs as `spec` expands to, counted without expanding: each range's length and each
    comma group's items multiply."""
    bound = 1
    for match in _RANGE.finditer(spec):
        if match.group(1) is not None:
            step = abs(int(match.group(3) or 1)) or 1
            bound *= abs(int(match.group(2)) - int(match.group(1))) // step + 1
        else:
            bound *= abs(ord(match.group(5)) - ord(match.group(4))) + 1
    stack: list[int] = []  # commas seen in each open brace group
    for char in spec:
        if char == "{":
            stack.append(0)
        elif char == "," and stack:
            stack[-1] += 1
        elif char == "}" and stack:
            bound *= stack.pop() + 1
    return bound


def join_url(base: str, relative: str) -> str:
    """Resolve `relative` (a shard path in a manifest) against the manifest's own URL `base`. A remote manifest
    may only name remote objects: never a local path, file:// or pipe: (it must not reach this machine's files)."""
    scheme, base_scheme = url_scheme(relative), url_scheme(base)
    if base_scheme in REMOTE and scheme not in REMOTE and (scheme or (base_scheme == "s3" and relative[:1] == "/")):
        raise SegdaError(f"{base} names {relative!r}: a remote manifest may only list http(s):// and s3:// URLs "
                         "or paths relative to itself, never local files")
    if scheme or (relative.startswith("/") and base_scheme not in ("http", "https")):
        return relative  # already absolute (an http(s) manifest's "/path" is a path on its own host)
    if base_scheme in ("http", "https", "file"):
        return urllib.parse.urljoin(base, relative)
    if base_scheme == "s3":  # urljoin does not know s3://, so join the key by hand
        bucket, key = s3.split(base)
        joined = posixpath.normpath(posixpath.join(posixpath.dirname(key), relative))
        if joined.startswith(".."):
            raise SegdaError(f"{relative!r} relative to {base} leaves bucket {bucket}; use a full s3:// URL")
        return f"s3://{bucket}/{joined}"
    if base_scheme:
        raise SegdaError(f"cannot resolve {relative!r} against {base}; give full URLs in the manifest")
    return os.path.normpath(os.path.join(os.path.dirname(base), relative))


def open_url(url: str, *, allow_pipe: bool = False, retries: int = 5, timeout: float = 30.0,
             backoff: float = 0.5) -> BinaryIO:
    """A readable binary file object for `url`; remote ones retry and resume (segda.data.sources.resumable).

    Permanent failures (missing file or key, HTTP 4xx, access denied) raise SegdaError at once; transient ones
    (refused/reset connections, stalls, HTTP 5xx/429) are retried `retries` times with exponential backoff.
    """
    scheme = url_scheme(url)
    if not scheme or scheme == "file":
        return local.open_file(local.path_of(url, scheme))
    if scheme == "pipe":
        if not allow_pipe:
            raise SegdaError(f"{PIPE_REFUSED}: {url}")
        return io.BufferedReader(PipeReader(url.strip()[len("pipe:"):], timeout), _BUFFER)
    return io.BufferedReader(_remote(url, scheme, retries, timeout, backoff), _BUFFER)


def read_bytes(url: str, **kwargs) -> bytes:
    """The whole object (manifests, small JSON files), at most MAX_READ_BYTES; same arguments as `open_url`."""
    with open_url(url, **kwargs) as f:
        data = f.read(MAX_READ_BYTES + 1)
    if len(data) > MAX_READ_BYTES:
        raise SegdaError(f"{url} is larger than {MAX_READ_BYTES >> 20} MiB: not a manifest")
    return data


def read_range(url: str, offset: int, size: int, *, expect_total: int | None = None, retries: int = 5,
               timeout: float = 30.0, backoff: float = 0.5) -> bytes:
    """Exactly bytes [offset, offset + size) of `url`: a seek for local files, one Range request for HTTP and S3
    (resumed like `open_url` if the connection drops). `expect_total`: the object's size the caller knows (from a
    manifest); a larger object was replaced since, and raises SegdaError. A shorter one (a truncated copy) raises
    EOFError only if the range runs past its end."""
    scheme = url_scheme(url)
    if not scheme or scheme == "file":
        data, total = local.read_range(local.path_of(url, scheme), offset, size)
    elif scheme == "pipe":
        raise SegdaError(f"{url}: a pipe: command cannot be read by byte range; use files or http(s)/s3 URLs")
    else:
        with _remote(url, scheme, retries, timeout, backoff, offset, offset + size) as raw:
            data = _read_exactly(raw, size)
            total = raw.size
    if expect_total is not None and total is not None and total > expect_total:
        raise SegdaError(f"{url} is {total} bytes, its manifest says {expect_total}: the shard was replaced after the "
                         "manifest was written; re-create the shards or re-download the manifest")
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


def _remote(url: str, scheme: str, retries: int, timeout: float, backoff: float, start: int = 0,
            end: int | None = None) -> Resumable:
    if scheme in ("http", "https"):
        return Resumable(url, http.connector(url, timeout), retries=retries, timeout=timeout, backoff=backoff,
                         transient=http.TRANSIENT, start=start, end=end)
    if scheme == "s3":
        return Resumable(url, s3.connector(url, timeout, bounded=end is not None), retries=retries, timeout=timeout,
                         backoff=backoff, transient=http.TRANSIENT + s3.transient_errors(), start=start, end=end)
    hint = "" if "://" in url else " (write a local path containing ':' as ./path)"
    raise SegdaError(f"unsupported URL scheme {scheme!r} in {url}; supported: {SUPPORTED}{hint}")
