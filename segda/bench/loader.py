"""`segda bench loader`: the training loader as it trains (rescale, crop with cat_max_ratio, flip, photometric
distortion) against what a user writes without segda (PIL + transformers' image processor on the raw PNGs)."""

from __future__ import annotations

import numpy as np
import torch

from segda.bench import rate, report
from segda.log import info


class _BaselineFrames(torch.utils.data.Dataset):
    """What a user writes without segda: PIL decode of the raw PNGs, numpy label remap, PIL resize of the whole
    frame, random crop (retried while one class fills more than cat_max_ratio, as mmseg does) + flip, PIL colour
    jitter (brightness, contrast, saturation, hue), then `SegformerImageProcessor` for normalisation."""

    def __init__(self, samples, crop_wh, base_size, scale_range, cat_max_ratio: float, photometric: bool):
        from transformers import SegformerImageProcessor

        from segda.classes import label_id_lut

        self.samples, self.crop, self.base, self.scales = samples, crop_wh, base_size, scale_range
        self.cat_max_ratio, self.photometric = cat_max_ratio, photometric
        self.lut = label_id_lut()
        self.processor = SegformerImageProcessor(do_resize=False, do_reduce_labels=False)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        from PIL import Image

        rng = np.random.default_rng(i)
        sample = self.samples[i]
        image = Image.open(sample.image).convert("RGB")
        label = Image.fromarray(self.lut[np.asarray(Image.open(sample.label))])
        ratio = rng.uniform(*self.scales)
        scale = min(max(self.base) * ratio / max(image.size), min(self.base) * ratio / min(image.size))
        size = (int(image.width * scale + 0.5), int(image.height * scale + 0.5))
        image, label = image.resize(size, Image.BILINEAR), label.resize(size, Image.NEAREST)
        for _ in range(10):
            x0 = int(rng.integers(0, max(size[0] - self.crop[0], 0) + 1))
            y0 = int(rng.integers(0, max(size[1] - self.crop[1], 0) + 1))
            box = (x0, y0, x0 + self.crop[0], y0 + self.crop[1])
            counts = np.bincount(np.asarray(label.crop(box)).ravel(), minlength=256)[:255]
            if self.cat_max_ratio >= 1 or counts.max() < self.cat_max_ratio * max(counts.sum(), 1):
                break
        image, label = image.crop(box), label.crop(box)
        if rng.random() < 0.5:
            image, label = image.transpose(Image.FLIP_LEFT_RIGHT), label.transpose(Image.FLIP_LEFT_RIGHT)
        if self.photometric:
            image = _pil_colour_jitter(image, rng)
        out = self.processor(images=image, segmentation_maps=label, return_tensors="pt")
        return out["pixel_values"][0], out["labels"][0]


def _pil_colour_jitter(image, rng):
    """torchvision's ColorJitter(0.125, 0.5, 0.5, 0.05) written with PIL, the baseline's photometric step."""
    from PIL import Image, ImageEnhance

    for enhance, low, high in ((ImageEnhance.Brightness, 0.875, 1.125), (ImageEnhance.Contrast, 0.5, 1.5),
                               (ImageEnhance.Color, 0.5, 1.5)):
        image = enhance(image).enhance(rng.uniform(low, high))
    hsv = np.array(image.convert("HSV"))
    hsv[..., 0] = (hsv[..., 0].astype(np.int16) + int(rng.integers(-13, 14))) % 256
    return Image.fromarray(hsv, "HSV").convert("RGB")


def bench_loader(data: str, raw: str, workers: int = 1, crop=(512, 512), batch: int = 4, samples: int = 64,
                 repeats: int = 3, base_size=None, crops_per_frame: int = 1) -> dict:
    """The training loader as it trains (rescale, crop with cat_max_ratio, flip, photometric distortion) against
    the baseline doing the same augmentations with PIL and transformers."""
    from segda.config import DataConfig
    from segda.data.datasets import resolve_dataset
    from segda.data.stream import TrainingData
    from segda.shards.layouts import find_samples

    ds = resolve_dataset(data).require_labels("bench loader")
    dataset = (ds.manifest or {}).get("dataset", "cityscapes")
    split = (ds.manifest or {}).get("split", "train")
    base_size = base_size or ((1280, 720) if dataset == "gta5" else (2048, 1024))
    cfg = DataConfig(batch_size=batch, workers=workers, crop_size="{}x{}".format(*crop),
                     base_size="{}x{}".format(*base_size), crops_per_frame=crops_per_frame)
    pairs, _ = find_samples(dataset, raw, split)
    frames = _BaselineFrames(pairs, crop, base_size, cfg.scale_range, cfg.cat_max_ratio, cfg.photometric)
    baseline = torch.utils.data.DataLoader(frames, batch_size=batch, shuffle=True, num_workers=workers)
    limit = min(samples, ds.num_samples - 2 * batch, len(pairs) - 2 * batch)
    codec = (ds.manifest or {}).get("options", {}).get("image_format", "?")
    info(f"loader: {limit} samples per run, {workers} worker(s), {crop[0]}x{crop[1]} crops, batch {batch}, "
         f"{dataset} frames scaled around {base_size[0]}x{base_size[1]}, shards: image format {codec}, "
         f"{crops_per_frame} crop(s) per decoded frame; both with flip, cat_max_ratio {cfg.cat_max_ratio} and "
         "photometric distortion; baseline: PIL + SegformerImageProcessor on the raw PNGs")
    ours, base = [], []
    for r in range(repeats):
        data = TrainingData(ds, cfg, rank=0, world=1, seed=0)
        data.load_state_dict({"epoch": r, "consumed": 0, "end": None})
        ours.append(rate(data, limit))
        data.close()
        base.append(rate(baseline, limit))
    return report("loader", ours, base, "samples/s", per=max(workers, 1))
