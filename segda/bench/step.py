"""`segda bench train`: segda's training step (uint8 batch normalised on the device, bf16 autocast, fused AdamW
with the on-device non-finite guard, ignore-aware loss) against a plain transformers fp32 loop."""

from __future__ import annotations

import time

import torch

from segda.bench import report
from segda.log import info


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


def make_segda_step(model_config: dict | None, device: torch.device, *, compiled: bool = False,
                    channels_last: bool = False, dtype: torch.dtype | None = torch.bfloat16,
                    compile_mode: str | None = None):
    """segda's training step as a function of a (uint8 images, uint8 labels) batch: normalised on the device,
    autocast in `dtype` (None: fp32), the ignore-aware loss, fused AdamW with the on-device non-finite guard."""
    from segda.model import build_model, normalize, segmentation_loss
    from segda.train.guard import NonFiniteGuard

    model = build_model("", model_config or {}).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=6e-5, fused=True)
    guard = NonFiniteGuard(optimizer, device)
    forward = torch.compile(model, mode=compile_mode) if compiled else model

    def step(b):
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = forward(pixel_values=normalize(b[0], device, channels_last=channels_last)).logits
        segmentation_loss(logits, b[1].to(device, non_blocking=True)).backward()
        guard.arm(model.parameters())
        optimizer.step()
        guard.disarm()
        optimizer.zero_grad(set_to_none=True)
    return step


def isolated_step_rate(model_config: dict | None, crop, batch: int, steps: int, dtype=None,
                       device: str | None = None) -> float:
    """Samples per second of segda's step alone, on one random batch (pinned on a GPU), after a warm-up step."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    width, height = crop
    images = torch.randint(0, 256, (batch, height, width, 3), dtype=torch.uint8)
    labels = torch.randint(0, 19, (batch, height, width), dtype=torch.uint8)
    if device.type == "cuda":
        images, labels = images.pin_memory(), labels.pin_memory()
    return _train_rate(make_segda_step(model_config, device, dtype=dtype), (images, labels), steps, device)


def bench_train(crop=(256, 256), batch: int = 4, steps: int = 3, repeats: int = 3, device: str | None = None,
                model_config: dict | None = None, compile: bool = False, channels_last: bool = False,
                compile_mode: str | None = None) -> dict:
    """segda's step (uint8 batch normalised on the device, bf16 autocast, fused AdamW with the on-device
    non-finite guard, ignore-aware loss) against a plain transformers loop (fp32 eager, float batch, the model's
    own loss). `compile` adds segda's step under torch.compile, measured in the same rounds."""
    from segda.decode_head import transformers_decode_head
    from segda.model import build_model

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    width, height = crop if isinstance(crop, tuple) else (crop, crop)
    images = torch.randint(0, 256, (batch, height, width, 3), dtype=torch.uint8)
    labels = torch.randint(0, 19, (batch, height, width), dtype=torch.uint8)
    plain_model = build_model("", model_config or {}).to(device)
    transformers_decode_head(plain_model)  # the plain loop a user would write: transformers' own head
    plain_opt = torch.optim.AdamW(plain_model.parameters(), lr=6e-5)
    float_images = ((images.permute(0, 3, 1, 2).float() / 255) - 0.45) / 0.226

    def plain_step(b):
        out = plain_model(pixel_values=b[0].to(device), labels=b[1].to(device).long())
        out.loss.backward()
        plain_opt.step()
        plain_opt.zero_grad()

    def segda_step(compiled: bool):
        return make_segda_step(model_config, device, compiled=compiled, channels_last=channels_last,
                               compile_mode=compile_mode)

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
    result = report("train step", ours, base, "img/s")
    if compiled_step is not None:
        result["compiled"] = report("train step compiled", compiled, ours, "img/s")
        info(f"(compiled: segda's step under torch.compile, mode {compile_mode or 'default'}; its baseline here is "
             "segda's eager step)")
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
        info(f"peak GPU memory (all models): {result['peak_memory_gib']:.2f} GiB")
    return result
