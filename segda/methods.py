"""Training methods: what the one training loop streams, the loss of a batch, and the state a method checkpoints.

    method = build_method(stage, cfg, train_ds, target_ds)
    for batch in method.batches(rank=r, world=w, position=p): ...
        loss = method.loss(batch, student, context)    # inside the loop's accumulate / backward / step
        method.after_step(step)                         # once per optimizer step
    method.state_dict() / method.load_state_dict(...)  # travels in every checkpoint

`Supervised` is the labelled batch's cross-entropy (pretrain, and adapt with target labels). `SelfTraining` adapts
without target labels (DACS / DAFormer): an EMA teacher of the adapter labels target frames, ClassMix pastes half
of a source frame's classes into them, and the student learns from the source frame and the mixed one.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from segda import selftrain
from segda.classes import IGNORE
from segda.data.stream import START, paired_batches, require_sample_by_sample, training_batches
from segda.model import segmentation_loss


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


class Supervised:
    """Cross-entropy on labelled batches of `data.train`; no state of its own."""

    name = "supervised"

    def __init__(self, train_ds, cfg):
        self.train_ds, self.cfg = train_ds, cfg

    def start_position(self) -> dict:
        return dict(START)

    def batches(self, *, rank: int, world: int, position: dict, pin_memory: bool):
        return training_batches(self.train_ds, self.cfg.data, rank=rank, world=world, seed=self.cfg.train.seed,
                                position=position, pin_memory=pin_memory)

    def loss(self, batch: dict, student, ctx: StepContext) -> torch.Tensor:
        logits = student(ctx.pixels(batch["image"]))
        return segmentation_loss(logits, batch["label"].to(ctx.device, non_blocking=True))

    def after_step(self, module, step: int) -> None:
        pass

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], module) -> None:
        pass

    @contextmanager
    def kept_weights(self, module):
        """The weights a run evaluates and saves: the student's, as trained."""
        yield

    def saved_adapters(self, module) -> list[tuple[str, object]]:
        """(folder under RUN_DIR, the weights it holds as a context manager) of each adapter the run writes."""
        return [("adapter", nullcontext())]


class SelfTraining:
    """LoRA self-training without target labels (DACS / DAFormer), for `segda adapt` with adapt.method=selftrain.

    Teacher: the same base with an exponential moving average of the adapter's trainable tensors; no second
    model. Its values are swapped into the module for the
    teacher's forward and swapped back, which costs two copies of the adapter (~150k numbers) per step.
    Each step the teacher labels the B target crops (a forward without gradients), then the student sees one batch
    of 2B frames: B labelled source crops (cross-entropy) and the B target crops with half of a source crop's
    classes pasted in (ClassMix), strongly jittered and blurred, learnt from the mixed labels weighted by the
    teacher's per-image confidence: one forward and one backward.
    """

    name = "selftrain"

    def __init__(self, source_ds, target_ds, cfg):
        self.source_ds, self.target_ds, self.cfg = source_ds, target_ds, cfg
        a = cfg.adapt
        self.alpha, self.threshold = a.ema_alpha, a.pseudo_threshold
        self.source_order = None
        if a.rare_class_temperature > 0:
            require_sample_by_sample(source_ds, cfg.data)  # at start, not at the first batch
            self.source_order = selftrain.rare_class_order(source_ds, a.rare_class_temperature)
        self.teacher: list[torch.Tensor] | None = None
        self.micro = 0  # micro-batches since the last optimizer step: seeds ClassMix under grad_accum

    def start_position(self) -> dict:
        return {"source": dict(START), "target": dict(START)}

    def batches(self, *, rank: int, world: int, position: dict, pin_memory: bool):
        # The target's labels, if its shards have any, must not even steer its crops (cat_max_ratio retries).
        target_cfg = dataclasses.replace(self.cfg.data, cat_max_ratio=1.0)
        if target_cfg.target_base_size:
            target_cfg = dataclasses.replace(target_cfg, base_size=target_cfg.target_base_size)
        return paired_batches(self.source_ds, self.target_ds, self.cfg.data, target_cfg, rank=rank, world=world,
                              seed=self.cfg.train.seed, position=position, pin_memory=pin_memory,
                              source_order_of=self.source_order)

    # ---- the teacher ---------------------------------------------------------------------------------------
    def _live(self, module) -> list[torch.Tensor]:
        """adapter_tensors(module), found once: the step swaps and averages them twice per step."""
        if getattr(self, "_live_of", (None,))[0] is not module:
            self._live_of = (module, self.adapter_tensors(module))
        return self._live_of[1]

    @staticmethod
    def adapter_tensors(module) -> list[torch.Tensor]:
        """The tensors the teacher averages: every trainable parameter, in the module's order (the same on every
        rank). Not the running statistics of the norms the adapter trains: under DDP each rank updates its own
        from its own batch (DDP re-broadcasts rank 0's at each forward), so an average of them would differ
        between ranks. The teacher uses the student's current ones, as DAFormer's teacher does."""
        return [p for p in module.parameters() if p.requires_grad]

    def _ensure_teacher(self, module) -> list[torch.Tensor]:
        if self.teacher is None:  # step 0: the teacher is a copy of the student (the source model)
            self.teacher = [t.detach().float().clone() for t in self._live(module)]
        return self.teacher

    @contextmanager
    def teacher_weights(self, module):
        """The module with the teacher's values in place of the student's, in eval mode; restored on exit."""
        live = self._live(module)
        teacher = self._ensure_teacher(module)
        saved = [t.detach().clone() for t in live]
        modes = [m.training for m in module.modules()]
        with torch.no_grad():
            torch._foreach_copy_(live, [t.to(x.dtype) for t, x in zip(teacher, live)])
        module.eval()
        try:
            yield module
        finally:
            with torch.no_grad():
                torch._foreach_copy_(live, saved)
            for m, mode in zip(module.modules(), modes):
                m.training = mode

    def after_step(self, module, step: int) -> None:
        """After optimizer step `step` (1-based): teacher <- m * teacher + (1 - m) * student."""
        teacher = self._ensure_teacher(module)
        live = self._live(module)
        ema_update(teacher, live, selftrain.ema_momentum(step, self.alpha))
        self.micro = 0

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"teacher.{i}": t.detach().cpu() for i, t in enumerate(self.teacher or [])}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], module) -> None:
        expected = self.adapter_tensors(module)
        if len(tensors) != len(expected) or any(tuple(tensors.get(f"teacher.{i}", torch.empty(0)).shape) !=
                                                tuple(t.shape) for i, t in enumerate(expected)):
            raise ValueError(f"the checkpoint's teacher holds {len(tensors)} tensors, this adapter "
                             f"{len(expected)} of other shapes")
        self.teacher = [tensors[f"teacher.{i}"].to(expected[i].device).float() for i in range(len(expected))]

    @contextmanager
    def kept_weights(self, module):
        """adapt.save=teacher: the EMA teacher is what the run evaluates and saves (restored on exit); student: the
        student as trained."""
        if self.cfg.adapt.save != "teacher":
            yield
            return
        with self.teacher_weights(module):
            yield

    def saved_adapters(self, module) -> list[tuple[str, object]]:
        """RUN_DIR/adapter holds the kept weights (adapt.save), RUN_DIR/adapter-<other> the other ones."""
        if self.cfg.adapt.save == "teacher":
            return [("adapter-student", nullcontext()), ("adapter", self.teacher_weights(module))]
        return [("adapter-teacher", self.teacher_weights(module)), ("adapter", nullcontext())]

    # ---- the loss -------------------------------------------------------------------------------------------
    def loss(self, batch: dict, student, ctx: StepContext) -> torch.Tensor:
        source, target = batch["source"], batch["target"]
        generator = torch.Generator().manual_seed(int(np.random.default_rng(
            [ctx.seed, ctx.rank, ctx.step, self.micro, 0x5E1F]).integers(2 ** 62)))
        self.micro += 1
        # ClassMix masks from the CPU labels: `unique` on the host costs no device sync
        # Target crop i gets source crop i's classes; an epoch's last batch of one side may be shorter (cycle it)
        pair = [i % len(source["key"]) for i in range(len(target["key"]))]
        masks = torch.stack([selftrain.class_mix_mask(source["label"][i], generator) for i in pair])
        if ctx.device.type == "cuda":
            masks = masks.pin_memory()  # a pageable host copy would block the host until the device catches up
        source_pixels, target_pixels = ctx.pixels(source["image"]), ctx.pixels(target["image"])
        with torch.no_grad(), self.teacher_weights(ctx.module) as teacher, ctx.autocast():
            teacher_logits = teacher(pixel_values=target_pixels).logits
        teacher_logits = F.interpolate(teacher_logits.float(), size=target_pixels.shape[-2:], mode="bilinear",
                                       align_corners=False)
        pseudo, weight = selftrain.pseudo_labels(teacher_logits, self.threshold,
                                                 per_pixel=self.cfg.adapt.pseudo_weight == "pixel")
        source_labels = source["label"].to(ctx.device, non_blocking=True)
        # Source crop i takes the colours of target crop i (i mod the target's length when the source's batch is
        # longer), the crop it is mixed into; a longer target batch mixes source crop i mod B into its extra crops
        if self.cfg.adapt.colour_transfer:
            looks = target_pixels
            if len(target["key"]) != len(source["key"]):
                looks = target_pixels[torch.arange(len(source["key"]), device=ctx.device) % len(target["key"])]
            source_pixels = selftrain.match_colours(source_pixels, looks)
        pasted_pixels, pasted_labels = source_pixels, source_labels
        if pair != list(range(len(source["key"]))):  # an index made on the device: no blocking copy
            index = torch.arange(len(pair), device=ctx.device) % len(source["key"])
            pasted_pixels, pasted_labels = source_pixels[index], source_labels[index]
        mixed, mixed_labels, mixed_weight = selftrain.class_mix(
            masks.to(ctx.device, non_blocking=True), pasted_pixels, pasted_labels, target_pixels, pseudo, weight)
        mixed = selftrain.strong_photometric(mixed.float(), generator).to(source_pixels.dtype)
        logits = student(torch.cat([source_pixels, mixed]))
        b = source_pixels.shape[0]
        return segmentation_loss(logits[:b], source_labels) + weighted_loss(logits[b:], mixed_labels, mixed_weight)


def ema_update(teacher, student, momentum: float) -> None:
    """The EMA over tensors of any dtype: the student (bf16 under DeepSpeed) is averaged into fp32."""
    selftrain.ema_update(teacher, [s.detach().float() for s in student], momentum)


def weighted_loss(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each pixel times its weight, averaged over the non-IGNORE pixels (no sync)."""
    labels = labels.long()
    up = F.interpolate(logits.float(), size=labels.shape[-2:], mode="bilinear", align_corners=False)
    per_pixel = F.cross_entropy(up, labels, ignore_index=IGNORE, reduction="none")
    return (per_pixel * weight).sum() / (labels != IGNORE).sum().clamp(min=1)


def build_method(stage: str, cfg, train_ds, target_ds=None):
    if stage == "adapt" and cfg.adapt.method == "selftrain":
        return SelfTraining(train_ds, target_ds, cfg)
    return Supervised(train_ds, cfg)
