"""What the launch environment asks for, read before torch loads: a launch that cannot do what its config says is
refused in a fraction of a second, not after every rank has spent seconds importing torch and transformers."""

from __future__ import annotations

import os

from segda.log import SegdaError

DEEPSPEED_UNDER_CPU_FLAG = (
    "the launch config asks for DeepSpeed, but this run would be {where} (no ZeRO sharding) because "
    "ACCELERATE_USE_CPU=1 is set: unset ACCELERATE_USE_CPU (DeepSpeed finds its CPU accelerator by itself), or launch "
    "with a config that is not DeepSpeed (launch/accelerate/cpu_ddp.yaml)")


def flag(name: str) -> bool:
    """An environment switch as Accelerate reads it (its str_to_bool's true values)."""
    return os.environ.get(name, "").lower() in ("1", "true", "yes", "y", "on", "t")


def refuse_deepspeed_under_cpu_flag() -> None:
    """`accelerate launch` with a DeepSpeed config exports ACCELERATE_USE_DEEPSPEED; with ACCELERATE_USE_CPU=1 as
    well, Accelerate sets up plain CPU DDP without a word (no ZeRO sharding, no DeepSpeed checkpoints)."""
    if flag("ACCELERATE_USE_DEEPSPEED") and flag("ACCELERATE_USE_CPU"):
        raise SegdaError(DEEPSPEED_UNDER_CPU_FLAG.format(where="plain CPU processes (DDP)"))
