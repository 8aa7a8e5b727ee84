"""Fault-injecting loopback servers for the streaming tests: segda's benchmark servers (segda.bench.servers: an HTTP
file server with Range support, moto S3 behind a proxy, both counting their traffic) with `.faults` that make
them fail on purpose. Used through the `http_server` and `s3_server` fixtures in conftest.py.

Faults fire once per path (the first GET of it), so a client that retries or resumes succeeds and a test can check
that it did, from `faults.requests`. S3 faults work through the proxy between the client and `moto_server`: the
client really re-requests the missing byte range from moto, nothing in the client is patched.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from segda.bench import servers
from segda.bench.servers import Traffic, free_port  # noqa: F401  (tests import them from here)


@dataclass
class Faults:
    """What the server does wrong, per test. Paths are URL paths: "/a/b.tar" (S3: "/bucket/key")."""

    status_once: int | None = None
    """Answer this status (e.g. 503) to the first GET of each path."""
    drop_after: int | None = None
    """First GET of each path (after any status_once): send the full Content-Length, this many body bytes, then cut."""
    reset: bool = False
    """Cut with a TCP reset (client sees ConnectionResetError) instead of a clean close (client sees a short body)."""
    stall: float = 0.0
    """Seconds to sit silent before the cut, to exercise the client's read timeout."""
    not_found: set[str] = field(default_factory=set)
    """Paths that always answer 404 (HTTP file server only; moto answers NoSuchKey for missing keys itself)."""
    ignore_range: bool = False
    """Answer 200 with the whole file even to a Range request, like a server without range support."""
    delay: float = 0.0
    """Seconds every GET waits before it is answered: a slow store."""
    only: set[str] | None = None
    """Limit status_once/drop_after to these paths; None means every path."""
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    """(path, Range header) of every GET received, in order."""
    _done: set[tuple[str, str]] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def decide(self, path: str, range_header: str | None) -> tuple[int | None, int | None]:
        """Log a GET and return (status to answer instead, body bytes to send before cutting)."""
        with self._lock:
            self.requests.append((path, range_header))
            if self.only is not None and path not in self.only:
                return None, None
            if self.status_once is not None and ("status", path) not in self._done:
                self._done.add(("status", path))
                return self.status_once, None
            if self.drop_after is not None and ("drop", path) not in self._done:
                self._done.add(("drop", path))
                return None, self.drop_after
            return None, None


class _Faulty:
    """The handler hooks of segda.bench.servers, answered from the server's current `faults`."""

    def fault(self, path, range_header):
        time.sleep(self.server.faults.delay)
        return self.server.faults.decide(path, range_header)

    def not_found(self, path):
        return path in self.server.faults.not_found

    def ignores_range(self):
        return self.server.faults.ignore_range

    def cut(self):
        time.sleep(self.server.faults.stall)
        self.close_connection = True
        if self.server.faults.reset:  # linger 0 + close = RST, with no FIN before it
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()


class _FaultyFiles(_Faulty, servers.FileHandler):
    pass


class _FaultyProxy(_Faulty, servers.ProxyHandler):
    pass


class _WithFaults:
    """`.faults` of a server (or of MotoS3's proxy), replaceable per test."""

    @property
    def faults(self) -> Faults:
        return self.server.faults

    @faults.setter
    def faults(self, value: Faults) -> None:
        self.server.faults = value


class FaultyServer(_WithFaults, servers.LoopbackServer):
    pass


class MotoS3(_WithFaults, servers.MotoS3):
    def __init__(self, log_path: Path, bucket: str = "segda-test"):
        super().__init__(log_path, bucket, proxy_handler=_FaultyProxy)
        self.faults = Faults()


def http_file_server(root: Path) -> FaultyServer:
    """Serve `root` with Range support: `.url` is the base URL, `.root` the directory, `.faults` the faults."""
    server = FaultyServer(_FaultyFiles, root=root)
    server.faults = Faults()
    return server
