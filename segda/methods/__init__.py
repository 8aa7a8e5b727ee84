"""Training methods: a method is what the one training loop streams, the loss of a batch, and the state it
checkpoints (torchtitan's "stateful parts"); the loop does the rest (steps, logging, checkpoints, stops).

    method = build_method(stage, cfg, train_ds, target_ds)
    method.bind(module)                                   # the plain model it trains (teacher swaps, shapes)
    data = method.data(rank=r, world=w, pin_memory=p)     # its batches: a stateful part (the data position)
    for batch in data:
        inputs = method.to_device(batch, ctx)             # the host's part of the step: copies to the device
        loss = method.loss(inputs, student, ctx)          # device work (normalising, masks, forwards), inside the
                                                          # loop's accumulate / backward / step
        method.after_step(step)                           # once per optimizer step
    method.log_metrics()                                  # its own device scalars for each metrics line
    method.state_dict() / method.load_state_dict(...)     # travels in every checkpoint

`Supervised` (supervised.py) is the labelled batch's cross-entropy (pretrain, and adapt with target labels).
`SelfTraining` (selftrain.py) adapts without target labels (DACS / DAFormer, pieces in dacs.py): an EMA teacher of
the adapter labels target frames, ClassMix pastes half of a source frame's classes into them, and the student
learns from the source frame and the mixed one.
"""

from __future__ import annotations

from segda.methods.context import StepContext
from segda.methods.selftrain import SelfTraining
from segda.methods.supervised import Supervised

__all__ = ["StepContext", "SelfTraining", "Supervised", "build_method"]


def build_method(stage: str, cfg, train_ds, target_ds=None):
    if stage == "adapt" and cfg.adapt.method == "selftrain":
        return SelfTraining(train_ds, target_ds, cfg)
    return Supervised(train_ds, cfg)
