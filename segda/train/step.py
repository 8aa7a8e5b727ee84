"""One micro-batch through the model: the method's loss, backward, clipping, the optimizer step and the
non-finite guard. Nothing here waits for the device (the DeepSpeed path excepted): the loss and the finiteness
verdict stay on it until a log line, an evaluation or a checkpoint reads them.
"""

from __future__ import annotations

import torch

from segda.log import SegdaError, warn
from segda.methods.context import StepContext


def context(t) -> StepContext:
    acc = t.accelerator
    return StepContext(acc.device, t.module, t.pixels, acc.autocast, acc.process_index, t.cfg.train.seed,
                       t.state.step)


def micro_step(t, inputs) -> bool:
    """Forward/backward one micro-batch of prepared `inputs`; True when it completed an optimizer step."""
    acc, cfg = t.accelerator, t.cfg
    with acc.accumulate(t.model):
        loss = t.method.loss(inputs, t.forward, context(t))
        if t.deepspeed and acc.mixed_precision != "fp16":
            # its engine owns the optimizer step: check on the host before backward (under fp16, DeepSpeed's own
            # loss scaler skips overflowing steps and lowers its scale, as Accelerate's does)
            _check_loss_now(t, loss)
        acc.backward(loss)
        grad_norm = None
        if acc.sync_gradients and cfg.optim.clip_grad_norm and not t.deepspeed:
            grad_norm = acc.clip_grad_norm_(t.model.parameters(), cfg.optim.clip_grad_norm)
        if acc.sync_gradients and t.guard is not None:
            t.guard.arm(t.model.parameters(), grad_norm)
        t.optimizer.step()
        if t.guard is not None:
            t.guard.disarm()
        elif acc.sync_gradients and acc.scaler is not None and t.optimizer.step_was_skipped:
            t.state.nonfinite_skipped += 1  # fp16: the scaler found an overflow, skipped and lowered its scale
            warn(f"fp16 overflow at step {t.state.step + 1}: the gradient scaler skipped the update and lowered its "
                 "scale")
        t.optimizer.zero_grad(set_to_none=True)
    t.state.images += t.method.crops(inputs) * acc.num_processes
    t.window.add(loss.detach())
    if not acc.sync_gradients:
        return False
    t.scheduler.step()
    t.state.step += 1
    t.method.after_step(t.state.step)
    return True


def _check_loss_now(t, loss) -> None:
    losses = t.accelerator.gather(loss.detach()[None])
    if not bool(torch.isfinite(losses).all()):
        stop_nonfinite(t, f"non-finite loss {losses.tolist()} at step {t.state.step + 1}")


def check_skipped_steps(t) -> None:
    """Syncs with the device: call where the loop syncs anyway (log lines, evaluations, checkpoints, the end)."""
    if t.guard is not None and (new := t.guard.new_skips()):
        stop_nonfinite(t, f"non-finite loss: {new} optimizer step(s) up to step {t.state.step} had NaN or infinite "
                          "gradients and were skipped on the device (the weights never saw them)")


def stop_nonfinite(t, what: str) -> None:
    raise SegdaError(f"{what}: stopping. Lower optim.lr, check the data, or resume from the last checkpoint "
                     f"({t.out / 'checkpoints'}) with --resume auto")
