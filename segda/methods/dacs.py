"""The pieces of LoRA self-training (DACS / DAFormer), each small and testable on its own.

    momentum = ema_momentum(step)                      # warm-up: min(1 - 1/(t+1), alpha)
    ema_update(teacher_tensors, student_tensors, momentum)
    labels, weight = pseudo_labels(teacher_logits, valid, mode="batch")   # DAFormer: one confidence per batch
    masks = class_mix_masks(source_labels, generator)  # half of each source crop's classes
    image, label, weight = class_mix(masks, source_image, source_label, target_image, labels, weight)
    probabilities = rare_class_probabilities(class_pixels)   # P(c) ~ exp((1 - f_c) / T)

Everything runs on the device the batch is on and none of it waits for the device (no .item(), no boolean
indexing, no data-dependent shapes). The colour operations are in `segda.methods.photometric`;
`segda.methods.selftrain.SelfTraining` puts the pieces together for `segda adapt` with adapt.method=selftrain.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from segda.classes import NUM_CLASSES

ALPHA = 0.999
"""DAFormer's EMA momentum of the teacher."""
THRESHOLD = 0.968
"""DAFormer's pseudo-label confidence threshold."""
TEMPERATURE = 0.01
"""DAFormer's rare-class sampling temperature."""


def ema_momentum(step: int, alpha: float = ALPHA) -> float:
    """The teacher's momentum after `step` optimizer steps: min(1 - 1/(t+1), alpha). At 0 it is 0 (the teacher is a
    copy of the student); after the first step 0.5, as DAFormer's update at iteration 1; early steps follow the
    student closely."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return min(1.0 - 1.0 / (step + 1), alpha)


@torch.no_grad()
def ema_update(teacher: list[torch.Tensor], student: list[torch.Tensor], momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, in place, one fused op per list."""
    if len(teacher) != len(student):
        raise ValueError(f"teacher has {len(teacher)} tensors, student {len(student)}")
    torch._foreach_mul_(teacher, momentum)
    torch._foreach_add_(teacher, student, alpha=1.0 - momentum)


PSEUDO_WEIGHTS = ("batch", "image", "pixel")
"""How a pseudo-label counts: `batch`, every target pixel weighs the batch's share of confident pixels (DAFormer:
one scalar per batch); `image`, its own image's share; `pixel`, 1 if the teacher is confident of it, else 0
(FixMatch's rule)."""


@torch.no_grad()
def pseudo_labels(logits: torch.Tensor, valid: torch.Tensor | None = None, threshold: float = THRESHOLD,
                  mode: str = "batch") -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher logits (B, C, H, W) -> (labels (B, H, W) int64, weight (B, H, W) float). A pixel is confident when
    its top softmax probability is >= threshold; `mode` (PSEUDO_WEIGHTS) turns that into weights. `valid` (B, H, W)
    bool: the pixels that may be pseudo-labelled (not padding, not the rows adapt.pseudo_ignore_top/bottom
    exclude); the others weigh 0 and the shares count only valid pixels."""
    if mode not in PSEUDO_WEIGHTS:
        raise ValueError(f"pseudo-label weight mode must be one of {PSEUDO_WEIGHTS}, got {mode!r}")
    # per pixel, a contiguous row of class scores (channels-last): on a CPU 1.8x faster than the same softmax and
    # max over NCHW's dim 1 at 8x19x512x512 (selftrain hands the logits over channels-last)
    scores = logits.float().contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
    confidence, labels = F.softmax(scores, dim=-1).max(dim=-1)
    valid = torch.ones_like(confidence, dtype=torch.bool) if valid is None else valid
    confident = ((confidence >= threshold) & valid).float()
    if mode == "pixel":
        return labels, confident
    dims = (0, 1, 2) if mode == "batch" else (1, 2)
    share = confident.sum(dim=dims, keepdim=True) / valid.float().sum(dim=dims, keepdim=True).clamp(min=1)
    return labels, torch.where(valid, share.expand_as(confidence), torch.zeros_like(confidence))


def valid_pixels(valid: torch.Tensor, height: int, width: int, ignore_top: int = 0, ignore_bottom: int = 0
                 ) -> torch.Tensor:
    """The crops' pixels that may be pseudo-labelled, (B, H, W) bool, from the loader's `valid` (B, 3): (rows,
    first column, end column) holding the frame. Padding never is; nor are the first `ignore_top` and last
    `ignore_bottom` rows of each crop (DAFormer's pseudo-label crop: Cityscapes' top rows and car hood)."""
    rows = torch.arange(height, device=valid.device)[None, :, None]
    cols = torch.arange(width, device=valid.device)[None, None, :]
    frame = (rows < valid[:, 0, None, None]) & (cols >= valid[:, 1, None, None]) & (cols < valid[:, 2, None, None])
    kept = (rows >= ignore_top) & (rows < height - ignore_bottom)
    return frame & kept


def class_mix_masks(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(B, H, W) source train ids -> (B, H, W) bool masks of the pixels of half of each crop's classes (DACS:
    ceil(n/2) of the n classes present, IGNORE never chosen), on the labels' device without waiting for it: each
    class present gets a random key, and the classes whose key ranks in the first half of the present ones are
    pasted. `generator` lives on the labels' device."""
    b = labels.shape[0]
    ids = labels.long().reshape(b, -1).clamp(max=NUM_CLASSES)  # IGNORE (and any id past the classes) -> slot 19
    present = torch.zeros(b, NUM_CLASSES + 1, dtype=torch.bool, device=labels.device)
    present.scatter_(1, ids, True)
    present[:, NUM_CLASSES] = False
    keys = torch.rand(b, NUM_CLASSES + 1, generator=generator, device=labels.device)
    keys = torch.where(present, keys, torch.full_like(keys, 2.0))  # absent classes rank last
    rank = keys.argsort(dim=1).argsort(dim=1)
    wanted = (present.sum(dim=1, keepdim=True) + 1) // 2
    chosen = present & (rank < wanted)
    return torch.gather(chosen, 1, ids).reshape(labels.shape)


def class_mix(mask: torch.Tensor, source_image: torch.Tensor, source_label: torch.Tensor,
              target_image: torch.Tensor, target_label: torch.Tensor, target_weight: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Paste the masked source pixels into the target frame: image, label and weight through the same mask.
    Images (B, 3, H, W), labels and weights (B, H, W), mask (B, H, W) bool. Pasted pixels weigh 1."""
    image = torch.where(mask[:, None], source_image, target_image)
    label = torch.where(mask, source_label.long(), target_label.long())
    weight = torch.where(mask, torch.ones_like(target_weight), target_weight)
    return image, label, weight


def rare_class_probabilities(class_pixels, temperature: float = TEMPERATURE) -> np.ndarray:
    """DAFormer's rare-class sampling: P(c) proportional to exp((1 - f_c) / T), f_c the class's share of the
    source's labelled pixels (the manifest's class_pixels). Classes without a pixel get 0 (nothing to sample)."""
    pixels = np.asarray(class_pixels, dtype=np.float64)
    if pixels.shape != (NUM_CLASSES,) or pixels.sum() <= 0:
        raise ValueError(f"class_pixels must be {NUM_CLASSES} counts with a positive sum")
    freq = pixels / pixels.sum()
    logits = np.where(pixels > 0, (1.0 - freq) / temperature, -np.inf)
    weights = np.exp(logits - logits[pixels > 0].max())
    return weights / weights.sum()


class RareClassOrder:
    """Rare-class sampling as each epoch's order of source frames (DAFormer): N draws, each a class c drawn with
    P(c) (`rare_class_probabilities`), then a frame that holds c, uniformly. A function of (seed, epoch) alone,
    so ranks split it as they split a permutation, and a resume finds the same draws."""

    def __init__(self, sample_classes, class_pixels, temperature: float = TEMPERATURE):
        classes = np.asarray(sample_classes, dtype=np.int64)
        self.holders = [np.flatnonzero((classes >> c) & 1) for c in range(NUM_CLASSES)]
        held = np.array([len(h) > 0 for h in self.holders])
        if not held.any():
            raise ValueError("no frame holds any class: rare-class sampling needs labelled source frames")
        p = rare_class_probabilities(class_pixels, temperature) * held  # a class only in slivers: no frame
        self.probabilities = p / p.sum()
        self.num_samples = len(classes)

    def __call__(self, num_samples: int, seed: int, epoch: int) -> np.ndarray:
        return self.draws(num_samples, seed, epoch)[0]

    def draws(self, num_samples: int, seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(frames, the class each was drawn for) at every position of the epoch's order: the loader crops each
        drawn frame around its class, as DAFormer does."""
        if num_samples != self.num_samples:
            raise ValueError(f"the order was built for {self.num_samples} samples, asked for {num_samples}")
        if getattr(self, "_last", (None,))[0] != (seed, epoch):
            rng = np.random.default_rng([seed, epoch, 0x2C5])
            drawn = rng.choice(NUM_CLASSES, size=num_samples, p=self.probabilities)
            picks = rng.random(num_samples)
            order = np.empty(num_samples, np.int64)
            for c in np.unique(drawn):
                where = drawn == c
                order[where] = self.holders[c][(picks[where] * len(self.holders[c])).astype(np.int64)]
            self._last = ((seed, epoch), (order, drawn))
        return self._last[1]


def rare_class_order(ds, temperature: float) -> RareClassOrder:
    """The rare-class order of a source dataset, from its manifest's per-frame classes and class pixels."""
    from segda.log import SegdaError

    entries = (ds.manifest or {}).get("shards") or []
    if not entries or any("classes" not in e for e in entries):
        raise SegdaError(f"rare-class sampling needs each frame's classes, which {ds.spec} does not list (shards "
                         "written by an older segda, or not a manifest): re-create the shards with `segda shards`, or "
                         "set adapt.rare_class_temperature=0")
    classes = [c for e in entries for c in e["classes"]]
    if len(classes) != ds.num_samples:
        raise SegdaError(f"{ds.spec} lists the classes of {len(classes)} frames for {ds.num_samples} samples: "
                         "re-create the shards with `segda shards`")
    try:
        return RareClassOrder(classes, ds.manifest["class_pixels"], temperature)
    except (ValueError, KeyError) as err:
        raise SegdaError(f"{ds.spec}: {err}; rare-class sampling needs a labelled source dataset") from err
