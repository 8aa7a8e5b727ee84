"""More domains and the field's protocols: SYNTHIA, ACDC, a plain folder with an id map and image-only folders,
each written in its real raw layout and checked pixel by pixel against the tables; per-condition ACDC reports;
the official Cityscapes evaluator scoring `segda predict --format cityscapes` as `segda evaluate` does."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest

from helpers import segda_here
from segda.shards.encode import EncodeOptions, load_id_map
from segda.shards.writer import CreateOptions, create_shards, manifest_path

# The SYNTHIA -> Cityscapes train id table as the issue gives it (DAFormer's tools/convert_datasets/synthia.py),
# written out here independently of segda.classes.
SYNTHIA = {3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 16: 9, 1: 10, 10: 11, 17: 12, 8: 13, 18: 14,
           19: 15, 20: 16, 12: 17, 11: 18}


def _members(out: Path, manifest: dict) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for shard in manifest["shards"]:
        with tarfile.open(out / shard["url"]) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def _label(data: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)


def _create(dataset, raw, out, split="train", id_map=None, **create) -> dict:
    create_shards(dataset, raw, out, EncodeOptions(dataset, split, id_map=id_map),
                  CreateOptions(shard_size=4, **create), progress=False)
    return json.loads(manifest_path(out, split).read_text())


def test_synthia_labels_follow_the_table(tmp_path):
    from segda.shards.synth import synth_synthia

    synth_synthia(tmp_path / "raw", 3, size=(96, 64))
    first = tmp_path / "raw" / "GT" / "LABELS" / "0000000.png"
    label = cv2.imread(str(first), cv2.IMREAD_UNCHANGED)
    label[:2, :, 2] = np.arange(96) % 25  # every SYNTHIA id 0-24 at least once, in the R channel
    cv2.imwrite(str(first), label)
    manifest = _create("synthia", tmp_path / "raw", tmp_path / "out")
    samples = _members(tmp_path / "out", manifest)
    assert sorted(samples) == ["0000000", "0000001", "0000002"] and manifest["labeled"] is True
    seen = set()
    for key, members in samples.items():
        raw = cv2.imread(str(tmp_path / "raw" / "GT" / "LABELS" / f"{key}.png"), cv2.IMREAD_UNCHANGED)
        assert raw.dtype == np.uint16 and raw.shape[2] == 3
        red = raw[..., 2]  # cv2 reads BGR: the first (R) channel of the file
        expected = np.vectorize(lambda v: SYNTHIA.get(int(v), 255), otypes=[np.uint8])(red)
        np.testing.assert_array_equal(_label(members["label.png"]), expected, err_msg=key)
        seen |= set(np.unique(red).tolist())
    assert set(range(25)) <= seen, "every id of the table and beyond it must be exercised"


def test_acdc_conditions_keys_and_train_ids(tmp_path):
    from segda.shards.synth import synth_acdc

    synth_acdc(tmp_path / "raw", "val", 2, size=(96, 64))
    manifest = _create("acdc", tmp_path / "raw", tmp_path / "out", split="val", conditions=("fog", "night"))
    samples = _members(tmp_path / "out", manifest)
    assert manifest["conditions"] == ["fog", "night"] and len(samples) == 4
    for key, members in samples.items():
        condition, name = key.split("_", 1)
        meta = json.loads(members["json"])
        assert meta["condition"] == condition and condition in ("fog", "night")
        sequence = name.split("_frame_")[0]
        gt = tmp_path / "raw" / "gt" / condition / "val" / sequence / f"{name}_gt_labelTrainIds.png"
        np.testing.assert_array_equal(_label(members["label.png"]), _label(gt.read_bytes()))
    # a label that is not train ids (a _gt_labelIds.png put in its place) is skipped and named
    bad = next((tmp_path / "raw" / "gt" / "snow" / "val").rglob("*_gt_labelTrainIds.png"))
    cv2.imwrite(str(bad), np.full((64, 96), 33, np.uint8))
    manifest = _create("acdc", tmp_path / "raw", tmp_path / "out2", split="val", conditions=("snow",))
    assert manifest["num_samples"] == 1 and "not train ids" in manifest["skipped"][0]["reason"]
    with pytest.raises(Exception, match="ACDC's conditions are fog, night, rain, snow"):
        _create("acdc", tmp_path / "raw", tmp_path / "out3", split="val", conditions=("sunny",))


def test_a_folder_with_an_id_map(tmp_path):
    from segda.shards.synth import FOLDER_OFFSET, synth_folder

    raw = tmp_path / "raw"
    synth_folder(raw, 3, size=(96, 64))
    odd = raw / "labels" / "frame_001.png"
    values = _label(odd.read_bytes())
    values[:4, :4] = 7  # a value the id map does not list
    cv2.imwrite(str(odd), values)
    id_map = load_id_map(raw / "ids.yaml")
    manifest = _create("folder", raw, tmp_path / "out", id_map=id_map)
    assert manifest["num_samples"] == 2 and "[7] are not in the id map" in manifest["skipped"][0]["reason"]
    for key, members in _members(tmp_path / "out", manifest).items():
        source = _label((raw / "labels" / f"{key}.png").read_bytes()).astype(np.int32)
        expected = np.where(source == 0, 255, source - FOLDER_OFFSET)
        np.testing.assert_array_equal(_label(members["label.png"]), expected)
    (raw / "loose.yaml").write_text((raw / "ids.yaml").read_text().replace("others: error", "others: ignore"))
    manifest = _create("folder", raw, tmp_path / "loose", id_map=load_id_map(raw / "loose.yaml"))
    label = _label(_members(tmp_path / "loose", manifest)["frame_001"]["label.png"])
    assert manifest["num_samples"] == 3 and (label[:4, :4] == 255).all()
    (raw / "bad.yaml").write_text("ids: {1: 40}\n")
    with pytest.raises(Exception, match="train id"):
        load_id_map(raw / "bad.yaml")
    (raw / "bool.yaml").write_text("ids: {0: true}\n")
    with pytest.raises(Exception, match="train id"):
        load_id_map(raw / "bool.yaml")
    (raw / "ids.json").write_text(json.dumps({"ids": {"0": 255, **{str(FOLDER_OFFSET + t): t for t in range(19)}}}))
    assert load_id_map(raw / "ids.json") == id_map  # JSON (string keys) reads like the YAML


def test_folder_labels_as_palette_and_16_bit_pngs(tmp_path):
    from PIL import Image

    raw = tmp_path / "raw"
    (raw / "images").mkdir(parents=True)
    (raw / "labels").mkdir()
    values = np.arange(64 * 96).reshape(64, 96) % 5
    for name in ("palette", "deep"):
        cv2.imwrite(str(raw / "images" / f"{name}.png"), np.zeros((64, 96, 3), np.uint8))
    palette = Image.fromarray(values.astype(np.uint8), "P")
    palette.putpalette([200, 10, 10] * 256)  # colours that are not the indices
    palette.save(raw / "labels" / "palette.png")
    cv2.imwrite(str(raw / "labels" / "deep.png"), (values * 1000).astype(np.uint16))  # 0, 1000, ... 4000
    (raw / "ids.yaml").write_text("ids: {0: 255, 1: 0, 2: 1, 3: 2, 4: 3, 1000: 0, 2000: 1, 3000: 2, 4000: 3}\n")
    manifest = _create("folder", raw, tmp_path / "out", id_map=load_id_map(raw / "ids.yaml"))
    assert manifest["num_samples"] == 2, manifest["skipped"]
    expected = np.where(values == 0, 255, values - 1)
    for key, members in _members(tmp_path / "out", manifest).items():
        np.testing.assert_array_equal(_label(members["label.png"]), expected, err_msg=key)


def test_image_only_folders_make_unlabeled_shards_that_training_refuses(tmp_path):
    from segda.config import load_config
    from segda.shards.synth import synth_cityscapes
    from segda.train import train

    synth_cityscapes(tmp_path / "raw", "train", 3, size=(96, 64))
    (tmp_path / "raw" / "gtFine").rename(tmp_path / "labels-elsewhere")  # a leftImg8bit tree without gtFine
    manifest = _create("images", tmp_path / "raw" / "leftImg8bit", tmp_path / "out")
    samples = _members(tmp_path / "out", manifest)
    assert manifest["labeled"] is False and sum(manifest["class_pixels"]) == 0
    assert sorted(samples) == ["aachen_000000_000019", "bochum_000000_000019", "bremen_000000_000019"]
    assert all(set(m) == {"pxz", "json"} for m in samples.values())
    cfg = load_config(None, [f"data.train={manifest_path(tmp_path / 'out', 'train')}", "model.name_or_path="])
    with pytest.raises(Exception, match="unlabeled images"):
        train("pretrain", cfg, tmp_path / "run")
    from segda.config import DataConfig
    from segda.evaluate import InferenceOptions, evaluate_matrix

    with pytest.raises(Exception, match="unlabeled images"):
        evaluate_matrix([("m", "unused")], [("u", str(manifest_path(tmp_path / "out", "train")))], tmp_path / "r",
                        DataConfig(workers=0), InferenceOptions())


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from segda.model import build_model, save_model

    import torch

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "m"
    save_model(build_model("", {"hidden_sizes": [16, 32, 64, 128], "decoder_hidden_size": 64}), path)
    return path


@pytest.mark.slow
def test_acdc_reports_each_condition_and_their_sum(tmp_path, tiny_model):
    from segda.shards.synth import synth_acdc

    synth_acdc(tmp_path / "raw", "val", 2, size=(96, 64), conditions=("fog", "night", "snow"))
    _create("acdc", tmp_path / "raw", tmp_path / "shards", split="val")
    segda_here("evaluate", "--model", f"m={tiny_model}", "--data", f"acdc={manifest_path(tmp_path / 'shards', 'val')}",
               "--out", tmp_path / "report", "--eval-size", "96x64", "--workers", "0", "--classes", "synthia13")
    pairs = {p["data"]: p for p in json.loads((tmp_path / "report" / "report.json").read_text())["pairs"]}
    assert set(pairs) == {"acdc", "acdc/fog", "acdc/night", "acdc/snow"}
    parts = [np.array(pairs[f"acdc/{c}"]["confusion"]) for c in ("fog", "night", "snow")]
    np.testing.assert_array_equal(sum(parts), np.array(pairs["acdc"]["confusion"]))
    assert all(pairs[f"acdc/{c}"]["num_samples"] == 2 for c in ("fog", "night", "snow"))
    assert all(p["protocol"] == "synthia13" for p in pairs.values())


@pytest.mark.slow
def test_the_official_cityscapes_evaluator_agrees_with_segda_evaluate(tmp_path, tiny_model):
    official = pytest.importorskip("cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling",
                                   reason="install the dev extra (cityscapesscripts)")
    from segda.shards.synth import synth_cityscapes

    raw = tmp_path / "cityscapes"
    synth_cityscapes(raw, "val", 5, size=(128, 64))
    _create("cityscapes", raw, tmp_path / "shards", split="val")
    segda_here("evaluate", "--model", f"m={tiny_model}", "--data", f"cs={manifest_path(tmp_path / 'shards', 'val')}",
               "--out", tmp_path / "report", "--eval-size", "128x64", "--workers", "0")
    ours = json.loads((tmp_path / "report" / "report.json").read_text())["pairs"][0]
    frames = sorted(raw.glob("leftImg8bit/val/*/*_leftImg8bit.png"))
    segda_here("predict", tiny_model, *frames, "--out", tmp_path / "results", "--format", "cityscapes",
               "--eval-size", "128x64")
    assert len(list((tmp_path / "results").iterdir())) == 5

    args = official.args
    args.predictionPath, args.predictionWalk = str(tmp_path / "results"), None
    args.evalInstLevelScore, args.JSONOutput, args.quiet = False, False, True
    ground_truth = sorted(str(p) for p in raw.glob("gtFine/val/*/*_gtFine_labelIds.png"))
    predictions = [official.getPrediction(args, gt) for gt in ground_truth]
    result = official.evaluateImgLists(predictions, ground_truth, args)
    assert result["averageScoreClasses"] == pytest.approx(ours["miou"], abs=1e-9)
    assert 0 < ours["miou"] < 1
    # every class, not only the ones this tiny model predicts, goes out under its official label id
    from cityscapesscripts.helpers.labels import trainId2label

    from segda.classes import train_to_label_id_lut

    assert [int(v) for v in train_to_label_id_lut()[:19]] == [trainId2label[t].id for t in range(19)]
    # the evaluator searches the whole folder: a second run into a folder holding other PNGs is refused
    (tmp_path / "results" / "old_overlay.png").write_bytes(b"")
    proc = segda_here("predict", tiny_model, frames[0], "--out", tmp_path / "results", "--format", "cityscapes",
                      check=False)
    assert proc.returncode == 2 and "already holds other PNGs" in proc.stderr
