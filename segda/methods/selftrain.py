"""LoRA self-training without target labels (DACS / DAFormer), for `segda adapt` with adapt.method=selftrain.

Teacher: the same base with an exponential moving average of the adapter's trainable tensors; no second model.
Its values are swapped into the module for the teacher's forward and swapped back, which costs two copies of the
adapter (~150k numbers) per step. Each step the teacher labels the B target crops (a forward without gradients,
BatchNorm on the target batch's own statistics as DAFormer's teacher in train mode), then the student learns from
the B labelled source crops (cross-entropy) and, in a second forward, the B target crops with half of a source
crop's classes pasted in (ClassMix), jittered and blurred (DAFormer's strong augmentation), the pseudo-labels
weighted by the teacher's confidence over the batch, never on padding or the crop's top and bottom rows.
Each of these choices is an adapt.* key (segda.config.AdaptConfig), DAFormer's being the default.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager, nullcontext

import numpy as np
import torch

from segda.data.stream import PairedData, TrainingData
from segda.log import SegdaError
from segda.methods import dacs, photometric
from segda.methods.context import StepContext
from segda.model import segmentation_loss, upsample_logits


class SelfTraining:
    name = "selftrain"

    def __init__(self, source_ds, target_ds, cfg):
        self.source_ds, self.target_ds, self.cfg = source_ds, target_ds, cfg
        a = cfg.adapt
        self.alpha, self.threshold = a.ema_alpha, a.pseudo_threshold
        self.source_order = None
        if a.rare_class_temperature > 0:  # at start, not at the first batch
            self.source_order = dacs.rare_class_order(source_ds, a.rare_class_temperature)
        self.teacher: list[torch.Tensor] | None = None
        self.module = None
        self._layer_cache: tuple | None = None  # (module, its submodules, its BatchNorm layers): see _layers
        self.micro = 0  # micro-batches since the last optimizer step: seeds ClassMix under grad_accum
        self.confident, self.batches = None, 0  # the teacher's confident shares summed since the last metrics line

    def bind(self, module) -> None:
        self.module = module
        self.live = self.adapter_tensors(module)  # found once: the step swaps and averages them twice per step

    def data(self, *, rank: int, world: int, pin_memory: bool) -> PairedData:
        seed = self.cfg.train.seed
        # The target's labels, if its shards have any, must not even steer its crops (cat_max_ratio retries).
        target_cfg = dataclasses.replace(self.cfg.data, cat_max_ratio=1.0)
        if target_cfg.target_base_size:
            target_cfg = dataclasses.replace(target_cfg, base_size=target_cfg.target_base_size)
        source = TrainingData(self.source_ds, self.cfg.data, rank=rank, world=world, seed=seed,
                              pin_memory=pin_memory, order_of=self.source_order)
        target = TrainingData(self.target_ds, target_cfg, rank=rank, world=world, seed=seed + 7919,
                              pin_memory=pin_memory)
        return PairedData(source, target)

    # ---- the teacher ---------------------------------------------------------------------------------------
    @staticmethod
    def adapter_tensors(module) -> list[torch.Tensor]:
        """The tensors the teacher averages: every trainable parameter, in the module's order (the same on every
        rank). Not the running statistics of the norms the adapter trains: under DDP each rank updates its own
        from its own batch (DDP re-broadcasts rank 0's at each forward), so an average of them would differ
        between ranks. The teacher uses the student's current ones, as DAFormer's teacher does."""
        return [p for p in module.parameters() if p.requires_grad]

    def _ensure_teacher(self) -> list[torch.Tensor]:
        if self.teacher is None:  # step 0: the teacher is a copy of the student (the source model)
            self.teacher = [t.detach().float().clone() for t in self.live]
        return self.teacher

    @contextmanager
    def teacher_weights(self, module, norm_stats: str = "running"):
        """The module with the teacher's values in place of the student's, in eval mode (no dropout); restored on
        exit. norm_stats="batch": its BatchNorm layers normalise with the batch's own statistics, as in train mode,
        without updating the running ones (the student's)."""
        live = self.live
        teacher = self._ensure_teacher()
        saved = [t.detach().clone() for t in live]
        layers, norms = self._layers(module)
        modes = [m.training for m in layers]
        with torch.no_grad():
            torch._foreach_copy_(live, [t.to(x.dtype) for t, x in zip(teacher, live)])
        for m in layers:  # module.eval() without walking the tree, nor nn.Module.__setattr__'s checks per flag
            vars(m)["training"] = False
        norms = norms if norm_stats == "batch" else []
        stats = [(m.running_mean, m.running_var, m.num_batches_tracked) for m in norms]
        for m in norms:  # train mode without running statistics: normalise by the batch, update nothing
            m.train()
            m.running_mean = m.running_var = m.num_batches_tracked = None
        try:
            yield module
        finally:
            with torch.no_grad():
                torch._foreach_copy_(live, saved)
            for m, (running_mean, running_var, tracked) in zip(norms, stats):
                m.running_mean, m.running_var, m.num_batches_tracked = running_mean, running_var, tracked
            for m, mode in zip(layers, modes):
                vars(m)["training"] = mode

    def _layers(self, module) -> tuple[list[torch.nn.Module], list[torch.nn.Module]]:
        """The module's submodules and its BatchNorm layers, found once per module (its structure does not change
        during a run): the teacher swaps in every step, and walking the tree three times and setting each mode
        through nn.Module.__setattr__ took 5.3 ms per swap on a LoRA-wrapped SegFormer of 684 submodules, on the
        2-core CPU where the demo's whole self-training step takes ~150 ms; 0.66 ms now."""
        if self._layer_cache is None or self._layer_cache[0] is not module:
            layers = list(module.modules())
            norms = [m for m in layers if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
            self._layer_cache = (module, layers, norms)
        return self._layer_cache[1], self._layer_cache[2]

    def after_step(self, step: int) -> None:
        """After optimizer step `step` (1-based): teacher <- m * teacher + (1 - m) * student."""
        teacher = self._ensure_teacher()
        dacs.ema_update(teacher, [s.detach().float() for s in self.live], dacs.ema_momentum(step, self.alpha))
        self.micro = 0

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"teacher.{i}": t.detach().cpu() for i, t in enumerate(self.teacher or [])}

    def load_state_dict(self, tensors: dict) -> None:
        expected = self.live
        if not tensors:
            raise SegdaError("the checkpoint holds no state of the selftrain method (written by another method or an "
                             "older segda): resume with the adapt.method it was written with")
        if len(tensors) != len(expected) or any(tuple(tensors.get(f"teacher.{i}", torch.empty(0)).shape) !=
                                                tuple(t.shape) for i, t in enumerate(expected)):
            raise SegdaError(f"the checkpoint's teacher holds {len(tensors)} tensors, this adapter {len(expected)} of "
                             "other shapes; resume with the lora.* settings it was written with")
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

    # ---- the step ------------------------------------------------------------------------------------------
    def to_device(self, batch: dict, ctx: StepContext) -> dict:
        """The host's part of the step: copies to the device and the step's random generator; nothing else (the
        pixels are normalised in `loss`, on the device: on a CPU that work would otherwise count as host work)."""
        source, target = batch["source"], batch["target"]
        generator = torch.Generator().manual_seed(int(np.random.default_rng(
            [ctx.seed, ctx.rank, ctx.step, self.micro, 0x5E1F]).integers(2 ** 62)))
        self.micro += 1
        return {"source": source["image"].to(ctx.device, non_blocking=True),
                "target": target["image"].to(ctx.device, non_blocking=True),
                "labels": source["label"].to(ctx.device, non_blocking=True),
                "valid": target["valid"].to(ctx.device, non_blocking=True), "generator": generator,
                "crops": len(source["key"])}

    def crops(self, inputs: dict) -> int:
        return inputs["crops"]

    def loss(self, inputs: dict, student, ctx: StepContext) -> torch.Tensor:
        a = self.cfg.adapt
        source_pixels, target_pixels = ctx.pixels(inputs["source"]), ctx.pixels(inputs["target"])
        source_labels = inputs["labels"]
        b, n_target = source_pixels.shape[0], target_pixels.shape[0]
        generator = inputs["generator"]
        device_draws = generator
        if ctx.device.type != "cpu":  # per-crop draws on the device, seeded from the host's (no copy, no sync)
            device_draws = torch.Generator(device=ctx.device)
            device_draws.manual_seed(int(torch.randint(2 ** 62, (1,), generator=generator)))
        if a.colour_transfer:  # source crop i takes the colours of the target crop it is mixed into
            looks = target_pixels if n_target == b else target_pixels[torch.arange(b, device=ctx.device) % n_target]
            source_pixels = photometric.match_colours(source_pixels, looks)
        # target crop i is mixed with source crop i (i mod B: an epoch's last batch of one side may be shorter)
        pasted_pixels, pasted_labels = source_pixels, source_labels
        if n_target != b:  # an index made on the device: no blocking copy
            index = torch.arange(n_target, device=ctx.device) % b
            pasted_pixels, pasted_labels = source_pixels[index], source_labels[index]
        masks = dacs.class_mix_masks(pasted_labels, device_draws)
        pseudo, weight = self._pseudo_labels(target_pixels, inputs["valid"], ctx)
        mixed, mixed_labels, mixed_weight = dacs.class_mix(masks, pasted_pixels, pasted_labels, target_pixels,
                                                           pseudo, weight)
        mixed = photometric.strong_photometric(mixed, generator)
        if a.student_forward == "joint":
            logits = student(pixel_values=torch.cat([source_pixels, mixed])).logits
            source_logits, mixed_logits = logits[:b], logits[b:]
        else:
            source_logits = student(pixel_values=source_pixels).logits
            mixed_logits = student(pixel_values=mixed).logits
        return (segmentation_loss(source_logits, source_labels)
                + segmentation_loss(mixed_logits, mixed_labels, mixed_weight))

    def _pseudo_labels(self, target_pixels: torch.Tensor, valid: torch.Tensor, ctx: StepContext):
        """The teacher's labels of the target crops and their weights (pseudo_loss_weight 0: never asked)."""
        a = self.cfg.adapt
        height, width = target_pixels.shape[-2:]
        if a.pseudo_loss_weight == 0:
            zeros = torch.zeros(target_pixels.shape[0], height, width, device=ctx.device)
            return zeros.long(), zeros
        with torch.no_grad(), self.teacher_weights(ctx.module, a.teacher_norm_stats) as teacher, ctx.autocast():
            logits = teacher(pixel_values=target_pixels).logits
        logits = upsample_logits(logits, (height, width))
        usable = dacs.valid_pixels(valid, height, width, a.pseudo_ignore_top, a.pseudo_ignore_bottom)
        pseudo, weight = dacs.pseudo_labels(logits, usable, self.threshold, mode=a.pseudo_weight)
        # every mode's weights average to the confident share over the usable pixels (on the device: no wait)
        share = weight.sum() / usable.sum().clamp(min=1)
        self.confident, self.batches = share if self.confident is None else self.confident + share, self.batches + 1
        return pseudo, weight * a.pseudo_loss_weight

    def log_metrics(self) -> dict[str, torch.Tensor]:
        """For the metrics line, device scalars since the last one: `pseudo_confident_share`, the share of usable
        target pixels the teacher labelled with confidence >= adapt.pseudo_threshold (DAFormer's pseudo-label weight
        under `pseudo_weight: batch`), each micro-batch's share averaged over the line's micro-batches (and ranks).
        Absent when no pseudo-label was made (pseudo_loss_weight 0)."""
        if not self.batches:
            return {}
        share, self.confident, self.batches = self.confident / self.batches, None, 0
        return {"pseudo_confident_share": share}

