"""The random number generators of one rank as a stateful part of the checkpoint (dropout, drop-path, and any
torch draw outside the data pipeline, whose augmentation is seeded per sample instead)."""

from __future__ import annotations

import torch


class RNGState:
    """torch's CPU (and CUDA) generator of this rank. A rank that did not exist when a checkpoint was written
    (an elastic resume onto more processes) starts a fresh stream of its own."""

    def __init__(self, rank: int, seed: int):
        self.rank, self.seed = rank, seed

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            out["cuda"] = torch.cuda.get_rng_state()
        return out

    def load_state_dict(self, state: dict) -> None:
        if "fresh_at_step" in state:
            torch.manual_seed(self.seed * 1000 + self.rank + 7919 * int(state["fresh_at_step"]))
            return
        torch.set_rng_state(state["cpu"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])


def pack(state: dict[str, torch.Tensor]) -> torch.Tensor:
    """One rank's RNG states as one uint8 tensor (CPU state, then CUDA's if any): every rank's has one size."""
    return torch.cat([t.view(torch.uint8).flatten() for t in state.values()])


def unpack(packed: torch.Tensor) -> dict[str, torch.Tensor]:
    cpu_size = torch.get_rng_state().numel()
    out = {"cpu": packed[:cpu_size].clone()}
    if packed.numel() > cpu_size:
        out["cuda"] = packed[cpu_size:].clone()
    return out
