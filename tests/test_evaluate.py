"""Evaluation: the metric against an independent computation, exactly-once under 2 processes x 2 workers,
adapter safety checks, sliding window, predict and export."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import TINY_MODEL, accelerate_launch, segda_here
from segda.classes import NUM_CLASSES
from segda.evaluate import InferenceOptions, confusion_update, predict_logits
from segda.log import SegdaError
from segda.report import metrics_from_confusion

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo"


def independent_iou(preds, labels):
    """Per-class IoU by set logic over valid pixels, written without segda's confusion matrix."""
    ious = []
    for c in range(NUM_CLASSES):
        inter = union = 0
        for p, g in zip(preds, labels):
            valid = g != 255
            inter += int(((p == c) & (g == c) & valid).sum())
            union += int((((p == c) | (g == c)) & valid).sum())
        ious.append(None if union == 0 else inter / union)
    return ious


def test_miou_matches_an_independent_computation_exactly():
    rng = np.random.default_rng(0)
    preds, labels = [], []
    confusion = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.int64)
    for shape in [(37, 53), (64, 64), (20, 91)]:
        g = rng.choice([*range(16), 255], size=shape).astype(np.uint8)  # classes 16-18 absent from labels
        p = rng.integers(0, 17, size=shape).astype(np.uint8)  # 17, 18 absent from both -> excluded
        preds.append(p)
        labels.append(g)
        confusion_update(confusion, torch.from_numpy(p), torch.from_numpy(g))
    metrics = metrics_from_confusion(confusion.numpy())
    expected = independent_iou(preds, labels)
    for got, want in zip(metrics["iou"], expected):
        assert (got is None and want is None) or got == pytest.approx(want, abs=1e-15)
    present = [v for v in expected if v is not None]
    assert metrics["miou"] == pytest.approx(sum(present) / len(present), abs=1e-15)
    assert metrics["num_pixels"] == sum(int((g != 255).sum()) for g in labels)
    assert expected[17] is None and expected[16] == 0.0  # predicted-only class counts as 0, absent one is left out


@pytest.fixture(scope="module")
def models(tmp_path_factory, gta5_manifest, cityscapes_manifest):
    root = tmp_path_factory.mktemp("models")
    common = ["--set", "data.batch_size=2", "data.workers=0", "data.crop_size=64x64", "data.base_size=160x88"]
    segda_here("pretrain", DEMO / "pretrain.yaml", "--out", root / "src", "--max-steps", 3, *common,
               f"data.train={gta5_manifest}", TINY_MODEL)
    segda_here("adapt", DEMO / "adapt.yaml", "--out", root / "lora", "--max-steps", 2, *common,
               f"data.train={cityscapes_manifest}", f"model.name_or_path={root / 'src' / 'model'}")
    return root / "src" / "model", root / "lora" / "adapter"


@pytest.mark.slow
def test_two_processes_two_workers_report_exactly_the_single_process_numbers(models, gta5_manifest,
                                                                              cityscapes_manifest, tmp_path):
    base, adapter = models
    args = ["evaluate", "--model", f"source={base}", "--model", f"source+lora={adapter}",
            "--data", f"gta5={gta5_manifest}", "--data", f"cs={cityscapes_manifest}", "--eval-size", "160x88",
            "--workers", "2", "--batch-size", "3"]
    segda_here(*args, "--out", tmp_path / "one")
    accelerate_launch(*args, "--out", tmp_path / "two")
    one, two = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("one", "two"))
    assert len(one["pairs"]) == 4
    for a, b in zip(one["pairs"], two["pairs"]):
        assert (a["model"], a["data"]) == (b["model"], b["data"])
        assert a["confusion"] == b["confusion"] and a["num_pixels"] == b["num_pixels"] > 0
        assert a["num_samples"] == b["num_samples"] and a["miou"] == b["miou"]
    manifest = json.loads(Path(gta5_manifest).read_text())
    assert one["pairs"][0]["num_samples"] == manifest["num_samples"]
    assert one["pairs"][0]["num_pixels"] == sum(manifest["class_pixels"])  # every labelled pixel, once
    report = tmp_path / "one"
    for png in report.glob("*.png"):
        with Image.open(png) as im:
            assert im.size[0] > 50 and im.size[1] > 50
    assert {"report.md", "iou_per_class.png"} <= {p.name for p in report.iterdir()}
    assert "source+lora" in (report / "report.md").read_text()


@pytest.mark.slow
def test_adapter_on_the_wrong_base_is_refused_unless_overridden(models, tmp_path, cityscapes_manifest):
    from segda.evaluate import load_any
    from segda.model import build_model, save_model

    base, adapter = models
    other = build_model("", {"hidden_sizes": [16, 32, 64, 128], "decoder_hidden_size": 64})
    save_model(other, tmp_path / "other")
    with pytest.raises(SegdaError, match="fingerprint"):
        load_any(str(adapter), base=str(tmp_path / "other"))
    assert load_any(str(adapter), base=str(tmp_path / "other"), allow_base_mismatch=True) is not None
    proc = segda_here("evaluate", "--model", adapter, "--base", tmp_path / "other", "--data", cityscapes_manifest,
                      "--out", tmp_path / "r", check=False)
    assert proc.returncode == 2 and "--allow-base-mismatch" in proc.stderr


@pytest.mark.slow
def test_class_count_mismatch_and_pickled_adapters_are_refused(models, tmp_path):
    from segda.evaluate import load_any

    _, adapter = models
    wrong = tmp_path / "wrong-classes"
    shutil.copytree(adapter, wrong)
    meta = json.loads((wrong / "segda.json").read_text())
    meta["num_classes"] = 20
    (wrong / "segda.json").write_text(json.dumps(meta))
    with pytest.raises(SegdaError, match="20 classes"):
        load_any(str(wrong))
    pickled = tmp_path / "pickled"
    shutil.copytree(adapter, pickled)
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    with pytest.raises(SegdaError, match="adapter_model.safetensors"):
        load_any(str(pickled))


def test_sliding_window_equals_whole_image_when_the_window_covers_it(models):
    from segda.evaluate import load_any

    model = load_any(str(models[0])).eval()
    image = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8))
    whole = predict_logits(model, [image], [(64, 96)], InferenceOptions(eval_size=(96, 64)), "cpu")[0]
    slide = predict_logits(model, [image], [(64, 96)], InferenceOptions(mode="slide", crop=(96, 64),
                                                                        stride=(32, 32)), "cpu")[0]
    assert torch.allclose(whole, slide, atol=1e-5)
    # overlapping windows: every window runs once and the result stays close to whole-image inference
    tiled = predict_logits(model, [image], [(64, 96)], InferenceOptions(mode="slide", crop=(64, 64),
                                                                        stride=(32, 32), batch_size=2), "cpu")[0]
    assert tiled.shape == whole.shape and torch.isfinite(tiled).all()
    # (width, height): 48-wide windows every 16 pixels across 96 make 4 columns; the full 64 rows make 1 row
    windows = []

    class Counting(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, pixel_values):
            windows.append(len(pixel_values))
            return self.inner(pixel_values=pixel_values)

    predict_logits(Counting(), [image], [(64, 96)], InferenceOptions(mode="slide", crop=(48, 64), stride=(16, 64),
                                                                    batch_size=8), "cpu")
    assert sum(windows) == 4


@pytest.mark.slow
def test_predict_writes_the_masks_evaluation_scores(models, tmp_path):
    from segda.evaluate import load_any

    _, adapter = models
    rgb = np.random.default_rng(1).integers(0, 256, (70, 130, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "frame.png")
    segda_here("predict", adapter, tmp_path / "frame.png", "--out", tmp_path / "out", "--eval-size", "128x64")
    mask = np.asarray(Image.open(tmp_path / "out" / "frame.png"))
    assert mask.shape == (70, 130) and mask.dtype == np.uint8 and mask.max() < NUM_CLASSES
    assert Image.open(tmp_path / "out" / "frame_overlay.png").size == (130, 70)
    # the same inference path as evaluation
    from segda.data.transforms import resize_image

    model = load_any(str(adapter)).eval()
    logits = predict_logits(model, [torch.from_numpy(resize_image(rgb, (128, 64)))], [(70, 130)],
                            InferenceOptions(eval_size=(128, 64)), "cpu")[0]
    assert (logits.argmax(0).numpy() == mask).all()


@pytest.mark.slow
def test_export_merges_the_adapter_into_a_plain_model(models, tmp_path):
    from transformers import SegformerForSemanticSegmentation

    from segda.evaluate import load_any

    _, adapter = models
    segda_here("export", adapter, "--out", tmp_path / "merged")
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    merged = SegformerForSemanticSegmentation.from_pretrained(tmp_path / "merged", use_safetensors=True).eval()
    adapted = load_any(str(adapter)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(merged(pixel_values=x).logits, adapted(pixel_values=x).logits, atol=1e-5)


@pytest.mark.slow
def test_adapters_of_one_base_load_it_once_and_score_as_when_loaded_alone(models, cityscapes_manifest, tmp_path,
                                                                         monkeypatch):
    from segda import adapters as segda_adapters
    from segda.config import DataConfig
    from segda.evaluate import evaluate_matrix

    base, first = models
    segda_here("adapt", DEMO / "adapt.yaml", "--out", tmp_path / "lora2", "--max-steps", 2, "--set",
               "data.batch_size=2", "data.workers=0", "data.crop_size=64x64", "data.base_size=160x88", "train.seed=1",
               "optim.lr=0.003", f"data.train={cityscapes_manifest}", f"model.name_or_path={base}")
    second = tmp_path / "lora2" / "adapter"
    data_cfg, opts = DataConfig(workers=0, eval_size="160x88"), InferenceOptions(eval_size=(160, 88))
    built = []
    real_build = segda_adapters.build_model
    monkeypatch.setattr(segda_adapters, "build_model", lambda *a, **k: built.append(a) or real_build(*a, **k))

    def scores(pairs, out):
        report = evaluate_matrix(pairs, [("cs", str(cityscapes_manifest))], tmp_path / out, data_cfg, opts,
                                 num_examples=0)
        return {p["model"]: p["confusion"] for p in report["pairs"]}

    # another layout (LoRA in the head, no head copies): it cannot share the base, and gets its own
    from segda.adapters import attach_lora, save_adapter
    from segda.config import LoraConfig
    from segda.model import fingerprint

    torch.manual_seed(3)
    fresh = segda_adapters.build_model(str(base))
    lora_head = attach_lora(fresh, LoraConfig(head="lora"))
    with torch.no_grad():
        for name, param in lora_head.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    save_adapter(lora_head, tmp_path / "lora-head", base=str(base), base_fingerprint=fingerprint(real_build(str(base))),
                 config={}, metrics={})
    built.clear()

    together = scores([("a", str(first)), ("b", str(second)), ("c", str(tmp_path / "lora-head")),
                       ("a-again", str(first))], "together")
    assert len(built) == 3, "one base for a and b, a fresh one for c's layout, a fresh one back to a's"
    alone = {**scores([("a", str(first))], "a"), **scores([("b", str(second))], "b"),
             **scores([("c", str(tmp_path / "lora-head"))], "c")}
    assert together["a"] == alone["a"] == together["a-again"] and together["b"] == alone["b"]
    assert together["c"] == alone["c"]
    assert together["a"] != together["b"], "two different adapters must score differently"
    proc = segda_here("bench", "adapters", first, second, "--data", cityscapes_manifest, "--eval-size", "160x88",
                      "--repeats", 1)
    assert "identical scores: True" in proc.stderr and "evaluate adapters speed" in proc.stdout
