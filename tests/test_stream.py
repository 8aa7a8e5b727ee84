"""The streaming pipeline: splitting over fake ranks and real workers, determinism, resume, exactly-once
evaluation, HTTP and S3 sources with faults, and every bad-data case."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from segda.config import DataConfig
from segda.data import plan
from segda.data.datasets import resolve_dataset
from segda.data.shardfiles import index_tar
from segda.data.eval_stream import eval_loader
from segda.data.stream import TrainingData, batches_per_epoch
from segda.data.transforms import random_scale_crop, warp_crop
from segda.log import SegdaError


def cfg(**kw) -> DataConfig:
    base = dict(batch_size=3, workers=2, crop_size="64x48", base_size="160x88", scale_range=[0.5, 2.0])
    return DataConfig(**{**base, **kw})


def manifest_keys(manifest_path: Path) -> list[str]:
    keys = []
    manifest = json.loads(Path(manifest_path).read_text())
    for shard in manifest["shards"]:
        with tarfile.open(Path(manifest_path).parent / shard["url"]) as tar:
            keys += sorted({m.name.split(".")[0] for m in tar.getmembers()}, key=[
                m.name.split(".")[0] for m in tar.getmembers()].index)
    return keys


def epoch_batches(spec, data_cfg, rank, world, epoch=0, start_step=0, seed=0):
    """This rank's batches of one epoch from `start_step` on, as training streams them (its position state)."""
    ds = resolve_dataset(str(spec)) if not hasattr(spec, "shards") else spec
    data = TrainingData(ds, data_cfg, rank=rank, world=world, seed=seed)
    frames = data_cfg.batch_size // data_cfg.crops_per_frame
    data.load_state_dict({"epoch": epoch, "consumed": start_step * frames * world, "end": None})
    stream = iter(data)
    batches = [next(stream) for _ in range(batches_per_epoch(data.ds, data_cfg, world) - start_step)]
    data.close()
    assert {b["epoch"] for b in batches} <= {epoch}
    if batches:
        assert data.state_dict() == {"epoch": epoch + 1, "consumed": 0, "end": None}, "the epoch is complete"
    return batches


def eval_keys(spec, data_cfg, world, **kw) -> list[str]:
    ds = resolve_dataset(str(spec), allow_pipe=data_cfg.allow_pipe)
    keys = []
    for rank in range(world):
        for batch in eval_loader(ds, data_cfg, rank=rank, world=world, **kw):
            keys += batch["key"]
    return keys


# ---- splitting ------------------------------------------------------------------------------------------

def test_two_fake_ranks_two_workers_train_on_everything_once(gta5_manifest):
    all_keys = manifest_keys(gta5_manifest)
    per_rank = [epoch_batches(gta5_manifest, cfg(), rank, 2) for rank in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) > 0, "every rank must yield the same number of batches"
    seen = [k for batches in per_rank for b in batches for k in b["key"]]
    assert len(seen) == len(set(seen)), "no sample twice in an epoch"
    assert set(seen) <= set(all_keys)
    assert len(all_keys) - len(seen) == len(all_keys) % 2, "only the N mod world remainder may rest this epoch"
    batch = per_rank[0][0]
    assert batch["image"].shape == (3, 48, 64, 3) and str(batch["image"].dtype) == "torch.uint8"
    assert batch["label"].shape == (3, 48, 64)


@pytest.mark.parametrize("num_shards_counts,world,workers", [([5, 3, 7, 1, 4], 2, 2), ([2, 1], 2, 3), ([9], 3, 2)])
def test_eval_plan_covers_every_sample_exactly_once(num_shards_counts, world, workers):
    covered = []
    for rank in range(world):
        for worker_plan in plan.eval_plan(num_shards_counts, rank, world, workers, batch_size=2):
            for seg in worker_plan.segments:
                covered += [(seg.shard, i) for i in range(seg.start, seg.stop)]
    expected = [(s, i) for s, c in enumerate(num_shards_counts) for i in range(c)]
    assert sorted(covered) == expected


def test_eval_exactly_once_with_uneven_shards_and_more_slots_than_shards(cityscapes_manifest):
    expected = manifest_keys(cityscapes_manifest)
    for world, workers in [(2, 2), (3, 2), (1, 0)]:
        keys = eval_keys(cityscapes_manifest, cfg(workers=workers), world, batch_size=3)
        assert sorted(keys) == sorted(expected), (world, workers)


def test_eval_exactly_once_from_a_pattern_without_counts(cityscapes_manifest):
    folder = cityscapes_manifest.parent
    pattern = str(folder / "val-{000000..000002}.tar")
    keys = eval_keys(pattern, cfg(workers=2), 2, batch_size=2)
    assert sorted(keys) == sorted(manifest_keys(cityscapes_manifest))


# ---- determinism and resume -----------------------------------------------------------------------------

def test_deterministic_per_seed_and_epoch_and_order_changes_between_epochs(gta5_manifest):
    a = epoch_batches(gta5_manifest, cfg(), 0, 2, epoch=0)
    b = epoch_batches(gta5_manifest, cfg(), 0, 2, epoch=0)
    assert [x["key"] for x in a] == [x["key"] for x in b]
    assert all((x["image"] == y["image"]).all() and (x["label"] == y["label"]).all() for x, y in zip(a, b))
    c = epoch_batches(gta5_manifest, cfg(), 0, 2, epoch=1)
    assert [x["key"] for x in a] != [x["key"] for x in c]


@pytest.mark.parametrize("workers,start", [(2, 3), (0, 2), (3, 1), (3, 2), (3, 3), (2, 4)])
def test_resume_position_yields_the_same_next_batches(gta5_manifest, workers, start):
    full = epoch_batches(gta5_manifest, cfg(workers=workers), 1, 2, epoch=3)
    resumed = epoch_batches(gta5_manifest, cfg(workers=workers), 1, 2, epoch=3, start_step=start)
    assert [x["key"] for x in resumed] == [x["key"] for x in full[start:]]
    assert all((x["image"] == y["image"]).all() for x, y in zip(resumed, full[start:]))


# ---- augmentation ---------------------------------------------------------------------------------------

def test_crop_first_equals_resize_then_crop():
    """The warpAffine crop uses cv2.resize's half-pixel-centre mapping, for the image and the label alike."""
    rng = np.random.default_rng(0)
    label = rng.integers(0, 19, (88, 160), dtype=np.uint8)
    image = rng.integers(0, 256, (88, 160, 3), dtype=np.uint8)
    for scale in (0.625, 1.375, 1.875):  # exact output sizes, so cv2.resize uses the same ratio
        size = (int(160 * scale + 0.5), int(88 * scale + 0.5))
        x0, y0 = 5, 4
        rows = np.floor((np.arange(24) + y0 + 0.5) / scale).astype(int)  # nearest source pixel centre
        cols = np.floor((np.arange(32) + x0 + 0.5) / scale).astype(int)
        assert (warp_crop(label, scale, x0, y0, 32, 24, True, 255) == label[rows][:, cols]).all()
        ref_image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)[y0:y0 + 24, x0:x0 + 32].astype(int)
        crop = warp_crop(image, scale, x0, y0, 32, 24, False, 0).astype(int)
        assert np.abs(crop - ref_image).mean() < 1.0


def test_small_frames_are_padded_with_ignore():
    rng = np.random.default_rng(1)
    label = np.full((20, 30), 7, np.uint8)
    image = np.zeros((20, 30, 3), np.uint8)
    img, lab, valid = random_scale_crop(image, label, rng, (30, 20), (1.0, 1.0), (64, 48), 1.0)  # (width, height)
    assert img.shape == (48, 64, 3) and lab.shape == (48, 64) and valid == (20, 30)
    assert set(np.unique(lab)) == {7, 255} and (lab[20:] == 255).all()


# ---- remote sources -------------------------------------------------------------------------------------

def _publish_http(manifest: Path, server) -> str:
    for f in manifest.parent.iterdir():
        shutil.copy(f, server.root / f.name)
    return f"{server.url}/{manifest.name}"


def test_http_stream_with_503_and_dropped_connections_loses_nothing(gta5_manifest, http_server):
    from servers import Faults

    url = _publish_http(gta5_manifest, http_server)
    local = [b["key"] for b in epoch_batches(gta5_manifest, cfg(), 0, 2)]
    http_server.faults = Faults(status_once=503, drop_after=20_000)
    remote = [b["key"] for b in epoch_batches(url, cfg(), 0, 2)]
    assert remote == local
    assert any(r for _, r in http_server.faults.requests), "the drop must have forced a Range re-request"
    keys = eval_keys(url, cfg(), 2, batch_size=2)
    assert sorted(keys) == sorted(manifest_keys(gta5_manifest))


def test_s3_stream_with_dropped_connection_loses_nothing(cityscapes_manifest, s3_server):
    from servers import Faults

    for f in cityscapes_manifest.parent.iterdir():
        s3_server.upload(f, f"cs/{f.name}")
    s3_server.faults = Faults(drop_after=30_000, only={s3_server.path("cs/val-000001.tar")})
    keys = eval_keys(s3_server.url(f"cs/{cityscapes_manifest.name}"), cfg(), 2, batch_size=2)
    assert sorted(keys) == sorted(manifest_keys(cityscapes_manifest))
    assert any(r for p, r in s3_server.faults.requests if p.endswith("val-000001.tar"))


def test_pipe_urls_are_refused_unless_enabled(cityscapes_manifest):
    spec = f"pipe:cat {cityscapes_manifest.parent}/val-000000.tar"
    with pytest.raises(SegdaError, match="allow_pipe"):
        eval_keys(spec, cfg(workers=0), 1)
    assert len(eval_keys(spec, cfg(workers=0, allow_pipe=True), 1)) == 4


def test_a_manifest_never_names_a_pipe_command_even_with_pipes_enabled(cityscapes_manifest, tmp_path):
    """allow_pipe covers URLs the user typed; a manifest (it may come from a server) only lists files and URLs."""
    from segda.data.datasets import resolve_dataset

    manifest = _copy_shards(cityscapes_manifest, tmp_path / "shards")
    ran = tmp_path / "ran"
    data = json.loads(manifest.read_text())
    data["shards"][0]["url"] = f"pipe:touch {ran}; cat {manifest.parent}/val-000000.tar"
    manifest.write_text(json.dumps(data))
    with pytest.raises(SegdaError, match=r"shards\[0\]\.url is a pipe: command"):
        resolve_dataset(str(manifest), allow_pipe=True)
    assert not ran.exists(), "the command never ran"


# ---- bad data -------------------------------------------------------------------------------------------

def _copy_shards(manifest: Path, dest: Path) -> Path:
    shutil.copytree(manifest.parent, dest)
    return dest / manifest.name


def _rewrite_tar(path: Path, edit, reindex: bool = True) -> None:
    """Rebuild a shard with `edit(name, data) -> data or None (drop the member)`; its manifest entry follows."""
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            data = edit(name, data)
            if data is not None:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    path.write_bytes(buf.getvalue())
    if not reindex:
        return
    manifest = next(path.parent.glob("*-manifest.json"))
    data = json.loads(manifest.read_text())
    for entry in data["shards"]:
        if entry["url"] == path.name:  # what `segda shards` would have recorded for this tar
            entry["bytes"] = path.stat().st_size
            with open(path, "rb") as f:
                entry["samples"] = index_tar(f)
            entry["num_samples"] = max(entry["num_samples"], len(entry["samples"]))
    manifest.write_text(json.dumps(data))


def _eval_batches(spec, data_cfg, world=1):
    ds = resolve_dataset(str(spec))
    return [b for r in range(world) for b in eval_loader(ds, data_cfg, rank=r, world=world, batch_size=2)]


def test_truncated_shard_is_skipped_with_warning_and_counted(cityscapes_manifest, tmp_path, capfd):
    manifest = _copy_shards(cityscapes_manifest, tmp_path / "s")
    shard = manifest.parent / "val-000001.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])
    batches = _eval_batches(manifest, cfg(workers=0))
    keys = [k for b in batches for k in b["key"]]
    skipped = sum(b["skipped"] for b in batches)
    assert len(keys) + skipped == 10 and skipped >= 1
    assert "val-000001.tar" in capfd.readouterr().err
    with pytest.raises(SegdaError, match="val-000001.tar"):
        _eval_batches(manifest, cfg(workers=0, strict=True))


def test_undecodable_image_and_missing_label_are_skipped_and_named(cityscapes_manifest, tmp_path, capfd):
    manifest = _copy_shards(cityscapes_manifest, tmp_path / "s")
    names = json.loads(manifest.read_text())["shards"]
    first = manifest.parent / names[0]["url"]
    with tarfile.open(first) as tar:
        keys = sorted({m.name.split(".")[0] for m in tar.getmembers()})
    broken, unlabeled = keys[0], keys[1]
    _rewrite_tar(first, lambda n, d: (b"not an image" if n == f"{broken}.pxz" else
                                      None if n == f"{unlabeled}.label.png" else d))
    batches = _eval_batches(manifest, cfg(workers=0))
    got = [k for b in batches for k in b["key"]]
    assert broken not in got and unlabeled not in got and len(got) == 8
    assert sum(b["skipped"] for b in batches) == 2
    err = capfd.readouterr().err
    assert broken in err and unlabeled in err and names[0]["url"] in err
    with pytest.raises(SegdaError, match=broken):
        _eval_batches(manifest, cfg(workers=0, strict=True))
    # training keeps its batch count even with lost samples
    batches = epoch_batches(manifest, cfg(workers=0, batch_size=2), 0, 1)
    assert all(len(b["key"]) == 2 for b in batches)


def test_sha256_mismatch_is_refused_when_verifying(cityscapes_manifest, tmp_path):
    """Evaluation skips a shard whose hash does not match (strict: refuses); training refuses it before its first
    step, on whichever rank hashes that shard."""
    manifest = _copy_shards(cityscapes_manifest, tmp_path / "s")
    data = json.loads(manifest.read_text())
    data["shards"][2]["sha256"] = hashlib.sha256(b"something else").hexdigest()
    manifest.write_text(json.dumps(data))
    assert len([k for b in _eval_batches(manifest, cfg(workers=0)) for k in b["key"]]) == 10
    batches = _eval_batches(manifest, cfg(workers=0, verify=True))
    assert len([k for b in batches for k in b["key"]]) == 8 and sum(b["skipped"] for b in batches) == 2
    with pytest.raises(SegdaError, match="sha256"):
        _eval_batches(manifest, cfg(workers=0, verify=True, strict=True))
    ds = resolve_dataset(str(manifest))
    TrainingData(ds, cfg(verify=True), rank=1, world=2, seed=0)  # rank 1 hashes shards 1 (fine) and 3 (none)
    with pytest.raises(SegdaError, match="val-000002.tar: sha256"):
        TrainingData(ds, cfg(verify=True), rank=0, world=2, seed=0)  # rank 0 hashes shards 0 and 2


def test_training_indexes_local_shards_without_offsets_and_refuses_remote_ones(cityscapes_manifest, http_server):
    """A shard pattern (no manifest) or an old manifest without byte offsets: local shards are indexed from their
    tar headers and train exactly as the indexed manifest does; remote ones are refused with the command."""
    pattern = str(cityscapes_manifest.parent / "val-{000000..000002}.tar")
    from_pattern = epoch_batches(resolve_dataset(pattern), cfg(workers=0), 0, 1)
    from_manifest = epoch_batches(cityscapes_manifest, cfg(workers=0), 0, 1)
    assert [b["key"] for b in from_pattern] == [b["key"] for b in from_manifest]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(from_pattern, from_manifest))
    url = _publish_http(cityscapes_manifest, http_server)
    remote = resolve_dataset(url.rsplit("/", 1)[0] + "/val-{000000..000002}.tar")
    with pytest.raises(SegdaError, match="segda index"):
        TrainingData(remote, cfg(), rank=0, world=1, seed=0)


@pytest.mark.slow
def test_real_two_process_accelerate_launch_splits_exactly(gta5_manifest, tmp_path):
    from helpers import accelerate_launch

    accelerate_launch(Path(__file__).parent / "stream_probe.py", gta5_manifest, tmp_path, module=False)
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert len(ranks[0]["train"]) == len(ranks[1]["train"]) == ranks[0]["planned"] > 0
    trained = [k for r in ranks for batch in r["train"] for k in batch]
    all_keys = manifest_keys(gta5_manifest)
    assert len(trained) == len(set(trained)) == len(all_keys) - len(all_keys) % 2
    evaluated = [k for r in ranks for k in r["eval"]]
    assert sorted(evaluated) == sorted(all_keys)


def test_several_crops_per_decoded_frame(gta5_manifest):
    batches = epoch_batches(gta5_manifest, cfg(batch_size=4, crops_per_frame=2, workers=0), 0, 1)
    first = batches[0]
    assert first["image"].shape[0] == 4 and first["key"][0] == first["key"][1] != first["key"][2]
    assert not (first["image"][0] == first["image"][1]).all(), "the crops of one frame differ"
    frames = [k for b in batches for k in b["key"][::2]]
    assert len(frames) == len(set(frames)) == len(manifest_keys(gta5_manifest))


def test_a_shard_shorter_than_its_manifest_is_reported(cityscapes_manifest, tmp_path):
    manifest = _copy_shards(cityscapes_manifest, tmp_path / "s")
    first = manifest.parent / "val-000000.tar"
    keep = sorted({m.name.split(".")[0] for m in tarfile.open(first).getmembers()})[:2]
    # a clean tar, 2 samples short, under a manifest that lists 4
    _rewrite_tar(first, lambda n, d: d if n.split(".")[0] in keep else None, reindex=False)
    batches = _eval_batches(manifest, cfg(workers=0))
    assert len([k for b in batches for k in b["key"]]) == 8 and sum(b["skipped"] for b in batches) == 2
    with pytest.raises(SegdaError, match="manifest says"):
        _eval_batches(manifest, cfg(workers=0, strict=True))


def test_resume_stays_exact_after_an_undecodable_sample(cityscapes_manifest, tmp_path):
    manifest = _copy_shards(cityscapes_manifest, tmp_path / "s")
    first = manifest.parent / "val-000000.tar"
    broken = sorted({m.name.split(".")[0] for m in tarfile.open(first).getmembers()})[1]
    _rewrite_tar(first, lambda n, d: b"garbage" if n == f"{broken}.pxz" else d)
    data_cfg = cfg(workers=0, batch_size=2)
    full = epoch_batches(manifest, data_cfg, 0, 1)
    assert sum(b["skipped"] for b in full) == 1, "the sample must really be undecodable"
    for start in range(1, len(full)):
        resumed = epoch_batches(manifest, data_cfg, 0, 1, start_step=start)
        assert [b["key"] for b in resumed] == [b["key"] for b in full[start:]]


def test_a_manifest_can_never_supply_a_pipe_command(cityscapes_manifest, tmp_path):
    manifest = _copy_shards(cityscapes_manifest, tmp_path / "s")
    data = json.loads(manifest.read_text())
    for url in ("pipe:echo owned", "PIPE:echo owned", " pipe:echo owned", "Pipe:echo owned"):
        data["shards"][0]["url"] = url
        manifest.write_text(json.dumps(data))
        with pytest.raises(SegdaError, match="pipe"):
            resolve_dataset(str(manifest), allow_pipe=True)
