"""Streaming at scale: many fake ranks x workers in one process against real HTTP and S3 servers on 127.0.0.1 that
count the requests and bytes they serve. Indexed shards (byte offsets in the manifest) must fetch only the bytes
of planned samples, read every sample exactly once, keep batches equal per rank, and draw batches from the whole
dataset. The baseline is plain webdataset (whole shards dealt to the rank x worker slots, streamed from byte 0),
and these tests show what it costs; manifests without offsets still evaluate, and train once indexed."""

from __future__ import annotations

import io
import json
import multiprocessing
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import make_shards

from segda.bench.stream import city_composition, simulate_baseline_epoch, simulate_eval, simulate_train_epoch
from segda.config import DataConfig
from segda.data import plan
from segda.data.datasets import resolve_dataset
from segda.data.shardfiles import index_tar
from segda.data.sources import read_range
from segda.data.stream import TrainingData, batches_per_epoch

WORLD, WORKERS = 4, 3


@pytest.fixture(scope="session")
def city_shards(tmp_path_factory):
    """60 train frames of 3 cities (20 each, shards of 16: mostly one city per shard) and 30 val frames in shards
    of 8; beside each indexed manifest, the same manifest without offsets (what segda < 0.2 wrote)."""
    root = tmp_path_factory.mktemp("cities")
    train = make_shards(root, "cityscapes", "train", 60, (64, 32), 16)
    val = make_shards(root, "cityscapes", "val", 30, (64, 32), 8)
    for manifest in (train, val):
        data = json.loads(manifest.read_text())
        for shard in data["shards"]:
            del shard["samples"]
        manifest.with_name(manifest.stem + "-no-offsets.json").write_text(json.dumps(data))
    return train.parent


def cfg(**kw) -> DataConfig:
    return DataConfig(**{**dict(batch_size=3, workers=WORKERS, crop_size="16x16", base_size="64x32",
                                photometric=False), **kw})


def sample_sizes(folder: Path, split: str) -> dict[str, int]:
    manifest = json.loads((folder / f"{split}-manifest.json").read_text())
    return {key: size for shard in manifest["shards"] for key, _, size in shard["samples"]}


def publish(folder: Path, server) -> str:
    """Put the shard folder on the server; returns the base URL."""
    if hasattr(server, "upload"):
        for f in folder.iterdir():
            server.upload(f, f"scale/{f.name}")
        return server.url("scale")
    for f in folder.iterdir():
        shutil.copy(f, server.root / f.name)
    return server.url


def measure(server, base: str, folder: Path, indexed: bool) -> dict:
    """segda (indexed manifest) or the plain-webdataset baseline (whole shards; evaluation without offsets)."""
    suffix = "" if indexed else "-no-offsets"
    train_ds = resolve_dataset(f"{base}/train-manifest{suffix}.json")
    val_ds = resolve_dataset(f"{base}/val-manifest{suffix}.json")
    server.reset_traffic()
    epoch = (simulate_train_epoch if indexed else simulate_baseline_epoch)(train_ds, cfg(), WORLD, WORKERS)
    train_traffic, _ = server.traffic, server.reset_traffic()
    evaluation = simulate_eval(val_ds, cfg(), WORLD, WORKERS)
    trained = [k for b in epoch["batches"] for k in b]
    sizes, val_sizes = sample_sizes(folder, "train"), sample_sizes(folder, "val")
    return {
        "trained": trained, "per_rank": epoch["per_rank"], "evaluated": evaluation["keys"],
        "train_ratio": train_traffic.bytes / sum(sizes[k] for k in trained),
        "eval_ratio": server.traffic.bytes / sum(val_sizes[k] for k in evaluation["keys"]),
        "train_requests": train_traffic.requests, "composition": city_composition(epoch["batches"], list(sizes)),
        "all_train": list(sizes), "all_val": list(val_sizes),
    }


def check_exactly_once(result: dict, rest: bool = True) -> None:
    """Every sample once (`rest`: all but the N mod W remainder, which rests this epoch); equal batches per rank."""
    trained, all_train = result["trained"], result["all_train"]
    assert len(trained) == len(set(trained)) == len(all_train) - (len(all_train) % WORLD if rest else 0)
    assert set(trained) <= set(all_train)
    assert len(set(result["per_rank"])) == 1, f"equal batches per rank, got {result['per_rank']}"
    assert sorted(result["evaluated"]) == sorted(result["all_val"]), "every evaluation sample exactly once"


@pytest.mark.parametrize("source", ["http", "s3"])
@pytest.mark.slow
def test_four_ranks_three_workers_fetch_only_what_they_use(city_shards, source, request):
    server = request.getfixturevalue("http_server" if source == "http" else "s3_server")
    base = publish(city_shards, server)
    ours = measure(server, base, city_shards, indexed=True)
    check_exactly_once(ours)
    assert ours["train_ratio"] <= 1.05 and ours["eval_ratio"] <= 1.05, ours
    # one Range request per shuffled training sample, fewer when neighbours in a shard meet in one batch
    assert 0.9 * len(ours["trained"]) <= ours["train_requests"] <= len(ours["trained"])
    # The baseline: whole shards per slot read each sample once, but 4 shards cannot give 4 ranks x 3 workers
    # equal batches, and evaluation readers starting mid-shard stream from byte 0 (what the counters must see)
    baseline = measure(server, base, city_shards, indexed=False)
    trained = baseline["trained"]
    assert len(trained) == len(set(trained)) == len(baseline["all_train"])
    assert len(set(baseline["per_rank"])) > 1, baseline["per_rank"]
    assert baseline["eval_ratio"] > 1.2, baseline


def test_batches_are_drawn_from_the_whole_dataset(city_shards, http_server):
    base = publish(city_shards, http_server)
    ours = measure(http_server, base, city_shards, indexed=True)
    baseline = measure(http_server, base, city_shards, indexed=False)
    # 1.0: as many cities per batch as a uniform shuffle gives; shard-order reading gives one city per batch.
    assert ours["composition"] > 0.85, ours["composition"]
    assert baseline["composition"] < 0.7, baseline["composition"]


def test_epoch_order_is_global_and_steps_consume_contiguous_stretches():
    n, batch = 47, 3
    for world in (1, 3, 4, 7):
        order = plan.epoch_order(n, seed=5, epoch=2)
        ranks = [plan.rank_batches(n, r, world, batch, seed=5, epoch=2) for r in range(world)]
        assert len({len(b) for b in ranks}) == 1 == len({plan.batches_per_epoch(n, world, batch), len(ranks[0])})
        for step in range(len(ranks[0])):  # after each step: exactly the first stretch of the order, whatever W
            consumed = np.concatenate([b for r in ranks for b in r[:step + 1]])
            assert sorted(consumed.tolist()) == sorted(order[:len(consumed)].tolist())
        whole = np.concatenate([b for r in ranks for b in r])
        assert sorted(whole.tolist()) == sorted(order[: n // world * world].tolist())
    assert (plan.epoch_order(n, 5, 2) != plan.epoch_order(n, 5, 3)).any(), "a new order each epoch"


@pytest.mark.parametrize("n,before,after,batch", [(47, 2, 1, 3), (47, 1, 2, 3), (50, 4, 3, 2), (23, 3, 8, 2)])
def test_an_epoch_interrupted_on_one_world_size_finishes_on_another_exactly_once(n, before, after, batch):
    """Positions consumed by `before` ranks, then the rest of the epoch on `after` ranks: each planned sample once,
    every rank of the second part with the same number of batches; the next epoch is a whole one on `after`."""
    full = plan.rank_batches(n, 0, before, batch, seed=1, epoch=4)
    end = plan.epoch_end(n, before)
    for steps in range(len(full)):
        first = [i for r in range(before) for b in plan.rank_batches(n, r, before, batch, 1, 4)[:steps] for i in b]
        position = plan.position_after(steps - 1, len(full), batch, before, 4, 0, end).state_dict() if steps else \
            {"epoch": 4, "consumed": 0, "end": end}
        assert sorted(first) == sorted(plan.epoch_order(n, 1, 4)[:position["consumed"]].tolist())
        rest = [plan.rank_batches(n, r, after, batch, 1, 4, position["consumed"], end) for r in range(after)]
        assert len({len(b) for b in rest}) == 1, "equal batch counts per rank"
        second = [i for r in rest for b in r for i in b]
        left = end - position["consumed"]
        expected = plan.epoch_order(n, 1, 4)[:end].tolist() if left >= after else first
        assert sorted(first + second) == sorted(expected), (steps, position)
    following = [i for r in range(after) for b in plan.rank_batches(n, r, after, batch, 1, 5) for i in b]
    assert len(following) == len(set(following)) == n // after * after


def test_the_manifest_index_is_each_samples_exact_bytes(city_shards):
    manifest = json.loads((city_shards / "train-manifest.json").read_text())
    assert manifest["format"] == "segda.shards/2"
    for shard in manifest["shards"]:
        path = city_shards / shard["url"]
        with open(path, "rb") as f:
            assert index_tar(f) == shard["samples"]
        with tarfile.open(path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for key, offset, size in shard["samples"]:
            with tarfile.open(fileobj=io.BytesIO(read_range(str(path), offset, size))) as piece:
                got = {m.name: piece.extractfile(m).read() for m in piece.getmembers()}
            assert got == {name: data for name, data in members.items() if name.split(".")[0] == key}


def test_range_reads_survive_faults_and_reuse_connections(city_shards, http_server):
    from servers import Faults

    base = publish(city_shards, http_server)
    local = city_shards / "train-000001.tar"
    data = local.read_bytes()
    http_server.faults = Faults(status_once=503, drop_after=1000)
    assert read_range(f"{base}/train-000001.tar", 5000, 30_000, backoff=0.01) == data[5000:35_000]
    assert [r for _, r in http_server.faults.requests][-1] == "bytes=6000-34999", "resumed where the drop cut"
    http_server.faults = Faults(ignore_range=True)  # a server without Range support: the slice is still right
    assert read_range(f"{base}/train-000001.tar", 700, 300) == data[700:1000]
    http_server.faults = Faults()
    http_server.reset_traffic()
    for offset in range(0, 20 * 512, 512):
        assert read_range(f"{base}/train-000001.tar", offset, 100) == data[offset:offset + 100]
    assert http_server.traffic.requests == 20 and http_server.traffic.connections == 1, "kept alive"


def test_loader_workers_live_across_epochs(city_shards):
    ds = resolve_dataset(str(city_shards / "train-manifest.json"))
    data = TrainingData(ds, cfg(workers=2, batch_size=6), rank=0, world=1, seed=0)
    seen = []
    for batch in data:
        seen.append((batch["epoch"], frozenset(p.pid for p in multiprocessing.active_children())))
        if batch["epoch"] == 2:
            break
    data.close()
    pids, epochs = [p for _, p in seen], [e for e, _ in seen]
    assert epochs[0] == 0 and epochs[-1] == 2 and len(set(pids)) == 1 and pids[0], "the same workers serve every epoch"
    assert not {p.pid for p in multiprocessing.active_children()} & pids[0], "close() stopped them"


def test_endless_stream_resumes_anywhere_from_its_state(city_shards):
    ds = resolve_dataset(str(city_shards / "train-manifest.json"))
    data_cfg = cfg(workers=2, batch_size=6)
    per_epoch = batches_per_epoch(ds, data_cfg, 2)
    straight = TrainingData(ds, data_cfg, rank=1, world=2, seed=3)
    stream, keys, states = iter(straight), [], []
    for _ in range(2 * per_epoch):
        keys.append(next(stream)["key"])
        states.append(straight.state_dict())
    straight.close()
    assert states[per_epoch - 1] == {"epoch": 1, "consumed": 0, "end": None}
    for start in (1, per_epoch - 1, per_epoch + 1):
        resumed = TrainingData(ds, data_cfg, rank=1, world=2, seed=3)
        resumed.load_state_dict(states[start - 1])
        again = iter(resumed)
        assert [next(again)["key"] for _ in range(2 * per_epoch - start)] == keys[start:]
        resumed.close()


def test_a_manifest_without_offsets_warns_how_to_regenerate(city_shards, capfd):
    resolve_dataset(str(city_shards / "train-manifest-no-offsets.json"))
    assert "segda index" in capfd.readouterr().err


def test_a_manifest_index_that_does_not_match_its_shard_is_named(city_shards, tmp_path):
    from segda.log import SegdaError

    folder = tmp_path / "s"
    shutil.copytree(city_shards, folder)
    manifest = folder / "val-manifest.json"
    data = json.loads(manifest.read_text())
    first = data["shards"][0]["samples"]
    first[0][0], first[1][0] = first[1][0], first[0][0]  # two keys swapped: the index lies about the tar
    manifest.write_text(json.dumps(data))
    ds = resolve_dataset(str(manifest))
    with pytest.raises(SegdaError, match="does not belong to this shard"):
        simulate_eval(ds, cfg(workers=1, strict=True), 1, 1)
    data["shards"][0]["samples"][2][1] = -5
    manifest.write_text(json.dumps(data))
    with pytest.raises(SegdaError, match=r"shards\[0\]\.samples\[2\] offset is -5"):
        resolve_dataset(str(manifest))


@pytest.mark.slow
def test_segda_index_adds_offsets_to_an_old_manifest(city_shards, tmp_path):
    from helpers import segda_here

    folder = tmp_path / "s"
    shutil.copytree(city_shards, folder)
    old = folder / "train-manifest-no-offsets.json"
    proc = segda_here("index", old)
    assert "indexed 60 samples in 4 shard(s)" in proc.stderr
    assert json.loads(old.read_text())["shards"] == json.loads((folder / "train-manifest.json").read_text())["shards"]
    assert resolve_dataset(str(old)).indexed
    (folder / "train-000002.tar").write_bytes(b"")  # a shard that no longer matches: refused, manifest kept
    before = old.read_text()
    proc = segda_here("index", old, check=False)
    assert proc.returncode == 2 and "train-000002.tar holds 0 samples" in proc.stderr and old.read_text() == before


@pytest.mark.slow
def test_s3_range_reads_are_presigned_gets_that_resume_and_name_the_s3_url(city_shards, s3_server):
    from servers import Faults

    from segda.log import SegdaError

    base = publish(city_shards, s3_server)
    data = (city_shards / "train-000001.tar").read_bytes()
    s3_server.faults = Faults(status_once=503, drop_after=1000, only={s3_server.path("scale/train-000001.tar")})
    assert read_range(f"{base}/train-000001.tar", 5000, 30_000, backoff=0.01) == data[5000:35_000]
    ranges = [r for p, r in s3_server.faults.requests if p == s3_server.path("scale/train-000001.tar")]
    assert ranges == ["bytes=5000-34999", "bytes=5000-34999", "bytes=6000-34999"], "503, cut at 1000, resumed"
    with pytest.raises(SegdaError) as err:
        read_range(f"{base}/missing.tar", 0, 10)
    assert "s3://segda-test/scale/missing.tar: HTTP 404" in str(err.value)
    assert "Signature" not in str(err.value), "a presigned URL is a credential: never print it"


@pytest.mark.parametrize("edit,named", [
    (lambda m: m["shards"][1].update(num_samples=-3), r"shards\[1\]\.num_samples is -3"),
    (lambda m: m["shards"][1].update(num_samples=2.5), r"shards\[1\]\.num_samples is 2\.5"),
    (lambda m: m["shards"][1].update(num_samples="8"), r"shards\[1\]\.num_samples is '8'"),
    (lambda m: m.update(shards={"url": "x.tar"}), "no 'shards' list"),
    (lambda m: m["shards"].__setitem__(0, "val-000000.tar"), r"shards\[0\] is str"),
    (lambda m: m["shards"][0].pop("url"), r"shards\[0\]\.url is None"),
    (lambda m: m["shards"][0].update(sha256="abc"), r"shards\[0\]\.sha256"),
    (lambda m: m["shards"][0]["samples"].pop(), r"shards\[0\]\.samples lists 7 samples but num_samples is 8"),
])
def test_a_malformed_manifest_is_refused_naming_the_field(city_shards, tmp_path, edit, named):
    from segda.log import SegdaError

    data = json.loads((city_shards / "val-manifest.json").read_text())
    edit(data)
    manifest = tmp_path / "val-manifest.json"
    manifest.write_text(json.dumps(data))
    with pytest.raises(SegdaError, match=named):
        resolve_dataset(str(manifest))


def test_a_shard_replaced_after_its_manifest_was_written_is_refused(city_shards, http_server):
    from segda.log import SegdaError

    base = publish(city_shards, http_server)
    shard = http_server.root / "val-000001.tar"
    shard.write_bytes(shard.read_bytes() + b"\0" * 10240)  # re-uploaded, longer: offsets may point anywhere
    ds = resolve_dataset(f"{base}/val-manifest.json")
    with pytest.raises(SegdaError, match=r"val-000001\.tar is \d+ bytes, its manifest says \d+"):
        simulate_eval(ds, cfg(workers=1), 1, 1)
