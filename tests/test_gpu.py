"""What only a GPU shows: CUDA's own count of host-device syncs in the supervised and the self-training step, in
bf16. Skipped where no GPU is visible (CI has none): run `python -m pytest tests/test_gpu.py` on a GPU machine.
(tests/test_launch_configs.py runs DeepSpeed self-training on the GPUs it finds, and on CPU processes without.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

from helpers import REPO, TINY_MODEL

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on a GPU machine)")]
DEMO = REPO / "configs" / "demo"
SMALL = ["data.batch_size=2", "data.workers=1", "data.crop_size=64x64", "data.base_size=160x88",
         "data.eval_size=160x88", "optim.warmup_steps=0"]


def _gpu_env(**extra) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **extra}
    env.pop("ACCELERATE_USE_CPU", None)
    return env


@pytest.fixture(scope="module")
def gpu_base(tmp_path_factory, gta5_manifest):
    """A tiny GTA5-pretrained base (2 bf16 steps on the GPU) and image-only target shards."""
    from segda.shards.encode import EncodeOptions
    from segda.shards.synth import synth_cityscapes
    from segda.shards.writer import CreateOptions, create_shards, manifest_path

    root = tmp_path_factory.mktemp("gpu")
    subprocess.run([sys.executable, "-m", "segda", "pretrain", str(DEMO / "pretrain.yaml"), "--out",
                    str(root / "base"), "--max-steps", "2", "--set", f"data.train={gta5_manifest}", *SMALL,
                    TINY_MODEL], env=_gpu_env(ACCELERATE_MIXED_PRECISION="bf16"), check=True, timeout=600)
    synth_cityscapes(root / "raw", "train", 9, size=(160, 80))
    create_shards("images", root / "raw" / "leftImg8bit", root / "target", EncodeOptions("images", "train"),
                  CreateOptions(shard_size=4), progress=False)
    return {"base": root / "base" / "model", "target": manifest_path(root / "target", "train")}


def _cuda_syncs(run) -> list[str]:
    """The syncs CUDA itself reports while `run()` runs (set_sync_debug_mode warns at each one)."""
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]


@pytest.mark.parametrize("method", ["supervised", "selftrain"])
def test_the_training_step_does_not_wait_for_the_gpu(tmp_path, monkeypatch, gpu_base, gta5_manifest, method):
    """bf16 on the GPU: syncs come per log line, checkpoint and run, never per step: 9 steps sync no more often
    than 3."""
    from segda.config import load_config
    from segda.train import train

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    if method == "supervised":  # LoRA on labelled frames
        recipe, data = "adapt.yaml", [f"data.train={gta5_manifest}"]
    else:  # GTA5 source, image-only target, every piece on (colour transfer too)
        recipe, data = "selftrain.yaml", [f"data.train={gta5_manifest}", f"data.target={gpu_base['target']}",
                                          "data.target_base_size=160x80", "adapt.colour_transfer=true"]

    def run(steps: int):
        cfg = load_config(DEMO / recipe, [*data, f"model.name_or_path={gpu_base['base']}", *SMALL,
                                          "train.checkpoint_every=0", f"train.max_steps={steps}",
                                          f"train.log_every={steps}"])
        return lambda: train("adapt", cfg, tmp_path / f"{method}-{steps}")

    short, long = _cuda_syncs(run(3)), _cuda_syncs(run(9))
    # A sync per step would add at least 6; the count of a run varies by a few (loader threads, the allocator)
    assert len(long) - len(short) < 9 - 3, f"syncs grow with the steps: {len(short)} for 3, {len(long)} for 9"
    print(f"{method}: CUDA syncs in a run of 3 steps {len(short)}, of 9 steps {len(long)}")
    record = json.loads((tmp_path / f"{method}-9" / "run.json").read_text())
    assert record["step"] == 9 and record["mixed_precision"] == "bf16"
    assert record["config"]["adapt"]["method"] == method


def test_classmix_masks_and_the_strong_augmentation_are_made_on_the_gpu_without_a_sync():
    """The self-training step's per-crop work happens on the device: CUDA reports no sync while it runs."""
    from segda.methods.dacs import class_mix_masks
    from segda.methods.photometric import strong_photometric

    labels = torch.randint(0, 19, (8, 512, 512), dtype=torch.uint8, device="cuda")
    images = torch.randn(8, 3, 512, 512, device="cuda")
    generator = torch.Generator(device="cuda").manual_seed(0)
    class_mix_masks(labels, generator), strong_photometric(images, torch.Generator().manual_seed(0))  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        masks = class_mix_masks(labels, generator)
        out = strong_photometric(images, torch.Generator().manual_seed(1))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert masks.device.type == "cuda" and out.device.type == "cuda"
