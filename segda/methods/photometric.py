"""Colour operations of self-training on the device, none of which waits for it: DAFormer's strong augmentation of
the mixed images (colour jitter as kornia 0.5.8 does it, then Gaussian blur) and the optional colour transfer of
source crops (adapt.colour_transfer).

    mixed = strong_photometric(mixed, generator)        # jitter with p=0.8, blur with p=0.5, one draw per batch
    source = match_colours(source, target)              # Reinhard's transfer in YCbCr, pair by pair

Images are normalised (B, 3, H, W) tensors; each operation works on their 0-1 colours and normalises again. Random
draws: the batch-level decisions come from a CPU generator (reading it never syncs), per-image values from a device
generator it seeds (no value is copied to the device).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from segda import colourstats
from segda.model import MEAN_01, STD_01, on_device

JITTER_P, JITTER_STRENGTH, BLUR_P = 0.8, 0.2, 0.5
"""DAFormer (configs/_base_/uda/dacs.py): colour jitter on a batch with probability 0.8 (color_jitter_probability
0.2 is the chance it is skipped), strength 0.2 for all four factors; blur with probability 0.5."""
SIGMA = (0.15, 1.15)
"""DAFormer's blur: sigma uniform in this range, drawn per image."""


def strong_photometric(images: torch.Tensor, generator: torch.Generator, jitter_p: float = JITTER_P,
                       blur_p: float = BLUR_P) -> torch.Tensor:
    """DAFormer's strong augmentation: with probability `jitter_p` (one draw per batch) every image gets its own
    colour jitter (`colour_jitter`); then, with probability `blur_p` (one draw per batch), its own Gaussian blur."""
    device = images.device
    per_image = generator
    if device.type != "cpu":
        per_image = torch.Generator(device=device)
        per_image.manual_seed(int(torch.randint(2 ** 62, (1,), generator=generator)))
    jitter, blur = torch.rand(2, generator=generator).tolist()  # host draws: reading them never syncs
    mean, std = on_device(MEAN_01, device), on_device(STD_01, device)
    out = images.float() * std + mean
    if jitter < jitter_p:
        order = torch.randperm(4, generator=generator).tolist()
        out = colour_jitter(out, per_image, order)
    if blur < blur_p:
        out = gaussian_blur(out, per_image)
    return ((out - mean) / std).to(images.dtype)


def colour_jitter(rgb: torch.Tensor, generator: torch.Generator, order=(0, 1, 2, 3),
                  strength: float = JITTER_STRENGTH) -> torch.Tensor:
    """kornia 0.5.8's ColorJitter(s, s, s, s) on 0-1 colours, factors drawn per image: brightness adds b in [-s, s],
    contrast multiplies by c in [1-s, 1+s], saturation multiplies S (of HSV) by a in [1-s, 1+s], hue turns by h in
    [-s, s] of a full turn; each clamped to 0-1 as kornia does. `order`: the four operations' order (kornia draws
    one per call; DAFormer calls it per image)."""
    b, device = rgb.shape[0], rgb.device

    def draw(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(b, 1, 1, 1, generator=generator, device=device)

    factors = {0: draw(-strength, strength), 1: draw(1 - strength, 1 + strength),
               2: draw(1 - strength, 1 + strength), 3: draw(-strength, strength)}
    for op in order:
        if op == 0:
            rgb = (rgb + factors[0]).clamp(0, 1)
        elif op == 1:
            rgb = (rgb * factors[1]).clamp(0, 1)
        elif op == 2:
            rgb = scale_saturation(rgb, factors[2])
        else:
            h, s, v = rgb_to_hsv(rgb)
            rgb = hsv_to_rgb(torch.remainder(h + factors[3] * 2 * math.pi, 2 * math.pi), s, v)
    return rgb


def scale_saturation(rgb: torch.Tensor, factor: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """0-1 RGB (B, 3, H, W) with its HSV saturation times `factor` (B, 1, 1, 1) and clamped to 1, hue and value
    kept: the HSV round trip without the hue. hsv_to_rgb makes each channel value - value * S * w(hue), so a new
    saturation S' scales every channel's distance below the value by S' / S = min(factor, 1 / S). On a CPU at
    8x3x512x512, ~20 ms a batch where the round trip took ~120."""
    value = rgb.amax(dim=1, keepdim=True)
    delta = value - rgb.amin(dim=1, keepdim=True)
    ratio = torch.minimum(factor.expand_as(delta), (value + eps) / delta)  # grey (delta 0): inf, then factor
    return (value - ratio * (value - rgb)).clamp(0, 1)


def rgb_to_hsv(rgb: torch.Tensor, eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """0-1 RGB (B, 3, H, W) -> hue in [0, 2 pi), saturation and value in [0, 1], each (B, 1, H, W)."""
    r, g, b = rgb[:, 0:1], rgb[:, 1:2], rgb[:, 2:3]
    value, _ = rgb.max(dim=1, keepdim=True)
    delta = value - rgb.min(dim=1, keepdim=True)[0]
    saturation = delta / (value + eps)
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    hue = torch.where(value == r, (g - b) / safe, torch.where(value == g, 2 + (b - r) / safe, 4 + (r - g) / safe))
    hue = torch.remainder(torch.where(delta > 0, hue, torch.zeros_like(hue)) * (math.pi / 3), 2 * math.pi)
    return hue, saturation, value


_HSV_OFFSETS = torch.tensor([5.0, 3.0, 1.0]).view(1, 3, 1, 1)


def hsv_to_rgb(hue: torch.Tensor, saturation: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """The inverse of rgb_to_hsv."""
    sector = hue * (3 / math.pi)
    k = torch.remainder(on_device(_HSV_OFFSETS, hue.device) + sector, 6)  # a constant copied once per device
    return value - value * saturation * (torch.minimum(k, 4 - k).clamp(0, 1))


def gaussian_blur(rgb: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """DAFormer's blur: a sigma per image (SIGMA), a kernel of about a tenth of the image's height (odd: 51 for
    512 rows), reflected borders; one grouped convolution per axis for the whole batch."""
    b, c, height, width = rgb.shape
    size = math.ceil(0.1 * height)
    size = max(3, size if size % 2 else size - 1)
    sigma = SIGMA[0] + (SIGMA[1] - SIGMA[0]) * torch.rand(b, generator=generator, device=rgb.device)
    x = torch.arange(size, device=rgb.device, dtype=rgb.dtype) - size // 2
    kernel = torch.exp(-x[None] ** 2 / (2 * sigma[:, None] ** 2))
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (B * C, size)
    pad = size // 2
    flat = rgb.reshape(1, b * c, height, width)
    flat = F.conv2d(F.pad(flat, (pad, pad, 0, 0), mode="reflect"), kernel.view(b * c, 1, 1, size), groups=b * c)
    flat = F.conv2d(F.pad(flat, (0, 0, pad, pad), mode="reflect"), kernel.view(b * c, 1, size, 1), groups=b * c)
    return flat.reshape(b, c, height, width)


# RGB (0-1) -> luma and two colour-difference axes (BT.601 YCbCr without offsets): a space where the camera's
# brightness, contrast and saturation are each one channel's mean or spread, so per-channel statistics carry them
TO_YCC = torch.tensor(colourstats.TO_YCC, dtype=torch.float32)
FROM_YCC = torch.linalg.inv(TO_YCC)  # here, once: linalg.inv on a GPU syncs to check its result
SPREAD_RATIO = (0.25, 4.0)
"""match_colours scales a channel's spread by the target's / the source's, within these bounds: a flat target crop
(sky, padding) must not flatten a labelled source crop into one colour."""


def ycc_statistics(rgb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image and channel, the mean and spread of 0-1 RGB (B, 3, H, W) in YCbCr: two (B, 3, 1, 1) tensors."""
    ycc = torch.einsum("ij,bjhw->bihw", on_device(TO_YCC, rgb.device), rgb.float())
    return ycc.mean(dim=(2, 3), keepdim=True), ycc.std(dim=(2, 3), keepdim=True)


def reinhard(rgb: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """0-1 RGB images given the YCbCr `mean` and (within SPREAD_RATIO of their own) `std`, clamped to 0-1."""
    to_ycc, from_ycc = on_device(TO_YCC, rgb.device), on_device(FROM_YCC, rgb.device)
    ycc = torch.einsum("ij,bjhw->bihw", to_ycc, rgb.float())
    own_mean, own_std = ycc.mean(dim=(2, 3), keepdim=True), ycc.std(dim=(2, 3), keepdim=True)
    scale = (std / (own_std + eps)).clamp(*SPREAD_RATIO)
    return torch.einsum("ij,bjhw->bihw", from_ycc, (ycc - own_mean) * scale + mean).clamp(0, 1)


def match_colours(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Source images recoloured with the colour statistics of the target images they are paired with (Reinhard et
    al.'s transfer, in YCbCr): each channel of source i takes target i's mean and (within SPREAD_RATIO of its own)
    spread, so a labelled game frame comes out as dark, dull or tinted as the camera frame. Both (B, 3, H, W)
    normalised, on one device; the result is normalised again, in the source's dtype and memory format."""
    if source.shape[0] != target.shape[0]:
        raise ValueError(f"match_colours pairs images one to one: {source.shape[0]} source, {target.shape[0]} target")
    mean, std = on_device(MEAN_01, source.device), on_device(STD_01, source.device)
    target_mean, target_std = ycc_statistics(target.float() * std + mean)
    rgb = reinhard(source.float() * std + mean, target_mean, target_std)
    out = ((rgb - mean) / std).to(source.dtype)
    if source.dim() == 4 and source.is_contiguous(memory_format=torch.channels_last):
        out = out.contiguous(memory_format=torch.channels_last)
    return out
