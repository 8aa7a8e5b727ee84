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
user would run them. On a CPU with one process per stage they run side by side, as many as there are cores (up to
3), each beside another into DIR/logs/STAGE.log: one stage keeps a single core busy (`segda.demo_jobs`).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from segda.colourstats import load_colour_stats
from segda.config import DataConfig
from segda.demo_jobs import Job, run_jobs, stage_slots
from segda.evaluate import InferenceOptions, evaluate_matrix
from segda.log import info
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
    pretrain_steps: int = 1200
    """The source's (and the oracle's) steps: on the demo's target, whose surfaces take long to learn, the oracle
    scored 19.6 at 300 steps and 30.2 at 900 (README, "The synthetic gap"); the source at a third or a quarter of
    the steps would sit nearer the oracle because the oracle is far from trained, not because the gap is small."""
    adapt_steps: int = 150
    uda_steps: int = 1000
    """Self-training steps (and its no-pseudo-label baseline's): steps and crops per step are what moved the
    pseudo-labels' gain (README); the fused decode head (`segda.decode_head`) paid for 1,000 in the demo's time."""
    model_config: str = "{hidden_sizes: [16, 32, 80, 128], decoder_hidden_size: 128}"
    """SegformerConfig overrides for the random-init model ({} = MiT-b0 shape). The default halves every MiT-b0
    width (32/64/160/256 -> 16/32/80/128, decoder 256 -> 128: 0.95 M weights), so the study fits a coffee break."""
    crop: tuple[int, int] = (96, 96)
    """Training crop of every stage (the recipes' 128x128 on a GPU-sized run)."""
    uda_batch: int = 8
    """Source crops (and as many mixed target crops) per self-training step. 8 against 4, at the same 900 steps, on
    the bases of seeds 0 and 2 of an earlier gap: pseudo-labels added 2.86 and 2.30 mIoU against 1.50 and 1.66
    (README, "Adapting without target labels"). Running the stages side by side (`segda.demo_jobs`) pays for the
    time on a CPU."""


SMOKE = DemoSize(16, 6, 16, 6, (160, 88), (160, 80), 3, 2, 2,
                 "{hidden_sizes: [16, 32, 64, 128], decoder_hidden_size: 64}", (128, 128), 4)
"""A tiny setting for tests: every stage runs, the numbers mean nothing."""

STAGE_TIMES = {"pretrain_s": "source", "oracle_s": "target", "adapt_s": "lora", "uda_s": "uda",
               "uda_nopseudo_s": "uda-nopseudo"}
"""report.json's extra: each stage's own seconds (side by side they overlap: `pretrain_wall_s`, `adapt_wall_s`)."""

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


def _job(name: str, stage: str, config: str, run: Path, steps: int, processes: int, overrides: list[str]) -> Job:
    args = ["-m", "segda", stage, str(CONFIGS / config), "--out", str(run), "--max-steps", str(steps),
            "--set", *overrides]
    if processes > 1:
        argv = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                str(processes), "--num_machines", "1", "--mixed_precision", mixed_precision(cpu=True),
                "--dynamo_backend", "no", "--main_process_port", "0", *args]
        return Job(name, argv, {"ACCELERATE_USE_CPU": "1"})
    return Job(name, [sys.executable, *args], {"ACCELERATE_MIXED_PRECISION": mixed_precision()})


def _logged(jobs: list[Job], slots: int, out: Path) -> list[Job]:
    """Jobs that run side by side write DIR/logs/STAGE.log; one at a time, they keep the terminal (and its bar)."""
    if min(slots, len(jobs)) == 1:
        return jobs
    return [dataclasses.replace(job, log=out / "logs" / f"{job.name}.log") for job in jobs]


def _beside(jobs: list[Job], slots: int) -> str:
    at_once = min(slots, len(jobs))
    return f", {at_once} stages at a time (one busy thread each)" if at_once > 1 else ""


def _training_jobs(out: Path, manifests: dict, size: DemoSize, seed: int, processes: int, oracle: bool
                   ) -> tuple[list[Job], list[Job]]:
    """The stages that need only the data (the source; the oracle), then those that need the source model."""
    runs = out / "runs"
    crop = "data.crop_size={}x{}".format(*size.crop)
    seed_set = [f"train.seed={seed}", f"model.config={size.model_config}", crop]

    def job(name: str, stage: str, config: str, steps: int, overrides: list[str]) -> Job:
        return _job(name, stage, config, runs / name, steps, processes, overrides)

    first = [job("source", "pretrain", "pretrain.yaml", size.pretrain_steps,
                 [f"data.train={manifests['gta5-train']}", *seed_set])]
    if oracle:
        first.append(job("target", "pretrain", "pretrain.yaml", size.pretrain_steps,
                         [f"data.train={manifests['cityscapes-train']}",
                          "data.base_size={}x{}".format(*size.cityscapes_size), *seed_set]))
    base = f"model.name_or_path={runs / 'source' / 'model'}"
    selftrain = [f"data.train={manifests['gta5-train']}", f"data.target={manifests['cityscapes-train-images']}",
                 base, f"train.seed={seed}", crop, f"data.batch_size={size.uda_batch}", *_pseudo_rows(size.crop[1])]
    # the longest first: side by side, the short LoRA run fills the gap the baseline leaves beside self-training
    nopseudo = [*selftrain, "adapt.pseudo_loss_weight=0"]
    second = [job("uda", "adapt", "selftrain.yaml", size.uda_steps, selftrain),
              job("uda-nopseudo", "adapt", "selftrain.yaml", size.uda_steps, nopseudo),
              job("lora", "adapt", "adapt.yaml", size.adapt_steps,
                  [f"data.train={manifests['cityscapes-train']}", base, f"train.seed={seed}", crop])]
    return first, second


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

    slots = stage_slots(processes)
    first, second = _training_jobs(out, manifests, size, seed, processes, oracle)
    start = _stage(f"3. pretrain on synthetic GTA5{' (and the oracle on synthetic Cityscapes)' if oracle else ''}"
                   f"{_beside(first, slots)}")
    took = run_jobs(_logged(first, slots, out), slots)
    times["pretrain_wall_s"] = time.perf_counter() - start
    start = _stage("4-5. adapt to synthetic Cityscapes: LoRA with its labels; self-training without them (uda), and "
                   f"the same without pseudo-labels (uda-nopseudo){_beside(second, slots)}")
    took.update(run_jobs(_logged(second, slots, out), slots))
    times["adapt_wall_s"] = time.perf_counter() - start
    times.update({key: took[name] for key, name in STAGE_TIMES.items() if name in took})
    times["stages_side_by_side"] = slots
    source = str(out / "runs" / "source" / "model")
    looks = load_colour_stats(str(manifests["gta5-train"]), DataConfig())
    models = [("source", source), ("source+colour", source, {"colour_match": looks}),
              ("source+uda-nopseudo", str(out / "runs" / "uda-nopseudo" / "adapter")),
              ("source+uda", str(out / "runs" / "uda" / "adapter")),
              ("source+lora", str(out / "runs" / "lora" / "adapter"))]
    if oracle:
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
