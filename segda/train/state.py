"""What a run counts as it trains: `TrainState` (checkpointed), `Window` (one metrics line) and `PhaseClock` (where
each step's host time goes: waiting for data, the method's host work, launching the step, logging).

The loss stays on the device until a log line needs it: no host-device sync per micro-batch.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch

PHASES = ("data_wait", "host", "step", "log")
"""Host time of one optimizer step, in order: blocked on the loader; the method's host work before the model
runs (copies to the device, masks); forward, backward and optimizer (launches on a GPU); logging, agreement between
ranks, checkpoints and evaluation."""


@dataclass
class TrainState:
    """The loop's own counters; they travel in every checkpoint's state.json."""

    step: int = 0
    """Optimizer steps done."""
    best: dict = field(default_factory=dict)
    """The best in-run evaluation so far ({step, val_miou, val_pixel_accuracy})."""
    images: int = 0
    """Crops trained on over all ranks (self-training: source crops)."""
    train_seconds: float = 0.0
    data_wait_seconds: float = 0.0
    nonfinite_skipped: int = 0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        fresh = TrainState()
        for name in asdict(fresh):  # a counter newer than the checkpoint starts from zero
            setattr(self, name, state.get(name, getattr(fresh, name)))


class PhaseClock:
    """Host milliseconds per phase (PHASES) of each optimizer step. `phase(name)` times a block; `end_step()`
    closes the step. Sums per metrics line always; every step's figures when `keep_steps` (benchmarks)."""

    def __init__(self, keep_steps: bool = False):
        self.keep_steps = keep_steps
        self.steps: list[dict[str, float]] = []
        self.current = dict.fromkeys(PHASES, 0.0)
        self.window = dict.fromkeys(PHASES, 0.0)

    @contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.current[name] += time.perf_counter() - start

    def end_step(self) -> None:
        for name, seconds in self.current.items():
            self.window[name] += seconds
        if self.keep_steps:
            self.steps.append({f"{name}_ms": 1000 * s for name, s in self.current.items()})
        self.current = dict.fromkeys(PHASES, 0.0)

    def read_window(self, steps: int) -> dict[str, float]:
        """Mean host ms per step of each phase since the last call."""
        out = {f"{name}_ms": 1000 * s / max(steps, 1) for name, s in self.window.items()}
        self.window = dict.fromkeys(PHASES, 0.0)
        return out


class Window:
    """What one metrics line reports: the mean loss over its micro-batches (summed on the device), the share of
    its wall time spent blocked on the loader, and the host time of each phase per step."""

    def __init__(self, device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.loss, self.count, self.steps = torch.zeros((), device=self.device), 0, 0
        self.data_wait = 0.0
        self.started = time.perf_counter()

    def add(self, loss: torch.Tensor) -> None:
        self.loss += loss.float()
        self.count += 1

    def read(self, accelerator, method_metrics: dict | None = None) -> dict:
        """Call on every rank (it gathers): the loss averaged over ranks and micro-batches; the data wait of the
        rank that waited longest (under DDP every rank then waits for it in the all-reduce), as seconds and as a
        share of the line's whole wall time (logging, checkpoints and evaluation included); the method's own
        device scalars (`method.log_metrics()`, the same names on every rank), averaged over ranks."""
        seconds = time.perf_counter() - self.started
        extra = method_metrics or {}
        local = torch.stack([self.loss / max(self.count, 1), torch.tensor(self.data_wait, device=self.device),
                             *(v.detach().to(self.device, torch.float32) for v in extra.values())])
        rows = accelerator.gather(local[None].double()).reshape(-1, 2 + len(extra))
        *means, wait = torch.cat([rows.mean(0), rows[:, 1].max()[None]]).tolist()  # one read of the device
        loss = means[0]
        out = {"loss": loss, "data_wait_s": wait, "data_wait_share": min(wait / max(seconds, 1e-9), 1.0)}
        out.update({name: means[2 + i] for i, name in enumerate(extra)})
        self.reset()
        return out
