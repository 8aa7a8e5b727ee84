"""What a resume may change, and what happens when it does. Read before the Accelerator exists, since an elastic
resume changes `train.grad_accum`.

- **The same world size**: the run continues exactly (same batches, same weights as an uninterrupted run).
- **Another number of processes** (`train.on_world_change`), from an indexed dataset, outside DeepSpeed: the
  interrupted epoch's untrained samples are shared out among the new ranks, each exactly once (`segda.data.plan`),
  later epochs follow the new world size, and the optimizer step and schedule continue. `keep_global_batch`
  (default) keeps batch_size x processes x grad_accum by changing grad_accum, and refuses when that does not divide;
  `keep_per_rank_batch` keeps grad_accum and lets the global batch change (the learning rate is not rescaled).
  Ranks that did not exist before start fresh dropout RNG streams.
- **Changed `optim.*` or `train.max_steps`**: take effect from the next step (new learning rates, weight decay,
  betas, warmup and decay horizon applied to the restored optimizer and step count), with a line saying so.
- **Changed data order or batch settings** (`RESUME_KEYS`): refused, naming the key.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from segda.config import Config, old_size_list
from segda.log import SegdaError, info, warn

RESUME_KEYS = ("data.train", "data.batch_size", "data.crops_per_frame", "data.crop_size", "data.base_size",
               "data.scale_range", "train.seed", "data.target", "data.target_base_size", "adapt.method",
               "adapt.rare_class_temperature")
"""Changing these between a checkpoint and its resume would change which samples or crops come next."""
SEQUENTIAL_KEYS = ("data.workers", "data.shuffle_buffer")
"""Shard-by-shard reading (no byte offsets) also depends on these; indexed reading does not."""
TAKE_EFFECT = ("optim.lr", "optim.head_lr_mult", "optim.weight_decay", "optim.betas", "optim.warmup_steps",
               "optim.poly_power", "optim.clip_grad_norm", "train.max_steps")


def read_state(path: Path) -> dict:
    try:
        return json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as err:
        raise SegdaError(f"cannot read {path / 'state.json'} ({err}); resume from another checkpoint") from err


def launched_world() -> int:
    """The number of processes of this launch, known before the Accelerator is made (accelerate/torchrun set it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_resumable(saved: dict, cfg: Config, stage: str, path, *, elastic: bool, world: int) -> None:
    """Refuse what would silently change the data or the run; announce what takes effect. Adjusts
    cfg.train.grad_accum for an elastic resume under keep_global_batch."""
    if saved.get("stage") != stage:
        raise SegdaError(f"{path} is a {saved.get('stage')} checkpoint; resume it with `segda {saved.get('stage')}`")
    before = saved.get("config", {})
    keys = RESUME_KEYS + (() if elastic else SEQUENTIAL_KEYS)
    for key in keys:
        if key.startswith("data.target") and cfg.adapt.method != "selftrain":
            continue  # read only by self-training (a supervised run's old value, if any, meant nothing)
        old, new = _get(before, key), _get(cfg.to_dict(), key)
        if old is None:  # a key newer than the checkpoint: it was running with that key's default
            old = _get(Config().to_dict(), key)
        old = old_size_list(key.rsplit(".", 1)[-1], old) or old  # a checkpoint of segda < 0.3: sizes were lists
        if old != new:
            raise SegdaError(f"{key} was {old!r} when {path} was written, now {new!r}: resume with the same value "
                             "(it decides which samples and crops come next)")
    _adjust_batch(saved, cfg, path, elastic=elastic, world=world)
    check_data_order(saved, path, elastic=elastic, cfg=cfg)
    for key in TAKE_EFFECT:
        old, new = _get(before, key), _get(cfg.to_dict(), key)
        if old is not None and old != new:
            info(f"{key} was {old!r} in {path}, now {new!r}: the new value takes effect from step "
                 f"{saved['step'] + 1}")


def _adjust_batch(saved: dict, cfg: Config, path, *, elastic: bool, world: int) -> None:
    old_world = saved.get("world_size", world)
    old_accum = _get(saved.get("config", {}), "train.grad_accum") or cfg.train.grad_accum
    batch = cfg.data.batch_size
    global_batch = batch * old_world * old_accum
    if old_world != world and not elastic:
        raise SegdaError(f"{path} was written by {old_world} processes, this run has {world}: resuming on another "
                         "number of processes needs sample-by-sample reading; add byte offsets to the manifest "
                         f"with `segda index {cfg.data.train}` (and set data.verify=false), or resume with "
                         f"{old_world} processes")
    if cfg.train.on_world_change == "keep_per_rank_batch":
        if old_world != world:
            warn(f"{path} was written by {old_world} processes, this run has {world}: the global batch changes "
                 f"from {global_batch} to {batch * world * old_accum} (train.on_world_change=keep_per_rank_batch); "
                 "the learning rate is not rescaled")
        cfg.train.grad_accum = old_accum
        return
    # keep_global_batch: the checkpoint's global batch, whatever train.grad_accum the command line carries (a
    # requeued job repeats the command of its first start, before an earlier resume changed grad_accum).
    if global_batch % (batch * world):
        raise SegdaError(
            f"{path} was written by {old_world} processes with a global batch of {global_batch} (data.batch_size "
            f"{batch} x {old_world} processes x train.grad_accum {old_accum}), which {world} processes cannot keep "
            f"with data.batch_size {batch}: resume on a number of processes that divides {global_batch // batch}, "
            "or set train.on_world_change=keep_per_rank_batch to let the global batch change")
    accum = global_batch // (batch * world)
    if accum != cfg.train.grad_accum:
        info(f"{path} was written by {old_world} processes with a global batch of {global_batch}; with {world} "
             f"process(es) train.grad_accum becomes {accum}, keeping the global batch of {global_batch}")
    cfg.train.grad_accum = accum


def check_data_order(saved: dict, path, *, elastic: bool, cfg: Config) -> None:
    """A data position means something only in the order it was written in (sample by sample, or shard by shard)."""
    written = (saved.get("data") or {}).get("order")
    now = "by_sample" if elastic else "by_shard"
    if written and written != now:
        raise SegdaError(f"{path} was written reading {cfg.data.train} {written.replace('_', ' ')}, this run reads "
                         f"it {now.replace('_', ' ')} (data.verify, or byte offsets added to the manifest, changed "
                         "in between): resume with the same data.verify and the same manifest")


def position_from_step(state: dict, frames: int, train_ds, cfg) -> dict:
    """The data position of a checkpoint written before positions were recorded (same world size)."""
    from segda.data.stream import batches_per_epoch

    world = state["world_size"]
    epoch, step = divmod(state["step"] * cfg.train.grad_accum, batches_per_epoch(train_ds, cfg.data, world))
    return {"epoch": epoch, "consumed": step * frames * world, "end": None}


def apply_optim_config(optimizer, scheduler, model, cfg) -> None:
    """optim.* of this run's config, over what the checkpoint restored: learning rates, weight decay and betas of
    each group, and the schedule (its lambda reads cfg) from the restored step on."""
    from segda.train import lr_factor, param_groups

    fresh = param_groups(model, cfg.optim)
    for group, new in zip(optimizer.param_groups, fresh):
        group["initial_lr"], group["weight_decay"], group["betas"] = new["lr"], new["weight_decay"], tuple(
            cfg.optim.betas)
    scheduler.base_lrs = [g["lr"] for g in fresh]
    factor = lr_factor(scheduler.last_epoch, cfg.optim.warmup_steps, cfg.train.max_steps, cfg.optim.poly_power)
    for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
        group["lr"] = base * factor
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


def _get(config: dict, key: str):
    section, name = key.split(".")
    return config.get(section, {}).get(name)
