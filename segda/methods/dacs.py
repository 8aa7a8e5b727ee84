"""The pieces of LoRA self-training (DACS / DAFormer style), each small and testable on its own.

    momentum = ema_momentum(step)                      # warm-up: min(1 - 1/(t+1), alpha)
    ema_update(teacher_tensors, student_tensors, momentum)
    labels, weight = pseudo_labels(teacher_logits)     # confidence weight per image (share of pixels >= 0.968)
    mask = class_mix_mask(source_label, generator)     # half of the source frame's classes
    image, label, weight = class_mix(mask, source_image, source_label, target_image, labels, weight)
    probabilities = rare_class_probabilities(class_pixels)   # P(c) ~ exp((1 - f_c) / T)

Everything but the ClassMix mask runs on the device the batch is on and none of it waits for the device (no
.item(), no data-dependent shapes in the mixing); the mask is drawn from the CPU labels. `segda.methods.SelfTraining`
puts the pieces together for `segda adapt` with adapt.method=selftrain.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from segda.classes import IGNORE, NUM_CLASSES
from segda.model import MEAN_01, STD_01, on_device

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


@torch.no_grad()
def pseudo_labels(logits: torch.Tensor, threshold: float = THRESHOLD, per_pixel: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher logits (B, C, H, W) -> (labels (B, H, W) int64, weight (B, H, W) float): every pixel of an image
    weighs the share of that image's pixels whose top softmax probability is >= threshold (DAFormer); `per_pixel`:
    a pixel weighs 1 when its own top probability reaches the threshold, else 0 (FixMatch's rule)."""
    confidence, labels = F.softmax(logits.float(), dim=1).max(dim=1)
    confident = (confidence >= threshold).float()
    if per_pixel:
        return labels, confident
    share = confident.mean(dim=(1, 2))
    return labels, share[:, None, None].expand_as(confidence).contiguous()


def class_mix_mask(source_label: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(H, W) source train ids -> bool mask of the pixels of half its classes (DACS: ceil(n/2) of the n classes
    present, IGNORE never chosen), drawn with `generator`. Runs on the CPU batch, where `unique` costs no sync."""
    classes = torch.unique(source_label)
    classes = classes[classes != IGNORE]
    chosen = classes[torch.randperm(len(classes), generator=generator)[:(len(classes) + 1) // 2]]
    return torch.isin(source_label, chosen)


def class_mix(mask: torch.Tensor, source_image: torch.Tensor, source_label: torch.Tensor,
              target_image: torch.Tensor, target_label: torch.Tensor, target_weight: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Paste the masked source pixels into the target frame: image, label and weight through the same mask.
    Images (B, 3, H, W), labels and weights (B, H, W), mask (B, H, W) bool. Pasted pixels weigh 1."""
    image = torch.where(mask[:, None], source_image, target_image)
    label = torch.where(mask, source_label.long(), target_label.long())
    weight = torch.where(mask, torch.ones_like(target_weight), target_weight)
    return image, label, weight


# RGB (0-1) -> luma and two colour-difference axes (BT.601 YCbCr without offsets): a space where the camera's
# brightness, contrast and saturation are each one channel's mean or spread, so per-channel statistics carry them
_TO_YCC = torch.tensor([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])
_FROM_YCC = torch.linalg.inv(_TO_YCC)  # here, once: linalg.inv on a GPU syncs to check its result
SPREAD_RATIO = (0.25, 4.0)
"""match_colours scales a channel's spread by the target's / the source's, within these bounds: a flat target crop
(sky, padding) must not flatten a labelled source crop into one colour."""


def match_colours(source: torch.Tensor, target: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """Source images recoloured with the colour statistics of the target images they are paired with (Reinhard et
    al.'s transfer, in YCbCr): each channel of source i takes target i's mean and (within SPREAD_RATIO of its own)
    spread, so a labelled game frame comes out as dark, dull or tinted as the camera frame. Both (B, 3, H, W)
    normalised, on one device; the result is clamped to the 0-1 colours, normalised again, in the source's dtype
    and memory format. Nothing in it reads a device value (not measured on a GPU yet)."""
    if source.shape[0] != target.shape[0]:
        raise ValueError(f"match_colours pairs images one to one: {source.shape[0]} source, {target.shape[0]} target")
    mean, std = on_device(MEAN_01, source.device), on_device(STD_01, source.device)
    to_ycc, from_ycc = on_device(_TO_YCC, source.device), on_device(_FROM_YCC, source.device)
    s = torch.einsum("ij,bjhw->bihw", to_ycc, source.float() * std + mean)
    t = torch.einsum("ij,bjhw->bihw", to_ycc, target.float() * std + mean)
    s_mean, s_std = s.mean(dim=(2, 3), keepdim=True), s.std(dim=(2, 3), keepdim=True)
    t_mean, t_std = t.mean(dim=(2, 3), keepdim=True), t.std(dim=(2, 3), keepdim=True)
    scale = (t_std / (s_std + eps)).clamp(*SPREAD_RATIO)
    rgb = torch.einsum("ij,bjhw->bihw", from_ycc, (s - s_mean) * scale + t_mean).clamp(0, 1)
    out = ((rgb - mean) / std).to(source.dtype)
    if source.dim() == 4 and source.is_contiguous(memory_format=torch.channels_last):
        out = out.contiguous(memory_format=torch.channels_last)
    return out


def strong_photometric(images: torch.Tensor, generator: torch.Generator, blur_p: float = 0.5) -> torch.Tensor:
    """DACS' strong augmentation of the mixed images, on their device: colour jitter of the 0-1 colours
    (brightness, contrast and saturation, strength 0.2 as DACS) and, with probability `blur_p` per image, a Gaussian
    blur (sigma 0.15-1.15, one per batch: it sets the kernel's size). `images` are normalised (B, 3, H, W): they are
    jittered in colour space and normalised again. `generator` is a CPU generator: on a GPU the per-image draws
    come from a device generator it seeds, so no draw is copied to the device (no sync)."""
    b = images.shape[0]
    device = images.device
    draws_from = generator
    if device.type != "cpu":
        draws_from = torch.Generator(device=device)
        draws_from.manual_seed(int(torch.randint(2 ** 62, (1,), generator=generator)))

    def draw(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(b, 1, 1, 1, generator=draws_from, device=device)

    mean, std = on_device(MEAN_01, device), on_device(STD_01, device)
    out = images * std + mean  # 0-1 colours
    out = out * draw(0.8, 1.2)  # brightness
    grey = out.mean(dim=(1, 2, 3), keepdim=True)
    out = (out - grey) * draw(0.8, 1.2) + grey  # contrast
    grey = (0.299 * out[:, :1] + 0.587 * out[:, 1:2] + 0.114 * out[:, 2:])
    out = (out - grey) * draw(0.8, 1.2) + grey  # saturation
    out = (out.clamp(0, 1) - mean) / std
    blur = torch.rand(b, generator=draws_from, device=device) < blur_p
    sigma = float(0.15 + torch.rand(1, generator=generator))  # the host's generator: reading it never syncs
    radius = max(1, int(round(2 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=out.dtype, device=device)
    kernel = torch.exp(-x ** 2 / (2 * sigma ** 2))
    kernel = kernel / kernel.sum()
    channels = out.shape[1]
    blurred = F.conv2d(F.pad(out, (radius, radius, 0, 0), mode="reflect"),
                       kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1), groups=channels)
    blurred = F.conv2d(F.pad(blurred, (0, 0, radius, radius), mode="reflect"),
                       kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1), groups=channels)
    return torch.where(blur[:, None, None, None], blurred, out)


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
