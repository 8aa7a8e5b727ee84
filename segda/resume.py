"""What a resume may change, and what happens when it does. Read before the Accelerator exists, since an elastic
resume changes `train.grad_accum`.

- **The same world size**: the run continues exactly (same batches, same weights as an uninterrupted run).
- **Another number of processes** (`train.on_world_change`), outside DeepSpeed: the
  interrupted epoch's untrained samples are shared out among the new ranks, each exactly once (`segda.data.plan`),
  later epochs follow the new world size, and the optimizer step and schedule continue. `keep_global_batch`
  (default) keeps batch_size x processes x grad_accum by changing grad_accum, and refuses when that does not divide;
  `keep_per_rank_batch` keeps grad_accum and lets the global batch change (the learning rate is not rescaled).
  Ranks that did not exist before start fresh dropout RNG streams.
- **Changed `optim.*` or `train.max_steps`**: take effect from the next step (new learning rates, weight decay,
  betas, warmup and decay horizon applied to the restored optimizer and step count), with a line saying so.
- **Changed data order or batch settings** (`RESUME_KEYS`), **another model** (`ARCHITECTURE_KEYS`, or a base whose
  weights changed): refused, naming the key.
"""

from __future__ import annotations

import os

from segda.compat import old_size_list
from segda.config import Config
from segda.log import SegdaError, info, warn

RESUME_KEYS = ("data.train", "data.batch_size", "data.crops_per_frame", "data.crop_size", "data.base_size",
               "data.scale_range", "train.seed", "data.target", "data.target_base_size", "adapt.method",
               "adapt.rare_class_temperature")
"""Changing these between a checkpoint and its resume would change which samples or crops come next."""
ARCHITECTURE_KEYS = ("model.name_or_path", "model.config", "lora.r", "lora.alpha", "lora.target_modules",
                     "lora.head")
"""Changing these would load the checkpoint's weights into another model (or fail on their shapes)."""
TAKE_EFFECT = ("optim.lr", "optim.head_lr_mult", "optim.weight_decay", "optim.betas", "optim.warmup_steps",
               "optim.poly_power", "optim.clip_grad_norm", "train.max_steps")


def launched_world() -> int:
    """The number of processes of this launch, known before the Accelerator is made (accelerate/torchrun set it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def refuse_unresumable(saved: dict, cfg: Config, stage: str, path, *, world: int) -> int:
    """Every refusal of `check_resumable`, with no side effect and no torch: the `segda` command runs it before
    torch loads, so a relaunch that cannot continue its run stops every rank in a fraction of a second, not after
    each has imported torch. Returns the train.grad_accum the resume runs with."""
    if saved.get("stage") != stage:
        raise SegdaError(f"{path} is a {saved.get('stage')} checkpoint; resume it with `segda {saved.get('stage')}`")
    refuse_changed_keys(saved, cfg, stage, path)
    return _kept_grad_accum(saved, cfg, path, world=world)


def check_resumable(saved: dict, cfg: Config, stage: str, path, *, world: int) -> None:
    """Refuse what would silently change the data, the model or the run; announce what takes effect. Adjusts
    cfg.train.grad_accum for a resume on another number of processes under keep_global_batch."""
    accum = refuse_unresumable(saved, cfg, stage, path, world=world)
    old_world, batch = saved.get("world_size", world), cfg.data.batch_size
    if cfg.train.on_world_change == "keep_per_rank_batch":
        if old_world != world:
            warn(f"{path} was written by {old_world} processes, this run has {world}: the global batch changes "
                 f"from {batch * old_world * accum} to {batch * world * accum} "
                 "(train.on_world_change=keep_per_rank_batch); the learning rate is not rescaled")
    elif accum != cfg.train.grad_accum:
        global_batch = batch * world * accum
        info(f"{path} was written by {old_world} processes with a global batch of {global_batch}; with {world} "
             f"process(es) train.grad_accum becomes {accum}, keeping the global batch of {global_batch}")
    cfg.train.grad_accum = accum
    before = saved.get("config") if isinstance(saved.get("config"), dict) else {}
    for key in TAKE_EFFECT:
        old, new = setting(before, key), setting(cfg.to_dict(), key)
        if old is not None and old != new:
            info(f"{key} was {old!r} in {path}, now {new!r}: the new value takes effect from step "
                 f"{saved['step'] + 1}")


def refuse_changed_keys(saved: dict, cfg: Config, stage: str, path) -> None:
    """Refuse a changed data-order or architecture key of `saved` (a checkpoint's state or a run's run.json)."""
    before = saved.get("config") if isinstance(saved.get("config"), dict) else {}
    for key in RESUME_KEYS + ARCHITECTURE_KEYS:
        if key.startswith(("data.target", "adapt.rare")) and cfg.adapt.method != "selftrain":
            continue  # read only by self-training (a supervised run's old value, if any, meant nothing)
        if key.startswith("lora.") and stage != "adapt":
            continue
        old, new = setting(before, key), setting(cfg.to_dict(), key)
        if old is None:  # a key newer than the checkpoint: it was running with that key's default
            old = setting(Config().to_dict(), key)
        old = old_size_list(key.rsplit(".", 1)[-1], old) or old  # a checkpoint of segda < 0.3: sizes were lists
        if old != new:
            why = "it decides which samples and crops come next" if key in RESUME_KEYS else \
                "the checkpoint holds the weights of that model"
            raise SegdaError(f"{key} was {old!r} when {path} was written, now {new!r}: resume with the same value "
                             f"({why}), or start a new run with another --out")


def check_base(saved: dict, base_fingerprint: str | None, path) -> None:
    """An adapter run resumed on a base whose weights changed since (same path, new model) would train the
    checkpoint's adapter on the wrong base: refuse, naming both fingerprints."""
    old = saved.get("base_fingerprint")
    if old and base_fingerprint and old != base_fingerprint:
        raise SegdaError(f"the base model at model.name_or_path changed since {path} was written (fingerprint "
                         f"{old[:12]}... then, {base_fingerprint[:12]}... now): resume on the base it was trained "
                         "on, or start a new run with another --out")


def _kept_grad_accum(saved: dict, cfg: Config, path, *, world: int) -> int:
    old_world = saved.get("world_size", world)
    old_accum = setting(saved.get("config", {}), "train.grad_accum") or cfg.train.grad_accum
    if cfg.train.on_world_change == "keep_per_rank_batch":
        return old_accum
    # keep_global_batch: the checkpoint's global batch, whatever train.grad_accum the command line carries (a
    # requeued job repeats the command of its first start, before an earlier resume changed grad_accum).
    batch = cfg.data.batch_size
    global_batch = batch * old_world * old_accum
    if global_batch % (batch * world):
        raise SegdaError(
            f"{path} was written by {old_world} processes with a global batch of {global_batch} (data.batch_size "
            f"{batch} x {old_world} processes x train.grad_accum {old_accum}), which {world} processes cannot keep "
            f"with data.batch_size {batch}: resume on a number of processes that divides {global_batch // batch}, "
            "or set train.on_world_change=keep_per_rank_batch to let the global batch change")
    return global_batch // (batch * world)


def setting(config: dict, key: str):
    """The value of a key such as `data.batch_size` in a config dict; None where it is missing."""
    section, name = key.split(".")
    return config.get(section, {}).get(name)
