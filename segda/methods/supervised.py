"""Cross-entropy on labelled batches of `data.train`: pretraining, and adaptation with target labels."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch

from segda.data.stream import TrainingData
from segda.methods.context import StepContext
from segda.model import segmentation_loss


class Supervised:
    """No state of its own: its checkpoint part is empty."""

    name = "supervised"

    def __init__(self, train_ds, cfg):
        self.train_ds, self.cfg = train_ds, cfg

    def bind(self, module) -> None:
        pass

    def data(self, *, rank: int, world: int, pin_memory: bool) -> TrainingData:
        return TrainingData(self.train_ds, self.cfg.data, rank=rank, world=world, seed=self.cfg.train.seed,
                            pin_memory=pin_memory)

    def to_device(self, batch: dict, ctx: StepContext) -> dict:
        """Copies only: normalising the pixels is device work and belongs to the step (see `loss`)."""
        return {"images": batch["image"].to(ctx.device, non_blocking=True),
                "labels": batch["label"].to(ctx.device, non_blocking=True), "crops": len(batch["key"])}

    def loss(self, inputs: dict, student, ctx: StepContext) -> torch.Tensor:
        return segmentation_loss(student(pixel_values=ctx.pixels(inputs["images"])).logits, inputs["labels"])

    def crops(self, inputs: dict) -> int:
        return inputs["crops"]

    def log_metrics(self) -> dict:
        return {}  # the loss says it all

    def after_step(self, step: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    @contextmanager
    def kept_weights(self, module):
        """The weights a run evaluates and saves: the student's, as trained."""
        yield

    def saved_adapters(self, module) -> list[tuple[str, object]]:
        """(folder under RUN_DIR, the weights it holds as a context manager) of each adapter the run writes."""
        return [("adapter", nullcontext())]
