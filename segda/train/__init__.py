"""One training loop for both stages: `pretrain` trains the whole SegFormer, `adapt` trains a LoRA adapter.

    accelerate launch --config_file launch/accelerate/cpu_ddp.yaml -m segda pretrain configs/demo/pretrain.yaml

    setup.py          the Accelerator, model, optimizer, method, data, checkpointer: a `Trainer` of stateful parts
    loop.py           the loop: batch -> method's host work -> step -> log / evaluate / checkpoint / stop
    step.py           one micro-batch: loss, backward, clipping, optimizer, the non-finite guard
    checkpointer.py   saves and restores every stateful part (safetensors + JSON, or DeepSpeed's own format)
    state.py          the loop's counters (checkpointed), one metrics line, the host time of each phase
    optim.py          the optimizer recipe; outputs.py what a run writes (segda/resume.py: what a resume may change)
    guard.py, preempt.py, rng.py   non-finite steps, clean stops on SIGTERM/SIGUSR1, each rank's RNG

Outputs: RUN_DIR/model (pretrain) or RUN_DIR/adapter (adapt, adapter only), RUN_DIR/run.json,
RUN_DIR/metrics.jsonl, RUN_DIR/checkpoints/.
"""

from __future__ import annotations

import os
from pathlib import Path

from segda import resume as resume_policy
from segda import rundir
from segda.config import Config
from segda.log import SegdaError, info
from segda.train import outputs, setup
from segda.train.loop import resumed_line, train_loop
from segda.train.preempt import Preempted, StopSignals
from segda.train.setup import STAGES
from segda.train.state import PhaseClock

__all__ = ["train", "STAGES"]


def train(stage: str, cfg: Config, out_dir: str | Path, resume: str | None = None, *, overwrite: bool = False,
          phases: PhaseClock | None = None) -> dict:
    """Run one stage; return the summary that also goes to RUN_DIR/run.json. The run folder is this run's alone
    (segda.rundir): `resume` continues the run in it, `overwrite` moves an earlier one aside. `phases`: a
    PhaseClock that keeps every step's host time by phase (segda bench loop)."""
    out = Path(out_dir)
    rundir.check_flags(resume, overwrite)
    finished = _finished_run(out, stage, cfg) if resume == "auto" else None
    if finished is not None:
        info(f"{out} holds a finished {stage} run ({finished.get('step')} steps): nothing to resume")
        return finished
    # From the first moment: a SIGTERM during start-up is answered at the first step, not by dying.
    signals = StopSignals()
    owner = rundir.claim(out, command=stage, resume=resume, overwrite=overwrite,
                         is_main=int(os.environ.get("RANK", "0")) == 0)
    try:
        trainer, found, saved = setup.build(stage, cfg, out, resume, signals, phases)
        setup.restore(trainer, found, saved)
        if found is not None:
            resumed_line(trainer, found)
        try:
            return train_loop(trainer)
        except Preempted:
            raise
        except BaseException as err:  # run.json must not say "running" after the run died
            if (trainer.out / "run.json").is_file():
                try:
                    message = str(err).rsplit("SegdaError: ", 1)[-1].strip()
                    outputs.record_status(trainer, "failed", error=f"{type(err).__name__}: {message}")
                except Exception:  # recording the failure must not hide it (a full disk fails here too)
                    pass
            raise
    finally:
        signals.restore()
        if owner is not None:
            owner.release()


def _finished_run(out: Path, stage: str, cfg: Config) -> dict | None:
    """For `--resume auto`: run.json of a finished run (status done) that already reached the asked
    train.max_steps, so there is nothing to do; a changed data-order or model key is refused even then, naming it.
    A finished run asked for more steps returns None: the resume path continues it from its newest checkpoint
    (retraining the steps after it: the last step writes the model, not a checkpoint). A finished run is never
    started over: another stage, or more steps with no checkpoint, is refused. Every rank decides from the same
    run.json, so on a shared filesystem all ranks agree; nodes that do not share --out must hold the same run."""
    summary = rundir.run_summary(out)
    if summary is None or summary.get("status") != "done":
        return None
    done = f"{out} holds a finished {summary.get('stage')} run ({summary.get('step')} steps)"
    if summary.get("stage") != stage:
        raise SegdaError(f"{done}: resume it with `segda {summary.get('stage')}`, or write this {stage} run "
                         "elsewhere with another --out")
    resume_policy.refuse_changed_keys(summary, cfg, stage, out / "run.json")
    if cfg.train.max_steps <= int(summary.get("step") or 0):
        return summary
    if not rundir.list_checkpoints(out):
        raise SegdaError(f"{done} and no checkpoint to continue it to train.max_steps={cfg.train.max_steps} "
                         "from: write the longer run elsewhere with another --out, or move this one aside with "
                         "--overwrite")
    return None


