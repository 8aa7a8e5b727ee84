"""The dataset creators end to end: synthetic raw folders in, WebDataset shards + manifest out, checked from the tars.

Everything is read back independently of the creator: members with plain `tarfile`, labels against a table built
here from `segda.classes.LABELS`, samples with `webdataset`, manifest numbers against the files themselves.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

import segda
from segda import atomic, cli
from segda import codec
from segda.classes import IGNORE, LABELS, NUM_CLASSES
from segda.log import SegdaError
from segda.shards import writer
from segda.shards.encode import EncodeOptions
from segda.shards.synth import synth_cityscapes, synth_gta5
from segda.shards.writer import CreateOptions, create_shards, manifest_path

GTA5_SIZE, CITY_SIZE = (160, 88), (160, 80)
N_GTA5, N_CITY, SHARD = 24, 12, 5
JSON_FIELDS = {"key", "dataset", "split", "image_file", "label_file", "original_size", "size", "image_format"}

# label id -> train id, built here from the official table rather than through the module's LUT.
TRAIN_ID = {label_id: train_id for label_id, _, train_id, _ in LABELS if label_id >= 0}
# A few values copied from cityscapesScripts' labels.py, so the table itself is pinned too.
OFFICIAL = {0: 255, 1: 255, 4: 255, 6: 255, 7: 0, 8: 1, 9: 255, 10: 255, 11: 2, 14: 255, 17: 5, 19: 6, 20: 7,
            21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 29: 255, 30: 255, 31: 16, 32: 17, 33: 18}


def _to_train_ids(raw: np.ndarray) -> np.ndarray:
    out = np.full(raw.shape, -1, np.int32)  # -1 survives only where a raw id has no table entry
    for label_id, train_id in TRAIN_ID.items():
        out[raw == label_id] = train_id
    assert (out >= 0).all(), f"raw ids outside the table: {sorted(set(np.unique(raw)) - set(TRAIN_ID))}"
    return out.astype(np.uint8)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _members(tar_path: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(tar_path) as tar:
        return [(m, tar.extractfile(m).read()) for m in tar.getmembers()]


def _samples(out: Path, manifest: dict) -> list[dict]:
    """Every sample of the shards in manifest order, as {key, ext -> bytes, url}; checks member order and grouping."""
    samples = []
    for shard in manifest["shards"]:
        members = _members(out / shard["url"])
        assert len(members) % 3 == 0, shard["url"]
        for i in range(0, len(members), 3):
            (mi, img), (ml, lab), (mj, meta) = members[i: i + 3]
            key, ext = mi.name.split(".", 1)
            assert ext in ("pxz", "png", "jpg", "webp")
            assert [ml.name, mj.name] == [f"{key}.label.png", f"{key}.json"], "member order is image, label, json"
            for m in (mi, ml, mj):  # fixed metadata: byte-identical shards on any machine
                assert m.isfile() and m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.mode == 0o644
            samples.append({"key": key, "ext": ext, "image": img, "label": lab, "json": json.loads(meta),
                            "url": shard["url"]})
    keys = [s["key"] for s in samples]
    assert len(set(keys)) == len(keys), "sample keys must be unique"
    assert keys == sorted(keys), "samples are written in key order"
    return samples


def _raw_gta5(root: Path) -> dict[str, tuple[Path, Path]]:
    return {p.stem: (p, root / "labels" / p.name) for p in sorted((root / "images").glob("*.png"))}


def _raw_city(root: Path, split: str = "train") -> dict[str, tuple[Path, Path]]:
    pairs = {}
    for p in sorted((root / "leftImg8bit" / split).glob("*/*_leftImg8bit.png")):
        stem = p.name[: -len("_leftImg8bit.png")]
        pairs[stem] = (p, root / "gtFine" / split / p.parent.name / f"{stem}_gtFine_labelIds.png")
    return pairs


def _raw_label(path: Path, dataset: str) -> np.ndarray:
    with Image.open(path) as im:
        assert im.mode == ("P" if dataset == "gta5" else "L")
        return np.array(im)  # palette indices for GTA5: they are the label ids


def _decode_label(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        assert im.mode == "L"
        return np.array(im)


def _run(dataset, root, out, split="train", progress=False, **kw) -> dict:
    encode_kw = {k: kw.pop(k) for k in ("resize", "image_format", "quality") if k in kw}
    return create_shards(dataset, root, out, EncodeOptions(dataset, split, **encode_kw),
                         CreateOptions(**{"shard_size": SHARD, **kw}), progress=progress)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "segda", *map(str, args)], capture_output=True, text=True,
                          timeout=120)


def _tars(out: Path) -> dict[str, str]:
    return {p.name: _sha256(p) for p in sorted(out.glob("*.tar"))}


# --------------------------------------------------------------------------- fixtures: raw data and one run each


@pytest.fixture(scope="module")
def gta5_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("raw-gta5")
    synth_gta5(root, N_GTA5, GTA5_SIZE, seed=0, quirks=True)
    return root


@pytest.fixture(scope="module")
def quirky(gta5_root) -> list[str]:
    """GTA5 keys whose image and label sizes differ, found by looking at the files."""
    keys = []
    for key, (image, label) in _raw_gta5(gta5_root).items():
        with Image.open(image) as im, Image.open(label) as lab:
            if im.size != lab.size:
                keys.append(key)
    assert keys, "the generator with quirks must produce at least one size-mismatched frame"
    return keys


@pytest.fixture(scope="module")
def city_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("raw-city")
    synth_cityscapes(root, "train", N_CITY, CITY_SIZE, seed=0)
    return root


@pytest.fixture(scope="module")
def clean_gta5(tmp_path_factory) -> Path:
    """Six good GTA5 frames, copied and damaged by the bad-input tests."""
    root = tmp_path_factory.mktemp("raw-gta5-clean")
    synth_gta5(root, 6, GTA5_SIZE, seed=1, quirks=False)
    return root


@pytest.fixture(scope="module")
def gta5_shards(gta5_root, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("shards-gta5")
    return out, _run("gta5", gta5_root, out)


@pytest.fixture(scope="module")
def city_shards(city_root, tmp_path_factory) -> tuple[Path, dict]:
    """Made by the real command line, in a subprocess."""
    out = tmp_path_factory.mktemp("shards-city")
    proc = _cli("shards", "cityscapes", city_root, out, "--split", "train", "--shard-size", SHARD)
    assert proc.returncode == 0, proc.stderr
    assert f"manifest: {manifest_path(out, 'train')}" in proc.stderr + proc.stdout
    assert "wrote 12 samples in 3 shard(s)" in proc.stderr
    return out, json.loads(manifest_path(out, "train").read_text())


@pytest.fixture(params=["gta5", "cityscapes"])
def made(request, gta5_root, city_root, gta5_shards, city_shards):
    """(dataset, raw root, raw pairs by key, shards folder, manifest)."""
    if request.param == "gta5":
        return ("gta5", gta5_root, _raw_gta5(gta5_root), *gta5_shards)
    return ("cityscapes", city_root, _raw_city(city_root), *city_shards)


# --------------------------------------------------------------------------- the shards


def test_official_label_table():
    assert {k: TRAIN_ID[k] for k in OFFICIAL} == OFFICIAL
    assert sorted(v for v in TRAIN_ID.values() if v != IGNORE) == list(range(NUM_CLASSES))


def test_shard_contents_match_raw_files(made, quirky):
    dataset, root, raw, out, manifest = made
    samples = _samples(out, manifest)
    bad = set(quirky) if dataset == "gta5" else set()
    assert [s["key"] for s in samples] == sorted(set(raw) - bad)
    seen_ids = set()
    for s in samples:
        image, label = raw[s["key"]]
        # the default codec is lossless: exactly the raw PNG's pixels
        assert s["ext"] == "pxz"
        np.testing.assert_array_equal(codec.decode(s["image"]), np.asarray(Image.open(image).convert("RGB")))
        ids = _raw_label(label, dataset)
        seen_ids |= set(np.unique(ids).tolist())
        np.testing.assert_array_equal(_decode_label(s["label"]), _to_train_ids(ids), err_msg=s["key"])
        w, h = ids.shape[1], ids.shape[0]
        assert s["json"] == {"key": s["key"], "dataset": dataset, "split": "train",
                             "image_file": image.relative_to(root).as_posix(),
                             "label_file": label.relative_to(root).as_posix(),
                             "original_size": [w, h], "size": [w, h], "image_format": "pxz"}
    # the raw data exercised void ids (-> 255) as well as train classes (which void ids a dozen random scenes
    # hold depends on the draw: unlabeled boxes (0) are one of several)
    assert {7, 26} <= seen_ids and len(seen_ids & {0, 1, 4, 6, 9, 10, 14, 29}) >= 3


def test_webdataset_reads_the_same_samples(made):
    _, _, _, out, manifest = made
    urls = [str(out / s["url"]) for s in manifest["shards"]]
    expected = _samples(out, manifest)
    got = list(wds.WebDataset(urls, shardshuffle=False))
    assert [s["__key__"] for s in got] == [s["key"] for s in expected]
    for g, e in zip(got, expected):
        assert {"pxz", "label.png", "json"} <= set(g)
        assert (g["pxz"], g["label.png"]) == (e["image"], e["label"])
        assert g["__url__"] == str(out / e["url"])


def test_manifest_matches_the_shards(made, quirky):
    dataset, root, raw, out, manifest = made
    samples = _samples(out, manifest)
    assert manifest["format"] == writer.MANIFEST_FORMAT and manifest["segda_version"] == segda.__version__
    assert (manifest["dataset"], manifest["split"]) == (dataset, "train")
    assert sorted(p.name for p in out.glob("*.tar")) == [s["url"] for s in manifest["shards"]]
    assert manifest["num_shards"] == len(manifest["shards"]) == math.ceil(len(raw) / SHARD)
    for shard in manifest["shards"]:
        path = out / shard["url"]
        assert shard["bytes"] == path.stat().st_size and shard["sha256"] == _sha256(path)
        assert shard["num_samples"] == sum(s["url"] == shard["url"] for s in samples)
    counts = [s["num_samples"] for s in manifest["shards"]]
    assert manifest["num_samples"] == sum(counts) == len(samples)
    assert len(counts) >= 3 and 0 < counts[-1] < SHARD, "several shards, the last one shorter"
    pixels = sum(np.bincount(_decode_label(s["label"]).ravel(), minlength=256) for s in samples)
    assert manifest["class_pixels"] == pixels[:NUM_CLASSES].tolist()
    assert manifest["ignore_pixels"] == pixels[IGNORE] and pixels[NUM_CLASSES:IGNORE].sum() == 0
    assert manifest["class_names"] == list(segda.classes.CLASS_NAMES)
    if dataset == "gta5":
        assert len(manifest["skipped"]) == len(quirky) == manifest["num_skipped"]
        for entry, key in zip(manifest["skipped"], quirky):
            image, label = raw[key]
            with Image.open(image) as im:
                w = im.size[0]
            assert entry == {"file": f"images/{key}.png",
                             "reason": f"image is {w}x{GTA5_SIZE[1]} but label is {GTA5_SIZE[0]}x{GTA5_SIZE[1]}"}
    else:
        assert manifest["skipped"] == [] and manifest["num_skipped"] == 0
    assert manifest["options"] == {"dataset": dataset, "split": "train", "resize": None, "image_format": "pxz",
                                   "quality": 90, "id_map": None, "shard_size": SHARD, "split_file": None,
                                   "source_root": str(root.resolve())}
    leftovers = [p.name for p in out.iterdir() if atomic.TMP_MARK in p.name or p.name == writer.PARTS_DIR]
    assert leftovers == []


# --------------------------------------------------------------------------- determinism, workers, resume


def test_second_run_is_byte_identical(gta5_root, gta5_shards, city_root, city_shards, tmp_path, capsys):
    for root, (out, _), dataset in ((gta5_root, gta5_shards, "gta5"), (city_root, city_shards, "cityscapes")):
        again = tmp_path / dataset
        _run(dataset, root, again)  # library call; the cityscapes baseline came from the CLI
        assert _tars(again) == _tars(out)
        assert manifest_path(again, "train").read_bytes() == manifest_path(out, "train").read_bytes()
    assert "manifest: " in capsys.readouterr().err


def test_two_workers_give_the_same_bytes(gta5_root, gta5_shards, tmp_path):
    out, manifest = gta5_shards
    proc = _cli("shards", "gta5", gta5_root, tmp_path, "--shard-size", SHARD, "--workers", 2)
    assert proc.returncode == 0, proc.stderr
    assert _tars(tmp_path) == _tars(out)
    assert json.loads(manifest_path(tmp_path, "train").read_text()) == manifest


def test_interrupted_run_leaves_no_half_shard_and_resumes(gta5_root, gta5_shards, tmp_path, monkeypatch, capsys):
    baseline, manifest = gta5_shards
    real_write_shard, real_fsync = writer._write_shard, atomic._fsync_file

    def crash_on_third(out, parts, split, index, *rest):
        if index == 2:
            # fail inside the real atomic write: the third shard's bytes are on disk under a temp name when it dies
            def disk_error(path):
                assert atomic.TMP_MARK in str(path)
                assert path.read_bytes()[:5] and not (out / "train-000002.tar").exists()
                raise OSError("simulated: disk went away")
            monkeypatch.setattr(atomic, "_fsync_file", disk_error)
        return real_write_shard(out, parts, split, index, *rest)

    monkeypatch.setattr(writer, "_write_shard", crash_on_third)
    with pytest.raises(OSError, match="simulated"):
        _run("gta5", gta5_root, tmp_path, workers=2)
    monkeypatch.setattr(writer, "_write_shard", real_write_shard)
    monkeypatch.setattr(atomic, "_fsync_file", real_fsync)

    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["train-000000.tar", "train-000001.tar"]
    for tar in tmp_path.glob("*.tar"):
        assert _sha256(tar) == _sha256(baseline / tar.name)  # complete: exactly its final content
        assert len(_members(tar)) % 3 == 0
    assert not manifest_path(tmp_path, "train").exists(), "the manifest is written last"
    assert not [p for p in tmp_path.iterdir() if atomic.TMP_MARK in p.name], "a failed write removes its temp"

    # A kill -9 gives the writer no chance to clean up: leave what it would leave, a half file and a temp folder.
    half = (baseline / "train-000002.tar").read_bytes()
    (tmp_path / f"train-000002.tar{atomic.TMP_MARK}killed").write_bytes(half[: len(half) // 2])
    (tmp_path / f"train-000003.tar{atomic.TMP_MARK}abc123").mkdir()
    (tmp_path / f"train-000003.tar{atomic.TMP_MARK}abc123" / "x").write_bytes(half[:100])
    reused = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.tar")}
    capsys.readouterr()

    assert _run("gta5", gta5_root, tmp_path) == manifest
    err = capsys.readouterr().err
    assert "reusing 2 complete shard(s)" in err
    assert {n: (tmp_path / n).stat().st_mtime_ns for n in reused} == reused, "finished shards are not rewritten"
    assert _tars(tmp_path) == _tars(baseline)
    assert manifest_path(tmp_path, "train").read_bytes() == manifest_path(baseline, "train").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in baseline.iterdir())


def test_changed_options_do_not_reuse_shards(gta5_root, tmp_path, capsys):
    _run("gta5", gta5_root, tmp_path)
    capsys.readouterr()
    manifest = _run("gta5", gta5_root, tmp_path, image_format="png")
    assert "reusing" not in capsys.readouterr().err
    assert manifest["options"]["image_format"] == "png"
    assert _tars(tmp_path) == {s["url"]: s["sha256"] for s in manifest["shards"]}


# --------------------------------------------------------------------------- bad input


def _palette(path: Path) -> list[int]:
    with Image.open(path) as im:
        return im.getpalette()


def _save_label(path: Path, ids: np.ndarray, like: Path) -> None:
    im = Image.fromarray(ids.astype(np.uint8), "L").convert("P")
    im.putpalette(_palette(like))
    im.save(path)


def _cut_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _shrink_label(path: Path) -> None:
    _save_label(path, _raw_label(path, "gta5")[:, :150], like=path)


def _ids_200(path: Path) -> None:
    ids = _raw_label(path, "gta5")
    ids[10:20, 10:20] = 200
    _save_label(path, ids, like=path)


def _rgb_label(path: Path) -> None:
    with Image.open(path) as im:
        im.convert("RGB").save(path)


# (what is wrong, file to damage, damage, file named in the report, reason)
BAD_GTA5 = [
    ("image without a label", "labels/00002.png", Path.unlink, "images/00002.png", "image without a label"),
    ("label without an image", "images/00003.png", Path.unlink, "labels/00003.png", "label without an image"),
    ("truncated image", "images/00004.png", _cut_half, "images/00004.png", "unreadable image"),
    ("garbage label", "labels/00005.png", lambda p: p.write_bytes(b"\x89PNG not really"), "labels/00005.png",
     "unreadable label"),
    ("truncated label", "labels/00001.png", _cut_half, "labels/00001.png", "unreadable label"),
    ("size mismatch", "labels/00002.png", _shrink_label, "images/00002.png", "image is 160x88 but label is 150x88"),
    ("ids outside the table", "labels/00003.png", _ids_200, "labels/00003.png", "label ids [200] are outside"),
    ("RGB label", "labels/00004.png", _rgb_label, "labels/00004.png", "label has mode RGB"),
]


@pytest.mark.parametrize("case", BAD_GTA5, ids=[c[0] for c in BAD_GTA5])
def test_bad_gta5_frame_is_skipped_and_reported_or_fatal_with_strict(case, clean_gta5, tmp_path, capsys):
    _, target, damage, file, reason = case
    root = tmp_path / "raw"
    shutil.copytree(clean_gta5, root)
    damage(root / target)
    bad_key = Path(target).stem

    manifest = _run("gta5", root, tmp_path / "out", shard_size=4)
    assert manifest["num_skipped"] == 1 and len(manifest["skipped"]) == 1
    entry = manifest["skipped"][0]
    assert entry["file"] == file and entry["reason"].startswith(reason), entry
    assert manifest["num_samples"] == 5
    samples = _samples(tmp_path / "out", manifest)
    assert bad_key not in [s["key"] for s in samples]
    err = capsys.readouterr().err
    assert f"skipping {file}" in err and "skipped 1 (listed in the manifest)" in err

    with pytest.raises(SegdaError, match=re.escape(file)):
        _run("gta5", root, tmp_path / "strict", shard_size=4, strict=True)
    assert not manifest_path(tmp_path / "strict", "train").exists()
    # the same through the command line (in process): exit status 2, the file named on stderr
    assert cli.main(["shards", "gta5", str(root), str(tmp_path / "strict-cli"), "--strict"]) == 2
    err = capsys.readouterr().err
    assert f"segda: error: {file}: {reason}" in err and "without --strict" in err


def test_bad_cityscapes_frames(city_root, tmp_path, capsys):
    root = tmp_path / "raw"
    shutil.copytree(city_root, root)
    frames = _raw_city(root)
    keys = sorted(frames)
    frames[keys[0]][1].unlink()  # image without a label
    ids = _raw_label(frames[keys[1]][1], "cityscapes")
    ids[:4, :4] = 200
    Image.fromarray(ids, "L").save(frames[keys[1]][1])
    rel = {k: [p.relative_to(root).as_posix() for p in frames[k]] for k in keys[:2]}

    manifest = _run("cityscapes", root, tmp_path / "out")
    assert manifest["num_samples"] == N_CITY - 2
    assert [(s["file"], s["reason"].split(" (")[0]) for s in manifest["skipped"]] == [
        (rel[keys[0]][0], "image without a label"),
        (rel[keys[1]][1], "label ids [200] are outside the Cityscapes table"),
    ]
    assert not {keys[0], keys[1]} & {s["key"] for s in _samples(tmp_path / "out", manifest)}

    proc = _cli("shards", "cityscapes", root, tmp_path / "strict", "--strict")
    assert proc.returncode == 2 and f"segda: error: {rel[keys[0]][0]}: image without a label" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("dataset,expected", [("gta5", ["images/00001.png", "labels/00001.png"]),
                                              ("cityscapes", ["leftImg8bit/train", "gtFine/train"])])
def test_empty_or_wrong_layout_names_the_expected_layout(dataset, expected, gta5_root, city_root, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    wrong = city_root if dataset == "gta5" else gta5_root
    for root in (empty, wrong):
        with pytest.raises(SegdaError) as err:
            _run(dataset, root, tmp_path / "out")
        assert all(e in str(err.value) for e in expected), str(err.value)
    with pytest.raises(SegdaError, match="does not exist"):
        _run(dataset, tmp_path / "missing", tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_empty_layout_folders(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    with pytest.raises(SegdaError, match="hold no .png files"):
        _run("gta5", tmp_path, tmp_path / "out")


def test_cli_wrong_layout_exits_2(tmp_path):
    proc = _cli("shards", "gta5", tmp_path, tmp_path / "out")
    assert proc.returncode == 2
    assert proc.stderr.startswith("segda: error: ") and "is not a GTA5 folder" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_gta5_split_file_selects_a_subset(clean_gta5, tmp_path):
    split = tmp_path / "train.txt"
    split.write_text("# the frames to use\n00001\n3.png\n\n  00005  \n00099\n")
    manifest = _run("gta5", clean_gta5, tmp_path / "out", split_file=str(split))
    assert [s["key"] for s in _samples(tmp_path / "out", manifest)] == ["00001", "00003", "00005"]
    assert manifest["skipped"] == [{"file": "images/00099.png",
                                    "reason": f"listed in {split} but neither image nor label exists"}]
    assert manifest["options"]["split_file"] == str(split)

    split.write_text("00001\nframe two\n")
    with pytest.raises(SegdaError, match=re.escape(f"{split}:2: 'frame two' is not a frame id")):
        _run("gta5", clean_gta5, tmp_path / "bad", split_file=str(split))
    with pytest.raises(SegdaError, match="split file .* does not exist"):
        _run("gta5", clean_gta5, tmp_path / "bad", split_file=str(tmp_path / "nope.txt"))
    with pytest.raises(SegdaError, match="GTA5 only"):
        _run("cityscapes", clean_gta5, tmp_path / "bad", split_file=str(split))



def test_gta5_split_mat(clean_gta5, tmp_path):
    savemat = pytest.importorskip("scipy.io").savemat
    split = tmp_path / "split.mat"
    # the official file stores ids as float columns, one array per split
    savemat(split, {"trainIds": np.array([[2.0], [4.0], [6.0]]), "valIds": np.array([[1.0]]),
                    "testIds": np.array([[3.0], [5.0]])})
    manifest = _run("gta5", clean_gta5, tmp_path / "out", split="val", split_file=str(split))
    assert [s["key"] for s in _samples(tmp_path / "out", manifest)] == ["00001"]
    assert sorted(p.name for p in (tmp_path / "out").glob("*")) == ["val-000000.tar", "val-manifest.json"]
    with pytest.raises(SegdaError, match="has no 'trainvalIds'"):
        _run("gta5", clean_gta5, tmp_path / "bad", split="trainval", split_file=str(split))

# --------------------------------------------------------------------------- resize and re-encode


def test_keep_stores_the_original_bytes(clean_gta5, tmp_path):
    manifest = _run("gta5", clean_gta5, tmp_path, image_format="keep")
    raw = _raw_gta5(clean_gta5)
    for s in _samples(tmp_path, manifest):
        assert s["ext"] == "png" and s["image"] == raw[s["key"]][0].read_bytes()


@pytest.mark.parametrize("fmt,pil_format", [("jpg", "JPEG"), ("keep", "PNG"), ("pxz", None)])
def test_resize_and_image_format(fmt, pil_format, clean_gta5, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["shards", "gta5", str(clean_gta5), str(out), "--shard-size", "4", "--resize", "96x48",
                     "--image-format", fmt]) == 0
    assert f"manifest: {manifest_path(out, 'train')}" in capsys.readouterr().err
    manifest = json.loads(manifest_path(out, "train").read_text())
    assert manifest["options"]["resize"] == [96, 48] and manifest["options"]["image_format"] == fmt
    raw = _raw_gta5(clean_gta5)
    samples = _samples(out, manifest)
    assert len(samples) == 6
    for s in samples:
        assert s["ext"] == {"jpg": "jpg", "keep": "png", "pxz": "pxz"}[fmt]
        if fmt == "pxz":
            assert codec.decode(s["image"]).shape == (48, 96, 3)
        else:
            with Image.open(io.BytesIO(s["image"])) as im:
                assert (im.format, im.size, im.mode) == (pil_format, (96, 48), "RGB")
                im.load()
        label = _decode_label(s["label"])
        assert label.shape == (48, 96)
        original = _to_train_ids(_raw_label(raw[s["key"]][1], "gta5"))
        # nearest neighbour: no blended ids, only ones of the full-size label
        assert set(np.unique(label).tolist()) <= set(np.unique(original).tolist())
        assert (s["json"]["original_size"], s["json"]["size"]) == ([160, 88], [96, 48])
    assert sum(manifest["class_pixels"]) + manifest["ignore_pixels"] == 6 * 96 * 48
