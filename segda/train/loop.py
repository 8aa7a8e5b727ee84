"""The training loop of both stages: batches in, optimizer steps out, with logging, evaluation, checkpoints and
clean stops in between. Everything it touches was built by `segda.train.setup`.

Each optimizer step's host time is split into phases (`segda.train.state.PHASES`): waiting for the loader, the
method's host work, the step itself, and what follows it (logging, agreement, checkpoints, evaluation).
"""

from __future__ import annotations

import time

from tqdm import tqdm

from segda.log import info, warn
from segda.rundir import checkpoint_dir
from segda.train import outputs
from segda.train.preempt import Preempted
from segda.train.step import check_skipped_steps, context, micro_step


def train_loop(t) -> dict:
    """Train from t.state.step to train.max_steps; return the run's summary (also in RUN_DIR/run.json)."""
    acc, cfg = t.accelerator, t.cfg.train
    outputs.start(t)
    started = time.perf_counter()
    bar = tqdm(total=cfg.max_steps, initial=t.state.step, desc=t.stage, unit="step",
               disable=not acc.is_main_process, dynamic_ncols=True)
    batches = iter(t.data)  # one endless stream over epochs: its loader workers live across epochs
    t.train_mode()
    if t.guard is not None:
        t.guard.start_step()
    skipped = _SkipCount(t)
    t.window.reset()
    tick = time.perf_counter()
    try:
        while t.state.step < cfg.max_steps:
            with t.phases.phase("data_wait"):
                waited = time.perf_counter()
                batch = next(batches)  # the time blocked here is the loader starving the trainer
                t.window.data_wait += time.perf_counter() - waited
            skipped.add(batch)
            outputs.log_samples(t, batch)
            with t.phases.phase("host"):
                inputs = t.method.to_device(batch, context(t))
            with t.phases.phase("step"):
                stepped = micro_step(t, inputs)
            if not stepped:
                continue
            with t.phases.phase("log"):
                busy = after_step(t)
            t.phases.end_step()
            now = time.perf_counter()
            t.state.train_seconds += now - tick - busy  # evaluation and checkpoint writes are not training time
            tick = now
            bar.update(1)
            if t.last and t.last["step"] == t.state.step:
                bar.set_postfix(loss=f"{t.last['loss']:.3f}", lr=f"{t.last['lr']:.2e}",
                                img_s=f"{t.last['img_per_s']:.1f}", wait=f"{100 * t.last['data_wait_share']:.0f}%")
    finally:
        t.data.close()  # stops the loader's workers
        bar.close()
    skipped.report()
    return outputs.finish(t, time.perf_counter() - started)


def after_step(t) -> float:
    """Log, evaluate, checkpoint or stop as this step asks; the seconds spent evaluating and checkpointing."""
    cfg, state = t.cfg.train, t.state
    busy = 0.0
    if state.step % cfg.log_every == 0 or state.step == cfg.max_steps:
        check_skipped_steps(t)
        t.last = {"step": state.step, **t.window.read(t.accelerator, t.method.log_metrics()),
                  "lr": t.scheduler.get_last_lr()[0],
                  "img_per_s": state.images / max(state.train_seconds, 1e-9),
                  **t.phases.read_window(cfg.log_every if state.step % cfg.log_every == 0 else 1)}
        state.data_wait_seconds += t.last["data_wait_s"]
        outputs.log(t, t.last)
    if t.val_ds is not None and cfg.eval_every and state.step % cfg.eval_every == 0 and state.step < cfg.max_steps:
        started = time.perf_counter()
        check_skipped_steps(t)
        outputs.evaluate(t)
        t.train_mode()
        busy += time.perf_counter() - started
    # Every rank takes the same decision at the same step, whichever rank the signal or the clock reached.
    stop, clock_due = t.control.agree(t.signals.received, t.clock.due())
    done = state.step >= cfg.max_steps
    if not done and (clock_due or stop or (cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0)):
        started = time.perf_counter()
        checkpoint(t)
        busy += time.perf_counter() - started
    if stop and not done:
        _preempted(t, stop)
    return busy


def checkpoint(t) -> None:
    check_skipped_steps(t)
    t.clock.reset()
    t.checkpointer.save(t.state.step, t.stateful_parts(), t.checkpoint_meta())


def _preempted(t, signum: int) -> None:
    """The checkpoint of this step is on disk: record the stop and leave with exit status 75 (see preempt)."""
    where = checkpoint_dir(t.out, t.state.step)
    outputs.record_status(t, "preempted", checkpoint=str(where))
    t.accelerator.wait_for_everyone()
    t.accelerator.end_training()
    raise Preempted(t.state.step, str(where), signum)


class _SkipCount:
    """Bad samples skipped per epoch on this rank, reported at each epoch's end: bad data is never silent."""

    def __init__(self, t):
        self.rank, self.epoch, self.count = t.accelerator.process_index, None, 0

    def add(self, batch: dict) -> None:
        if batch["epoch"] != self.epoch:
            self.report()
            self.epoch, self.count = batch["epoch"], 0
        self.count += batch["skipped"]

    def report(self) -> None:
        if self.count:  # each rank reports its own share
            warn(f"rank {self.rank}, epoch {self.epoch}: {self.count} bad sample(s) skipped; their batch slots were "
                 "refilled from other samples (see the warnings above)")
            self.count = 0


def resumed_line(t, path) -> None:
    info(f"resumed from {path} at step {t.state.step} ({t.data.describe_position()})")
