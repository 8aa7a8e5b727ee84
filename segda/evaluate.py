"""Score models on datasets with the standard 19-class metric: a confusion matrix over every non-255 pixel.

    segda evaluate --model source=runs/gta5/model --model source+lora=runs/cs/adapter \
                   --data gta5-val=shards/gta5/val-manifest.json --data cityscapes-val=... --out reports/

Each rank evaluates its own samples (every sample exactly once across ranks x workers, `segda.data.plan`),
accumulates an int64 19x19 confusion matrix at label resolution, and the matrices are all-reduced once at the
end. Inference is whole-image (resize to `eval_size`, logits upsampled to the label's size) or sliding-window at
full resolution, optionally with flip test-time augmentation.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from segda.classes import IGNORE, NUM_CLASSES
from segda.config import DataConfig
from segda.data.datasets import resolve_dataset
from segda.data.eval_stream import eval_loader
from segda.log import SegdaError, info
from segda.methods.photometric import reinhard
from segda.model import MEAN_01, STD_01, normalize, on_device, upsample_logits
from segda.report import metrics_from_confusion


@dataclass(frozen=True)
class InferenceOptions:
    mode: str = "whole"
    """whole: resize the frame to eval_size; slide: windows of `crop` at full resolution."""
    eval_size: tuple[int, int] = (1024, 512)
    """(width, height) for whole-image inference."""
    crop: tuple[int, int] = (512, 512)
    """(width, height) of sliding windows."""
    stride: tuple[int, int] = (341, 341)
    """(width, height) step of sliding windows (mmseg's 1024x1024/768 scaled to B0-sized crops)."""
    flip: bool = False
    """Average logits with those of the horizontally flipped frame."""
    batch_size: int = 4
    """Frames (whole) or windows (slide) per forward pass."""
    colour_match: tuple | None = None
    """(YCbCr mean, spread) each frame is Reinhard-matched to before inference (`--colour-match`): test-time
    colour matching to the source domain's look, a baseline that needs no training."""

    max_pixels: int = 8192 * 4096
    """Refuse to infer on a frame larger than this (its logits alone take 76 bytes a pixel: 2.5 GB here)."""

    def __post_init__(self):
        if self.mode not in ("whole", "slide"):
            raise SegdaError(f"inference mode must be 'whole' or 'slide', got {self.mode!r}")
        if min(*self.crop, *self.eval_size) < MIN_SIDE or self.batch_size < 1 or min(self.stride) < 1:
            raise SegdaError(f"--crop and --eval-size must be at least {MIN_SIDE}x{MIN_SIDE} (SegFormer's coarsest "
                             f"stage is 1/32 of the input), --stride and --batch-size at least 1 (got crop {self.crop}, "
                             f"eval size {self.eval_size}, stride {self.stride}, batch size {self.batch_size})")
        if self.mode == "slide" and any(s > c for s, c in zip(self.stride, self.crop)):
            raise SegdaError(f"--stride {self.stride[0]}x{self.stride[1]} is longer than --crop {self.crop[0]}x"
                             f"{self.crop[1]}: the windows would leave pixels between them unpredicted; use a stride "
                             "at most the crop (mmseg: two thirds of it)")
        if self.max_pixels < 1 or self.eval_size[0] * self.eval_size[1] > self.max_pixels:
            raise SegdaError(f"--eval-size {self.eval_size[0]}x{self.eval_size[1]} is over --max-pixels "
                             f"{self.max_pixels}")


MIN_SIDE = 32


def _pixels(images: torch.Tensor, model, device, opts: InferenceOptions) -> torch.Tensor:
    # In the weights' dtype: a model DeepSpeed cast to bf16 takes bf16 pixels (autocast covers the fp32 case).
    dtype = next(model.parameters()).dtype
    if opts.colour_match is None:
        return normalize(images, device, dtype)
    mean, std = (torch.tensor(v, dtype=torch.float32, device=device).view(1, 3, 1, 1) for v in opts.colour_match)
    rgb = reinhard(images.to(device, non_blocking=True).permute(0, 3, 1, 2).float() / 255, mean, std)
    return ((rgb - on_device(MEAN_01, device)) / on_device(STD_01, device)).to(dtype)


def _forward(model, pixels: torch.Tensor, flip: bool) -> torch.Tensor:
    logits = model(pixel_values=pixels).logits.float()
    if flip:
        logits = logits + model(pixel_values=pixels.flip(-1)).logits.float().flip(-1)
    return logits


@torch.no_grad()
def predict_logits(model, images: list[torch.Tensor], out_sizes: list[tuple[int, int]], opts: InferenceOptions,
                   device) -> list[torch.Tensor]:
    """Logits (19, H, W) at each requested (H, W) for uint8 (h, w, 3) frames."""
    for image, (height, width) in zip(images, out_sizes):
        if max(height * width, image.shape[0] * image.shape[1]) > opts.max_pixels:
            raise SegdaError(f"a frame of {max(width, image.shape[1])}x{max(height, image.shape[0])} pixels is over "
                             f"--max-pixels {opts.max_pixels} (its logits alone would take "
                             f"{76 * height * width / 2 ** 30:.1f} GB): resize it, or raise --max-pixels")
    if opts.mode == "slide":
        return [_slide(model, image, size, opts, device) for image, size in zip(images, out_sizes)]
    out = []
    for i in range(0, len(images), opts.batch_size):
        chunk = images[i:i + opts.batch_size]
        if len({tuple(im.shape) for im in chunk}) > 1:  # mixed sizes: one at a time
            logits = [_forward(model, _pixels(im[None], model, device, opts), opts.flip)[0] for im in chunk]
        else:
            logits = list(_forward(model, _pixels(torch.stack(chunk), model, device, opts), opts.flip))
        for logit, size in zip(logits, out_sizes[i:i + opts.batch_size]):
            # channels-last, as the loss upsamples: the argmax reads each pixel's scores as one row (one core,
            # 19x40x80 -> 19x160x320 and argmax: 3.0 against 10.5 ms per frame through planes)
            out.append(upsample_logits(logit[None], size)[0])
    return out


def _windows(length: int, crop: int, stride: int) -> list[int]:
    count = max(length - crop + stride - 1, 0) // stride + 1
    return [max(min(i * stride + crop, length) - crop, 0) for i in range(count)]


def _slide(model, image: torch.Tensor, size: tuple[int, int], opts: InferenceOptions, device) -> torch.Tensor:
    """Every window runs once, in batches; overlapping logits are averaged (mmseg's slide_inference)."""
    height, width = image.shape[:2]
    cw, ch = min(opts.crop[0], width), min(opts.crop[1], height)
    boxes = [(y, x) for y in _windows(height, ch, opts.stride[1]) for x in _windows(width, cw, opts.stride[0])]
    total = torch.zeros(NUM_CLASSES, height, width, device=device)
    count = torch.zeros(1, height, width, device=device)
    for i in range(0, len(boxes), opts.batch_size):
        chunk = boxes[i:i + opts.batch_size]
        crops = torch.stack([image[y:y + ch, x:x + cw] for y, x in chunk])
        logits = _forward(model, _pixels(crops, model, device, opts), opts.flip)
        logits = F.interpolate(logits, size=(ch, cw), mode="bilinear", align_corners=False)
        for (y, x), logit in zip(chunk, logits):
            total[:, y:y + ch, x:x + cw] += logit
            count[:, y:y + ch, x:x + cw] += 1
    logits = total / count
    if (height, width) != tuple(size):
        logits = upsample_logits(logits[None], size)[0]
    return logits


def confusion_update(confusion: torch.Tensor, pred: torch.Tensor, label: torch.Tensor) -> None:
    """Add one frame: rows = ground truth, columns = prediction, IGNORE pixels left out.

    Without a host-device sync: a boolean mask would need the device to say how many pixels survive, and
    bincount asks it for the largest index. IGNORE pixels go to one extra bin instead, and a scatter-add counts.
    """
    cells = NUM_CLASSES * NUM_CLASSES
    # Ids 19-254 are left out like IGNORE (as mmseg's histogram does): indexing past the matrix would be a fatal
    # device-side assert on a GPU.
    outside = (label == IGNORE) | (label >= NUM_CLASSES)
    index = torch.where(outside, cells, label.long() * NUM_CLASSES + pred.long()).reshape(-1)
    counts = torch.zeros(cells + 1, dtype=torch.int64, device=confusion.device)
    counts.scatter_add_(0, index, index.new_ones(()).expand_as(index))  # a broadcast 1, not a frame of ones
    confusion += counts[:cells].view(NUM_CLASSES, NUM_CLASSES)


@torch.no_grad()
def evaluate_model(model, ds, data_cfg: DataConfig, accelerator, *, opts: InferenceOptions | None = None,
                   limit: int = 0, num_examples: int = 0, protocol: str = "19") -> dict:
    """Confusion matrix and metrics of `model` on dataset `ds`, summed over all ranks (call on every rank)."""
    opts = opts or InferenceOptions(eval_size=data_cfg.eval_size.wh)
    device = accelerator.device
    was_training = model.training
    model.eval()
    confusion = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.int64, device=device)
    counts = torch.zeros(2, dtype=torch.int64, device=device)  # samples, skipped
    # ACDC: one more matrix per condition (same order on every rank: the manifest's), reported beside the total
    groups = {g: torch.zeros_like(confusion) for g in ds.groups}
    group_samples = torch.zeros(max(len(groups), 1), dtype=torch.int64, device=device)
    group_index = {g: i for i, g in enumerate(groups)}
    examples = []
    resize = opts.eval_size if opts.mode == "whole" else None
    loader = eval_loader(ds, data_cfg, rank=accelerator.process_index, world=accelerator.num_processes,
                         batch_size=opts.batch_size, resize=resize, limit=limit,
                         pin_memory=device.type == "cuda")
    with accelerator.autocast():
        for batch in loader:
            counts[1] += batch["skipped"]
            if not batch["key"]:
                continue
            labels = [lab.to(device, non_blocking=True) for lab in batch["label"]]
            logits = predict_logits(model, batch["image"], [tuple(lab.shape) for lab in labels], opts, device)
            for image, logit, label, key in zip(batch["image"], logits, labels, batch["key"]):
                pred = logit.argmax(0)
                confusion_update(confusion, pred, label)
                group = key.split("_", 1)[0] if groups else None
                if group in groups:
                    confusion_update(groups[group], pred, label)
                    group_samples[group_index[group]] += 1
                if len(examples) < num_examples and accelerator.is_main_process:
                    examples.append((image.numpy(), label.cpu().numpy(), pred.to(torch.uint8).cpu().numpy()))
            counts[0] += len(batch["key"])
    confusion = accelerator.reduce(confusion, reduction="sum")
    counts = accelerator.reduce(counts, reduction="sum")
    groups = {g: accelerator.reduce(c, reduction="sum").cpu().numpy().astype(np.int64) for g, c in groups.items()}
    group_samples = accelerator.reduce(group_samples, reduction="sum").cpu()
    model.train(was_training)
    result = metrics_from_confusion(confusion.cpu().numpy().astype(np.int64), protocol)
    return {**result, "confusion": confusion.cpu().numpy().astype(np.int64), "num_samples": int(counts[0]),
            "skipped": int(counts[1]), "examples": examples, "protocol": protocol,
            "groups": {g: {**metrics_from_confusion(c, protocol), "confusion": c,
                           "num_samples": int(group_samples[group_index[g]])} for g, c in groups.items()}}


def load_any(path: str, base: str | None = None, allow_base_mismatch: bool = False):
    """A full model folder (or hub id), or an adapter folder applied to its recorded base (or `base`)."""
    from segda.adapters import is_adapter, load_adapted
    from segda.model import build_model

    if is_adapter(path):
        return load_adapted(path, base, allow_base_mismatch=allow_base_mismatch)
    if (Path(path) / "adapter_model.safetensors").is_file() or (Path(path) / "segda.json").is_file():
        raise SegdaError(f"{path} looks like an adapter folder but has no adapter_config.json: copy the whole "
                         "folder written by `segda adapt` (adapter_config.json, adapter_model.safetensors, "
                         "segda.json)")
    if base:
        raise SegdaError(f"--base applies to adapters, but {path} is a full model folder")
    return build_model(path)


def parse_labeled(items: list[str], what: str) -> list[tuple[str, str]]:
    """['LABEL=PATH' or 'PATH', ...] -> [(label, path)]; labels default to the folder or file name."""
    out = []
    for item in items:
        label, sep, path = item.partition("=")
        if not sep or "://" in label:
            path, label = item, Path(item.rstrip("/")).name.replace("-manifest.json", "")
        if not path:
            raise SegdaError(f"--{what} {item!r}: expected [LABEL=]PATH")
        out.append((label, path))
    labels = [label for label, _ in out]
    if len(set(labels)) != len(labels):
        raise SegdaError(f"--{what} labels must be unique, got {labels}: name them LABEL=PATH")
    return out


def evaluate_matrix(models: list[tuple[str, str]], datasets: list[tuple[str, str]], out_dir: str | Path,
                    data_cfg: DataConfig, opts: InferenceOptions, *, base: str | None = None,
                    allow_base_mismatch: bool = False, limit: int = 0, num_examples: int = 4,
                    extra: dict | None = None, accelerator=None, protocol: str = "19") -> dict:
    """Evaluate every model on every dataset and write the report (main process)."""
    from accelerate import Accelerator

    from segda.log import set_main_process
    from segda.report import format_matrix, write_report

    accelerator = accelerator or Accelerator()
    set_main_process(accelerator.is_main_process)
    if accelerator.device.type == "cpu":
        from segda.host_memory import keep_freed_memory

        keep_freed_memory()  # full-size logits are not faulted back in at every frame
    from segda.adapters import SharedBase, is_adapter

    fetch = {"allow_pipe": data_cfg.allow_pipe, "timeout": data_cfg.timeout, "retries": data_cfg.retries}
    resolved = [(label, resolve_dataset(spec, **fetch).require_labels("evaluation"), spec)
                for label, spec in datasets]
    results = []
    shared = SharedBase(allow_base_mismatch)  # adapters of one base: the base is loaded once
    for entry in models:  # (label, path) or (label, path, {InferenceOptions field: value} for this model only)
        model_label, path = entry[:2]
        model_opts = dataclasses.replace(opts, **entry[2]) if len(entry) > 2 else opts
        if is_adapter(path):
            model = shared.activate(path, base).to(accelerator.device)
        else:
            model = load_any(path, base, allow_base_mismatch).to(accelerator.device)
        for data_label, ds, spec in resolved:
            info(f"evaluating {model_label} on {data_label} ...")
            r = evaluate_model(model, ds, data_cfg, accelerator, opts=model_opts, limit=limit,
                               num_examples=num_examples, protocol=protocol)
            if r["num_samples"] == 0:
                raise SegdaError(f"no sample of {data_label} ({spec}) could be evaluated ({r['skipped']} skipped): "
                                 "shards without labels, or every sample bad (see the warnings above)")
            info(f"  mIoU {100 * r['miou']:.1f} ({r['protocol_classes']} classes, protocol {protocol}) over "
                 f"{r['num_samples']} samples, {r['num_pixels']:,} pixels")
            results.append({**r, "model": model_label, "data": data_label, "model_path": path, "data_spec": spec})
            for group, g in r["groups"].items():  # ACDC: each condition as its own column
                info(f"  {group}: mIoU {100 * g['miou']:.1f} over {g['num_samples']} samples")
                results.append({**g, "model": model_label, "data": f"{data_label}/{group}", "model_path": path,
                                "data_spec": spec, "skipped": 0, "examples": []})
    report = {}
    if accelerator.is_main_process:
        report = write_report(out_dir, results, extra)
        print(format_matrix(results))
        info(f"report: {Path(out_dir) / 'report.md'}")
    accelerator.wait_for_everyone()
    return report
