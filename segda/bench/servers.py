"""Loopback servers for `segda bench stream`: an HTTP file server that answers Range requests, and a real moto S3
server behind a small proxy. Both count the requests, connections and body bytes they serve (`.traffic`), which
is what the streaming benchmark reports. They listen on 127.0.0.1 only.

    python -m segda.bench.servers http ROOT      # or: s3 LOG_FILE; prints its addresses as one JSON line

The handlers have one hook, `fault(path, range)`, that answers "no fault" here: the tests (tests/servers.py)
override it to inject failures (a status, a cut connection, a stall) into the same servers.
"""

from __future__ import annotations

import http.client
import json
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

TRAFFIC_PATH = "/__traffic__"
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"}


@dataclass
class Traffic:
    """What a server answered to GET requests: how many, and how many body bytes it sent."""

    requests: int = 0
    bytes: int = 0
    connections: int = 0
    """TCP connections accepted (a client that keeps connections alive makes far fewer than requests)."""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def connected(self) -> None:
        with self._lock:
            self.connections += 1

    def answering(self) -> None:
        """Counted before the body goes out: a client that has read the whole body may look at once."""
        with self._lock:
            self.requests += 1

    def sent(self, nbytes: int) -> None:
        with self._lock:
            self.bytes += nbytes


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    traffic: Traffic
    root: Path | None = None
    upstream: tuple[str, int] | None = None

    def process_request(self, request, client_address):
        self.traffic.connected()
        super().process_request(request, client_address)

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], OSError):  # aborted connections are the point of these servers
            super().handle_error(request, client_address)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes: with Nagle's algorithm on, a kept-alive connection waits ~40 ms for
    # the client's delayed ACK before each body. Real servers set TCP_NODELAY too.
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format, *args):
        pass

    def fault(self, path: str, range_header: str | None) -> tuple[int | None, int | None]:
        """(status to answer instead, body bytes to send before cutting the connection) for a GET: none here."""
        return None, None

    def cut(self) -> None:
        """End the connection after a partial body (a fault)."""
        self.close_connection = True

    def not_found(self, path: str) -> bool:
        return False

    def ignores_range(self) -> bool:
        return False

    def reply(self, status: int, headers: dict[str, str], body: bytes) -> None:
        """Send a response (or the fault `fault` asks for)."""
        drop = None
        if self.command == "GET":
            fault_status, drop = self.fault(urlsplit(self.path).path, self.headers.get("Range"))
            if fault_status is not None:
                status, headers, body = fault_status, {}, b"injected fault\n"
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        if self.command != "HEAD" or "Content-Length" not in headers:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command == "HEAD":
            return
        self._send_counted(body if drop is None else body[:drop])
        if drop is not None:
            self.cut()

    def answered_traffic(self) -> bool:
        """GET /__traffic__ answers the counters as JSON (?reset=1 zeroes them), uncounted: how a benchmark reads
        a server that runs in another process."""
        parts = urlsplit(self.path)
        if self.command != "GET" or parts.path != TRAFFIC_PATH:
            return False
        traffic = self.server.traffic
        body = json.dumps({"requests": traffic.requests, "bytes": traffic.bytes,
                           "connections": traffic.connections}).encode()
        if "reset=1" in parts.query:
            self.server.traffic = Traffic()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        return True

    def _send_counted(self, body: bytes) -> None:
        """Write the body in chunks, counting each as it goes out: a client that hangs up mid-body (a reader that
        needed only the head of a shard) is charged for what was sent, as object storage would charge it (plus at
        most the one chunk the hang-up cut). Counted before the write, so a client that has read the whole body
        never sees the counters behind."""
        view = memoryview(body)
        traffic = self.server.traffic  # the counters current when the request came, even if reset meanwhile
        counted = self.command == "GET"
        if counted:
            traffic.answering()
        for start in range(0, len(body), 1 << 16):
            chunk = view[start:start + (1 << 16)]
            if counted:
                traffic.sent(len(chunk))
            self.wfile.write(chunk)


class FileHandler(Handler):
    def do_GET(self):
        if self.answered_traffic():
            return
        path = unquote(urlsplit(self.path).path)
        root = self.server.root.resolve()
        file = (root / path.lstrip("/")).resolve()
        if self.not_found(path) or root not in file.parents or not file.is_file():
            return self.reply(404, {"Content-Type": "text/plain"}, b"not found\n")
        stat = file.stat()
        size = stat.st_size
        headers = {"Accept-Ranges": "bytes", "ETag": f'"{stat.st_mtime_ns}-{size}"'}
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if not match or self.ignores_range():
            return self.reply(200, headers, file.read_bytes())
        start, end = int(match[1]), min(int(match[2] or size - 1), size - 1)
        if start >= size:
            return self.reply(416, {"Content-Range": f"bytes */{size}"}, b"")
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        with open(file, "rb") as f:  # only the asked-for bytes: a shard can be gigabytes
            f.seek(start)
            self.reply(206, headers, f.read(end + 1 - start))

    do_HEAD = do_GET


class ProxyHandler(Handler):
    """Forwards each request to moto, buffering the answer so faults can cut its body at an exact byte."""

    def forward(self):
        if self.answered_traffic():
            return
        if "chunked" in self.headers.get("Transfer-Encoding", ""):
            body = self._read_chunked()
        else:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP | {"expect"}}
        conn = http.client.HTTPConnection(*self.server.upstream, timeout=30)
        try:
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        skip = _HOP_BY_HOP | {"server", "date"} | ({"content-length"} if self.command != "HEAD" else set())
        self.reply(resp.status, {k: v for k, v in resp.getheaders() if k.lower() not in skip}, data)

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = forward

    def _read_chunked(self) -> bytes:
        out = bytearray()
        while size := int(self.rfile.readline().split(b";")[0], 16):
            out += self.rfile.read(size)
            self.rfile.readline()
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
            pass
        return bytes(out)


class LoopbackServer:
    """A threaded HTTP server on 127.0.0.1 (ephemeral port) in a daemon thread; `close()` stops it."""

    def __init__(self, handler: type[Handler], root: Path | None = None, upstream: tuple[str, int] | None = None):
        self._server = _Server(("127.0.0.1", 0), handler)
        self._server.root, self._server.upstream = root, upstream
        self._server.traffic = Traffic()
        self.root = root
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    @property
    def server(self) -> _Server:
        """The server object each handler sees as `self.server` (where a test puts its faults)."""
        return self._server

    @property
    def traffic(self) -> Traffic:
        return self._server.traffic

    def reset_traffic(self) -> None:
        self._server.traffic = Traffic()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def http_file_server(root: Path, handler: type[Handler] = FileHandler) -> LoopbackServer:
    """Serve `root` with Range support: `.url` is the base URL, `.root` the directory."""
    return LoopbackServer(handler, root=root)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoS3:
    """A `moto_server` process behind a counting proxy, with one bucket.

    `.endpoint` (the proxy) is what clients should use, e.g. via AWS_ENDPOINT_URL; `.upload()` goes straight to
    moto (uncounted, and past any fault a test injects into the proxy).
    """

    ACCESS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": "us-east-1"}

    def __init__(self, log_path: Path, bucket: str = "segda-test", proxy_handler: type[Handler] = ProxyHandler):
        port = free_port()
        command = shutil.which("moto_server")
        argv = [command] if command else [sys.executable, "-m", "moto.server"]
        self._log = open(log_path, "wb")
        self._proc = subprocess.Popen(argv + ["-H", "127.0.0.1", "-p", str(port)], stdout=self._log, stderr=self._log)
        self.direct_endpoint = f"http://127.0.0.1:{port}"
        self.bucket = bucket
        self._proxy = None
        try:
            self._wait_until_up(log_path)
            self.client().create_bucket(Bucket=bucket)
            self._proxy = LoopbackServer(proxy_handler, upstream=("127.0.0.1", port))
        except BaseException:
            self.close()
            raise
        self.endpoint = self._proxy.url

    def _wait_until_up(self, log_path: Path, limit: float = 30.0) -> None:
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"moto_server exited with {self._proc.returncode}: {log_path.read_text()[-2000:]}")
            try:
                urllib.request.urlopen(self.direct_endpoint + "/", timeout=1).close()
                return
            except urllib.error.HTTPError:
                return  # any HTTP answer means it is serving
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"moto_server did not answer within {limit}s: {log_path.read_text()[-2000:]}")

    @property
    def server(self):
        """The proxy's server object (where a test puts its faults)."""
        return self._proxy.server

    @property
    def traffic(self) -> Traffic:
        """Requests and bytes that went through the proxy (uploads made with `.upload()` bypass it)."""
        return self._proxy.traffic

    def reset_traffic(self) -> None:
        self._proxy.reset_traffic()

    def client(self):
        """A boto3 client talking to moto directly (no proxy, no faults), independent of the environment."""
        import boto3

        return boto3.session.Session().client("s3", endpoint_url=self.direct_endpoint, **self.ACCESS)

    def upload(self, local_path, key: str) -> str:
        """Put a local file at `key` in the bucket; returns its s3:// URL."""
        self.client().upload_file(str(local_path), self.bucket, key)
        return self.url(key)

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def path(self, key: str) -> str:
        """The URL path the proxy sees for `key`."""
        return f"/{self.bucket}/{key}"

    def close(self) -> None:
        if self._proxy is not None:
            self._proxy.close()
        self._proc.terminate()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._log.close()


def serve_main(argv: list[str]) -> None:
    """`python -m segda.bench.servers http ROOT` or `... s3 LOG_FILE`: run one server in this process, print its
    addresses as one JSON line, and stop when standard input closes (when the parent process exits)."""
    kind, where = argv
    if kind == "http":
        server = http_file_server(Path(where))
        print(json.dumps({"url": server.url}), flush=True)
    else:
        server = MotoS3(Path(where))
        print(json.dumps({"endpoint": server.endpoint, "direct": server.direct_endpoint, "bucket": server.bucket}),
              flush=True)
    try:
        sys.stdin.read()
    finally:
        server.close()


if __name__ == "__main__":
    serve_main(sys.argv[1:])
