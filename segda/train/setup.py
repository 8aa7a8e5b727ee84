"""Build everything a run needs before its first step: the Accelerator, the model (whole, or base + LoRA), the
optimizer recipe, the training method and its data, the checkpointer and the stateful parts it saves.

Processes, mixed precision and DeepSpeed come from the Accelerate launch config; everything else from the
experiment config. The loader is never passed through `accelerator.prepare` (each rank streams its own part).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs

from segda import adapters, launchenv, rundir
from segda import resume as resume_policy
from segda.config import Config
from segda.data.datasets import resolve_dataset
from segda.data.loader import limit_main_threads
from segda.host_memory import keep_freed_memory
from segda.log import SegdaError, set_main_process
from segda.methods import build_method
from segda.model import batchnorm_in_fp32, build_model, fingerprint, normalize
from segda.train import checkpointer as ckpt
from segda.train.guard import NonFiniteGuard
from segda.train.optim import apply_optim_config, build_optimizer
from segda.train.preempt import CheckpointClock, Control, StopSignals
from segda.train.rng import RNGState
from segda.train.state import PhaseClock, TrainState, Window

STAGES = ("pretrain", "adapt")


@dataclass
class Trainer:
    """The parts of one run. Each part with state has state_dict / load_state_dict (`stateful_parts`)."""

    stage: str
    cfg: Config
    out: Path
    accelerator: Accelerator
    model: torch.nn.Module
    """As prepared by Accelerate (DDP or DeepSpeed wrapped); `module` is the plain one."""
    optimizer: object
    scheduler: object
    method: object
    data: object
    """The method's batches: iterable, with the data position as its state (segda.data.stream)."""
    checkpointer: ckpt.Checkpointer
    signals: StopSignals
    val_ds: object = None
    base_fingerprint: str | None = None
    state: TrainState = field(default_factory=TrainState)
    phases: PhaseClock = field(default_factory=PhaseClock)

    def __post_init__(self):
        acc = self.accelerator
        self.module = plain_module(acc, self.model)
        self.deepspeed = acc.distributed_type == DistributedType.DEEPSPEED
        self.window = Window(acc.device)
        self.control = Control(acc.num_processes, acc.process_index)
        self.clock = CheckpointClock(self.cfg.train.checkpoint_minutes)
        # Under DeepSpeed bf16/fp16 the engine casts the model and Accelerate does not autocast: the pixels must
        # arrive in the model's dtype. Elsewhere the weights stay fp32 and autocast does the casting.
        self.input_dtype = next(self.model.parameters()).dtype
        # fp16 (Accelerate's scaler) and DeepSpeed (its engine) own the optimizer step; elsewhere the fused AdamW
        # skips a non-finite step on the device (segda.train.guard)
        self.guard = None if self.deepspeed or acc.scaler is not None else \
            NonFiniteGuard(self.optimizer, acc.device, self.model)
        self.forward = compiled(self.model, self.cfg.train) if self.cfg.train.compile else self.model
        self.rng = RNGState(acc.process_index, self.cfg.train.seed)
        self.last: dict = {}  # the latest metrics line

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        return normalize(images, self.accelerator.device, self.input_dtype, channels_last=self.cfg.train.channels_last)

    def train_mode(self) -> None:
        self.model.train()
        if self.stage == "adapt":
            adapters.freeze_untrained_norms(self.model)

    def stateful_parts(self) -> dict:
        """What a checkpoint holds, by name (segda.train.checkpointer)."""
        parts = {"model": _Module(self.module), "optimizer": _Optimizer(self.optimizer),
                 "scheduler": self.scheduler, "method": self.method, "data": self.data, "train": self.state,
                 "rng": self.rng}
        if self.accelerator.scaler is not None:  # fp16: the same loss scale, so the same skipped steps
            parts["scaler"] = self.accelerator.scaler
        return parts

    def checkpoint_meta(self) -> dict:
        return {"stage": self.stage, "world_size": self.accelerator.num_processes, "config": self.cfg.to_dict(),
                "base_fingerprint": self.base_fingerprint, "data_order": "by_sample"}


def plain_module(accelerator, model):
    """The model inside its DDP wrapper. Accelerate's unwrap_model imports DeepSpeed whenever it is installed (half a
    second of every process's start, `python -X importtime`); only a DeepSpeed (or FSDP) run needs that."""
    if accelerator.distributed_type not in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        return accelerator.unwrap_model(model)
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def compiled(model, cfg):
    """torch.compile of the training forward only: saving and evaluating use the module itself."""
    mode = None if cfg.compile_mode == "default" or cfg.compile_backend != "inductor" else cfg.compile_mode
    return torch.compile(model, backend=cfg.compile_backend, mode=mode)


def build(stage: str, cfg: Config, out_dir: Path, resume: str | None, signals: StopSignals,
          phases: PhaseClock | None = None):
    """(Trainer, checkpoint to resume from or None, its state.json or None), on every rank."""
    if stage not in STAGES:
        raise SegdaError(f"unknown stage {stage!r}; choose one of {STAGES}")
    set_main_process(int(os.environ.get("RANK", "0")) == 0)
    train_ds, val_ds, target_ds = datasets(stage, cfg)
    found = rundir.find_resume(out_dir, resume)  # segda.rundir already refused a run folder that is not ours
    saved = rundir.read_checkpoint_state(found) if found else None
    if saved is not None:  # may change train.grad_accum, which the Accelerator is built with
        resume_policy.check_resumable(saved, cfg, stage, found, world=resume_policy.launched_world())
    accelerator = make_accelerator(cfg, out_dir)
    set_main_process(accelerator.is_main_process)
    limit_main_threads(cfg.data.workers, cfg.data.threads)  # no core runs two busy threads (data.loader)
    if accelerator.device.type == "cpu":
        keep_freed_memory()  # large tensors are not faulted back in at every step (segda.host_memory)
    torch.manual_seed(cfg.train.seed)  # identical init on every rank
    model, base_fp = build_trainable(stage, cfg)
    if saved is not None:
        resume_policy.check_base(saved, base_fp, found)
    if cfg.train.channels_last:  # weights and inputs alike (segda bench train --channels-last measures both)
        model = model.to(memory_format=torch.channels_last)
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    # DeepSpeed on CPU steps its flat fp32 partitions itself: it keeps the plain AdamW there.
    optimizer, scheduler = build_optimizer(model, cfg, fused=accelerator.device.type == "cuda" or not deepspeed)
    _deepspeed_batch(accelerator, cfg)
    # The scheduler is stepped by hand once per optimizer step: a prepared one would step once per process.
    model, optimizer = accelerator.prepare(model, optimizer)
    if deepspeed and accelerator.mixed_precision in ("bf16", "fp16"):
        batchnorm_in_fp32(model)
    torch.manual_seed(cfg.train.seed * 1000 + accelerator.process_index)  # dropout differs per rank (open_clip)
    method = build_method(stage, cfg, train_ds, target_ds)
    method.bind(plain_module(accelerator, model))
    data = method.data(rank=accelerator.process_index, world=accelerator.num_processes,
                       pin_memory=accelerator.device.type == "cuda")
    checkpointer = ckpt.Checkpointer(out_dir, accelerator, Control(accelerator.num_processes,
                                     accelerator.process_index), cfg.train.keep_checkpoints, deepspeed)
    trainer = Trainer(stage, cfg, out_dir, accelerator, model, optimizer, scheduler, method, data, checkpointer,
                      signals, val_ds, base_fp, phases=phases or PhaseClock())
    return trainer, found, saved


def restore(t: Trainer, path: Path | None, saved: dict | None) -> None:
    """Call on every rank, with or without a checkpoint: the ranks first agree that they all see the same."""
    step = saved["step"] if saved else -1
    highest, lowest = t.control.agree(step, -step)
    if highest != -lowest:  # every rank reads the checkpoint: it must sit on a filesystem all nodes mount
        seen = f"sees step {step}" if path else "sees no checkpoint"
        raise SegdaError(f"the checkpoints under {t.out} are not visible on every node alike (rank "
                         f"{t.accelerator.process_index} on {os.uname().nodename} {seen}; others see step "
                         f"{highest if highest != step else -lowest}): put --out on a filesystem every node mounts")
    if path is None:
        return
    if t.deepspeed and saved.get("world_size") != t.accelerator.num_processes:
        raise SegdaError(f"{path} is a DeepSpeed checkpoint of {saved.get('world_size')} processes, this run has "
                         f"{t.accelerator.num_processes}: DeepSpeed's sharded optimizer state resumes only on the "
                         "same number of processes")
    t.checkpointer.load(path, t.stateful_parts(), saved)
    apply_optim_config(t.optimizer, t.scheduler, t.module, t.cfg)


def make_accelerator(cfg: Config, out_dir: Path) -> Accelerator:
    # On CPU, multi-process runs (DeepSpeed too) need gloo; a single process must not ask for a process group.
    multi = int(os.environ.get("WORLD_SIZE", "1")) > 1
    handlers = [InitProcessGroupKwargs(backend="gloo")] if multi and not torch.cuda.is_available() else []
    trackers = "tensorboard" if importlib.util.find_spec("tensorboard") is not None else None
    accelerator = Accelerator(gradient_accumulation_steps=cfg.train.grad_accum, kwargs_handlers=handlers,
                              log_with=trackers, project_dir=str(out_dir))
    _refuse_silent_deepspeed_loss(accelerator)
    return accelerator


def _refuse_silent_deepspeed_loss(accelerator: Accelerator) -> None:
    """A DeepSpeed launch config under ACCELERATE_USE_CPU=1 runs as plain DDP without a word: say so and stop."""
    if launchenv.flag("ACCELERATE_USE_DEEPSPEED") and accelerator.distributed_type != DistributedType.DEEPSPEED:
        where = accelerator.distributed_type.value
        if launchenv.flag("ACCELERATE_USE_CPU"):  # the CLI refuses this before torch loads; library callers here
            raise SegdaError(launchenv.DEEPSPEED_UNDER_CPU_FLAG.format(where=where))
        raise SegdaError(f"the launch config asks for DeepSpeed, but Accelerate set up {where}: check that "
                         "`import deepspeed` works in this environment and that the config's distributed_type is "
                         "DEEPSPEED")


def build_trainable(stage: str, cfg: Config):
    """(model, base fingerprint or None): the whole model for pretrain, base + LoRA for adapt."""
    if stage == "pretrain":
        return build_model(cfg.model.name_or_path, cfg.model.config, new_head_ok=True), None
    if not cfg.model.name_or_path:
        raise SegdaError("adapt needs the pretrained base: set model.name_or_path to RUN_DIR/model of a pretrain run")
    base = build_model(cfg.model.name_or_path)
    base_fp = fingerprint(base)  # before peft injects its layers into `base`
    return adapters.attach_lora(base, cfg.lora), base_fp


def datasets(stage: str, cfg: Config):
    """(train, val or None, target or None), resolved (training indexes what it reads: segda.data.stream)."""
    fetch = {"allow_pipe": cfg.data.allow_pipe, "timeout": cfg.data.timeout, "retries": cfg.data.retries}
    train_ds = resolve_dataset(cfg.data.train, **fetch)
    train_ds.require_labels("data.train (supervised training)")
    val_ds = resolve_dataset(cfg.data.val, **fetch) if cfg.data.val else None
    if val_ds is not None:
        val_ds.require_labels("data.val (evaluation)")
        if cfg.train.eval_max_samples and not val_ds.counts_known:
            raise SegdaError(f"train.eval_max_samples needs per-shard counts: point data.val at the manifest of "
                             f"{cfg.data.val}, or set train.eval_max_samples=0")
    target_ds = None
    if cfg.adapt.method == "selftrain":  # the target's frames (labels, if any, are never read by the method)
        if stage != "adapt":
            raise SegdaError(f"adapt.method=selftrain trains an adapter: run it with `segda adapt`, not "
                             f"`segda {stage}`")
        target_ds = resolve_dataset(cfg.data.target, **fetch)
    return train_ds, val_ds, target_ds


def _deepspeed_batch(accelerator: Accelerator, cfg: Config) -> None:
    """DeepSpeed wants the micro-batch size, normally read from a prepared loader, which we never prepare."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        ds_cfg = accelerator.state.deepspeed_plugin.deepspeed_config
        ds_cfg["train_micro_batch_size_per_gpu"] = cfg.data.batch_size
        ds_cfg["gradient_accumulation_steps"] = cfg.train.grad_accum
        if cfg.optim.clip_grad_norm:
            ds_cfg["gradient_clipping"] = cfg.optim.clip_grad_norm
        if "train_batch_size" in ds_cfg:
            ds_cfg["train_batch_size"] = cfg.data.batch_size * cfg.train.grad_accum * accelerator.num_processes


class _Module:
    """The plain module's weights as a checkpoint part."""

    def __init__(self, module):
        self.module = module

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)


class _Optimizer:
    """An optimizer's state as flat tensors ("<param index>.<name>") beside JSON-able values (param groups, scalar
    entries), the form safetensors and JSON can hold."""

    def __init__(self, optimizer):
        self.optimizer = optimizer

    def state_dict(self) -> dict:
        state = self.optimizer.state_dict()
        out, scalars = {}, {}
        for idx, entry in state["state"].items():
            for name, value in entry.items():
                if torch.is_tensor(value):
                    out[f"{idx}.{name}"] = value
                else:
                    scalars[f"{idx}.{name}"] = value
        return {**out, "param_groups": state["param_groups"], "scalars": scalars}

    def load_state_dict(self, flat: dict) -> None:
        state: dict[int, dict] = {}
        for key, value in list(flat.items()) + list(flat.get("scalars", {}).items()):
            if key in ("param_groups", "scalars"):
                continue
            idx, name = key.split(".", 1)
            state.setdefault(int(idx), {})[name] = value
        self.optimizer.load_state_dict({"state": state, "param_groups": flat["param_groups"]})
