"""Shared fixtures: loopback HTTP and S3 servers that serve real shards, with fault injection (see servers.py)."""

from __future__ import annotations

import os

import pytest

from servers import Faults, MotoS3, http_file_server


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto` (pyproject's addopts): one worker per core, at most 4. Each worker builds the session's shards
    and servers for itself, and many tests start two or three processes of their own."""
    return max(1, min(_cores(), 4))


def pytest_configure(config) -> None:
    """In an xdist worker, torch's threads are the worker's share of the cores (OMP_NUM_THREADS too, which the
    trainer's thread policy respects): workers with a thread per core each would spin against each other."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        import torch

        share = max(1, _cores() // workers)
        os.environ["OMP_NUM_THREADS"] = str(share)
        torch.set_num_threads(share)


LONGEST_FIRST = ("test_launch_configs.py", "test_elastic.py", "test_demo.py", "test_demo_side_by_side.py",
                 "test_evaluate.py", "test_selftrain.py", "test_hostile.py")
"""Files that take 30-140 s of a worker (multi-process launches), longest first, measured with
`python -m pytest -v` under time stamps. xdist hands out whole files (--dist loadfile) in collection order."""


def pytest_collection_modifyitems(config, items) -> None:
    """The longest files start first, the short ones fill in behind them. In xdist's own order (most tests first)
    the 55 s demo file started last and ran alone for its last 50 s while the other worker idled."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


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


# ---- small real datasets, made once per session -----------------------------------------------------------

def make_shards(root, dataset: str, split: str, num: int, size, shard_size: int, seed: int = 0):
    """Synthetic raw frames -> real shards with the real creator; returns the manifest path."""
    from segda.shards.encode import EncodeOptions
    from segda.shards.synth import synth_cityscapes, synth_gta5
    from segda.shards.writer import CreateOptions, create_shards, manifest_path

    raw = root / f"raw-{dataset}-{split}"
    if dataset == "gta5":
        synth_gta5(raw, num, size=size, seed=seed)
    else:
        synth_cityscapes(raw, split, num, size=size, seed=seed)
    out = root / f"shards-{dataset}"
    create_shards(dataset, raw, out, EncodeOptions(dataset, split), CreateOptions(shard_size=shard_size),
                  progress=False)
    return manifest_path(out, split)


@pytest.fixture(scope="session")
def gta5_manifest(tmp_path_factory):
    """~21 synthetic GTA5 frames (160x88) in uneven shards of <= 5 (one quirky frame is skipped)."""
    return make_shards(tmp_path_factory.mktemp("gta5"), "gta5", "train", 22, (160, 88), 5)


@pytest.fixture(scope="session")
def cityscapes_manifest(tmp_path_factory):
    """10 synthetic Cityscapes val frames (160x80) in 3 shards of 4, 4, 2."""
    return make_shards(tmp_path_factory.mktemp("cityscapes"), "cityscapes", "val", 10, (160, 80), 4)
