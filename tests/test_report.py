"""segda.report: metrics against an independent per-class set computation, and the written report end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from segda.classes import CLASS_NAMES, IGNORE, NUM_CLASSES
from segda.report import format_matrix, metrics_from_confusion, write_report

ABSENT = (3, 16, 17)
"""Classes that appear neither in the labels nor in the predictions of the random data."""


def _random_pair(rng, shape=(64, 96), absent=ABSENT):
    present = np.array([c for c in range(NUM_CLASSES) if c not in absent])
    gt = rng.choice(present, size=shape).astype(np.uint8)
    pred = np.where(rng.random(shape) < 0.6, gt, rng.choice(present, size=shape)).astype(np.uint8)
    gt[rng.random(shape) < 0.15] = IGNORE
    return gt, pred


def _confusion(gt, pred):
    valid = gt != IGNORE
    flat = NUM_CLASSES * gt[valid].astype(np.int64) + pred[valid]
    return np.bincount(flat, minlength=NUM_CLASSES ** 2).reshape(NUM_CLASSES, NUM_CLASSES)


def test_metrics_match_set_logic():
    rng = np.random.default_rng(0)
    gt, pred = _random_pair(rng)
    gt[gt == 12] = 0  # rider is now predicted but never in the ground truth: IoU 0, still counted in the mean
    metrics = metrics_from_confusion(_confusion(gt, pred))

    valid = gt != IGNORE
    expected = []
    for c in range(NUM_CLASSES):
        g, p = (gt == c) & valid, (pred == c) & valid
        union = np.logical_or(g, p).sum()
        expected.append(None if union == 0 else np.logical_and(g, p).sum() / union)
    assert [i for i, v in enumerate(expected) if v is None] == list(ABSENT)
    assert expected[12] == 0.0
    for got, want in zip(metrics["iou"], expected):
        assert (got is None) == (want is None)
        if want is not None:
            assert isinstance(got, float) and abs(got - want) < 1e-12
    kept = [v for v in expected if v is not None]
    assert abs(metrics["miou"] - sum(kept) / len(kept)) < 1e-12
    assert metrics["num_pixels"] == int(valid.sum())
    assert abs(metrics["pixel_accuracy"] - (gt[valid] == pred[valid]).mean()) < 1e-12
    in_gt = [c for c in range(NUM_CLASSES) if ((gt == c) & valid).any()]
    accs = [((gt == c) & (pred == c)).sum() / (gt == c).sum() for c in in_gt]
    assert abs(metrics["mean_accuracy"] - np.mean(accs)) < 1e-12


def test_metrics_of_empty_confusion():
    metrics = metrics_from_confusion(np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64))
    assert metrics["iou"] == [None] * NUM_CLASSES
    assert metrics["miou"] == metrics["pixel_accuracy"] == metrics["mean_accuracy"] == 0.0
    assert metrics["num_pixels"] == 0


def _result(rng, model, data, n_examples):
    gt, pred = _random_pair(rng)
    examples = []
    for _ in range(n_examples):
        g, p = _random_pair(rng, shape=(40, 80))
        image = rng.integers(0, 256, size=(80, 160, 3), dtype=np.uint8)  # twice the label size, as from disk
        examples.append((image, g, p))
    return {"model": model, "data": data, "model_path": f"runs/{model}", "data_spec": f"shards/{data}/{{0..3}}.tar",
            "confusion": _confusion(gt, pred), "num_samples": 7, "skipped": 1, "examples": examples}


@pytest.mark.slow
def test_write_report(tmp_path):
    rng = np.random.default_rng(1)
    results = [_result(rng, "source+lora", "a/b", 3), _result(rng, "source+lora", "cityscapes", 0),
               _result(rng, "gta5 only", "a/b", 2)]  # gta5 only @ cityscapes is missing on purpose
    report = write_report(tmp_path / "out", results, extra={"adapter_bytes": np.int64(123456), "rank": 8})

    out = tmp_path / "out"
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([
        "report.json", "report.md", "iou_per_class.png",
        "confusion_source+lora_a-b.png", "confusion_source+lora_cityscapes.png", "confusion_gta5-only_a-b.png",
        "examples_source+lora_a-b.png", "examples_gta5-only_a-b.png"])

    loaded = json.loads((out / "report.json").read_text())
    assert loaded == report
    assert loaded["class_names"] == list(CLASS_NAMES)
    assert loaded["extra"] == {"adapter_bytes": 123456, "rank": 8}
    keys = {"model", "data", "model_path", "data_spec", "miou", "iou", "pixel_accuracy", "mean_accuracy",
            "num_samples", "num_pixels", "skipped", "confusion", "protocol"}
    mious = []
    for pair, result in zip(loaded["pairs"], results):
        assert set(pair) == keys
        assert np.array_equal(np.array(pair["confusion"]), result["confusion"])
        assert list(pair["iou"]) == list(CLASS_NAMES)
        assert all(pair["iou"][CLASS_NAMES[c]] is None for c in ABSENT)
        assert pair["miou"] == metrics_from_confusion(result["confusion"])["miou"]
        assert (pair["num_samples"], pair["skipped"]) == (7, 1)
        mious.append(f"{100 * pair['miou']:.1f}")

    md = (out / "report.md").read_text()
    matrix = format_matrix(loaded["pairs"])
    assert matrix == format_matrix(results)  # from raw results or from report pairs: one table
    assert matrix.splitlines() == [
        "| model | a/b | cityscapes |", "|---|---:|---:|",
        f"| source+lora | {mious[0]} | {mious[1]} |", f"| gta5 only | {mious[2]} | – |"]
    assert "## mIoU\n\n" + matrix in md
    assert "| wall | – | – | – |" in md  # absent class: no IoU in any pair
    assert "| adapter_bytes | 123456 |" in md
    for name in names:
        if name.endswith(".png"):
            assert f"]({name})" in md

    for name in names:
        if name.endswith(".png"):
            with Image.open(out / name) as image:
                image.verify()
            with Image.open(out / name) as image:
                assert 200 <= image.width <= 3000 and 150 <= image.height <= 3000, (name, image.size)
    with Image.open(out / "examples_source+lora_a-b.png") as grid:
        width, height = grid.size
        assert width == 3 * 384 + 2 * 4  # three panels and two gaps
        assert height == 20 + 3 * 192 + 2 * 4  # title band, three rows of 384x192 and two gaps
        assert grid.getpixel((384 + 1, 100)) == (255, 255, 255)  # the gap between image and ground truth


def test_duplicate_pair_is_refused(tmp_path):
    rng = np.random.default_rng(2)
    with pytest.raises(Exception, match="appears twice"):
        write_report(tmp_path, [_result(rng, "m", "d", 0), _result(rng, "m", "d", 0)])


@pytest.mark.parametrize("protocol,left_out", [("19", ()), ("synthia16", ("terrain", "truck", "train")),
                                                ("synthia13", ("wall", "fence", "pole", "terrain", "truck", "train"))])
def test_protocols_average_their_classes_from_the_full_matrix(protocol, left_out, tmp_path):
    rng = np.random.default_rng(3)
    gt, pred = _random_pair(rng, absent=())
    confusion = _confusion(gt, pred)
    full = metrics_from_confusion(confusion)
    metrics = metrics_from_confusion(confusion, protocol)
    kept = [c for c, name in enumerate(CLASS_NAMES) if name not in left_out]
    assert metrics["iou"] == full["iou"]  # IoUs themselves come from the whole matrix
    assert metrics["miou"] == pytest.approx(np.mean([full["iou"][c] for c in kept]))
    accuracy = np.diag(confusion) / confusion.sum(axis=1)
    assert metrics["mean_accuracy"] == pytest.approx(np.mean(accuracy[kept]))
    assert metrics["protocol_classes"] == 19 - len(left_out)
    if left_out:
        assert metrics["miou"] != pytest.approx(full["miou"])
    report = write_report(tmp_path, [{"model": "m", "data": "d", "model_path": "m", "data_spec": "d",
                                      "confusion": confusion, "num_samples": 1, "skipped": 0, "examples": [],
                                      "protocol": protocol}])
    assert report["pairs"][0]["protocol"] == protocol and report["pairs"][0]["miou"] == metrics["miou"]
    assert f"Protocol: {protocol} ({19 - len(left_out)} classes" in (tmp_path / "report.md").read_text()
    with pytest.raises(Exception, match="unknown evaluation protocol"):
        metrics_from_confusion(confusion, "synthia15")
