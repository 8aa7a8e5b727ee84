"""`segda bench`: segda against the plain baseline a user would otherwise write, side by side in one run.

    segda bench loader --data shards/cityscapes/train-manifest.json --raw raw/cityscapes --workers 2 --crop 512
    segda bench train --crop 256 --batch 4
    segda bench shards gta5 raw/gta5

Each measurement alternates segda and baseline for `--repeats` rounds (the machines are noisy) and reports
medians and the ratio, ending with `N.Nx`.
"""

from __future__ import annotations

import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from segda.log import info


def _report(name: str, segda_rates: list[float], base_rates: list[float], unit: str, per: int = 1) -> dict:
    s, b = statistics.median(segda_rates), statistics.median(base_rates)
    info(f"{name}: segda {s:.2f} {unit} (runs {', '.join(f'{r:.2f}' for r in segda_rates)}); "
         f"baseline {b:.2f} {unit} (runs {', '.join(f'{r:.2f}' for r in base_rates)})")
    if per > 1:
        info(f"per worker: segda {s / per:.2f}, baseline {b / per:.2f} {unit}")
    ratio = s / b
    print(f"{name} speed-up (median segda / median baseline): {ratio:.1f}x" if ratio >= 0.1 else
          f"{name} speed ratio (median segda / median baseline): {ratio:.3f}x (baseline {1 / ratio:.0f}x faster)")
    return {"segda": s, "baseline": b, "ratio": ratio, "segda_runs": segda_rates, "baseline_runs": base_rates}


# ---- loader ---------------------------------------------------------------------------------------------

class _BaselineFrames(torch.utils.data.Dataset):
    """What a user writes without segda: PIL decode of the raw PNGs, numpy label remap, PIL resize of the whole
    frame, random crop + flip, then `SegformerImageProcessor` for normalisation (float tensors)."""

    def __init__(self, samples, crop: int, base_size, scale_range):
        from transformers import SegformerImageProcessor

        from segda.classes import label_id_lut

        self.samples, self.crop, self.base, self.scales = samples, crop, base_size, scale_range
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
        x0 = int(rng.integers(0, max(size[0] - self.crop, 0) + 1))
        y0 = int(rng.integers(0, max(size[1] - self.crop, 0) + 1))
        box = (x0, y0, x0 + self.crop, y0 + self.crop)
        image, label = image.crop(box), label.crop(box)
        if rng.random() < 0.5:
            image, label = image.transpose(Image.FLIP_LEFT_RIGHT), label.transpose(Image.FLIP_LEFT_RIGHT)
        out = self.processor(images=image, segmentation_maps=label, return_tensors="pt")
        return out["pixel_values"][0], out["labels"][0]


def _rate(iterable, limit: int) -> float:
    it = iter(iterable)
    first = next(it)  # start-up (worker fork, first shard open) is not throughput
    n, start = 0, time.perf_counter()
    for batch in it:
        n += len(batch["key"]) if isinstance(batch, dict) else len(batch[0])
        if n >= limit:
            break
    del first
    return n / (time.perf_counter() - start)


def bench_loader(data: str, raw: str, workers: int = 1, crop: int = 512, batch: int = 4, samples: int = 64,
                 repeats: int = 3, base_size=None, crops_per_frame: int = 1) -> dict:
    from segda.config import DataConfig
    from segda.data.datasets import resolve_dataset
    from segda.data.stream import train_loader
    from segda.shards.layouts import find_samples

    ds = resolve_dataset(data)
    dataset = (ds.manifest or {}).get("dataset", "cityscapes")
    split = (ds.manifest or {}).get("split", "train")
    base_size = base_size or ((1280, 720) if dataset == "gta5" else (2048, 1024))
    cfg = DataConfig(batch_size=batch, workers=workers, crop_size=[crop, crop], base_size=list(base_size),
                     photometric=False, cat_max_ratio=1.0, crops_per_frame=crops_per_frame)
    pairs, _ = find_samples(dataset, raw, split)
    baseline = torch.utils.data.DataLoader(_BaselineFrames(pairs, crop, base_size, cfg.scale_range),
                                           batch_size=batch, shuffle=True, num_workers=workers)
    limit = min(samples, ds.num_samples - 2 * batch, len(pairs) - 2 * batch)
    codec = (ds.manifest or {}).get("options", {}).get("image_format", "?")
    info(f"loader: {limit} samples per run, {workers} worker(s), {crop}x{crop} crops, batch {batch}, "
         f"{dataset} frames scaled around {base_size[0]}x{base_size[1]}, shards: image format {codec}, "
         f"{crops_per_frame} crop(s) per decoded frame; baseline: PIL + SegformerImageProcessor on the raw PNGs")
    ours, base = [], []
    for r in range(repeats):
        loader, _ = train_loader(ds, cfg, rank=0, world=1, seed=0, epoch=r)
        ours.append(_rate(loader, limit))
        base.append(_rate(baseline, limit))
    return _report("loader", ours, base, "samples/s", per=max(workers, 1))


# ---- training step --------------------------------------------------------------------------------------

def _train_rate(model, step, batch, steps: int) -> float:
    step(batch)  # warm-up: allocator, kernels
    start = time.perf_counter()
    for _ in range(steps):
        step(batch)
    return steps * len(batch[0]) / (time.perf_counter() - start)


def bench_train(crop: int = 256, batch: int = 4, steps: int = 3, repeats: int = 3, device: str | None = None,
                model_config: dict | None = None) -> dict:
    """segda's step (uint8 batch normalised on the device, bf16 autocast, channels-last, fused AdamW on GPU,
    ignore-aware loss) against a plain transformers loop (fp32 eager, float batch, the model's own loss)."""
    from segda.model import build_model, normalize, segmentation_loss

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    images = torch.randint(0, 256, (batch, crop, crop, 3), dtype=torch.uint8)
    labels = torch.randint(0, 19, (batch, crop, crop), dtype=torch.uint8)
    plain_model = build_model("", model_config or {}).to(device)
    our_model = build_model("", model_config or {}).to(device).to(memory_format=torch.channels_last)
    plain_opt = torch.optim.AdamW(plain_model.parameters(), lr=6e-5)
    our_opt = torch.optim.AdamW(our_model.parameters(), lr=6e-5, fused=device.type == "cuda")
    float_images = ((images.permute(0, 3, 1, 2).float() / 255) - 0.45) / 0.226

    def plain_step(b):
        out = plain_model(pixel_values=b[0].to(device), labels=b[1].to(device).long())
        out.loss.backward()
        plain_opt.step()
        plain_opt.zero_grad()

    def our_step(b):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = our_model(pixel_values=normalize(b[0], device)).logits
        segmentation_loss(logits, b[1].to(device, non_blocking=True)).backward()
        our_opt.step()
        our_opt.zero_grad(set_to_none=True)

    info(f"train step: SegFormer {'MiT-b0' if not model_config else model_config}, batch {batch}, {crop}x{crop}, "
         f"{device}, {torch.get_num_threads()} thread(s)")
    ours, base = [], []
    for _ in range(repeats):
        ours.append(_train_rate(our_model, our_step, (images, labels), steps))
        base.append(_train_rate(plain_model, plain_step, (float_images, labels), steps))
    result = _report("train step", ours, base, "img/s")
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
        info(f"peak GPU memory (both models): {result['peak_memory_gib']:.2f} GiB")
    return result


# ---- creators -------------------------------------------------------------------------------------------

def bench_shards(dataset: str, raw: str, split: str = "train", workers: int = 1, repeats: int = 3) -> dict:
    """segda's creator (validate, LUT-remap labels, copy image bytes, hash) against `tar` of the raw files."""
    from segda.shards.encode import EncodeOptions
    from segda.shards.layouts import find_samples
    from segda.shards.writer import CreateOptions, create_shards

    pairs, _ = find_samples(dataset, raw, split)
    ours, base = [], []
    with tempfile.TemporaryDirectory() as tmp:
        listing = Path(tmp) / "files.txt"
        listing.write_text("".join(f"{p.rel(p.image)}\n{p.rel(p.label)}\n" for p in pairs))
        for r in range(repeats):
            start = time.perf_counter()
            create_shards(dataset, raw, Path(tmp) / f"segda-{r}", EncodeOptions(dataset, split),
                          CreateOptions(shard_size=256, workers=workers), progress=False)
            ours.append(len(pairs) / (time.perf_counter() - start))
            start = time.perf_counter()
            # The limit: copying bytes into a tar. Fixed argv, no shell.
            subprocess.run(["tar", "-cf", str(Path(tmp) / f"plain-{r}.tar"), "-C", str(raw), "-T", str(listing)],
                           check=True)
            base.append(len(pairs) / (time.perf_counter() - start))
    info(f"creators: {len(pairs)} {dataset} frames, {workers} worker(s); baseline: tar of the raw files")
    return _report("creators", ours, base, "samples/s")
