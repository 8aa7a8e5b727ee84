"""segda.data.sources against local files, a loopback HTTP server and a real moto S3 server, with injected faults."""

from __future__ import annotations

import io
import os
import socket
import tarfile
import time

import pytest

from segda.data import sources
from segda.data.sources import PIPE_REFUSED, expand_urls, join_url, open_url, read_bytes
from segda.log import SegdaError

SIZE, DROP = 300_000, 100_000
FAST = {"retries": 4, "backoff": 0.01, "timeout": 5.0}
"""Tiny backoff so retry tests take milliseconds."""


@pytest.fixture
def blob() -> bytes:
    return os.urandom(SIZE)


def read_all(url: str, chunk: int = 8192, **kwargs) -> bytes:
    """Read the way tarfile does, in small pieces, so resumes happen mid-consumption."""
    parts = []
    with open_url(url, **{**FAST, **kwargs}) as f:
        while piece := f.read(chunk):
            parts.append(piece)
    return b"".join(parts)


def serve(http_server, name: str, data: bytes) -> str:
    (http_server.root / name).write_bytes(data)
    return f"{http_server.url}/{name}"


# --- local paths and URL helpers ---


def test_local_plain_and_file_url(tmp_path, blob):
    path = tmp_path / "a b.tar"
    path.write_bytes(blob)
    assert read_bytes(str(path)) == blob
    assert read_bytes(path.as_uri()) == blob  # file:// with %20 for the space


def test_local_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "train-000007.tar"
    with pytest.raises(SegdaError, match=r"no such file: .*train-000007\.tar.*check the path"):
        open_url(str(missing))


def test_expand_urls_keeps_order():
    assert expand_urls("shards/gta5/train-{000000..000002}.tar") == [
        "shards/gta5/train-000000.tar",
        "shards/gta5/train-000001.tar",
        "shards/gta5/train-000002.tar",
    ]
    assert expand_urls("s3://b/{val,train}-{0..1}.tar") == [
        "s3://b/val-0.tar", "s3://b/val-1.tar", "s3://b/train-0.tar", "s3://b/train-1.tar"
    ]
    assert expand_urls("https://h/x.tar") == ["https://h/x.tar"]
    with pytest.raises(SegdaError, match="empty shard spec"):
        expand_urls("  ")


def test_join_url_for_each_kind():
    assert join_url("shards/gta5/manifest.json", "train-000001.tar") == os.path.join("shards/gta5", "train-000001.tar")
    assert join_url("manifest.json", "a.tar") == "a.tar"
    assert join_url("/data/m.json", "../other/a.tar") == "/other/a.tar"
    assert join_url("file:///data/gta5/m.json", "a.tar") == "file:///data/gta5/a.tar"
    assert join_url("https://h:8000/gta5/m.json?sig=1", "train-0.tar") == "https://h:8000/gta5/train-0.tar"
    assert join_url("http://h/gta5/m.json", "../city/a.tar") == "http://h/city/a.tar"
    assert join_url("s3://bkt/gta5/m.json", "train-0.tar") == "s3://bkt/gta5/train-0.tar"
    assert join_url("s3://bkt/m.json", "sub/../a.tar") == "s3://bkt/a.tar"
    assert join_url("s3://bkt/gta5/m.json", "https://cdn/a.tar") == "https://cdn/a.tar"  # absolute wins
    assert join_url("http://h/d/m.json", "/abs/a.tar") == "http://h/abs/a.tar"  # a path on the manifest's host
    assert join_url("/data/m.json", "/abs/a.tar") == "/abs/a.tar"
    with pytest.raises(SegdaError, match="leaves bucket"):
        join_url("s3://bkt/m.json", "../a.tar")
    for local in ("file:///etc/passwd", "/etc/passwd", "pipe:cat /etc/passwd"):  # a remote manifest never reaches
        with pytest.raises(SegdaError, match="never local files"):              # this machine's files
            join_url("s3://bkt/m.json" if local[0] == "/" else "https://h/m.json", local)


def test_unknown_scheme_lists_supported():
    with pytest.raises(SegdaError, match=r"unsupported URL scheme 'gs'.*s3://.*pipe:"):
        open_url("gs://bucket/a.tar")


# --- HTTP ---


def test_http_plain_read(http_server, blob):
    url = serve(http_server, "train-000000.tar", blob)
    assert read_all(url) == blob
    assert read_bytes(url) == blob
    assert http_server.faults.requests == [("/train-000000.tar", None)] * 2


def test_http_tar_stream_survives_drop(http_server, tmp_path):
    """What webdataset does with a shard: stream it through tarfile while the connection drops mid-member."""
    members = {f"{i:04d}.{ext}": os.urandom(20_000) for i in range(8) for ext in ("png", "json")}
    with tarfile.open(http_server.root / "shard.tar", "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    http_server.faults.drop_after = DROP
    with open_url(f"{http_server.url}/shard.tar", **FAST) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        assert {m.name: tar.extractfile(m).read() for m in tar} == members
    assert len(http_server.faults.requests) == 2


def test_http_503_once_is_retried(http_server, blob):
    url = serve(http_server, "a.tar", blob)
    http_server.faults.status_once = 503
    assert read_all(url) == blob
    assert len(http_server.faults.requests) == 2


@pytest.mark.parametrize("reset", [False, True], ids=["close", "reset"])
def test_http_drop_mid_body_resumes_exactly(http_server, blob, reset):
    url = serve(http_server, "a.tar", blob)
    http_server.faults.drop_after, http_server.faults.reset = DROP, reset
    assert read_all(url) == blob
    (_, first), (_, second) = http_server.faults.requests
    assert first is None
    if not reset:  # a clean close delivers every byte sent, so the resume starts exactly there
        assert second == f"bytes={DROP}-"


def test_http_stalled_body_times_out_and_resumes(http_server, blob):
    url = serve(http_server, "a.tar", blob)
    http_server.faults.drop_after, http_server.faults.stall = DROP, 2.0
    start = time.monotonic()
    assert read_all(url, timeout=0.3) == blob
    assert time.monotonic() - start < 1.5
    resumed_at = http_server.faults.requests[1][1]  # a timeout may discard the chunk being read: offset <= DROP
    assert resumed_at.startswith("bytes=") and 0 < int(resumed_at[6:-1]) <= DROP


def test_http_server_ignoring_range_is_skipped_forward(http_server, blob):
    url = serve(http_server, "a.tar", blob)
    http_server.faults.drop_after, http_server.faults.ignore_range = DROP, True
    assert read_all(url) == blob  # second answer is a 200 with the whole file: the first DROP bytes are skipped


def test_http_object_changed_between_drop_and_resume(http_server, blob):
    url = serve(http_server, "a.tar", blob)
    http_server.faults.drop_after = DROP
    with open_url(url, **FAST) as f:
        (http_server.root / "a.tar").write_bytes(os.urandom(SIZE))  # same size, new ETag
        with pytest.raises(SegdaError, match="changed while being read"):
            f.read()


def test_http_404_fails_at_once(http_server):
    http_server.faults.not_found.add("/missing.tar")
    url = f"{http_server.url}/missing.tar"
    start = time.monotonic()
    with pytest.raises(SegdaError, match=r"missing\.tar: HTTP 404"):
        open_url(url, retries=5, backoff=1.0)
    assert time.monotonic() - start < 0.5
    assert len(http_server.faults.requests) == 1


def test_http_connection_refused_gives_up_after_retries():
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/a.tar"
    start = time.monotonic()
    with pytest.raises(SegdaError, match=rf"giving up on {url} after 3 attempts.*last error: ConnectionRefusedError"):
        open_url(url, retries=3, backoff=0.05, timeout=2.0)
    assert time.monotonic() - start < 3.0


# --- S3 (moto) ---


def test_s3_read_uploaded_object(s3_server, tmp_path, blob):
    (tmp_path / "a.tar").write_bytes(blob)
    url = s3_server.upload(tmp_path / "a.tar", "gta5/train-000000.tar")
    assert read_all(url) == blob
    assert read_bytes(url) == blob
    assert s3_server.faults.requests == [(s3_server.path("gta5/train-000000.tar"), None)] * 2


@pytest.mark.parametrize("reset", [False, True], ids=["close", "reset"])
def test_s3_drop_mid_body_rerequests_range(s3_server, tmp_path, blob, reset):
    (tmp_path / "a.tar").write_bytes(blob)
    url = s3_server.upload(tmp_path / "a.tar", f"drop-{reset}.tar")
    s3_server.faults.drop_after, s3_server.faults.reset = DROP, reset
    assert read_all(url) == blob
    ranges = [r for _, r in s3_server.faults.requests]
    assert ranges[0] is None and len(ranges) == 2
    if not reset:  # urllib3 may drop the partly read chunk, so the resume offset is at most DROP
        assert ranges[1].startswith("bytes=") and 0 < int(ranges[1][6:-1]) <= DROP


def test_s3_503_once_is_retried(s3_server, tmp_path, blob):
    (tmp_path / "a.tar").write_bytes(blob)
    url = s3_server.upload(tmp_path / "a.tar", "busy.tar")
    s3_server.faults.status_once = 503
    assert read_all(url) == blob


def test_s3_missing_key_and_bucket(s3_server):
    start = time.monotonic()
    with pytest.raises(SegdaError, match=r"s3://segda-test/nope\.tar does not exist \(NoSuchKey\).*AWS_ENDPOINT_URL"):
        open_url(s3_server.url("nope.tar"), retries=5, backoff=1.0)
    with pytest.raises(SegdaError, match=r"does not exist \(NoSuchBucket\)"):
        open_url("s3://no-such-bucket/a.tar", retries=5, backoff=1.0)
    assert time.monotonic() - start < 2.0


def test_s3_endpoint_url_s3_wins_over_generic(s3_server, tmp_path, monkeypatch):
    (tmp_path / "m.json").write_bytes(b"{}")
    url = s3_server.upload(tmp_path / "m.json", "m.json")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # would be refused
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server.endpoint)
    assert read_bytes(url, **FAST) == b"{}"


def test_s3_client_cached_per_process(s3_server, monkeypatch):
    client = sources.s3.client(5.0)
    assert sources.s3.client(5.0) is client
    monkeypatch.setattr(sources.os, "getpid", lambda: -1)  # what a forked worker sees
    assert sources.s3.client(5.0) is not client


# --- pipe: ---


def test_pipe_refused_by_default(tmp_path):
    with pytest.raises(SegdaError) as info:
        open_url(f"pipe:cat {tmp_path}/a.tar")
    assert PIPE_REFUSED in str(info.value)
    assert "set data.allow_pipe=true (or pass --allow-pipe)" in str(info.value)


def test_pipe_allowed_when_enabled(tmp_path, blob):
    (tmp_path / "a.tar").write_bytes(blob)
    assert read_bytes(f"pipe:cat {tmp_path}/a.tar", allow_pipe=True) == blob


def test_pipe_failure_raises_at_close(tmp_path):
    with pytest.raises(SegdaError, match="exited with status 1"):
        read_bytes(f"pipe:cat {tmp_path}/missing.tar 2>/dev/null", allow_pipe=True)


def test_pipe_closed_early_is_not_an_error():
    with open_url("pipe:yes", allow_pipe=True, timeout=2.0) as f:  # endless output: dies of SIGPIPE on close
        assert f.read(4) == b"y\ny\n"


def test_an_unreachable_s3_endpoint_is_retried_and_named(monkeypatch):
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for name, value in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
                        "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                        "NO_PROXY": "127.0.0.1"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SegdaError, match=r"giving up on s3://bucket/a\.tar after 2 attempts.*EndpointConnectionError"):
        open_url("s3://bucket/a.tar", retries=2, backoff=0.01, timeout=2.0)
