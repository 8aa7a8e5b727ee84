"""Stopping cleanly when the cluster asks: SIGTERM / SIGUSR1 -> finish the optimizer step -> one checkpoint -> exit 75.

SLURM sends SIGTERM before preempting or cancelling a job (and, with `--signal=USR1@SECONDS`, SIGUSR1 before its
time limit); `torchrun` (under `accelerate launch`) passes SIGTERM on to every rank. The signal may reach the ranks
at different moments, so a rank never acts alone: after every optimizer step all ranks agree on the flags
(`Control.agree`, a MAX all-reduce on a CPU-side gloo group, which never waits on the GPU) and then stop at the
same step, write one complete checkpoint and exit with `EXIT_PREEMPTED`. `launch/slurm/` requeues the job on that
status and continues it with `--resume auto`.

The same agreement carries the time-based checkpoint (`train.checkpoint_minutes`), so every rank saves together.
"""

from __future__ import annotations

import signal
import time

import torch
import torch.distributed as dist

EXIT_PREEMPTED = 75
"""EX_TEMPFAIL: the run stopped for the cluster's sake, complete and resumable; run it again with --resume auto."""
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """Raised after the preemption checkpoint is on disk; the CLI turns it into exit status 75."""

    def __init__(self, step: int, checkpoint: str, signum: int):
        self.step, self.checkpoint, self.signum = step, checkpoint, signum
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint {checkpoint}; "
                         "continue with --resume auto")


class StopSignals:
    """Remembers the first SIGTERM / SIGUSR1 instead of dying of it; `restore()` puts the old handlers back."""

    def __init__(self):
        self.received = 0
        self._previous = {}
        for signum in SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = self.received or signum

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


class Control:
    """Flags every rank must agree on, exchanged over a gloo group (CPU tensors: no device synchronisation)."""

    def __init__(self, world: int, rank: int = 0):
        self.world, self.rank = world, rank
        self._group = None
        if world > 1 and dist.is_available() and dist.is_initialized():
            gloo = dist.get_backend() == "gloo"
            self._group = dist.group.WORLD if gloo else dist.new_group(backend="gloo")

    def agree(self, *flags: int) -> list[int]:
        """The largest value of each flag over all ranks (a flag raised on any rank is raised on all)."""
        values = torch.tensor([int(f) for f in flags], dtype=torch.int64)
        if self._group is not None:
            dist.all_reduce(values, op=dist.ReduceOp.MAX, group=self._group)
        return values.tolist()

    def gather_bytes(self, data: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's uint8 tensor (equal sizes), in rank order: how per-rank RNG states reach the main process
        without any shared filesystem."""
        if self._group is None:
            return [data]
        out = [torch.empty_like(data) for _ in range(self.world)]
        dist.all_gather(out, data, group=self._group)
        return out


class CheckpointClock:
    """Time-based checkpoints: due every `minutes` of wall time since the last one (0: never)."""

    def __init__(self, minutes: float):
        self.seconds = minutes * 60
        self.last = time.monotonic()

    def due(self) -> bool:
        return bool(self.seconds) and time.monotonic() - self.last >= self.seconds

    def reset(self) -> None:
        self.last = time.monotonic()
