"""What the loop hands a training method at each step."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class StepContext:
    """What a method needs from the loop: the device, the model as a plain module, and how to feed it pixels."""

    device: torch.device
    module: torch.nn.Module
    """The unwrapped model (no DDP hooks): the teacher runs through it."""
    pixels: callable
    """uint8 images (B, H, W, 3) -> normalised pixels in the model's dtype and layout, on the device."""
    autocast: callable
    """A context manager: the launch config's mixed precision (the teacher's forward runs under it)."""
    rank: int
    seed: int
    step: int
    """Optimizer steps done so far."""
