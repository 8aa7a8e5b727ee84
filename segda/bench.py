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


def bench_loader(data: str, raw: str, workers: int = 1, crop=(512, 512), batch: int = 4, samples: int = 64,
                 repeats: int = 3, base_size=None, crops_per_frame: int = 1) -> dict:
    """The training loader as it trains (rescale, crop with cat_max_ratio, flip, photometric distortion) against
    the baseline doing the same augmentations with PIL and transformers."""
    from segda.config import DataConfig
    from segda.data.datasets import resolve_dataset
    from segda.data.stream import train_loader
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
        loader, _ = train_loader(ds, cfg, rank=0, world=1, seed=0, epoch=r)
        ours.append(_rate(loader, limit))
        base.append(_rate(baseline, limit))
    return _report("loader", ours, base, "samples/s", per=max(workers, 1))


# ---- training step --------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":  # kernels run asynchronously: the clock must wait for them
        torch.cuda.synchronize(device)


def _train_rate(step, batch, steps: int, device: torch.device) -> float:
    step(batch)  # warm-up: allocator, kernels (and, compiled, the compilation)
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step(batch)
    _sync(device)
    return steps * len(batch[0]) / (time.perf_counter() - start)


def bench_train(crop=(256, 256), batch: int = 4, steps: int = 3, repeats: int = 3, device: str | None = None,
                model_config: dict | None = None, compile: bool = False, channels_last: bool = False) -> dict:
    """segda's step (uint8 batch normalised on the device, bf16 autocast, fused AdamW with the on-device
    non-finite guard, ignore-aware loss) against a plain transformers loop (fp32 eager, float batch, the model's
    own loss). `compile` adds segda's step under torch.compile, measured in the same rounds."""
    from segda.train.guard import NonFiniteGuard
    from segda.model import build_model, normalize, segmentation_loss

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    width, height = crop if isinstance(crop, tuple) else (crop, crop)
    images = torch.randint(0, 256, (batch, height, width, 3), dtype=torch.uint8)
    labels = torch.randint(0, 19, (batch, height, width), dtype=torch.uint8)
    plain_model = build_model("", model_config or {}).to(device)
    plain_opt = torch.optim.AdamW(plain_model.parameters(), lr=6e-5)
    float_images = ((images.permute(0, 3, 1, 2).float() / 255) - 0.45) / 0.226

    def plain_step(b):
        out = plain_model(pixel_values=b[0].to(device), labels=b[1].to(device).long())
        out.loss.backward()
        plain_opt.step()
        plain_opt.zero_grad()

    def segda_step(compiled: bool):
        model = build_model("", model_config or {}).to(device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        optimizer = torch.optim.AdamW(model.parameters(), lr=6e-5, fused=True)
        guard = NonFiniteGuard(optimizer, device)
        forward = torch.compile(model) if compiled else model

        def step(b):
            with torch.autocast(device.type, dtype=torch.bfloat16):
                logits = forward(pixel_values=normalize(b[0], device, channels_last=channels_last)).logits
            segmentation_loss(logits, b[1].to(device, non_blocking=True)).backward()
            guard.arm(model.parameters())
            optimizer.step()
            guard.disarm()
            optimizer.zero_grad(set_to_none=True)
        return step

    info(f"train step: SegFormer {'MiT-b0' if not model_config else model_config}, batch {batch}, {width}x{height}, "
         f"{device}, {torch.get_num_threads()} thread(s), channels-last {'on' if channels_last else 'off'}")
    eager_step = segda_step(False)
    compiled_step = segda_step(True) if compile else None
    ours, base, compiled = [], [], []
    for _ in range(repeats):
        ours.append(_train_rate(eager_step, (images, labels), steps, device))
        base.append(_train_rate(plain_step, (float_images, labels), steps, device))
        if compiled_step is not None:
            compiled.append(_train_rate(compiled_step, (images, labels), steps, device))
    result = _report("train step", ours, base, "img/s")
    if compiled_step is not None:
        result["compiled"] = _report("train step compiled", compiled, ours, "img/s")
        info("(compiled: segda's step under torch.compile; its baseline here is segda's eager step)")
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
        info(f"peak GPU memory (all models): {result['peak_memory_gib']:.2f} GiB")
    return result


# ---- codec ---------------------------------------------------------------------------------------------

def bench_codec(images: list[str], repeats: int = 7) -> dict:
    """PXZ (segda's default shard codec) against the images' own PNG bytes: size and single-core decode time."""
    import cv2

    from segda import codec
    from segda.data.transforms import decode_image

    cv2.setNumThreads(1)
    rows, pxz_ms, png_ms, pxz_bytes, png_bytes = [], [], [], 0, 0
    for path in images:
        original = Path(path).read_bytes()
        rgb = decode_image(original)
        png = original if original[:8] == b"\x89PNG\r\n\x1a\n" else \
            cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes()
        pxz = codec.encode(rgb)
        assert np.array_equal(codec.decode(pxz), rgb), f"{path}: PXZ did not round-trip"
        times = {}
        for name, data in (("png", png), ("pxz", pxz)):
            runs = []
            for _ in range(repeats):
                start = time.perf_counter()
                decode_image(data)
                runs.append(1000 * (time.perf_counter() - start))
            times[name] = statistics.median(runs)
        pxz_ms.append(times["pxz"])
        png_ms.append(times["png"])
        pxz_bytes, png_bytes = pxz_bytes + len(pxz), png_bytes + len(png)
        rows.append(f"| {Path(path).name} | {rgb.shape[1]}x{rgb.shape[0]} | {len(png) / 1e6:.2f} MB | "
                    f"{len(pxz) / 1e6:.2f} MB ({len(pxz) / len(png):.2f}x) | {times['png']:.1f} | {times['pxz']:.1f} |")
    print("| image | size | PNG | PXZ (vs PNG) | PNG decode ms | PXZ decode ms |\n|---|---|---:|---:|---:|---:|")
    print("\n".join(rows))
    print(f"bytes: PXZ / PNG = {pxz_bytes / png_bytes:.2f}x")
    info(f"codec: {len(images)} image(s), median of {repeats} single-threaded decodes each (to RGB)")
    return {"size_ratio": pxz_bytes / png_bytes, **_report("decode", [1000 / t for t in pxz_ms],
                                                             [1000 / t for t in png_ms], "frames/s")}


# ---- many adapters on one base --------------------------------------------------------------------------

def bench_adapters(adapters: list[str], data: str, repeats: int = 3, eval_size=(1024, 512), workers: int = 0) -> dict:
    """`segda evaluate` of several adapters of one base: the base loaded once and the adapters switched (segda),
    against loading base + adapter afresh for each (baseline). Both score the same pairs; times are wall seconds."""
    import tempfile

    from accelerate import Accelerator

    from segda.config import DataConfig
    from segda.evaluate import InferenceOptions, evaluate_matrix

    accelerator = Accelerator()
    data_cfg = DataConfig(workers=workers, eval_size="{}x{}".format(*eval_size))
    opts = InferenceOptions(eval_size=tuple(eval_size))
    labelled = [(f"adapter{i}", path) for i, path in enumerate(adapters)]
    shared, separate = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeats):
            start = time.perf_counter()
            one = evaluate_matrix(labelled, [("data", data)], Path(tmp) / f"shared-{r}", data_cfg, opts,
                                  num_examples=0, accelerator=accelerator)
            shared.append(time.perf_counter() - start)
            start = time.perf_counter()
            each = [evaluate_matrix([pair], [("data", data)], Path(tmp) / f"one-{r}-{i}", data_cfg, opts,
                                    num_examples=0, accelerator=accelerator) for i, pair in enumerate(labelled)]
            separate.append(time.perf_counter() - start)
            same = [p["confusion"] for p in one["pairs"]] == [e["pairs"][0]["confusion"] for e in each]
            info(f"round {r + 1}: shared base {shared[-1]:.2f} s, reloading {separate[-1]:.2f} s, "
                 f"identical scores: {same}")
    info(f"adapters: {len(adapters)} on one base, {data}")
    return _report("evaluate adapters", [1 / t for t in shared], [1 / t for t in separate], "matrices/s")


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
