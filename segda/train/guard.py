"""Keep a non-finite gradient out of the weights without asking the device at every step.

The verdict is the global gradient norm, taken on the device after DDP's all-reduce, so every rank reaches the
same one (a NaN on one rank is a NaN in everyone's reduced gradient). The fused AdamW kernel takes it as
`found_inf` (the mechanism torch's GradScaler uses) and, when it is 1, leaves the weights, both moments and the
step count untouched. The host reads how many steps were skipped only when it logs or checkpoints: one sync per
`train.log_every` steps instead of one per micro-batch.

Not used where another component owns the step: fp16 (Accelerate's gradient scaler skips overflowing steps) and
DeepSpeed (its engine runs the optimizer; the loop checks the loss on the host there).
"""

from __future__ import annotations

import torch


class NonFiniteGuard:
    def __init__(self, optimizer, device, model=None):
        self.inner = getattr(optimizer, "optimizer", optimizer)  # under Accelerate: its AcceleratedOptimizer
        if not self.inner.defaults.get("fused"):
            raise ValueError("the non-finite guard needs a fused optimizer: only its kernel takes found_inf")
        self.skipped = torch.zeros((), device=device)
        self._reported = 0
        # BatchNorm running statistics change in the forward pass, before any verdict: they are kept as they
        # were at the start of the optimizer step and put back (on the device) when the step is skipped.
        self.buffers = [b for m in (model.modules() if model is not None else ())
                        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                        for b in m.buffers() if b.is_floating_point()]
        self._saved: list[torch.Tensor] = []

    def start_step(self) -> None:
        """Call once before training (after a resume has loaded the statistics); `arm` keeps it up to date."""
        self._saved = [b.detach().clone() for b in self.buffers]

    def arm(self, parameters, grad_norm: torch.Tensor | None = None) -> None:
        """Before the optimizer step: skip it (on the device) if any gradient is NaN or infinite."""
        if grad_norm is None:  # no clipping computed it: one fused pass over the gradients
            grads = [p.grad for p in parameters if p.grad is not None]
            grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads else \
                torch.zeros((), device=self.skipped.device)
        found = (~torch.isfinite(grad_norm)).to(torch.float32).reshape(())
        self.inner.found_inf = found
        self.skipped += found
        with torch.no_grad():
            for buffer, saved in zip(self.buffers, self._saved):
                buffer.copy_(torch.where(found.bool(), saved, buffer))
                saved.copy_(buffer)  # what the next optimizer step starts from

    def disarm(self) -> None:
        self.inner.__dict__.pop("found_inf", None)

    def new_skips(self) -> int:
        """Steps skipped since the last call (synchronises with the device: call at log or checkpoint time)."""
        total = int(self.skipped.item())
        new, self._reported = total - self._reported, total
        return new
