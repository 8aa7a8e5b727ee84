"""The self-training pieces (issue 13): EMA values and warm-up, the confidence weight, ClassMix through one mask
with classes from the source frame, the strong augmentation, and rare-class sampling against the formula."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from segda.classes import IGNORE, NUM_CLASSES
from segda.selftrain import (class_mix, class_mix_mask, ema_momentum, ema_update, pseudo_labels,
                             rare_class_probabilities, strong_photometric)


def test_ema_momentum_warms_up_to_alpha():
    assert [ema_momentum(t) for t in range(4)] == [0.0, 0.5, pytest.approx(2 / 3), 0.75]
    assert ema_momentum(998) == pytest.approx(1 - 1 / 999) and ema_momentum(999) == ema_momentum(5000) == 0.999
    assert ema_momentum(10, alpha=0.5) == 0.5
    with pytest.raises(ValueError):
        ema_momentum(-1)


def test_ema_update_values():
    teacher = [torch.tensor([1.0, 2.0]), torch.tensor([[0.0]])]
    student = [torch.tensor([3.0, 6.0]), torch.tensor([[10.0]])]
    ema_update(teacher, student, 0.0)  # step 0: a copy of the student
    assert torch.equal(teacher[0], student[0]) and torch.equal(teacher[1], student[1])
    teacher = [torch.tensor([1.0, 2.0])]
    ema_update(teacher, [torch.tensor([3.0, 6.0])], 0.75)
    assert torch.allclose(teacher[0], torch.tensor([0.75 * 1 + 0.25 * 3, 0.75 * 2 + 0.25 * 6]))


def test_the_confidence_weight_is_each_images_share_of_confident_pixels():
    logits = torch.zeros(2, NUM_CLASSES, 2, 2)
    logits[0, 3] = 20.0  # image 0: every pixel confident in class 3
    logits[1, 5, 0, 0] = 20.0  # image 1: one pixel of four confident; the rest uniform (1/19 < 0.968)
    labels, weight = pseudo_labels(logits)
    assert (labels[0] == 3).all() and labels[1, 0, 0] == 5
    assert torch.equal(weight[0], torch.ones(2, 2)) and torch.allclose(weight[1], torch.full((2, 2), 0.25))
    probs = torch.softmax(torch.tensor([4.0] + [0.0] * 18), 0).max()  # ~0.75: below 0.968
    assert probs < 0.968 and float(pseudo_labels(torch.tensor([4.0] + [0.0] * 18).view(1, 19, 1, 1))[1]) == 0


def test_class_mix_takes_half_the_source_classes_and_mixes_image_label_weight_by_one_mask():
    generator = torch.Generator().manual_seed(0)
    source_label = torch.tensor([[0, 0, 1, 1], [2, 2, 3, IGNORE], [4, 4, 4, IGNORE]], dtype=torch.uint8)
    for _ in range(5):
        mask = class_mix_mask(source_label, generator)
        chosen = set(source_label[mask].tolist())
        assert len(chosen) == 3 and IGNORE not in chosen and chosen <= {0, 1, 2, 3, 4}  # ceil(5 / 2)
        assert torch.equal(mask, torch.isin(source_label, torch.tensor(sorted(chosen), dtype=torch.uint8)))
    masks = mask[None]
    source_image, target_image = torch.full((1, 3, 3, 4), 1.0), torch.full((1, 3, 3, 4), -1.0)
    target_label, target_weight = torch.full((1, 3, 4), 7), torch.full((1, 3, 4), 0.3)
    image, label, weight = class_mix(masks, source_image, source_label[None], target_image, target_label,
                                     target_weight)
    assert torch.equal(image[:, 0] == 1.0, masks) and torch.equal(image[:, 2] == 1.0, masks)
    assert torch.equal(label[masks], source_label[None][masks].long()) and (label[~masks] == 7).all()
    assert (weight[masks] == 1).all() and torch.allclose(weight[~masks], torch.tensor(0.3))


def test_strong_photometric_changes_colours_but_keeps_shape_and_is_reproducible():
    images = torch.randn(4, 3, 16, 16)
    a = strong_photometric(images, torch.Generator().manual_seed(1))
    b = strong_photometric(images, torch.Generator().manual_seed(1))
    assert a.shape == images.shape and torch.equal(a, b) and not torch.allclose(a, images)
    assert torch.isfinite(a).all()


def test_rare_class_sampling_follows_the_formula():
    pixels = np.arange(1, NUM_CLASSES + 1, dtype=np.float64) * 1000
    pixels[5] = 0  # a class without pixels is never sampled
    p = rare_class_probabilities(pixels, temperature=0.01)
    freq = pixels / pixels.sum()
    expected = np.array([math.exp((1 - f) / 0.01) if n > 0 else 0.0 for f, n in zip(freq, pixels)])
    np.testing.assert_allclose(p, expected / expected.sum(), rtol=1e-9)
    assert p[5] == 0 and p.argmax() == 0 and abs(p.sum() - 1) < 1e-12
    draws = np.random.default_rng(0).choice(NUM_CLASSES, size=20000, p=p)
    observed = np.bincount(draws, minlength=NUM_CLASSES) / 20000
    assert np.abs(observed - p).max() < 0.02
    with pytest.raises(ValueError):
        rare_class_probabilities(np.zeros(NUM_CLASSES))


def test_two_streams_train_each_side_once_per_epoch_and_give_every_rank_the_same_steps(gta5_manifest, tmp_path):
    """The source (labelled) and the target (image-only shards) side by side on 2 simulated ranks: each side has
    its own epochs, every sample of a side's epoch is trained once across the ranks, and the ranks step equally."""
    from segda.config import DataConfig
    from segda.data.datasets import resolve_dataset
    from segda.data.stream import paired_batches
    from segda.shards.encode import EncodeOptions
    from segda.shards.synth import synth_cityscapes
    from segda.shards.writer import CreateOptions, create_shards, manifest_path

    synth_cityscapes(tmp_path / "raw", "train", 9, size=(96, 64))
    create_shards("images", tmp_path / "raw" / "leftImg8bit", tmp_path / "target", EncodeOptions("images", "train"),
                  CreateOptions(shard_size=4), progress=False)
    source, target = resolve_dataset(str(gta5_manifest)), resolve_dataset(str(manifest_path(tmp_path / "target",
                                                                                              "train")))
    cfg = DataConfig(batch_size=2, workers=0, crop_size="32x32", base_size="160x88")
    steps = 12
    seen = {"source": {}, "target": {}}
    for rank in range(2):
        pairs = paired_batches(source, target, cfg, rank=rank, world=2, seed=0)
        taken = [next(pairs) for _ in range(steps)]
        pairs.close()
        assert len(taken) == steps
        for pair in taken:
            for side in ("source", "target"):
                batch = pair[side]
                seen[side].setdefault(batch["epoch"], []).extend(batch["key"])
                assert pair["position"][side] == batch["position"]
            assert (pair["target"]["label"] == IGNORE).all(), "image-only shards: nothing to learn from"
            assert (pair["source"]["label"] != IGNORE).any()
    for side, ds in (("source", source), ("target", target)):
        complete = [e for e in seen[side] if e < max(seen[side])]
        assert complete, f"{side}: no complete epoch in {steps} steps"
        for epoch in complete:
            keys = seen[side][epoch]
            assert len(keys) == len(set(keys)), f"{side} epoch {epoch} repeats a sample"
            assert len(keys) >= ds.num_samples - 1, f"{side} epoch {epoch} trained {len(keys)} of {ds.num_samples}"
    assert len(seen["target"]) > len(seen["source"]), "the shorter side starts its next epochs on its own"


def test_two_streams_resume_from_their_recorded_position(gta5_manifest, cityscapes_manifest):
    from segda.config import DataConfig
    from segda.data.datasets import resolve_dataset
    from segda.data.stream import paired_batches

    source, target = resolve_dataset(str(gta5_manifest)), resolve_dataset(str(cityscapes_manifest))
    cfg = DataConfig(batch_size=2, workers=0, crop_size="32x32", base_size="160x88")
    straight = paired_batches(source, target, cfg, rank=0, world=2, seed=0)
    taken = [next(straight) for _ in range(9)]
    straight.close()
    resumed = paired_batches(source, target, cfg, rank=0, world=2, seed=0, position=taken[4]["position"])
    again = [next(resumed) for _ in range(4)]
    resumed.close()
    for a, b in zip(taken[5:], again):
        assert a["source"]["key"] == b["source"]["key"] and a["target"]["key"] == b["target"]["key"]
        assert torch.equal(a["target"]["image"], b["target"]["image"])
