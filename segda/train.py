"""One training loop for both stages: `pretrain` trains the whole SegFormer, `adapt` trains a LoRA adapter.

    accelerate launch --config_file launch/accelerate/cpu_ddp.yaml -m segda pretrain configs/demo/pretrain.yaml

Processes, mixed precision and DeepSpeed come from the Accelerate launch config; everything else from the
experiment config. Each rank streams its own part of the shards (`segda.data.stream`): the loader is never
passed through `accelerator.prepare`. Outputs: RUN_DIR/model (pretrain, save_pretrained safetensors) or
RUN_DIR/adapter (adapt, adapter only), RUN_DIR/run.json, RUN_DIR/metrics.jsonl, RUN_DIR/checkpoints/.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs
from tqdm import tqdm

from segda import adapters, atomic, checkpoint
from segda.config import Config
from segda.data.datasets import resolve_dataset, with_counts
from segda import resume as resume_policy
from segda.data.stream import elastic
from segda.guard import NonFiniteGuard
from segda.preempt import CheckpointClock, Control, Preempted, StopSignals
from segda.evaluate import evaluate_model
from segda.methods import StepContext, build_method
from segda.log import SegdaError, info, set_main_process, warn
from segda.model import batchnorm_in_fp32, build_model, count_parameters, fingerprint, normalize, save_model
from segda.runinfo import run_info

STAGES = ("pretrain", "adapt")


def make_accelerator(cfg: Config, out_dir: Path) -> Accelerator:
    # On CPU, multi-process runs (DeepSpeed too) need gloo; a single process must not ask for a process group.
    multi = int(os.environ.get("WORLD_SIZE", "1")) > 1
    handlers = [InitProcessGroupKwargs(backend="gloo")] if multi and not torch.cuda.is_available() else []
    trackers = "tensorboard" if _has_tensorboard() else None
    accelerator = Accelerator(gradient_accumulation_steps=cfg.train.grad_accum, kwargs_handlers=handlers,
                              log_with=trackers, project_dir=str(out_dir))
    _refuse_silent_deepspeed_loss(accelerator)
    return accelerator


def _refuse_silent_deepspeed_loss(accelerator: Accelerator) -> None:
    """A DeepSpeed launch config under ACCELERATE_USE_CPU=1 runs as plain DDP without a word: say so and stop."""
    asked = os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true")
    if asked and accelerator.distributed_type != DistributedType.DEEPSPEED:
        where = accelerator.distributed_type.value
        if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
            raise SegdaError(f"the launch config asks for DeepSpeed, but this run would be {where} (no ZeRO "
                             "sharding) because ACCELERATE_USE_CPU=1 is set: unset ACCELERATE_USE_CPU (DeepSpeed "
                             "finds its CPU accelerator by itself), or launch with a config that is not DeepSpeed "
                             "(launch/accelerate/cpu_ddp.yaml)")
        raise SegdaError(f"the launch config asks for DeepSpeed, but Accelerate set up {where}: check that "
                         "`import deepspeed` works in this environment and that the config's distributed_type is "
                         "DEEPSPEED")


def _has_tensorboard() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


def build_trainable(stage: str, cfg: Config):
    """(model, base fingerprint or None): the whole model for pretrain, base + LoRA for adapt."""
    if stage == "pretrain":
        return build_model(cfg.model.name_or_path, cfg.model.config, new_head_ok=True), None
    if not cfg.model.name_or_path:
        raise SegdaError("adapt needs the pretrained base: set model.name_or_path to RUN_DIR/model of a pretrain run")
    base = build_model(cfg.model.name_or_path)
    base_fp = fingerprint(base)  # before peft injects its layers into `base`
    return adapters.attach_lora(base, cfg.lora), base_fp


def param_groups(model, cfg) -> list[dict]:
    """SegFormer recipe: head at lr x head_lr_mult; no weight decay on norms, biases and position embeddings."""
    groups = {(h, d): [] for h in (False, True) for d in (False, True)}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = param.ndim > 1 and "norm" not in name and "pos" not in name
        groups[("decode_head" in name, decay)].append(param)
    out = []
    for (head, decay), params in groups.items():
        if params:
            out.append({"params": params, "lr": cfg.lr * (cfg.head_lr_mult if head else 1.0),
                        "weight_decay": cfg.weight_decay if decay else 0.0})
    return out


def lr_factor(step: int, warmup: int, max_steps: int, power: float) -> float:
    """Linear warmup, then polynomial decay to zero at max_steps."""
    warm = min(1.0, (step + 1) / warmup) if warmup else 1.0
    return warm * max(0.0, 1.0 - step / max_steps) ** power


def train(stage: str, cfg: Config, out_dir: str | Path, resume: str | None = None) -> dict:
    """Run one stage; return the summary that also goes to RUN_DIR/run.json."""
    if stage not in STAGES:
        raise SegdaError(f"unknown stage {stage!r}; choose one of {STAGES}")
    # From the first moment: a SIGTERM during start-up is answered at the first step, not by dying.
    signals = StopSignals()
    try:
        return _train(stage, cfg, Path(out_dir), resume, signals)
    finally:
        signals.restore()


def _train(stage: str, cfg: Config, out_dir: Path, resume: str | None, signals: StopSignals) -> dict:
    set_main_process(int(os.environ.get("RANK", "0")) == 0)
    train_ds = with_counts(resolve_dataset(cfg.data.train, allow_pipe=cfg.data.allow_pipe),
                           allow_pipe=cfg.data.allow_pipe)
    train_ds.require_labels("data.train (supervised training)")
    val_ds = resolve_dataset(cfg.data.val, allow_pipe=cfg.data.allow_pipe) if cfg.data.val else None
    if val_ds is not None:
        val_ds.require_labels("data.val (evaluation)")

    target_ds = _target_dataset(stage, cfg)
    is_elastic = elastic(train_ds, cfg.data) and (target_ds is None or elastic(target_ds, cfg.data))
    if val_ds is not None and cfg.train.eval_max_samples and not val_ds.counts_known:
        raise SegdaError(f"train.eval_max_samples needs per-shard counts: point data.val at the manifest of "
                         f"{cfg.data.val}, or set train.eval_max_samples=0")
    found = checkpoint.find_resume(out_dir, resume)
    if found is None and checkpoint.list_checkpoints(out_dir):
        raise SegdaError(f"{out_dir} already holds checkpoints of an earlier run: continue it with --resume auto, "
                         "or choose another --out")
    saved = resume_policy.read_state(found) if found else None
    if saved is not None:  # may change train.grad_accum, which the Accelerator is built with
        resume_policy.check_resumable(saved, cfg, stage, found, elastic=is_elastic,
                                      world=resume_policy.launched_world())
    accelerator = make_accelerator(cfg, out_dir)
    set_main_process(accelerator.is_main_process)
    rank = accelerator.process_index
    torch.manual_seed(cfg.train.seed)  # identical init on every rank
    model, base_fp = build_trainable(stage, cfg)
    if cfg.train.channels_last:  # weights and inputs alike (segda bench train --channels-last measures both)
        model = model.to(memory_format=torch.channels_last)
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    # Fused: one kernel per step, and the only AdamW that can skip a step on the device (segda.guard). DeepSpeed
    # on CPU steps its flat fp32 partitions itself: it keeps the plain implementation there.
    optimizer = torch.optim.AdamW(param_groups(model, cfg.optim), betas=tuple(cfg.optim.betas),
                                  fused=accelerator.device.type == "cuda" or not deepspeed)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(
        s, cfg.optim.warmup_steps, cfg.train.max_steps, cfg.optim.poly_power))
    _deepspeed_batch(accelerator, cfg)
    # The scheduler is stepped by hand once per optimizer step: a prepared one would step once per process.
    model, optimizer = accelerator.prepare(model, optimizer)
    if deepspeed and accelerator.mixed_precision in ("bf16", "fp16"):
        batchnorm_in_fp32(model)
    torch.manual_seed(cfg.train.seed * 1000 + rank)  # dropout / drop-path differ per rank, as in open_clip

    method = build_method(stage, cfg, train_ds, target_ds)
    loop = _Loop(stage, cfg, out_dir, accelerator, model, optimizer, scheduler, train_ds, val_ds, base_fp, signals,
                 method, is_elastic)
    loop.restore(found, saved)
    return loop.run()


def _target_dataset(stage: str, cfg: Config):
    """adapt.method=selftrain: the target's frames (labels, if any, are never read by the method)."""
    if cfg.adapt.method != "selftrain":
        return None
    if stage != "adapt":
        raise SegdaError(f"adapt.method=selftrain trains an adapter: run it with `segda adapt`, not `segda {stage}`")
    return with_counts(resolve_dataset(cfg.data.target, allow_pipe=cfg.data.allow_pipe),
                       allow_pipe=cfg.data.allow_pipe)


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


class _Loop:
    def __init__(self, stage, cfg, out_dir, accelerator, model, optimizer, scheduler, train_ds, val_ds, base_fp,
                 signals: StopSignals, method, is_elastic: bool):
        self.stage, self.cfg, self.out, self.acc = stage, cfg, out_dir, accelerator
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.train_ds, self.val_ds, self.base_fp = train_ds, val_ds, base_fp
        self.step, self.best, self.last = 0, {}, {}  # last: the latest logged loss and lr
        self.images, self.train_seconds, self.nonfinite_skipped = 0, 0.0, 0
        self.deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
        # The loss stays on the device until a log line needs it: no host-device sync per micro-batch.
        self.window = _Window(accelerator.device)
        self.data_wait_seconds = 0.0
        # Under DeepSpeed bf16/fp16 the engine casts the model and Accelerate does not autocast: the pixels must
        # arrive in the model's dtype. Elsewhere the weights stay fp32 and autocast does the casting.
        self.input_dtype = next(model.parameters()).dtype
        self.guard = None if self.deepspeed or accelerator.scaler is not None else \
            NonFiniteGuard(optimizer, accelerator.device, model)
        self.forward = _compiled(model, cfg.train) if cfg.train.compile else model
        self.method, self.elastic = method, is_elastic
        self.position = method.start_position()  # of the data order, after the last micro-batch trained on
        self.control = Control(accelerator.num_processes)
        self.clock = CheckpointClock(cfg.train.checkpoint_minutes)
        self.signals = signals

    # ---- resume -------------------------------------------------------------------------------------------
    def restore(self, path: Path | None, state: dict | None) -> None:
        """Call on every rank, with or without a checkpoint: the ranks first agree that they all see the same."""
        acc = self.acc
        step = state["step"] if state else -1
        highest, lowest = self.control.agree(step, -step)
        if highest != -lowest:  # every rank reads the checkpoint: it must sit on a filesystem all nodes mount
            seen = f"sees step {step}" if path else "sees no checkpoint"
            raise SegdaError(f"the checkpoints under {self.out} are not visible on every node alike (rank "
                             f"{acc.process_index} on {os.uname().nodename} {seen}; others see step "
                             f"{highest if highest != step else -lowest}): put --out on a filesystem every node "
                             "mounts")
        if path is None:
            return
        if self.deepspeed:
            if state.get("world_size") != acc.num_processes:
                raise SegdaError(f"{path} is a DeepSpeed checkpoint of {state.get('world_size')} processes, this "
                                 f"run has {acc.num_processes}: DeepSpeed's sharded optimizer state resumes only on "
                                 "the same number of processes")
            acc.load_state(str(path / "deepspeed"))  # DeepSpeed's own format: resume only from your own runs
        else:
            model_t, opt_t, opt_rest, rng = checkpoint.load_checkpoint(path, acc.process_index)
            acc.unwrap_model(self.model).load_state_dict(model_t)
            checkpoint.load_optimizer(self.optimizer, opt_t, opt_rest)
            if rng is not None:
                checkpoint.restore_rng(rng)
            else:  # a rank that did not exist when the checkpoint was written: a fresh dropout stream
                torch.manual_seed(self.cfg.train.seed * 1000 + acc.process_index + 7919 * state["step"])
        self._restore_method(path)
        self.scheduler.load_state_dict(state["scheduler"])
        resume_policy.apply_optim_config(self.optimizer, self.scheduler, acc.unwrap_model(self.model), self.cfg)
        if acc.scaler is not None and state.get("scaler"):
            acc.scaler.load_state_dict(state["scaler"])  # fp16: the same loss scale, so the same skipped steps
        self.step, self.best = state["step"], state.get("best", {})
        self.images, self.train_seconds = state.get("images", 0), state.get("train_seconds", 0.0)
        self.data_wait_seconds = state.get("data_wait_seconds", 0.0)
        # Checkpoints of segda < 0.2 record no data position: the step gives it (same world size only).
        frames = self.cfg.data.batch_size // self.cfg.data.crops_per_frame
        saved_position = {k: v for k, v in (state.get("data") or {}).items() if k != "order"}
        self.position = saved_position or resume_policy.position_from_step(state, frames, self.train_ds, self.cfg)
        where = self.position.get("source", self.position)
        info(f"resumed from {path} at step {self.step} (epoch {where['epoch']}, {where['consumed']} of its samples "
             "done)")

    def _restore_method(self, path: Path) -> None:
        """The method's own state (self-training's EMA teacher), saved beside the model in every checkpoint."""
        tensors = checkpoint.load_method_state(path)
        module = self.acc.unwrap_model(self.model)
        if tensors is None:
            if self.method.state_dict() or self.method.name != "supervised":
                raise SegdaError(f"{path} holds no state of the {self.method.name} method (written by another "
                                 "method or an older segda): resume with the adapt.method it was written with")
            return
        try:
            self.method.load_state_dict({k: v.to(self.acc.device) for k, v in tensors.items()}, module)
        except ValueError as err:
            raise SegdaError(f"{path}: {err}; resume with the lora.* settings it was written with") from err

    # ---- main loop ----------------------------------------------------------------------------------------
    def run(self) -> dict:
        try:
            return self._run()
        except Preempted:
            raise
        except BaseException as err:  # run.json must not say "running" after the run died
            if self.acc.is_main_process and (self.out / "run.json").is_file():
                try:
                    message = str(err).rsplit("SegdaError: ", 1)[-1].strip()
                    atomic.write_json(self.out / "run.json", {**self._summary(status="failed"),
                                                              "error": f"{type(err).__name__}: {message}"})
                except Exception:  # recording the failure must not hide it (a full disk fails here too)
                    pass
            raise

    def _run(self) -> dict:
        acc, cfg = self.acc, self.cfg
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            self._truncate_metrics()
            if cfg.train.log_samples:
                (self.out / "samples").mkdir(exist_ok=True)
                for log in (self.out / "samples").glob("rank-*.jsonl"):  # every old rank's, whatever the world now
                    _truncate_after(log, self.step)
            atomic.write_json(self.out / "run.json", self._summary(status="running"))
        if acc.log_with:
            acc.init_trackers(f"segda-{self.stage}", config=_flat(cfg.to_dict()))
        started = time.perf_counter()
        bar = tqdm(total=cfg.train.max_steps, initial=self.step, desc=self.stage, unit="step",
                   disable=not acc.is_main_process, dynamic_ncols=True)
        # One endless stream over epochs: its loader workers live across epoch boundaries.
        batches = self.method.batches(rank=acc.process_index, world=acc.num_processes, position=self.position,
                                      pin_memory=acc.device.type == "cuda")
        self._train_mode()
        if self.guard is not None:
            self.guard.start_step()
        epoch, skipped = self.position.get("source", self.position)["epoch"], 0
        stream = iter(batches)
        tick = time.perf_counter()
        try:
            while self.step < cfg.train.max_steps:
                waited = time.perf_counter()
                batch = next(stream)  # the time blocked here is the loader starving the trainer
                self.window.data_wait += time.perf_counter() - waited
                if batch["epoch"] != epoch:
                    self._report_skipped(epoch, skipped)
                    epoch, skipped = batch["epoch"], 0
                skipped += batch["skipped"]
                self._log_samples(batch)
                if self._micro_step(batch):
                    self.position = batch["position"]
                    now = time.perf_counter()
                    self.train_seconds += now - tick
                    self.window.seconds += now - tick
                    bar.update(1)
                    if self._after_step(self.signals):
                        bar.set_postfix(loss=f"{self.last['loss']:.3f}", lr=f"{self.last['lr']:.2e}",
                                        img_s=f"{self.last['img_per_s']:.1f}",
                                        wait=f"{100 * self.last['data_wait_share']:.0f}%")
                    tick = time.perf_counter()
        finally:
            batches.close()  # stops the loader's workers
            bar.close()
        self._report_skipped(epoch, skipped)
        return self._finish(time.perf_counter() - started)

    def _log_samples(self, batch) -> None:
        """train.log_samples: this rank's keys of each micro-batch, under the optimizer step they count towards."""
        if self.cfg.train.log_samples:
            with open(self.out / "samples" / f"rank-{self.acc.process_index}.jsonl", "a") as fh:
                fh.write(json.dumps({"step": self.step + 1, "epoch": batch["epoch"], "keys": batch["key"]}) + "\n")

    def _report_skipped(self, epoch: int, skipped: int) -> None:
        if skipped:  # each rank reports its own share: bad data is never silently dropped
            warn(f"rank {self.acc.process_index}, epoch {epoch}: {skipped} bad sample(s) skipped; their batch "
                 "slots were refilled from other samples (see the warnings above)")

    def _train_mode(self) -> None:
        self.model.train()
        if self.stage == "adapt":
            adapters.freeze_untrained_norms(self.model)

    def _micro_step(self, batch) -> bool:
        """Forward/backward one micro-batch; True when this completed an optimizer step. Nothing here waits for
        the device (the DeepSpeed path excepted): the loss and the finiteness verdict stay on it."""
        acc, cfg = self.acc, self.cfg
        with acc.accumulate(self.model):
            loss = self.method.loss(batch, self._student, self._context())
            if self.deepspeed and acc.mixed_precision != "fp16":
                # its engine owns the optimizer step: check on the host before backward (under fp16, DeepSpeed's
                # own loss scaler skips overflowing steps and lowers its scale, as Accelerate's does)
                self._check_loss_now(loss)
            acc.backward(loss)
            grad_norm = None
            if acc.sync_gradients and cfg.optim.clip_grad_norm and not self.deepspeed:
                grad_norm = acc.clip_grad_norm_(self.model.parameters(), cfg.optim.clip_grad_norm)
            if acc.sync_gradients and self.guard is not None:
                self.guard.arm(self.model.parameters(), grad_norm)
            self.optimizer.step()
            if self.guard is not None:
                self.guard.disarm()
            elif acc.sync_gradients and acc.scaler is not None and self.optimizer.step_was_skipped:
                self.nonfinite_skipped += 1  # fp16: the scaler found an overflow, skipped and lowered its scale
                warn(f"fp16 overflow at step {self.step + 1}: the gradient scaler skipped the update and lowered "
                     "its scale")
            self.optimizer.zero_grad(set_to_none=True)
        self.images += len(batch.get("source", batch)["key"]) * acc.num_processes  # self-training: source crops
        self.window.add(loss.detach())
        if not acc.sync_gradients:
            return False
        self.scheduler.step()
        self.step += 1
        self.method.after_step(acc.unwrap_model(self.model), self.step)
        return True

    def _pixels(self, images: torch.Tensor) -> torch.Tensor:
        return normalize(images, self.acc.device, self.input_dtype, channels_last=self.cfg.train.channels_last)

    def _student(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.forward(pixel_values=pixels).logits

    def _context(self) -> StepContext:
        return StepContext(self.acc.device, self.acc.unwrap_model(self.model), self._pixels, self.acc.autocast,
                           self.acc.process_index, self.cfg.train.seed, self.step)

    def _check_loss_now(self, loss) -> None:
        losses = self.acc.gather(loss.detach()[None])
        if not bool(torch.isfinite(losses).all()):
            self._stop_nonfinite(f"non-finite loss {losses.tolist()} at step {self.step + 1}")

    def _check_skipped_steps(self) -> None:
        """Syncs: call where the loop syncs anyway (log lines, checkpoints, the end)."""
        if self.guard is not None and (new := self.guard.new_skips()):
            self._stop_nonfinite(f"non-finite loss: {new} optimizer step(s) up to step {self.step} had NaN or "
                                 "infinite gradients and were skipped on the device (the weights never saw them)")

    def _stop_nonfinite(self, what: str) -> None:
        raise SegdaError(f"{what}: stopping. Lower optim.lr, check the data, or resume from the last checkpoint "
                         f"({self.out / 'checkpoints'}) with --resume auto")

    def _after_step(self, signals: StopSignals) -> bool:
        """Log, evaluate, checkpoint or stop as this step asks; True when it wrote a log line."""
        cfg, acc = self.cfg.train, self.acc
        logged = self.step % cfg.log_every == 0 or self.step == cfg.max_steps
        if logged:
            self._check_skipped_steps()
            self.last = {"step": self.step, **self.window.read(acc), "lr": self.scheduler.get_last_lr()[0],
                         "img_per_s": self.images / max(self.train_seconds, 1e-9)}
            self.data_wait_seconds += self.last["data_wait_s"]
            self._log(self.last)
        if self.val_ds is not None and cfg.eval_every and self.step % cfg.eval_every == 0 \
                and self.step < cfg.max_steps:
            self._check_skipped_steps()
            self._evaluate()
        # Every rank takes the same decision at the same step, whichever rank the signal or the clock reached.
        stop, clock_due = self.control.agree(signals.received, self.clock.due())
        done = self.step >= cfg.max_steps
        if not done and (clock_due or stop or (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0)):
            self._checkpoint()
        if stop and not done:
            self._preempted(stop)
        return logged

    def _preempted(self, signum: int) -> None:
        """The checkpoint of this step is on disk: record the stop and leave with exit status 75 (see preempt)."""
        acc = self.acc
        where = checkpoint.checkpoint_dir(self.out, self.step)
        if acc.is_main_process:
            atomic.write_json(self.out / "run.json", {**self._summary(status="preempted"), "checkpoint": str(where)})
        acc.wait_for_everyone()
        acc.end_training()
        raise Preempted(self.step, str(where), signum)

    def _evaluate(self) -> dict:
        model = self.acc.unwrap_model(self.model)
        with self.method.kept_weights(model):  # self-training: the weights it will save (the EMA teacher)
            result = evaluate_model(model, self.val_ds, self.cfg.data, self.acc,
                                    limit=self.cfg.train.eval_max_samples)
        metrics = {"step": self.step, "val_miou": result["miou"], "val_pixel_accuracy": result["pixel_accuracy"]}
        if result["miou"] >= self.best.get("val_miou", -1.0):
            self.best = metrics
        self._log(metrics)
        info(f"step {self.step}: val mIoU {100 * result['miou']:.1f} (best {100 * self.best['val_miou']:.1f} "
             f"at step {self.best['step']})")
        self._train_mode()
        return metrics

    def _checkpoint(self) -> None:
        acc = self.acc
        self._check_skipped_steps()
        state = {"step": self.step, "world_size": acc.num_processes, "scheduler": self.scheduler.state_dict(),
                 "best": self.best, "images": self.images, "train_seconds": self.train_seconds,
                 "data_wait_seconds": self.data_wait_seconds + self.window.data_wait,
                 "stage": self.stage, "config": self.cfg.to_dict(),
                 "data": {**self.position, "order": "by_sample" if self.elastic else "by_shard"},
                 "scaler": acc.scaler.state_dict() if acc.scaler is not None else None}
        final = checkpoint.checkpoint_dir(self.out, self.step)
        self.clock.reset()
        if self.deepspeed:  # DeepSpeed shards optimizer state: its own format, written by every rank
            acc.save_state(str(final / "deepspeed"))
            acc.wait_for_everyone()  # every rank's part is on disk before state.json marks the folder complete
            if acc.is_main_process:
                checkpoint.save_method_state(final, self.method.state_dict())
                atomic.write_json(final / "state.json", state)
                checkpoint.prune(self.out, self.cfg.train.keep_checkpoints)
            acc.wait_for_everyone()
            return
        # Every rank's RNG state travels to the main process over the network: no shared filesystem needed to save.
        rng = [checkpoint.unpack_rng(t) for t in self.control.gather_bytes(checkpoint.pack_rng())]
        if acc.is_main_process:
            checkpoint.save_checkpoint(self.out, self.step, acc.unwrap_model(self.model).state_dict(),
                                       self.optimizer, state, rng, self.cfg.train.keep_checkpoints,
                                       method_state=self.method.state_dict())
        acc.wait_for_everyone()

    # ---- outputs ------------------------------------------------------------------------------------------
    def _log(self, record: dict) -> None:
        if self.acc.log_with:
            self.acc.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
        if self.acc.is_main_process:
            with open(self.out / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps(record) + "\n")

    def _truncate_metrics(self) -> None:
        """After a resume, drop the lines a killed run wrote past its last checkpoint."""
        _truncate_after(self.out / "metrics.jsonl", self.step)

    def _finish(self, wall: float) -> dict:
        acc = self.acc
        final = self._evaluate() if self.val_ds is not None else {}
        acc.wait_for_everyone()
        model = acc.unwrap_model(self.model)
        self.replicas_identical = self._replicas_identical(model)
        if self.deepspeed:  # bf16/fp16 cast the module: save ZeRO's fp32 master weights, like every other run's fp32
            _take_fp32_master_weights(model)
        if acc.is_main_process:
            if self.stage == "pretrain":
                save_model(model, self.out / "model")
            else:  # self-training also saves the adapter it does not keep (adapter-student or adapter-teacher)
                for name, weights in self.method.saved_adapters(model):
                    with weights:
                        adapters.save_adapter(model, self.out / name, config=self.cfg.to_dict(),
                                              base=_base_reference(self.cfg.model.name_or_path),
                                              base_fingerprint=self.base_fp, metrics=final if name == "adapter" else {})
        summary = self._summary(status="done", wall=wall, final=final)
        if acc.is_main_process:
            atomic.write_json(self.out / "run.json", summary)
            where = self.out / ("model" if self.stage == "pretrain" else "adapter")
            info(f"{self.stage} done: {self.step} steps, {summary['throughput_img_per_s']:.1f} img/s; saved {where}")
        acc.wait_for_everyone()
        acc.end_training()
        return summary

    def _replicas_identical(self, model) -> bool:
        """DDP must keep every rank's weights equal: compare a checksum of the trainable tensors across ranks."""
        if self.acc.num_processes == 1:
            return True
        tensors = [p for p in model.parameters() if p.requires_grad] + list(self.method.state_dict().values())
        with torch.no_grad():  # the student and the method's state (self-training's teacher) alike
            local = torch.stack([t.detach().double().sum().to(self.acc.device) for t in tensors]).sum()
        sums = self.acc.gather(local.reshape(1).to(self.acc.device))
        return bool((sums == sums[0]).all())

    def _summary(self, status: str, wall: float = 0.0, final: dict | None = None) -> dict:
        model = self.acc.unwrap_model(self.model)
        return {
            "status": status, "stage": self.stage, "step": self.step, "config": self.cfg.to_dict(),
            "world_size": self.acc.num_processes, "mixed_precision": self.acc.mixed_precision,
            "distributed_type": str(self.acc.distributed_type), "device": str(self.acc.device),
            "trainable_parameters": count_parameters(model, trainable_only=True),
            "total_parameters": count_parameters(model), "train_samples_per_epoch": self.train_ds.num_samples,
            "throughput_img_per_s": self.images / max(self.train_seconds, 1e-9), "wall_seconds": wall,
            "train_seconds": self.train_seconds, "nonfinite_steps_skipped": self.nonfinite_skipped,
            "data_wait_seconds": self.data_wait_seconds,
            "data_wait_share": self.data_wait_seconds / max(self.train_seconds, 1e-9),
            "best": self.best, "final": final or {}, "images_seen": self.images,
            "replicas_identical": getattr(self, "replicas_identical", None), **run_info(),
        }


class _Window:
    """What one metrics line reports: the mean loss over its micro-batches (summed on the device) and the share of
    its wall time spent waiting for data."""

    def __init__(self, device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.loss, self.count, self.data_wait, self.seconds = torch.zeros((), device=self.device), 0, 0.0, 0.0

    def add(self, loss: torch.Tensor) -> None:
        self.loss += loss.float()
        self.count += 1

    def read(self, accelerator) -> dict:
        """Call on every rank (it gathers): the loss averaged over ranks and micro-batches; the data wait of the
        rank that waited longest (under DDP every rank then waits for it in the all-reduce)."""
        local = torch.stack([self.loss / max(self.count, 1), torch.tensor(self.data_wait, device=self.device)])
        both = accelerator.gather(local[None].double()).reshape(-1, 2)
        loss, wait = float(both[:, 0].mean()), float(both[:, 1].max())
        out = {"loss": loss, "data_wait_s": wait, "data_wait_share": min(wait / max(self.seconds, 1e-9), 1.0)}
        self.reset()
        return out


def _take_fp32_master_weights(model) -> None:
    """Call on every rank: ZeRO keeps the fp32 master copy sharded, and assembling it is a collective."""
    from deepspeed.utils import safe_get_full_fp32_param

    masters = [(p, safe_get_full_fp32_param(p)) for p in model.parameters() if p.requires_grad]
    model.float()
    with torch.no_grad():
        for param, master in masters:
            if master is not None:
                param.copy_(master.reshape(param.shape))


def _compiled(model, cfg):
    """torch.compile of the training forward only: the module itself (saving, evaluating) stays the same object."""
    return torch.compile(model, backend=cfg.compile_backend)


def _truncate_after(path: Path, step: int) -> None:
    """Drop the lines a killed run wrote past the checkpoint it resumes from."""
    if path.is_file():
        kept = [line for line in path.read_text().splitlines() if _step_of(line) <= step]
        atomic.write_text(path, "".join(line + "\n" for line in kept))


def _step_of(line: str) -> float:
    """The step of a metrics line; a line torn by a kill counts as past the checkpoint (dropped)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


def _base_reference(name_or_path: str) -> str:
    """A local base folder is recorded as an absolute path (the run may start elsewhere); a hub id as is."""
    path = Path(name_or_path)
    return str(path.resolve()) if path.is_dir() else name_or_path


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out



