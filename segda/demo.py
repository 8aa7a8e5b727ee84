"""`segda demo`: the whole study on embedded synthetic data, with no download, in a few minutes on a CPU.

    segda demo --out demo-out [--processes 2] [--oracle] [--seed 0]

1. synthetic GTA5 (train + val) and Cityscapes (train + val) in the real raw layouts (`segda synth`)
2. their shards, through the real creators (`segda shards`)
3. pretrain SegFormer (MiT-b0 architecture, random init) on the GTA5 shards (`segda pretrain`)
4. adapt it to Cityscapes with LoRA, saving only the adapter (`segda adapt`): `source+lora` with Cityscapes labels
5. self-train adapters without any Cityscapes label, from image-only shards of the same frames
   (adapt.method=selftrain, DAFormer's recipe): `source+uda`, and beside it `source+uda-nopseudo`, the same run with
   the pseudo-label loss weighted 0 (what ClassMix of labelled source crops alone gives)
6. evaluate every model on both validation sets and write DIR/report.md + DIR/report.json (`segda evaluate`), with
   `source+colour`: the source model on frames colour-matched to the source's look (no training at all)
With --oracle a model is also trained on Cityscapes directly (`target`): the gain the adapter could reach.
Training stages run as their own processes, under `accelerate launch` when --processes > 1, exactly as a
user would run them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from segda.colourstats import load_colour_stats
from segda.config import DataConfig
from segda.evaluate import InferenceOptions, evaluate_matrix
from segda.log import SegdaError, info
from segda.rundir import STUDY_MARKERS, claim
from segda.shards.encode import EncodeOptions
from segda.shards.synth import synth_cityscapes, synth_gta5
from segda.shards.writer import CreateOptions, create_shards, manifest_path

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "demo"


@dataclass(frozen=True)
class DemoSize:
    gta5_train: int = 160
    gta5_val: int = 40
    cityscapes_train: int = 160
    cityscapes_val: int = 100
    gta5_size: tuple[int, int] = (320, 176)
    cityscapes_size: tuple[int, int] = (320, 160)
    pretrain_steps: int = 300
    adapt_steps: int = 150
    uda_steps: int = 900
    model_config: str = "{hidden_sizes: [16, 32, 80, 128], decoder_hidden_size: 128}"
    """SegformerConfig overrides for the random-init model ({} = MiT-b0 shape). The default halves every MiT-b0
    width (32/64/160/256 -> 16/32/80/128, decoder 256 -> 128: 0.95 M weights), so the study fits a coffee break."""
    crop: tuple[int, int] = (96, 96)
    """Training crop of every stage (the recipes' 128x128 on a GPU-sized run)."""
    uda_batch: int = 4
    """Source crops (and as many mixed target crops) per self-training step. 4 against 2, at the same 900 steps
    (3 seeds, with fp32 paying for the time): self-training recovers 64 ± 12% of the labelled gain against
    48 ± 12%, and pseudo-labels add 1.9 ± 0.3 mIoU against 1.7 ± 0.3 (README, "Quickstart")."""


SMOKE = DemoSize(16, 6, 16, 6, (160, 88), (160, 80), 3, 2, 2,
                 "{hidden_sizes: [16, 32, 64, 128], decoder_hidden_size: 64}", (128, 128), 4)
"""A tiny setting for tests: every stage runs, the numbers mean nothing."""

DAFORMER_PSEUDO_ROWS = (15, 120, 512)
"""DAFormer ignores the top 15 and bottom 120 rows of a 512-row Cityscapes crop's pseudo-label (the ego car)."""


def mixed_precision(cpu: bool = False) -> str:
    """bf16 on a GPU (unless `cpu`: the stages run on CPU processes), fp32 on every CPU. The demo's model and crops
    are so small that autocast's casts cost more than bf16 saves even with native bf16: on an AMX CPU fp32 ran
    pretraining 1.25x, LoRA 1.2x and self-training 1.0-1.2x faster (README, `segda demo`); on an AVX2-only one bf16 runs
    13x slower. One precision on every CPU also gives every CPU the same matrix."""
    import torch

    return "bf16" if torch.cuda.is_available() and not cpu else "no"


def _pseudo_rows(crop_height: int) -> list[str]:
    top, bottom, rows = DAFORMER_PSEUDO_ROWS
    return [f"adapt.pseudo_ignore_top={round(top * crop_height / rows)}",
            f"adapt.pseudo_ignore_bottom={round(bottom * crop_height / rows)}"]


def _stage(name: str):
    info(f"\n=== {name} ===")
    return time.perf_counter()


def make_data(out: Path, size: DemoSize, seed: int) -> dict[str, Path]:
    raw, shards = out / "raw", out / "shards"
    synth_gta5(raw / "gta5-train", size.gta5_train, size=size.gta5_size, seed=seed, progress=True)
    synth_gta5(raw / "gta5-val", size.gta5_val, size=size.gta5_size, seed=seed + 10_000, progress=True)
    for split, num in (("train", size.cityscapes_train), ("val", size.cityscapes_val)):
        synth_cityscapes(raw / "cityscapes", split, num, size=size.cityscapes_size, seed=seed, progress=True)
    jobs = {"gta5-train": ("gta5", raw / "gta5-train", "train"), "gta5-val": ("gta5", raw / "gta5-val", "val"),
            "cityscapes-train": ("cityscapes", raw / "cityscapes", "train"),
            "cityscapes-val": ("cityscapes", raw / "cityscapes", "val")}
    manifests = {}
    for label, (dataset, root, split) in jobs.items():
        target = shards / dataset
        create_shards(dataset, root, target, EncodeOptions(dataset, split), CreateOptions(shard_size=32, workers=2))
        manifests[label] = manifest_path(target, split)
    # The self-trained adapter's target: the same frames as image-only shards, so no label can reach it.
    images = shards / "cityscapes-images"
    create_shards("images", raw / "cityscapes" / "leftImg8bit" / "train", images, EncodeOptions("images", "train"),
                  CreateOptions(shard_size=32, workers=2))
    manifests["cityscapes-train-images"] = manifest_path(images, "train")
    return manifests


def _train(stage: str, config: str, run: Path, steps: int, processes: int, overrides: list[str]) -> None:
    args = ["-m", "segda", stage, str(CONFIGS / config), "--out", str(run), "--max-steps", str(steps),
            "--set", *overrides]
    if processes > 1:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
               str(processes), "--num_machines", "1", "--mixed_precision", mixed_precision(cpu=True),
               "--dynamo_backend", "no",
               "--main_process_port", "0", *args]
        env = {"ACCELERATE_USE_CPU": "1"}
    else:
        cmd, env = [sys.executable, *args], {"ACCELERATE_MIXED_PRECISION": mixed_precision()}
    proc = subprocess.run(cmd, env={**os.environ, **env})  # fixed argv, no shell
    if proc.returncode != 0:
        raise SegdaError(f"the {stage} stage failed (exit {proc.returncode}); its output is above")


def run_demo(out: str | Path = "demo-out", processes: int = 1, oracle: bool = False, seed: int = 0,
             size: DemoSize = DemoSize(), overwrite: bool = False) -> dict:
    out = Path(out)
    with claim(out, command="demo", resume=None, overwrite=overwrite, markers=STUDY_MARKERS):
        return _study(out, processes, oracle, seed, size)


def _study(out: Path, processes: int, oracle: bool, seed: int, size: DemoSize) -> dict:
    times = {}
    start = _stage("1-2. synthetic datasets and their shards")
    manifests = make_data(out, size, seed)
    times["data_s"] = time.perf_counter() - start

    crop = "data.crop_size={}x{}".format(*size.crop)
    seed_set = [f"train.seed={seed}", f"model.config={size.model_config}", crop]
    start = _stage("3. pretrain on synthetic GTA5")
    _train("pretrain", "pretrain.yaml", out / "runs" / "source", size.pretrain_steps, processes,
           [f"data.train={manifests['gta5-train']}", *seed_set])
    times["pretrain_s"] = time.perf_counter() - start

    start = _stage("5. adapt to synthetic Cityscapes with LoRA")
    _train("adapt", "adapt.yaml", out / "runs" / "lora", size.adapt_steps, processes,
           [f"data.train={manifests['cityscapes-train']}", f"model.name_or_path={out / 'runs' / 'source' / 'model'}",
            f"train.seed={seed}", crop])
    times["adapt_s"] = time.perf_counter() - start
    selftrain = [f"data.train={manifests['gta5-train']}", f"data.target={manifests['cityscapes-train-images']}",
                 f"model.name_or_path={out / 'runs' / 'source' / 'model'}", f"train.seed={seed}", crop,
                 f"data.batch_size={size.uda_batch}", *_pseudo_rows(size.crop[1])]
    start = _stage("5. self-train an adapter on synthetic Cityscapes without its labels")
    _train("adapt", "selftrain.yaml", out / "runs" / "uda", size.uda_steps, processes, selftrain)
    times["uda_s"] = time.perf_counter() - start
    start = _stage("5b. the same without pseudo-labels (adapt.pseudo_loss_weight=0): the baseline beside it")
    _train("adapt", "selftrain.yaml", out / "runs" / "uda-nopseudo", size.uda_steps, processes,
           [*selftrain, "adapt.pseudo_loss_weight=0"])
    times["uda_nopseudo_s"] = time.perf_counter() - start
    source = str(out / "runs" / "source" / "model")
    looks = load_colour_stats(str(manifests["gta5-train"]), DataConfig())
    models = [("source", source), ("source+colour", source, {"colour_match": looks}),
              ("source+uda-nopseudo", str(out / "runs" / "uda-nopseudo" / "adapter")),
              ("source+uda", str(out / "runs" / "uda" / "adapter")),
              ("source+lora", str(out / "runs" / "lora" / "adapter"))]
    if oracle:
        start = _stage("oracle: train on synthetic Cityscapes directly")
        _train("pretrain", "pretrain.yaml", out / "runs" / "target", size.pretrain_steps, processes,
               [f"data.train={manifests['cityscapes-train']}", "data.base_size={}x{}".format(*size.cityscapes_size), *seed_set])
        times["oracle_s"] = time.perf_counter() - start
        models.append(("target", str(out / "runs" / "target" / "model")))

    start = _stage("4 + 6. evaluate the matrix")
    extra = {**_sizes(out), **{k: round(v, 1) for k, v in times.items()}, "seed": seed, "processes": processes}
    datasets = [("gta5-val", str(manifests["gta5-val"])), ("cityscapes-val", str(manifests["cityscapes-val"]))]
    report = evaluate_matrix(models, datasets, out, DataConfig(workers=2),
                             InferenceOptions(eval_size=size.cityscapes_size, batch_size=8), extra=extra)
    info(f"evaluation took {time.perf_counter() - start:.0f} s; report: {out / 'report.md'}")
    return report


def _sizes(out: Path) -> dict:
    full = out / "runs" / "source" / "model" / "model.safetensors"
    run = json.loads((out / "runs" / "source" / "run.json").read_text())
    sizes = {"full_model_bytes": full.stat().st_size, "model_parameters": run["total_parameters"]}
    for prefix, run_name in (("adapter", "lora"), ("uda_adapter", "uda")):
        adapter = out / "runs" / run_name / "adapter"
        meta = json.loads((adapter / "segda.json").read_text())
        size = (adapter / "adapter_model.safetensors").stat().st_size
        sizes.update({f"{prefix}_bytes": size, f"{prefix}_to_model_size": round(size / full.stat().st_size, 4),
                      f"{prefix}_trainable_parameters": meta["trainable_parameters"]})
    return sizes
