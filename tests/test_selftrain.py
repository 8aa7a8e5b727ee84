"""The self-training pieces (issue 13): EMA values and warm-up, the confidence weight, ClassMix through one mask
with classes from the source frame, the strong augmentation, and rare-class sampling against the formula."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from segda.classes import IGNORE, NUM_CLASSES
from segda.log import SegdaError
from segda.methods.dacs import ema_momentum, ema_update, rare_class_probabilities


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


def test_colour_transfer_gives_each_source_image_its_paired_targets_colour_statistics():
    """Luma and chroma of source i take target i's mean and spread: a vivid bright frame becomes as dark and dull
    as its camera frame (and not as the other one), keeping its own layout."""
    from segda.data.transforms import MEAN, STD
    from segda.methods.photometric import TO_YCC as _TO_YCC, match_colours

    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    g = torch.Generator().manual_seed(0)
    source = 0.2 + 0.6 * torch.rand(2, 3, 24, 32, generator=g)
    dull = 0.25 + 0.2 * torch.rand(1, 3, 24, 32, generator=g) + torch.tensor([0.05, 0.0, -0.03]).view(1, 3, 1, 1)
    bright = 0.4 + 0.5 * torch.rand(1, 3, 24, 32, generator=g)
    target = torch.cat([dull, bright])
    out = match_colours((source - mean) / std, (target - mean) / std) * std + mean

    def stats(x):
        ycc = torch.einsum("ij,bjhw->bihw", _TO_YCC, x)
        return ycc.mean(dim=(2, 3)), ycc.std(dim=(2, 3))

    (out_mean, out_std), (t_mean, t_std), (s_mean, _) = stats(out), stats(target), stats(source)
    assert torch.allclose(out_mean, t_mean, atol=2e-3) and torch.allclose(out_std, t_std, atol=2e-3)
    assert not torch.allclose(out_mean[0], s_mean[0], atol=0.05), "the source's own colours survived"
    assert (out_mean[0, 0] - t_mean[1, 0]).abs() > 0.2, "paired with the wrong target"
    # the layout is the source's: per pixel, luma ranks as the source's did
    luma = lambda x: torch.einsum("j,bjhw->bhw", _TO_YCC[0], x)
    assert torch.corrcoef(torch.stack([luma(out)[1].flatten(), luma(source)[1].flatten()]))[0, 1] > 0.99
    assert 0 <= float(out.min()) and float(out.max()) <= 1 + 1e-6


def test_colour_transfer_stays_in_range_keeps_a_flat_targets_source_visible_and_keeps_the_dtype():
    from segda.data.transforms import MEAN, STD
    from segda.methods.photometric import SPREAD_RATIO, TO_YCC as _TO_YCC, match_colours

    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    g = torch.Generator().manual_seed(1)
    source = torch.rand(2, 3, 16, 16, generator=g)
    bright = (0.8 + 0.4 * torch.rand(1, 3, 16, 16, generator=g)).clamp(0, 1)  # mean luma + 2 spreads > 1
    flat = torch.full((1, 3, 16, 16), 0.4)
    out = match_colours((source - mean) / std, (torch.cat([bright, flat]) - mean) / std) * std + mean
    assert float(out.min()) >= -1e-6 and float(out.max()) <= 1 + 1e-6 and float(out[0].max()) > 1 - 1e-3
    luma = lambda x: torch.einsum("j,bjhw->bhw", _TO_YCC[0], x)
    assert luma(out)[1].std() >= SPREAD_RATIO[0] * luma(source)[1].std() * 0.99, "a flat target flattened the source"
    half = match_colours(((source - mean) / std).bfloat16(), ((torch.cat([bright, flat]) - mean) / std).bfloat16())
    assert half.dtype == torch.bfloat16 and torch.isfinite(half.float()).all()


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


def paired(source, target, cfg, *, rank, world, seed=0):
    """Source and target streams side by side, as self-training builds them (the target seeded apart)."""
    from segda.data.stream import PairedData, TrainingData

    return PairedData(TrainingData(source, cfg, rank=rank, world=world, seed=seed),
                      TrainingData(target, cfg, rank=rank, world=world, seed=seed + 7919))


def test_two_streams_train_each_side_once_per_epoch_and_give_every_rank_the_same_steps(gta5_manifest, tmp_path):
    """The source (labelled) and the target (image-only shards) side by side on 2 simulated ranks: each side has
    its own epochs, every sample of a side's epoch is trained once across the ranks, and the ranks step equally."""
    from segda.config import DataConfig
    from segda.data.datasets import resolve_dataset
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
        data = paired(source, target, cfg, rank=rank, world=2)
        pairs = iter(data)
        taken = [next(pairs) for _ in range(steps)]
        data.close()
        assert len(taken) == steps
        for pair in taken:
            for side in ("source", "target"):
                batch = pair[side]
                seen[side].setdefault(batch["epoch"], []).extend(batch["key"])
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

    source, target = resolve_dataset(str(gta5_manifest)), resolve_dataset(str(cityscapes_manifest))
    cfg = DataConfig(batch_size=2, workers=0, crop_size="32x32", base_size="160x88")
    straight = paired(source, target, cfg, rank=0, world=2)
    pairs = iter(straight)
    taken = []
    for _ in range(9):
        taken.append(next(pairs))
        if len(taken) == 5:
            position = straight.state_dict()  # what a checkpoint after the fifth step records
    straight.close()
    resumed = paired(source, target, cfg, rank=0, world=2)
    resumed.load_state_dict(position)
    again_iter = iter(resumed)
    again = [next(again_iter) for _ in range(4)]
    resumed.close()
    for a, b in zip(taken[5:], again):
        assert a["source"]["key"] == b["source"]["key"] and a["target"]["key"] == b["target"]["key"]
        assert torch.equal(a["target"]["image"], b["target"]["image"])


def test_manifests_list_each_frames_classes_as_the_labels_hold_them(gta5_manifest):
    """Rare-class sampling draws frames by the classes they hold: the creator's bits against the stored labels."""
    import json
    import tarfile

    from segda.data.transforms import decode_label

    manifest = json.loads(gta5_manifest.read_text())
    checked = 0
    for entry in manifest["shards"]:
        assert len(entry["classes"]) == entry["num_samples"]
        with tarfile.open(gta5_manifest.parent / entry["url"]) as tar:
            labels = {}
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                if ext == "label.png":
                    labels[key] = decode_label(tar.extractfile(member).read())
        for (key, _, _), bits in zip(entry["samples"], entry["classes"]):
            counts = np.bincount(labels[key].ravel(), minlength=256)[:NUM_CLASSES]
            # DAFormer's rare-class minimum: 3000 pixels of a 1914x1052 GTA5 frame, as a share of labelled pixels
            held = {c for c in range(NUM_CLASSES) if counts[c] >= 3000 / (1914 * 1052) * counts.sum() and counts[c] > 0}
            assert {c for c in range(NUM_CLASSES) if bits >> c & 1} == held, key
            checked += 1
    assert checked == manifest["num_samples"] > 10


def test_rare_class_order_draws_frames_with_the_formulas_frequencies():
    """Frame c holds only class c: how often the epoch orders pick frame c is how often class c is drawn."""
    from segda.methods.dacs import RareClassOrder

    pixels = np.linspace(50, 1, NUM_CLASSES) ** 2 * 1000
    order = RareClassOrder([1 << c for c in range(NUM_CLASSES)], pixels, temperature=0.05)
    drawn = np.concatenate([order(NUM_CLASSES, 0, epoch) for epoch in range(2000)])
    observed = np.bincount(drawn, minlength=NUM_CLASSES) / len(drawn)
    expected = rare_class_probabilities(pixels, 0.05)
    assert np.abs(observed - expected).max() < 0.01 and observed.argmax() == NUM_CLASSES - 1
    assert np.array_equal(order(NUM_CLASSES, 0, 3), order(NUM_CLASSES, 0, 3)), "a function of (seed, epoch)"
    # a class no frame holds (only slivers of it) is never drawn; the others share its probability
    holders = [1 << c for c in range(NUM_CLASSES - 1)] + [1 << 0]
    order = RareClassOrder(holders, pixels, temperature=0.05)
    assert order.probabilities[NUM_CLASSES - 1] == 0 and abs(order.probabilities.sum() - 1) < 1e-12


def _tiny_adapter():
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    from segda.adapters import attach_lora
    from segda.config import LoraConfig

    torch.manual_seed(0)
    config = SegformerConfig(num_labels=NUM_CLASSES, hidden_sizes=[16, 32, 64, 128], decoder_hidden_size=64)
    return attach_lora(SegformerForSemanticSegmentation(config), LoraConfig())


def test_the_teacher_is_an_ema_of_the_adapter_swapped_in_and_back():
    from segda.config import Config
    from segda.methods import SelfTraining

    cfg = Config()
    cfg.adapt.rare_class_temperature = 0
    method, model = SelfTraining(None, None, cfg), _tiny_adapter()
    method.bind(model)
    model.train()
    live = SelfTraining.adapter_tensors(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert any("lora_B" in names[id(t)] for t in live) and any("classifier" in names[id(t)] for t in live)
    assert not any("lora" not in names[id(t)] and "decode_head" not in names[id(t)] for t in live), \
        "the teacher averages the adapter, never the frozen base"
    start = [t.detach().clone() for t in live]
    method._ensure_teacher()  # first use: a copy of the student (the source model)
    assert all(torch.equal(t, s) for t, s in zip(method.teacher, start))
    with torch.no_grad():
        for t in live:
            t.add_(1.0)  # the student moves
    method.after_step(1)  # momentum 0.5
    for teacher, before in zip(method.teacher, start):
        assert torch.allclose(teacher, before + 0.5)
    method.after_step(3)  # momentum 0.75: 0.75 * (s + .5) + 0.25 * (s + 1)
    for teacher, before in zip(method.teacher, start):
        assert torch.allclose(teacher, before + 0.625)
    student = [t.detach().clone() for t in live]
    with method.teacher_weights(model) as teacher_model:
        assert not teacher_model.training and all(not m.training for m in model.modules())
        assert all(torch.allclose(t, s + 0.625) for t, s in zip(live, start))
    assert all(torch.equal(t, s) for t, s in zip(live, student)), "the student's values come back"
    assert model.training
    state = method.state_dict()
    other = SelfTraining(None, None, cfg)
    other.bind(model)
    other.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(other.teacher, method.teacher))
    with pytest.raises(SegdaError, match="teacher"):
        other.load_state_dict({k: v for k, v in list(state.items())[:-1]})


# ---- segda adapt with adapt.method=selftrain, as users run it ------------------------------------------------

REPO = Path(__file__).resolve().parents[1]

@pytest.fixture(scope="module")
def uda_setup(tmp_path_factory, gta5_manifest):
    """A tiny GTA5-pretrained base, and image-only target shards: no target label exists for the method to use."""
    from helpers import TINY_MODEL, segda_here
    from segda.shards.encode import EncodeOptions
    from segda.shards.synth import synth_cityscapes
    from segda.shards.writer import CreateOptions, create_shards, manifest_path

    root = tmp_path_factory.mktemp("uda")
    segda_here("pretrain", REPO / "configs" / "demo" / "pretrain.yaml", "--out", root / "base", "--max-steps", 3,
               "--set", f"data.train={gta5_manifest}", "data.batch_size=2", "data.workers=0", "data.crop_size=64x64",
               "data.base_size=160x88", TINY_MODEL)
    synth_cityscapes(root / "raw", "train", 9, size=(160, 80))
    create_shards("images", root / "raw" / "leftImg8bit", root / "target", EncodeOptions("images", "train"),
                  CreateOptions(shard_size=4), progress=False)
    return {"base": root / "base" / "model", "target": manifest_path(root / "target", "train")}


def _selftrain_args(uda_setup, gta5_manifest, *extra) -> list[str]:
    return ["adapt", str(REPO / "configs" / "demo" / "selftrain.yaml"), "--set", f"data.train={gta5_manifest}",
            f"data.target={uda_setup['target']}", f"model.name_or_path={uda_setup['base']}", "data.batch_size=2",
            "data.workers=1", "data.crop_size=64x64", "data.base_size=160x88", "data.target_base_size=160x80",
            "adapt.ema_alpha=0.9", *extra]


def _adapter(folder) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


@pytest.mark.slow
def test_selftraining_killed_with_sigkill_resumes_to_the_uninterrupted_adapter(tmp_path, uda_setup, gta5_manifest):
    """kill -9 after the step-4 checkpoint, resume: the same teacher and student as a run never interrupted. The
    lines of steps 1-4 are marked before the resume: a resume that restarted from step 0 would rewrite them."""
    import json

    from helpers import segda_here, segda_killed_at

    args = _selftrain_args(uda_setup, gta5_manifest, "train.checkpoint_every=2", "train.log_samples=true")
    steps = ["--max-steps", "7"]
    segda_here(*args[:2], "--out", tmp_path / "straight", *steps, *args[2:])
    victim = tmp_path / "killed"
    segda_killed_at(victim / "checkpoints" / "step-000004", *args[:2], "--out", victim, *steps, *args[2:])
    assert not (victim / "adapter").exists(), "the run finished before the kill: the test proved nothing"
    assert (victim / "checkpoints" / "step-000004" / "method.safetensors").is_file(), "the teacher is checkpointed"
    log = victim / "samples" / "rank-0.jsonl"
    marked = [{**json.loads(line), "before_kill": True} for line in log.read_text().splitlines()]
    log.write_text("".join(json.dumps(m) + "\n" for m in marked))
    segda_here(*args[:2], "--out", victim, "--resume", "auto", *steps, *args[2:])
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 8))
    assert [x.get("before_kill", False) for x in lines] == [True] * 4 + [False] * 3, "resumed at step 4"
    straight_lines = [json.loads(x) for x in (tmp_path / "straight" / "samples" / "rank-0.jsonl").read_text().splitlines()]
    assert [x["keys"] for x in lines] == [x["keys"] for x in straight_lines]
    for folder in ("adapter", "adapter-teacher"):  # adapt.save: student (the demo recipe's)
        a, b = _adapter(tmp_path / "straight" / folder), _adapter(victim / folder)
        worst = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
        assert a.keys() == b.keys() and worst <= 1e-6, f"{folder}: resumed weights differ by {worst}"
    teacher, student = _adapter(victim / "adapter-teacher"), _adapter(victim / "adapter")
    assert any(not torch.equal(teacher[k], student[k]) for k in teacher), "the saved teacher is not the student"


@pytest.mark.slow
def test_two_process_selftraining_keeps_replicas_and_teachers_identical(tmp_path, uda_setup, gta5_manifest):
    import json

    from helpers import accelerate_launch

    out = tmp_path / "ddp"
    accelerate_launch(*_selftrain_args(uda_setup, gta5_manifest, "train.log_samples=true"), "--out", out,
                      "--max-steps", "5", mixed_precision="bf16")
    run = json.loads((out / "run.json").read_text())
    assert run["world_size"] == 2 and run["replicas_identical"] is True and run["mixed_precision"] == "bf16"
    assert run["config"]["adapt"]["method"] == "selftrain" and (out / "adapter").is_dir()
    ranks = [[json.loads(x) for x in (out / "samples" / f"rank-{r}.jsonl").read_text().splitlines()] for r in (0, 1)]
    assert [len(r) for r in ranks] == [5, 5], "every rank steps equally"
    for a, b in zip(*ranks):  # each step: 2 source + 2 target keys per rank; the ranks share no target frame
        assert len(a["keys"]) == len(b["keys"]) == 4 and not set(a["keys"][2:]) & set(b["keys"][2:])


@pytest.mark.slow
def test_after_one_step_the_saved_teacher_is_half_the_start_and_half_the_student(tmp_path, uda_setup, gta5_manifest):
    """The loop updates the teacher after the optimizer step with DAFormer's momentum (0.5 after step 1): LoRA's B
    starts at zero, so the teacher's B is half the student's; the classifier starts at the base's."""
    from safetensors.torch import load_file

    from helpers import segda_here

    segda_here(*_selftrain_args(uda_setup, gta5_manifest, "adapt.save=teacher"), "--out", tmp_path / "one",
               "--max-steps", "1")
    teacher, student = _adapter(tmp_path / "one" / "adapter"), _adapter(tmp_path / "one" / "adapter-student")
    base = load_file(str(uda_setup["base"] / "model.safetensors"))
    b_keys = [k for k in student if "lora_B" in k]
    assert b_keys and any(student[k].abs().max() > 0 for k in b_keys), "the student moved"
    for k in b_keys:
        assert torch.allclose(teacher[k], 0.5 * student[k], atol=1e-7), k
    classifier = [k for k in student if "classifier.weight" in k]
    assert classifier
    for k in classifier:
        start = base["decode_head.classifier.weight"]
        assert torch.allclose(teacher[k], 0.5 * start + 0.5 * student[k], atol=1e-6), k


def test_each_metrics_line_says_what_share_of_the_target_the_teacher_was_sure_of(tmp_path, uda_setup, gta5_manifest):
    """pseudo_confident_share: the confident share of the usable target pixels (DAFormer's batch weight). Any
    confidence passes a threshold of 1e-6, so it is exactly 1 there, with padding and cropped rows left out of the
    count; no pixel reaches a probability of 1 exactly; with no pseudo-labels there is no figure."""
    from helpers import segda_here

    def shares(name, *sets):
        run = tmp_path / name
        segda_here(*_selftrain_args(uda_setup, gta5_manifest, "train.log_every=1", "adapt.pseudo_ignore_top=5",
                                    "adapt.pseudo_ignore_bottom=20", "data.scale_range=[0.5, 0.75]", *sets),
                   "--out", run, "--max-steps", "2")
        lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return [line.get("pseudo_confident_share") for line in lines if "loss" in line]

    assert shares("sure", "adapt.pseudo_threshold=1e-6") == [1.0, 1.0]
    assert shares("never", "adapt.pseudo_threshold=1", "adapt.pseudo_weight=pixel") == [0.0, 0.0]
    assert shares("none", "adapt.pseudo_loss_weight=0") == [None, None]


def test_a_labelled_target_gives_the_crops_of_its_image_only_shards(tmp_path, gta5_manifest):
    """The target's labels, when its shards have them, are never used: not even to steer its crops."""
    from segda.config import Config
    from segda.data.datasets import resolve_dataset
    from segda.methods import SelfTraining
    from segda.shards.encode import EncodeOptions
    from segda.shards.synth import synth_cityscapes
    from segda.shards.writer import CreateOptions, create_shards, manifest_path

    synth_cityscapes(tmp_path / "raw", "train", 6, size=(160, 80))
    for dataset, root in (("cityscapes", tmp_path / "raw"), ("images", tmp_path / "raw" / "leftImg8bit" / "train")):
        create_shards(dataset, root, tmp_path / dataset, EncodeOptions(dataset, "train"), CreateOptions(shard_size=3),
                      progress=False)
    from segda.config import DataConfig

    cfg = Config(data=DataConfig(batch_size=2, workers=0, crop_size="64x64", base_size="160x80",
                                 cat_max_ratio=0.3))  # a strict ratio: labels would steer the crops
    cfg.adapt.rare_class_temperature = 0
    crops = {}
    for dataset in ("cityscapes", "images"):
        method = SelfTraining(resolve_dataset(str(gta5_manifest)),
                              resolve_dataset(str(manifest_path(tmp_path / dataset, "train"))), cfg)
        data = method.data(rank=0, world=1, pin_memory=False)
        stream = iter(data)
        crops[dataset] = [next(stream)["target"] for _ in range(3)]
        data.close()
    for a, b in zip(crops["cityscapes"], crops["images"]):
        assert a["key"] == b["key"] and torch.equal(a["image"], b["image"])


def test_rare_class_draws_are_cropped_around_their_class_and_repeats_get_new_crops(gta5_manifest):
    from segda.config import DataConfig
    from segda.data.datasets import resolve_dataset
    from segda.data.stream import TrainStream
    from segda.data.transforms import RARE_CLASS_CROP_SHARE
    from segda.methods.dacs import rare_class_order

    ds = resolve_dataset(str(gta5_manifest))
    order = rare_class_order(ds, 0.01)
    cfg = DataConfig(batch_size=4, workers=0, crop_size="48x48", base_size="160x88", cat_max_ratio=1.0)
    drawn = order.draws(ds.num_samples, 0, 0)[1]

    def epoch(order_of):
        stream = TrainStream(ds, cfg, rank=0, world=1, seed=0, order_of=order_of,
                             num_batches=-(-ds.num_samples // 4))
        crops = [(k, img, lab) for b in stream.worker_iter(0) for k, img, lab in zip(b["key"], b["image"], b["label"])]
        held = [int((lab == int(c)).sum()) >= RARE_CLASS_CROP_SHARE * 48 * 48 for (_, _, lab), c in zip(crops, drawn)]
        return crops, sum(held) / len(held)

    crops, share = epoch(order)
    _, share_without = epoch(order.__call__)  # the same frames, cropped without knowing the drawn class
    # Not every draw can succeed: a frame holds a class from 3000 px of 2 Mpx (DAFormer's frame minimum), a crop
    # wants RARE_CLASS_CROP_SHARE of its own pixels, more than some frames hold at the test's 160x88.
    assert share >= 0.75 and share > share_without + 0.3, (share, share_without)
    seen = {}
    for key, image, _ in crops:
        seen.setdefault(key, []).append(image)
    repeats = [images for images in seen.values() if len(images) > 1]
    assert repeats, "rare-class sampling at T=0.01 draws some frames more than once an epoch"
    assert all(not torch.equal(images[0], images[1]) for images in repeats), "a repeated draw got the same crop"


def test_a_batch_of_unreadable_frames_borrows_the_next_batchs_rare_class_crops(gta5_manifest, tmp_path):
    """Every frame of a rank's batch 0 unreadable: the batch is filled from batch 1, whose frames keep the rare-class
    draws of their own positions, so the borrowed crops are exactly the ones batch 1 itself yields."""
    import shutil
    import tarfile

    from segda.config import DataConfig
    from segda.data.datasets import resolve_dataset
    from segda.data.plan import rank_batches
    from segda.data.stream import TrainStream
    from segda.methods.dacs import rare_class_order

    shutil.copytree(gta5_manifest.parent, tmp_path / "shards")
    manifest = tmp_path / "shards" / gta5_manifest.name
    ds = resolve_dataset(str(manifest))
    order = rare_class_order(ds, 0.01)
    seed = next(s for s in range(50) if not set(
        (b := rank_batches(ds.num_samples, 0, 1, 4, s, 0, order_of=order))[0]) & set(b[1]))
    cfg = DataConfig(batch_size=4, workers=0, crop_size="48x48", base_size="160x88", cat_max_ratio=1.0, verify=False)

    def first_two(dataset):
        stream = TrainStream(dataset, cfg, rank=0, world=1, seed=seed, order_of=order, num_batches=2)
        return list(stream.worker_iter(0))

    clean = first_two(ds)
    for index in set(rank_batches(ds.num_samples, 0, 1, 4, seed, 0, order_of=order)[0]):
        shard, position = ds.locate(int(index))
        key, offset, size = ds.shards[shard].samples[position]
        path = tmp_path / "shards" / Path(ds.shards[shard].url).name
        with tarfile.open(path) as tar:  # garble the image's bytes, keep the tar readable
            image = next(m for m in tar.getmembers() if m.name.startswith(key + ".") and "label" not in m.name)
        with open(path, "r+b") as f:
            f.seek(image.offset_data)
            f.write(b"\x00" * image.size)
    broken = first_two(resolve_dataset(str(manifest)))
    assert broken[0]["skipped"] == 4 and broken[1]["skipped"] == 0
    assert broken[0]["key"] == clean[1]["key"] and broken[1]["key"] == clean[1]["key"]
    for part in ("image", "label"):
        assert torch.equal(broken[0][part], clean[1][part]), f"borrowed {part}s differ from batch 1's own"
        assert torch.equal(broken[1][part], clean[1][part]), f"batch 1's own {part}s changed"


def test_selftraining_config_errors_name_the_key_and_the_fix():
    from segda.config import load_config
    from segda.log import SegdaError

    cases = {("adapt.method=selftrain",): "data.target must name the target's frames",
             ("data.target=shards/cs/train-manifest.json",): "data.target is read only by adapt.method=selftrain",
             ("adapt.method=selftrain", "data.target=t", "adapt.pseudo_weight=pix"): "adapt.pseudo_weight must be batch, image or pixel",
             ("adapt.method=selftrain", "data.target=t", "adapt.save=ema"): "adapt.save must be teacher or student",
             ("adapt.method=selftrian",): "adapt.method must be one of supervised, selftrain",
             ("adapt.method=selftrain", "data.target=t", "adapt.ema_alpha=1"): "adapt.ema_alpha must be in (0, 1)",
             ("adapt.method=selftrain", "data.target=t", "data.target_base_size=12"): None}
    for overrides, message in cases.items():
        if message is None:
            assert load_config(None, list(overrides)).data.target_base_size == "12x12"
            continue
        with pytest.raises(SegdaError, match=re.escape(message)):
            load_config(None, list(overrides))


@pytest.mark.parametrize("sizes", [(3, 4), (4, 3)])
def test_selftraining_loss_pairs_batches_of_different_lengths(sizes):
    """An epoch's last batch of one side can be shorter: target crop i takes source crop i mod B's classes."""
    from contextlib import nullcontext

    from segda.config import Config
    from segda.methods import SelfTraining, StepContext
    from segda.model import normalize

    cfg = Config()
    cfg.adapt.rare_class_temperature = 0
    method, model = SelfTraining(None, None, cfg), _tiny_adapter()
    model.train()
    n_source, n_target = sizes
    g = torch.Generator().manual_seed(0)

    def side(n, labelled):
        label = torch.randint(0, 5, (n, 32, 32), generator=g).to(torch.uint8) if labelled else \
            torch.full((n, 32, 32), IGNORE, dtype=torch.uint8)
        return {"image": torch.randint(0, 255, (n, 32, 32, 3), generator=g).to(torch.uint8), "label": label,
                "key": [f"k{i}" for i in range(n)], "valid": torch.tensor([[32, 0, 32]] * n)}

    batch = {"source": side(n_source, True), "target": side(n_target, False)}
    ctx = StepContext(torch.device("cpu"), model, lambda images: normalize(images, "cpu"), nullcontext, 0, 0, 0)
    seen = []
    method.bind(model)
    loss = method.loss(method.to_device(batch, ctx),
                       lambda pixel_values: seen.append(pixel_values.shape[0]) or model(pixel_values=pixel_values),
                       ctx)
    assert seen == [n_source, n_target] and torch.isfinite(loss), "source and mixed crops: two forwards"
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("sizes", [(3, 2), (2, 3)])
def test_with_colour_transfer_the_student_learns_source_crops_in_their_target_crops_colours(sizes):
    """adapt.colour_transfer: the source crops the student sees have the colour statistics (per channel: mean and
    spread) of the target crop each is paired with (i mod the target's length when a side's last batch is shorter),
    the crops pasted into the mixed half change with them, and without the flag the source crops are untouched."""
    from contextlib import nullcontext

    from segda.config import Config
    from segda.data.transforms import MEAN, STD
    from segda.methods import SelfTraining, StepContext
    from segda.model import normalize
    from segda.methods.photometric import TO_YCC as _TO_YCC

    n_source, n_target = sizes
    g = torch.Generator().manual_seed(0)
    source = {"image": torch.randint(90, 190, (n_source, 32, 32, 3), generator=g).to(torch.uint8),
              "label": torch.randint(0, 5, (n_source, 32, 32), generator=g).to(torch.uint8),
              "key": [f"s{i}" for i in range(n_source)]}
    tints = torch.tensor([[60.0, 40.0, 20.0], [20.0, 90.0, 60.0], [150.0, 120.0, 140.0]])[:n_target]
    target_images = (tints.view(-1, 1, 1, 3) + 40 * torch.rand(n_target, 32, 32, 3, generator=g)).to(torch.uint8)
    target = {"image": target_images, "label": torch.full((n_target, 32, 32), IGNORE, dtype=torch.uint8),
              "key": [f"t{i}" for i in range(n_target)], "valid": torch.tensor([[32, 0, 32]] * n_target)}

    def student_inputs(colour_transfer: bool) -> torch.Tensor:
        cfg = Config()
        cfg.adapt.rare_class_temperature, cfg.adapt.colour_transfer = 0, colour_transfer
        method, model = SelfTraining(None, None, cfg), _tiny_adapter()
        ctx = StepContext(torch.device("cpu"), model, lambda images: normalize(images, "cpu"), nullcontext, 0, 0, 0)
        seen = []
        method.bind(model)
        method.loss(method.to_device({"source": source, "target": target}, ctx),
                    lambda pixel_values: seen.append(pixel_values) or model(pixel_values=pixel_values), ctx)
        return seen  # the source crops, then the mixed ones

    (plain, plain_mixed), (recoloured, recoloured_mixed) = student_inputs(False), student_inputs(True)
    assert torch.equal(plain, normalize(source["image"], "cpu")), "without the flag: untouched"
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)

    def ycc_stats(x):
        ycc = torch.einsum("ij,bjhw->bihw", _TO_YCC, x)
        return torch.cat([ycc.mean(dim=(2, 3)), ycc.std(dim=(2, 3))], dim=1)

    learnt = ycc_stats(recoloured * std + mean)
    paired = ycc_stats(target_images.permute(0, 3, 1, 2).float() / 255)[torch.arange(n_source) % n_target]
    assert torch.allclose(learnt, paired, atol=0.01), (learnt, paired)
    assert not torch.allclose(plain_mixed, recoloured_mixed), "the pasted source pixels kept their colours"


def test_rare_class_draws_follow_each_ranks_positions_on_resume(gta5_manifest):
    """Rank 1 of 4, resumed mid-epoch at position 5 with the `end` (20) a 5-rank run wrote: each sample's drawn
    class is the one drawn at its own position of the epoch's order, the rest's extra sample included."""
    from segda.config import DataConfig
    from segda.data.datasets import resolve_dataset
    from segda.data.stream import TrainStream
    from segda.methods.dacs import rare_class_order

    ds = resolve_dataset(str(gta5_manifest))
    assert ds.num_samples == 21
    order = rare_class_order(ds, 0.01)
    frames, drawn = order.draws(ds.num_samples, 0, 0)
    cfg = DataConfig(batch_size=2, workers=0, crop_size="48x48", base_size="160x88")
    stream = TrainStream(ds, cfg, rank=1, world=4, seed=0, position={"epoch": 0, "consumed": 5, "end": 20},
                         order_of=order)
    batches = stream._epoch_batches(0, 5, 20)
    positions = []
    for b, samples in enumerate(batches):
        draws = stream._draws(0, b, 5, 20)
        assert [int(frames[p]) for p, _ in draws] == [int(i) for i in samples]
        assert [c for _, c in draws] == [int(drawn[p]) for p, _ in draws]
        positions += [p for p, _ in draws]
    assert positions == [6, 10, 14, 18], "positions 5 + 1, + 5, + 9, and the 15 mod 4 rest's 5 + 13"


def test_resume_compares_the_target_only_for_selftraining(tmp_path):
    """A supervised checkpoint holding a stray data.target (accepted before) still resumes; a self-training one
    refuses another target, and a checkpoint older than the adapt section counts as supervised."""
    from segda.config import load_config
    from segda.log import SegdaError
    from segda.resume import check_resumable

    supervised = load_config(None, [])
    saved = {"stage": "adapt", "step": 2, "world_size": 1, "scheduler": {},
             "config": {**supervised.to_dict(), "data": {**supervised.to_dict()["data"], "target": "old/t.json"}}}
    check_resumable(saved, supervised, "adapt", tmp_path, world=1)
    selftraining = load_config(None, ["adapt.method=selftrain", "data.target=new/t.json"])
    saved = {**saved, "config": selftraining.to_dict()}
    check_resumable(saved, selftraining, "adapt", tmp_path, world=1)
    other = load_config(None, ["adapt.method=selftrain", "data.target=other/t.json"])
    with pytest.raises(SegdaError, match="data.target was 'new/t.json'"):
        check_resumable(saved, other, "adapt", tmp_path, world=1)
    old = {**saved, "config": {k: v for k, v in supervised.to_dict().items() if k != "adapt"}}
    with pytest.raises(SegdaError, match=r"data.target was '' .*now 'new/t.json'"):
        check_resumable(old, selftraining, "adapt", tmp_path, world=1)


@pytest.mark.slow
def test_the_selftraining_step_with_colour_transfer_does_not_wait_for_the_device(tmp_path, uda_setup, gta5_manifest):
    """Masks, pseudo-labels, their weights, colour transfer and the strong augmentation stay on the device: a run of
    9 steps makes as many syncing calls as a run of 3 (on a GPU, tests/test_gpu.py counts CUDA's own syncs)."""
    from helpers import SyncCounter

    from segda.config import load_config
    from segda.train import train

    def syncs(steps: int) -> list[str]:
        args = _selftrain_args(uda_setup, gta5_manifest, "adapt.colour_transfer=true", "train.checkpoint_every=0",
                               f"train.max_steps={steps}", f"train.log_every={steps}")
        cfg = load_config(args[1], args[3:])
        with SyncCounter() as counter:
            train("adapt", cfg, tmp_path / str(steps))
        return counter.calls

    short, long = syncs(3), syncs(9)
    assert len(long) == len(short), f"syncs grow with the steps: {len(short)} for 3 steps, {len(long)} for 9: {long}"
    assert json.loads((tmp_path / "9" / "run.json").read_text())["step"] == 9
