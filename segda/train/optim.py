"""The optimizer recipe of both stages (SegFormer's): AdamW with the head at a higher learning rate, no weight
decay on norms, biases and position embeddings, linear warmup then polynomial decay to zero at max_steps.

    optimizer, scheduler = build_optimizer(model, cfg, fused=True)
    apply_optim_config(optimizer, scheduler, model, cfg)   # after a resume: this run's optim.* take effect
"""

from __future__ import annotations

import torch


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


def build_optimizer(model, cfg, *, fused: bool):
    """(AdamW, its LambdaLR schedule) for the trainable parameters of `model`. `fused`: one kernel per step, and
    the only AdamW that can skip a step on the device (segda.train.guard)."""
    optimizer = torch.optim.AdamW(param_groups(model, cfg.optim), betas=tuple(cfg.optim.betas), fused=fused)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(
        s, cfg.optim.warmup_steps, cfg.train.max_steps, cfg.optim.poly_power))
    return optimizer, scheduler


def apply_optim_config(optimizer, scheduler, model, cfg) -> None:
    """optim.* of this run's config, over what a checkpoint restored: learning rates, weight decay and betas of
    each group, and the schedule (its lambda reads cfg) from the restored step on."""
    fresh = param_groups(model, cfg.optim)
    for group, new in zip(optimizer.param_groups, fresh):
        group["initial_lr"], group["weight_decay"], group["betas"] = new["lr"], new["weight_decay"], tuple(
            cfg.optim.betas)
    scheduler.base_lrs = [g["lr"] for g in fresh]
    factor = lr_factor(scheduler.last_epoch, cfg.optim.warmup_steps, cfg.train.max_steps, cfg.optim.poly_power)
    for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
        group["lr"] = base * factor
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
