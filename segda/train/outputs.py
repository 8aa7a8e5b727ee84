"""What a run writes besides checkpoints: RUN_DIR/metrics.jsonl (one line per log step and evaluation),
RUN_DIR/samples/rank-R.jsonl (train.log_samples), RUN_DIR/run.json (status and summary), and at the end
RUN_DIR/model (pretrain, save_pretrained safetensors) or RUN_DIR/adapter (adapt, the adapter only).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from segda import adapters, atomic
from segda.evaluate import evaluate_model
from segda.log import info
from segda.model import count_parameters, save_model
from segda.runinfo import run_info
from segda.train.step import check_skipped_steps


def start(t) -> None:
    """Before the first step: the run's folder, its files cut back to the resumed step, run.json "running"."""
    acc, cfg = t.accelerator, t.cfg
    if acc.is_main_process:
        t.out.mkdir(parents=True, exist_ok=True)
        _truncate_after(t.out / "metrics.jsonl", t.state.step)  # a killed run's lines past its checkpoint
        if cfg.train.log_samples:
            (t.out / "samples").mkdir(exist_ok=True)
            for log_file in (t.out / "samples").glob("rank-*.jsonl"):  # every old rank's, whatever the world now
                _truncate_after(log_file, t.state.step)
        atomic.write_json(t.out / "run.json", summary(t, status="running"))
    if acc.log_with:
        acc.init_trackers(f"segda-{t.stage}", config=_flat(cfg.to_dict()))


def log(t, record: dict) -> None:
    if t.accelerator.log_with:
        t.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
    if t.accelerator.is_main_process:
        with open(t.out / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")


def log_samples(t, batch: dict) -> None:
    """train.log_samples: this rank's keys of each micro-batch, under the optimizer step they count towards."""
    if t.cfg.train.log_samples:
        with open(t.out / "samples" / f"rank-{t.accelerator.process_index}.jsonl", "a") as fh:
            fh.write(json.dumps({"step": t.state.step + 1, "epoch": batch["epoch"], "keys": batch["key"]}) + "\n")


def evaluate(t) -> dict:
    with t.method.kept_weights(t.module):  # self-training: the weights it will save
        result = evaluate_model(t.module, t.val_ds, t.cfg.data, t.accelerator, limit=t.cfg.train.eval_max_samples)
    step, best = t.state.step, t.state.best
    metrics = {"step": step, "val_miou": result["miou"], "val_pixel_accuracy": result["pixel_accuracy"]}
    if result["miou"] >= best.get("val_miou", -1.0):
        t.state.best = best = metrics
    log(t, metrics)
    info(f"step {step}: val mIoU {100 * result['miou']:.1f} (best {100 * best['val_miou']:.1f} at step "
         f"{best['step']})")
    return metrics


def finish(t, wall: float) -> dict:
    """After the last step: the final evaluation, the saved model or adapter(s), run.json "done"."""
    acc = t.accelerator
    check_skipped_steps(t)
    final = evaluate(t) if t.val_ds is not None else {}
    acc.wait_for_everyone()
    model = t.module
    t.replicas_identical = _replicas_identical(t)
    if t.deepspeed:  # bf16/fp16 cast the module: save ZeRO's fp32 master weights, like every other run's fp32
        _take_fp32_master_weights(model)
    if acc.is_main_process:
        if t.stage == "pretrain":
            save_model(model, t.out / "model")
        else:  # self-training also saves the adapter it does not keep (adapter-student or adapter-teacher)
            for name, weights in t.method.saved_adapters(model):
                with weights:
                    adapters.save_adapter(model, t.out / name, config=t.cfg.to_dict(),
                                          base=_base_reference(t.cfg.model.name_or_path),
                                          base_fingerprint=t.base_fingerprint,
                                          metrics=final if name == "adapter" else {})
    result = summary(t, status="done", wall=wall, final=final)
    if acc.is_main_process:
        atomic.write_json(t.out / "run.json", result)
        where = t.out / ("model" if t.stage == "pretrain" else "adapter")
        info(f"{t.stage} done: {t.state.step} steps, {result['throughput_img_per_s']:.1f} img/s; saved {where}")
    acc.wait_for_everyone()
    acc.end_training()
    return result


def record_status(t, status: str, **extra) -> None:
    """run.json says how the run ended (preempted, failed) even when it did not finish."""
    if t.accelerator.is_main_process:
        atomic.write_json(t.out / "run.json", {**summary(t, status=status), **extra})


def summary(t, status: str, wall: float = 0.0, final: dict | None = None) -> dict:
    acc, state = t.accelerator, t.state
    return {
        "status": status, "stage": t.stage, "step": state.step, "config": t.cfg.to_dict(),
        "world_size": acc.num_processes, "mixed_precision": acc.mixed_precision,
        "distributed_type": str(acc.distributed_type), "device": str(acc.device),
        "trainable_parameters": count_parameters(t.module, trainable_only=True),
        "total_parameters": count_parameters(t.module), "train_samples_per_epoch": t.data.num_samples,
        "throughput_img_per_s": state.images / max(state.train_seconds, 1e-9), "wall_seconds": wall,
        "train_seconds": state.train_seconds, "nonfinite_steps_skipped": state.nonfinite_skipped,
        "data_wait_seconds": state.data_wait_seconds,
        "data_wait_share": state.data_wait_seconds / max(state.train_seconds, 1e-9),
        "best": state.best, "final": final or {}, "images_seen": state.images,
        "replicas_identical": getattr(t, "replicas_identical", None), **run_info(),
    }


def _replicas_identical(t) -> bool:
    """DDP must keep every rank's weights equal: compare a checksum of the trainable tensors across ranks."""
    acc = t.accelerator
    if acc.num_processes == 1:
        return True
    tensors = [p for p in t.module.parameters() if p.requires_grad] + list(t.method.state_dict().values())
    with torch.no_grad():  # the student and the method's state (self-training's teacher) alike
        local = torch.stack([x.detach().double().sum().to(acc.device) for x in tensors if torch.is_tensor(x)]).sum()
    sums = acc.gather(local.reshape(1).to(acc.device))
    return bool((sums == sums[0]).all())


def _take_fp32_master_weights(model) -> None:
    """Call on every rank: ZeRO keeps the fp32 master copy sharded, and assembling it is a collective."""
    from deepspeed.utils import safe_get_full_fp32_param

    masters = [(p, safe_get_full_fp32_param(p)) for p in model.parameters() if p.requires_grad]
    model.float()
    with torch.no_grad():
        for param, master in masters:
            if master is not None:
                param.copy_(master.reshape(param.shape))


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
