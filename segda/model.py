"""SegFormer for the 19 Cityscapes classes: build (hub id, local folder, or config), save, fingerprint, loss.

    model = build_model("nvidia/mit-b0")                 # ImageNet encoder, fresh 19-class head
    model = build_model("runs/gta5/model")               # a pretrained segda model (transformers folder)
    model = build_model("", {"hidden_sizes": [16, 32, 64, 128]})   # random init (tests, demo)

Weights are read from safetensors only (`use_safetensors=True`): no pickle is ever loaded.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import SegformerConfig, SegformerForSemanticSegmentation

from segda import atomic
from segda.classes import CLASS_NAMES, IGNORE, NUM_CLASSES
from segda.data.transforms import MEAN, STD
from segda.decode_head import fuse_decode_head
from safetensors import SafetensorError

from segda.log import SegdaError
from segda.modelfiles import check_model_folder


def _label_maps() -> dict:
    return {"num_labels": NUM_CLASSES, "id2label": dict(enumerate(CLASS_NAMES)),
            "label2id": {name: i for i, name in enumerate(CLASS_NAMES)}, "semantic_loss_ignore_index": IGNORE}


def build_model(name_or_path: str, config_overrides: dict | None = None, *,
                new_head_ok: bool = False) -> SegformerForSemanticSegmentation:
    """A 19-class SegFormer from a hub id or local folder (weights), or from a SegformerConfig (random init).

    A checkpoint without a trained 19-class decode head (an ImageNet encoder such as nvidia/mit-b0, or a model
    for another class set) gets a fresh head only when `new_head_ok` (pretraining); everywhere else that would
    silently score or adapt a random classifier, so it is refused.
    """
    if not name_or_path:
        try:
            config = SegformerConfig(**{**(config_overrides or {}), **_label_maps()})
            return _fused(SegformerForSemanticSegmentation(config))
        except (TypeError, ValueError, IndexError, RuntimeError, ZeroDivisionError, AttributeError) as err:
            raise SegdaError(f"model.config {config_overrides} does not make a SegFormer ({type(err).__name__}: "
                             f"{err}): its lists (hidden_sizes, depths, ...) need one entry per stage (4) and positive "
                             "sizes") from None
    if config_overrides:
        raise SegdaError("model.config applies to random init only; clear model.name_or_path or model.config")
    check_model_folder(name_or_path)
    try:
        found = SegformerConfig.from_pretrained(name_or_path)
        has_head = "SegformerForSemanticSegmentation" in (found.architectures or [])
        if not (has_head and found.num_labels == NUM_CLASSES) and not new_head_ok:
            what = f"a {found.num_labels}-class decode head" if has_head else "no decode head (an encoder only)"
            raise SegdaError(f"model {name_or_path} has {what}, not the 19 Cityscapes classes: evaluate and adapt "
                             "need a model trained by `segda pretrain` (RUN_DIR/model)")
        return _fused(SegformerForSemanticSegmentation.from_pretrained(
            name_or_path, use_safetensors=True, ignore_mismatched_sizes=new_head_ok, **_label_maps()))
    except OSError as err:
        raise SegdaError(f"cannot load model {name_or_path!r}: {err}. Hub ids need network access and a "
                         "model.safetensors file; offline, download the folder and point at it") from err
    except SafetensorError as err:
        raise SegdaError(f"{name_or_path}: its .safetensors weights are corrupt or truncated ({err}); copy the "
                         "folder again or re-run the stage that wrote it") from err


def _fused(model: SegformerForSemanticSegmentation) -> SegformerForSemanticSegmentation:
    fuse_decode_head(model)  # the same weights and outputs, a faster step (segda.decode_head)
    return model


def save_model(model, out_dir: str | Path) -> Path:
    """save_pretrained (safetensors) into a temporary folder, then swap it in: never a half-written model."""
    model = getattr(model, "module", model)
    with atomic.atomic_path(out_dir) as tmp, atomic.os_errors(out_dir):
        model.save_pretrained(tmp, safe_serialization=True)
    return Path(out_dir)


def fingerprint(model) -> str:
    """sha256 over the model's tensors (names, shapes, fp32 values): identifies the exact base of an adapter."""
    digest = hashlib.sha256()
    state = getattr(model, "module", model).state_dict()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu")
        if tensor.is_floating_point():
            tensor = tensor.float()
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()


def count_parameters(model, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


MEAN_01 = torch.tensor(MEAN).view(1, 3, 1, 1)
STD_01 = torch.tensor(STD).view(1, 3, 1, 1)
"""The normalisation of 0-1 colours, as (1, 3, 1, 1) host constants (pass them through `on_device`)."""
_MEAN, _STD = MEAN_01 * 255, STD_01 * 255
_ON_DEVICE: dict[tuple[int, torch.device], torch.Tensor] = {}


def on_device(constant: torch.Tensor, device) -> torch.Tensor:
    """`constant`, a module-level host tensor, copied to `device` once and kept: a copy from pageable memory waits
    for the device, so the hot path must not make one per step."""
    key = (id(constant), torch.device(device))
    if key not in _ON_DEVICE:
        _ON_DEVICE[key] = constant.to(device)
    return _ON_DEVICE[key]


def normalize(images: torch.Tensor, device, dtype=torch.float32, channels_last: bool = False) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> normalised (B, 3, H, W) in `dtype` on `device`.

    The uint8 batch crosses to the device (4x fewer bytes than float) and is normalised there, with mean and std
    copied to each device once, not per batch.
    """
    device = torch.device(device)
    mean, std = on_device(_MEAN, device), on_device(_STD, device)
    x = images.to(device, non_blocking=True).permute(0, 3, 1, 2).float()
    x = ((x - mean) / std).to(dtype)
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def batchnorm_in_fp32(model) -> int:
    """Run every BatchNorm of `model` in fp32, whatever dtype its weights were cast to; returns how many.

    DeepSpeed's bf16/fp16 casts parameters but not buffers, so the decode head's BatchNorm would meet bf16 weights
    and fp32 running statistics (and fail). Normalisation statistics belong in fp32 anyway, as every
    mixed-precision recipe keeps them: the input and the affine weights are upcast, the output cast back.
    """
    patched = 0
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.forward = _fp32_batchnorm.__get__(module)
            patched += 1
    return patched


def _fp32_batchnorm(self, x: torch.Tensor) -> torch.Tensor:
    average = 0.0 if self.momentum is None else self.momentum
    if self.training and self.track_running_stats and self.num_batches_tracked is not None:
        self.num_batches_tracked.add_(1)
        if self.momentum is None:  # cumulative moving average (reads the count: a sync, as torch's own does)
            average = 1.0 / float(self.num_batches_tracked)
    use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
    keep_stats = not self.training or self.track_running_stats
    out = F.batch_norm(x.float(), self.running_mean if keep_stats else None,
                       self.running_var if keep_stats else None,
                       None if self.weight is None else self.weight.float(),
                       None if self.bias is None else self.bias.float(), use_batch_stats, average, self.eps)
    return out.to(x.dtype)


def upsample_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Logits (B, C, h, w) bilinearly upsampled to `size` (H, W), in float32 and channels-last: each pixel's class
    scores one contiguous row (B, H, W, C in memory), which the full-resolution loss and pseudo-labels reduce over.
    A SegFormer's logits come out channels-last on a CPU; reductions over NCHW's dim 1 first copied the 160 MB of
    8x19x512x512 upsampled logits to NCHW, and their gradient took the NCHW upsampling backward, 3.7x slower than
    the channels-last one (`segda bench loop` measures it)."""
    return F.interpolate(logits.float().contiguous(memory_format=torch.channels_last), size=size, mode="bilinear",
                         align_corners=False)


def pixel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each label pixel against the logits upsampled to the labels' size, shaped like `labels`;
    IGNORE pixels give 0. Over channels-last rows (upsample_logits): the same sums as over NCHW's dim 1, 2x faster
    on a CPU. Per pixel, never reduced inside: CUDA sums a (rows, classes) cross-entropy in a single block of
    threads, where an elementwise loss and a sum spread over the whole GPU."""
    up = upsample_logits(logits, labels.shape[-2:])
    rows = up.permute(0, 2, 3, 1).reshape(-1, up.shape[1])  # a view: channels-last is (B, H, W, C) in memory
    return F.cross_entropy(rows, labels.reshape(-1).long(), ignore_index=IGNORE, reduction="none").view(labels.shape)


def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy over non-IGNORE pixels, logits upsampled to label resolution; with `weight` (shaped like
    `labels`: self-training's pseudo-label weights), each pixel's cross-entropy times its weight.

    Summed and divided by max(valid pixels, 1): a batch with no valid pixel gives 0 (still connected to the
    graph, so every rank joins DDP's gradient all-reduce) instead of the NaN of a mean over nothing, and no
    host-device sync is needed to find out.
    """
    per_pixel = pixel_cross_entropy(logits, labels)
    total = per_pixel.sum() if weight is None else (per_pixel * weight).sum()
    return total / (labels != IGNORE).sum().clamp(min=1)
