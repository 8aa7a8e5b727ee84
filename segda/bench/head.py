"""`segda bench head`: SegFormer with segda's fused decode head against transformers' own, the same weights.

    segda bench head --crop 96x96 --batch 8 --config demo     # segda demo's model, as its stages train it
    segda bench head --crop 512x512 --batch 8 --config b0 --bf16   # MiT-b0 at the real recipe's crop, bf16 autocast

Forward and backward in train mode (a training step's compute, without the optimizer) and the forward alone in
eval mode (inference), in fp32 or under bf16 autocast (`--bf16`, as segda trains on a GPU), alternated for
`--repeats` rounds on one random batch; also the largest difference of their logits (float rounding:
`segda.decode_head` changes the order of the sums, not the map).
"""

from __future__ import annotations

import copy
import time

import torch

import yaml

from segda.bench import report
from segda.bench.step import _sync
from segda.demo import DemoSize
from segda.log import info

CONFIGS = {"demo": yaml.safe_load(DemoSize.model_config), "b0": {}}
"""`demo`: segda demo's half-width MiT-b0 (its DemoSize.model_config); `b0`: MiT-b0."""


def _rate(model, images: torch.Tensor, steps: int, train: bool, device: torch.device, bf16: bool) -> float:
    model.train(train)
    with torch.set_grad_enabled(train):
        def once():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(pixel_values=images).logits
            if train:
                logits.float().square().mean().backward()
        once()  # warm-up
        _sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            once()
        _sync(device)
    return steps * len(images) / (time.perf_counter() - start)


def bench_head(crop=(96, 96), batch: int = 8, steps: int = 5, repeats: int = 3, config: str = "demo",
               device: str | None = None, bf16: bool = False) -> dict:
    from segda.decode_head import transformers_decode_head
    from segda.model import build_model

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    fused = build_model("", CONFIGS[config]).to(device)
    plain = copy.deepcopy(fused)
    transformers_decode_head(plain)
    width, height = crop
    images = torch.randn(batch, 3, height, width, device=device)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        difference = (fused.eval()(pixel_values=images).logits.float()
                      - plain.eval()(pixel_values=images).logits.float()).abs().max()
    info(f"decode head: SegFormer {config} ({CONFIGS[config] or 'MiT-b0'}), batch {batch}, {width}x{height}, "
         f"{device}, {torch.get_num_threads()} thread(s), {'bf16 autocast' if bf16 else 'fp32'}; largest logit "
         f"difference {float(difference):.2e}")
    result = {"config": config, "crop": [width, height], "batch": batch, "bf16": bf16,
              "max_logit_difference": float(difference)}
    for train, name in ((True, "forward+backward"), (False, "forward (eval)")):
        ours, base = [], []
        for _ in range(repeats):
            ours.append(_rate(fused, images, steps, train, device, bf16))
            base.append(_rate(plain, images, steps, train, device, bf16))
        result[name] = report(f"{name}, fused head vs transformers'", ours, base, "img/s")
    return result
