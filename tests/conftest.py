"""Shared fixtures: loopback HTTP and S3 servers that serve real shards, with fault injection (see servers.py)."""

from __future__ import annotations

import pytest

from servers import Faults, MotoS3, http_file_server


@pytest.fixture
def http_server(tmp_path, monkeypatch):
    """An HTTP file server for this test: write files under `.root`, fetch `.url + "/name"`, set `.faults`."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")  # a proxy in the environment must not see loopback
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    root = tmp_path / "www"
    root.mkdir()
    server = http_file_server(root)
    yield server
    server.close()


@pytest.fixture(scope="session")
def _moto_s3(tmp_path_factory):
    server = MotoS3(tmp_path_factory.mktemp("moto") / "moto_server.log")
    yield server
    server.close()


@pytest.fixture
def s3_server(_moto_s3, monkeypatch, tmp_path):
    """A moto S3 server (shared by the session) whose proxy `.endpoint` is this test's AWS_ENDPOINT_URL.

    Attributes: `.endpoint`, `.bucket`, `.upload(local_path, key) -> "s3://bucket/key"`, `.faults` (reset per
    test), `.path(key)` (the path faults see) and `.client()` (boto3 straight to moto).
    """
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS"):
        monkeypatch.delenv(name, raising=False)
    # Keep a developer's ~/.aws out of it, and never wait on the EC2 metadata service.
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", _moto_s3.endpoint)
    _moto_s3.faults = Faults()
    yield _moto_s3
    _moto_s3.faults = Faults()
