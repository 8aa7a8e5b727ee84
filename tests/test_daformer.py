"""Each DAFormer piece of self-training against its formula (lhoyer/DAFormer mmseg/models/uda/dacs.py and
mmseg/models/utils/dacs_transforms.py, with kornia 0.5.8's ColorJitter): pseudo-label weights, the rows and
padding never pseudo-labelled, ClassMix masks made on the device, the strong augmentation's jitter and blur, the
teacher's BatchNorm, and the student's separate forwards."""

from __future__ import annotations

import math
from contextlib import nullcontext

import pytest
import torch

from segda.classes import IGNORE, NUM_CLASSES
from segda.methods import photometric
from segda.methods.dacs import class_mix, class_mix_masks, pseudo_labels, valid_pixels


def _logits():
    logits = torch.zeros(2, NUM_CLASSES, 2, 2)
    logits[0, 3] = 20.0  # image 0: every pixel confident in class 3
    logits[1, 5, 0, 0] = 20.0  # image 1: one pixel of four confident; the rest uniform (1/19 < 0.968)
    return logits


def test_pseudo_label_weights_per_batch_per_image_and_per_pixel():
    labels, batch = pseudo_labels(_logits(), mode="batch")
    assert (labels[0] == 3).all() and labels[1, 0, 0] == 5
    assert torch.allclose(batch, torch.full((2, 2, 2), 5 / 8)), "DAFormer: one share for the whole batch"
    _, image = pseudo_labels(_logits(), mode="image")
    assert torch.equal(image[0], torch.ones(2, 2)) and torch.allclose(image[1], torch.full((2, 2), 0.25))
    _, pixel = pseudo_labels(_logits(), mode="pixel")
    assert torch.equal(pixel[1], torch.tensor([[1., 0], [0, 0]])) and torch.equal(pixel[0], torch.ones(2, 2))
    valid = torch.ones(2, 2, 2, dtype=torch.bool)
    valid[1, 1] = False  # image 1's second row: padding
    _, batch = pseudo_labels(_logits(), valid, mode="batch")
    assert torch.allclose(batch[valid], torch.tensor(5 / 6)) and (batch[~valid] == 0).all(), "shares of valid pixels"
    below = torch.tensor([4.0] + [0.0] * 18).view(1, NUM_CLASSES, 1, 1)  # top probability ~0.75 < 0.968
    assert float(pseudo_labels(below, mode="batch")[1]) == 0


@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format])
def test_pseudo_labels_are_the_top_softmax_class_and_its_probability_in_either_memory_format(memory_format):
    """Against the textbook softmax over NCHW's dim 1, on non-square crops (a swapped height and width fails) whose
    logits span the threshold, so that the confident pixels are some, not none or all."""
    torch.manual_seed(0)
    logits = (torch.randn(3, NUM_CLASSES, 10, 14) * 4).contiguous(memory_format=memory_format)
    confidence, expected = torch.softmax(logits, dim=1).max(dim=1)
    labels, weight = pseudo_labels(logits, mode="pixel", threshold=0.9)
    assert torch.equal(labels, expected)
    assert 0 < int((confidence >= 0.9).sum()) < confidence.numel()
    assert torch.equal(weight, (confidence >= 0.9).float())


def test_padding_and_the_crops_top_and_bottom_rows_are_never_pseudo_labelled():
    valid = torch.tensor([[10, 0, 12], [10, 4, 12]])  # crop 0: rows 0-9 hold the frame; crop 1 flipped: cols 4-11
    usable = valid_pixels(valid, height=12, width=12, ignore_top=2, ignore_bottom=3)
    expected = torch.zeros(2, 12, 12, dtype=torch.bool)
    expected[0, 2:9, :] = True  # rows 2..8: below the top 2, above the last 3 (9-11) and the padding (10-11)
    expected[1, 2:9, 4:] = True
    assert torch.equal(usable, expected)
    _, weight = pseudo_labels(torch.full((2, NUM_CLASSES, 12, 12), 0.0).index_fill_(1, torch.tensor([2]), 20.0),
                              usable, mode="batch")
    assert torch.equal(weight > 0, expected)


def test_class_mix_masks_take_half_of_each_crops_classes_on_the_device():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 7, (6, 16, 16), generator=g).to(torch.uint8)
    labels[0] = IGNORE
    labels[1, :8] = IGNORE
    labels[2] = 4  # one class: ceil(1 / 2) = 1, pasted whole
    masks = class_mix_masks(labels, torch.Generator().manual_seed(1))
    picks = []
    for label, mask in zip(labels, masks):
        present = set(label.unique().tolist()) - {IGNORE}
        chosen = set(label[mask].tolist())
        assert IGNORE not in chosen and len(chosen) == (len(present) + 1) // 2, (present, chosen)
        assert torch.equal(mask, torch.isin(label, torch.tensor(sorted(chosen), dtype=torch.uint8)))
        picks.append(tuple(sorted(chosen)))
    assert len(set(picks[3:])) > 1, "each crop draws its own classes"
    again = class_mix_masks(labels, torch.Generator().manual_seed(1))
    assert torch.equal(masks, again), "reproducible from the generator"
    source_image, target_image = torch.full((6, 3, 16, 16), 1.0), torch.full((6, 3, 16, 16), -1.0)
    image, label, weight = class_mix(masks, source_image, labels, target_image, torch.full((6, 16, 16), 7),
                                     torch.full((6, 16, 16), 0.3))
    assert torch.equal(image[:, 0] == 1.0, masks) and (label[~masks] == 7).all() and (weight[masks] == 1).all()


def _hsv(rgb):
    return photometric.rgb_to_hsv(rgb)


def test_hsv_round_trip():
    rgb = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(photometric.hsv_to_rgb(*_hsv(rgb)), rgb, atol=1e-5)


def test_saturation_is_the_hsv_round_trip_with_s_scaled_and_clamped():
    """scale_saturation against rgb_to_hsv -> S * factor clamped to 1 -> hsv_to_rgb, on colours that clamp
    (saturated ones times 1.2), greys (S 0) and black, for factors below and above 1."""
    g = torch.Generator().manual_seed(5)
    rgb = torch.rand(6, 3, 8, 8, generator=g)
    rgb[0, :, :4] = rgb[0, :1, :4]  # greys
    rgb[1, 1:] = 0.0  # pure reds: S = 1
    rgb[2, :, 0, 0] = 0.0  # black
    factor = torch.tensor([0.8, 1.2, 1.2, 0.9, 1.2, 1.05]).view(-1, 1, 1, 1)
    h, s, v = _hsv(rgb)
    expected = photometric.hsv_to_rgb(h, (s * factor).clamp(0, 1), v)
    assert ((s * factor) > 1).any(), "some colours clamp"
    assert torch.allclose(photometric.scale_saturation(rgb, factor), expected, atol=1e-5)


@pytest.mark.parametrize("op", [0, 1, 2, 3], ids=["brightness", "contrast", "saturation", "hue"])
def test_colour_jitter_factors_follow_kornia_0_5_8(op):
    """Brightness adds b in [-0.2, 0.2]; contrast multiplies by c in [0.8, 1.2]; saturation multiplies S by
    [0.8, 1.2]; hue turns by up to 0.2 of a full turn (kornia: hue_factor * 2 pi); each image its own factor."""
    g = torch.Generator().manual_seed(3)
    rgb = 0.3 + 0.4 * torch.rand(256, 3, 4, 4, generator=g)  # mid colours: nothing clamps
    out = photometric.colour_jitter(rgb, torch.Generator().manual_seed(4), order=(op,))
    if op == 0:
        change = (out - rgb).mean(dim=(1, 2, 3))
        assert torch.allclose(out - rgb, change.view(-1, 1, 1, 1), atol=1e-6), "additive, one number per image"
        low, high = -0.2, 0.2
    elif op == 1:
        change = (out / rgb).mean(dim=(1, 2, 3))
        assert torch.allclose(out / rgb, change.view(-1, 1, 1, 1), atol=1e-5), "multiplicative, no grey blend"
        low, high = 0.8, 1.2
    else:
        (h0, s0, v0), (h1, s1, v1) = _hsv(rgb), _hsv(out)
        assert torch.allclose(v0, v1, atol=1e-5)
        if op == 2:
            change = (s1 / s0).mean(dim=(1, 2, 3))
            low, high = 0.8, 1.2
        else:
            assert torch.allclose(s0, s1, atol=1e-4)
            turn = torch.remainder(h1 - h0 + math.pi, 2 * math.pi) - math.pi
            change = turn.mean(dim=(1, 2, 3)) / (2 * math.pi)
            low, high = -0.2, 0.2
    assert change.min() >= low - 1e-4 and change.max() <= high + 1e-4, (change.min(), change.max())
    span = high - low
    assert change.min() < low + 0.1 * span and change.max() > high - 0.1 * span, "the whole range is drawn"
    draws = torch.Generator().manual_seed(4)  # colour_jitter draws the four factors, in this order, per image
    own = [torch.rand(256, generator=draws) for _ in range(4)][op]
    assert torch.allclose(change, low + span * own, atol=1e-4), "each operation takes its own factor"


def test_strong_augmentation_jitters_80_and_blurs_50_percent_of_batches_whole():
    rgb = 0.3 + 0.4 * torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    mean, std = photometric.on_device(photometric.MEAN_01, "cpu"), photometric.on_device(photometric.STD_01, "cpu")
    images = (rgb - mean) / std
    jittered, blurred = [], []
    for seed in range(300):
        def changed(**p):
            out = photometric.strong_photometric(images, torch.Generator().manual_seed(seed), **p) * std + mean
            return (out - rgb).abs().amax(dim=(1, 2, 3)) > 1e-4
        jitter = changed(blur_p=0.0)
        assert jitter.all() or not jitter.any(), "jitter is decided once per batch"
        jittered.append(bool(jitter.all()))
        blurred.append(bool(changed(jitter_p=0.0).any()))  # a sigma near 0.15 leaves an image as it was
    assert abs(sum(jittered) / 300 - 0.8) < 0.07 and abs(sum(blurred) / 300 - 0.5) < 0.08


def test_blur_kernel_is_a_tenth_of_the_height_and_sigma_is_drawn_per_image():
    impulse = torch.zeros(8, 1, 512, 64)
    impulse[:, :, 256, 32] = 1.0
    out = photometric.gaussian_blur(impulse, torch.Generator().manual_seed(0))
    column = out[:, 0, :, 32]
    reach = [(c > 0).nonzero().flatten() for c in column]
    assert all(int(r.max() - r.min()) + 1 <= 51 for r in reach), "a 51-tap kernel at 512 rows (DAFormer)"
    grid = torch.linspace(0.05, 1.5, 2901)  # the sigma whose 51-tap kernel's centre weight, squared, is the peak
    x = torch.arange(51) - 25.0
    centre = 1 / torch.exp(-x[None] ** 2 / (2 * grid[:, None] ** 2)).sum(dim=1)
    sigma = grid[(centre[None] ** 2 - column[:, 256:257]).abs().argmin(dim=1)]
    assert sigma.min() >= 0.15 - 0.01 and sigma.max() <= 1.15 + 0.01 and sigma.std() > 0.1, sigma


def _tiny_adapter():
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    from segda.adapters import attach_lora
    from segda.config import LoraConfig

    torch.manual_seed(0)
    config = SegformerConfig(num_labels=NUM_CLASSES, hidden_sizes=[16, 32, 64, 128], decoder_hidden_size=64)
    return attach_lora(SegformerForSemanticSegmentation(config), LoraConfig())


def _method(**adapt):
    from segda.config import Config
    from segda.methods import SelfTraining

    cfg = Config()
    cfg.adapt.rare_class_temperature = 0
    cfg.adapt.pseudo_ignore_top = cfg.adapt.pseudo_ignore_bottom = 0
    for key, value in adapt.items():
        setattr(cfg.adapt, key, value)
    method, model = SelfTraining(None, None, cfg), _tiny_adapter()
    method.bind(model)
    return method, model


def test_the_teachers_batchnorm_normalises_by_the_target_batch_and_updates_nothing():
    method, model = _method()
    model.train()
    norm = model.base_model.model.decode_head.batch_norm
    with torch.no_grad():
        norm.running_mean.fill_(3.0)  # far from any batch's statistics: eval mode would show it
    before = [b.clone() for b in norm.buffers()]
    pixels = torch.randn(4, 3, 32, 32)
    with torch.no_grad(), method.teacher_weights(model, "batch") as teacher:
        batch_stats = teacher(pixel_values=pixels).logits
    assert all(torch.equal(a, b) for a, b in zip(before, norm.buffers())), "running statistics untouched"
    assert model.training, "the student's modes come back"
    with torch.no_grad(), method.teacher_weights(model, "running") as teacher:
        running = teacher(pixel_values=pixels).logits
    reference = _tiny_adapter()
    reference.load_state_dict(model.state_dict())
    reference.eval()
    reference.base_model.model.decode_head.batch_norm.train()  # train-mode BN, dropout off: DAFormer's teacher
    with torch.no_grad():
        expected = reference(pixel_values=pixels).logits
    assert torch.allclose(batch_stats, expected, atol=1e-5)
    assert not torch.allclose(running, batch_stats, atol=1e-3), "running statistics differ from the batch's"


def test_the_teachers_swap_gives_back_every_modes_and_statistics_even_on_error_and_on_another_module():
    """The swap sets each submodule's mode from a list found once: every mode (not only the top one's), the
    BatchNorm's running statistics, and a module other than the bound one must come back as they were."""
    method, model = _method()
    model.train()
    model.base_model.model.segformer.eval()  # mixed modes: a restore of the top module alone would not give these
    norm = model.base_model.model.decode_head.batch_norm
    norm.eval()
    modes = {n: m.training for n, m in model.named_modules()}
    before = {k: v.clone() for k, v in norm.named_buffers()}
    with pytest.raises(RuntimeError), method.teacher_weights(model, "batch"):
        batch_norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        assert batch_norms and all(m.training for m in batch_norms), "BatchNorm on the batch's statistics"
        assert not any(m.training for m in model.modules() if m not in batch_norms), "the rest in eval mode"
        raise RuntimeError("the teacher's forward failed")
    assert {n: m.training for n, m in model.named_modules()} == modes
    after = dict(norm.named_buffers())
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    other = _tiny_adapter().train()
    with method.teacher_weights(other, "running"):
        assert not any(m.training for m in other.modules()), "the module passed, not the bound one"
    assert all(m.training for m in other.modules())


def _batch(n_source, n_target, size=32):
    g = torch.Generator().manual_seed(0)
    return {"source": {"image": torch.randint(0, 255, (n_source, size, size, 3), generator=g).to(torch.uint8),
                       "label": torch.randint(0, 5, (n_source, size, size), generator=g).to(torch.uint8),
                       "key": [f"s{i}" for i in range(n_source)]},
            "target": {"image": torch.randint(0, 255, (n_target, size, size, 3), generator=g).to(torch.uint8),
                       "label": torch.full((n_target, size, size), IGNORE, dtype=torch.uint8),
                       "key": [f"t{i}" for i in range(n_target)], "valid": torch.tensor([[size, 0, size]] * n_target)}}


def _run(method, model, batch):
    from segda.methods import StepContext
    from segda.model import normalize

    ctx = StepContext(torch.device("cpu"), model, lambda images: normalize(images, "cpu"), nullcontext, 0, 0, 0)
    seen = []
    loss = method.loss(method.to_device(batch, ctx),
                       lambda pixel_values: seen.append(pixel_values.shape[0]) or model(pixel_values=pixel_values), ctx)
    return loss, seen


@pytest.mark.parametrize("mode,calls", [("separate", [3, 3]), ("joint", [6])])
def test_the_student_sees_the_source_and_the_mixed_batch_in_separate_forwards(mode, calls):
    method, model = _method(student_forward=mode)
    model.train()
    loss, seen = _run(method, model, _batch(3, 3))
    assert seen == calls and torch.isfinite(loss)


def test_pseudo_loss_weight_zero_never_asks_the_teacher_and_learns_from_pasted_pixels_only():
    method, model = _method(pseudo_loss_weight=0.0)
    asked = []
    method.teacher_weights = lambda *a, **k: asked.append(1) or nullcontext(model)
    loss, _ = _run(method, model, _batch(2, 2))
    assert not asked and torch.isfinite(loss)
    method, model = _method(pseudo_loss_weight=1.0)
    original = method.teacher_weights
    method.teacher_weights = lambda *a, **k: asked.append(1) or original(*a, **k)
    _run(method, model, _batch(2, 2))
    assert asked == [1]
