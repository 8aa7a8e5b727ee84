"""`segda bench loop`: the real training loop (segda.train, the shipped recipe, real shards, real augmentations,
real loader workers) timed phase by phase, beside the loader alone and the isolated step, in one run.

    segda bench loop --model tiny --crop 512 --batch 8 --workers 1 --json loop.json
    ACCELERATE_MIXED_PRECISION=bf16 segda bench loop --model b0 --stage selftrain --workers 8    # on a GPU

`--model tiny` is a SegFormer of ~11k weights: the model's own cost almost vanishes, so what is left of each step
is everything that is not the model (the loss at full resolution included). Per optimizer step the loop's host
milliseconds are split into `data_wait_ms` (blocked on the loader), `host_ms` (the method's host work: copies,
masks), `step_ms` (forward, backward, optimizer: launches on a GPU) and `log_ms` (logging, agreement between
ranks, checkpoints); medians over the steps after the warm-up. `loop_samples_per_s` against
`loader_samples_per_s` (the same stream with no model) and `step_samples_per_s` (the step on one batch kept on
the device) say which one bounds training. `cores_per_gpu` turns the loader's rate per worker into the CPU cores
one GPU needs at a given step rate.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from segda.config import Config, load_config
from segda.log import SegdaError, info

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
RECIPES = {"pretrain": "pretrain_gta5.yaml", "adapt": "adapt_cityscapes_lora.yaml",
           "selftrain": "adapt_gta5_to_cityscapes_selftrain.yaml"}
MODELS = {"tiny": {"hidden_sizes": [8, 8, 8, 8], "decoder_hidden_size": 8, "num_attention_heads": [1, 1, 1, 1],
                   "depths": [1, 1, 1, 1], "mlp_ratios": [1, 1, 1, 1],
                   "sr_ratios": [16, 8, 4, 2]},  # attention over 4x fewer keys than MiT's (crops down to 64 px)
          "b0": {}}
"""SegformerConfig overrides: `tiny` (~11k weights, the model's cost almost gone) or MiT-b0 (3.7M)."""


def make_frames(root: Path, frames: int, size: tuple[int, int], target: bool) -> dict[str, str]:
    """Synthetic GTA5 frames (and Cityscapes images for self-training) at `size` as PXZ shards, each made once."""
    from segda.shards.encode import EncodeOptions
    from segda.shards.synth import synth_cityscapes, synth_gta5
    from segda.shards.writer import CreateOptions, create_shards, manifest_path

    wanted = {"frames": frames, "size": list(size)}
    parts = {"train": ("gta5", lambda raw: synth_gta5(raw, frames, size=size, seed=0, quirks=False), "gta5"),
             "target": ("target", lambda raw: synth_cityscapes(raw, "train", frames, size=size, seed=0), "images")}
    manifests = {}
    for name, (folder, synth, dataset) in parts.items():
        manifests[name] = str(manifest_path(root / folder, "train"))
        stamp = root / f"{folder}.json"
        if (name == "target" and not target) or (stamp.is_file() and json.loads(stamp.read_text()) == wanted):
            continue
        raw = root / f"raw-{folder}"
        synth(raw)
        source = raw / "leftImg8bit" / "train" if dataset == "images" else raw
        create_shards(dataset, source, root / folder, EncodeOptions(dataset, "train"),
                      CreateOptions(shard_size=16, workers=2), progress=False)
        stamp.write_text(json.dumps(wanted))
    return manifests


def loop_config(stage: str, model: str, manifests: dict, crop, batch: int, workers: int, steps: int,
                base: str = "", threads: str = "auto") -> Config:
    """The shipped recipe of `stage`, pointed at the benchmark's shards and model, no evaluation or checkpoint."""
    overrides = [f"data.train={manifests['train']}", "data.val=", f"data.batch_size={batch}",
                 f"data.workers={workers}", "data.crop_size={}x{}".format(*crop), f"train.max_steps={steps}",
                 f"train.log_every={steps}", "train.checkpoint_every=0", "train.eval_every=0", "optim.warmup_steps=0",
                 f"data.threads={threads}"]
    if stage == "pretrain":
        overrides += ["model.name_or_path=", f"model.config={json.dumps(MODELS[model])}"]
    else:
        overrides += [f"model.name_or_path={base}"]
    if stage == "selftrain":  # DAFormer's pseudo-label crop (15 and 120 rows of 512) scaled to the crop
        overrides += [f"data.target={manifests['target']}", f"adapt.pseudo_ignore_top={round(15 * crop[1] / 512)}",
                      f"adapt.pseudo_ignore_bottom={round(120 * crop[1] / 512)}"]
    return load_config(CONFIGS / RECIPES[stage], overrides)


def _base_model(root: Path, model: str) -> str:
    """A random-init model of the benchmark's size saved as a pretrained base (adapt and selftrain need one)."""
    from segda.model import build_model, save_model

    import hashlib

    shape = hashlib.sha256(json.dumps(MODELS[model], sort_keys=True).encode()).hexdigest()[:8]
    folder = root / f"base-{model}-{shape}"  # a --data-dir kept from an older tiny model is not reused
    if not (folder / "config.json").is_file():
        torch.manual_seed(0)
        save_model(build_model("", MODELS[model]), folder)
    return str(folder)


def _loader_rate(method, rank_batches: int, warmup: int, pin_memory: bool) -> float:
    """The method's own stream with no model: samples per second after `warmup` batches."""
    data = method.data(rank=0, world=1, pin_memory=pin_memory)
    stream = iter(data)
    for _ in range(warmup):
        next(stream)
    start, samples = time.perf_counter(), 0
    for _ in range(rank_batches):
        batch = next(stream)
        samples += len(batch.get("source", batch)["key"])
    rate = samples / (time.perf_counter() - start)
    data.close()
    return rate


def _step_rate(model: str, crop, batch: int, steps: int, mixed_precision: str) -> float:
    """segda's step alone on one batch kept in memory (segda bench train's), same model, size and precision."""
    from segda.bench.step import isolated_step_rate

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    return isolated_step_rate(MODELS[model], crop, batch, steps, dtype=dtype)


def bench_loop(model: str = "tiny", crop=(512, 512), batch: int = 8, workers: int = 1, steps: int = 20,
               warmup: int = 5, stage: str = "pretrain", frames: int = 32, size=(1280, 720),
               data_dir: str | None = None, json_path: str | None = None, step_rates=(218.7,),
               threads: str = "auto") -> dict:
    from segda.data.loader import available_cores, threads_per_worker
    from segda.methods import build_method
    from segda.train import setup, train
    from segda.train.state import PhaseClock

    if model == "tiny" and min(crop) < 64:
        raise SegdaError(f"--crop {crop[0]}x{crop[1]}: the tiny model needs crops of 64x64 or more (its attention "
                         "shrinks the first stage's keys 16x); pass --crop 64 or larger")
    root = Path(data_dir or tempfile.mkdtemp(prefix="segda-bench-loop-"))
    manifests = make_frames(root / "data", frames, size, target=stage == "selftrain")
    base = _base_model(root, model) if stage != "pretrain" else ""
    cfg = loop_config(stage, model, manifests, crop, batch, workers, warmup + steps, base, threads)
    info(f"loop: {stage}, model {model}, {crop[0]}x{crop[1]} crops, batch {batch}, {workers} worker(s) of "
         f"{threads_per_worker(workers) if threads == 'auto' else 'library'} thread(s) on {available_cores()} "
         f"cores, {frames} frames of "
         f"{size[0]}x{size[1]}, {warmup} warm-up + {steps} timed steps")
    phases = PhaseClock(keep_steps=True)
    with tempfile.TemporaryDirectory(dir=root) as out:
        summary = train("adapt" if stage != "pretrain" else "pretrain", cfg, Path(out) / "run", phases=phases)
    timed = phases.steps[warmup:]
    medians = {name: statistics.median(s[name] for s in timed) for name in timed[0]}
    step_walls = [sum(s.values()) / 1000 for s in timed]
    loop_rate = batch * len(timed) / sum(step_walls)
    method = build_method("adapt" if stage != "pretrain" else "pretrain",
                          loop_config(stage, model, manifests, crop, batch, workers, 1, base, threads),
                          *setup.datasets("adapt" if stage != "pretrain" else "pretrain", cfg)[::2])
    loader_rate = _loader_rate(method, steps, warmup, pin_memory=torch.cuda.is_available())
    step_rate = _step_rate(model, crop, batch, steps, summary["mixed_precision"])
    per_worker = loader_rate / max(workers, 1)
    result = {"stage": stage, "model": model, "crop": list(crop), "batch": batch, "workers": workers,
              "threads": threads, "threads_per_worker": threads_per_worker(workers) if threads == "auto" else None,
              "main_threads": torch.get_num_threads(), "cores": available_cores(),
              "device": summary["device"], "mixed_precision": summary["mixed_precision"], **medians,
              "loop_samples_per_s": loop_rate, "loader_samples_per_s": loader_rate,
              "step_samples_per_s": step_rate, "loop_to_loader": loop_rate / loader_rate,
              "loop_to_step": loop_rate / step_rate, "bound_by": "loader" if loader_rate < step_rate else "step",
              "loop_to_bound": loop_rate / min(loader_rate, step_rate), "data_wait_share": summary["data_wait_share"],
              "loader_samples_per_s_per_worker": per_worker,
              "cores_per_gpu": {f"{r:g}": r / per_worker for r in (*step_rates, step_rate)}}
    _print(result)
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
    return result


def _print(r: dict) -> None:
    print(f"| phase | host ms per step (median of {r['stage']} steps) |\n|---|---:|")
    for name in ("data_wait_ms", "host_ms", "step_ms", "log_ms"):
        print(f"| {name[:-3]} | {r[name]:.1f} |")
    print(f"loop {r['loop_samples_per_s']:.1f} samples/s; loader alone {r['loader_samples_per_s']:.1f} "
          f"({r['workers']} worker(s)); step alone {r['step_samples_per_s']:.1f}")
    print(f"loop / loader: {r['loop_to_loader']:.2f}x; loop / step: {r['loop_to_step']:.2f}x; data-wait share "
          f"{100 * r['data_wait_share']:.0f}%")
    print(f"bound by the {r['bound_by']}: the loop runs at {r['loop_to_bound']:.2f}x of it" + (
        "" if r["stage"] == "pretrain" else " (the step alone is the supervised step of the whole model: "
        f"{r['stage']}'s own step does more)"))
    for rate, cores in r["cores_per_gpu"].items():
        print(f"one GPU stepping at {float(rate):.1f} samples/s needs {cores:.1f} loader cores at "
              f"{r['loader_samples_per_s_per_worker']:.1f} samples/s per worker ({r['crop'][0]}x{r['crop'][1]})")
