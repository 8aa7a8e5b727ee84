"""`segda bench`: segda against the plain baseline a user would otherwise write, side by side in one run.

    segda bench loader --data shards/cityscapes/train-manifest.json --raw raw/cityscapes --workers 2 --crop 512
    segda bench train --crop 256 --batch 4
    segda bench loop --model tiny --crop 512 --batch 8 --workers 1 --json loop.json
    segda bench shards gta5 raw/gta5
    segda bench stream --world 64 --workers 8

Each measurement alternates segda and baseline for `--repeats` rounds (the machines are noisy) and reports
medians and the ratio, ending with `N.Nx`. Tooling, not training: nothing under segda.train imports this package.
"""

from __future__ import annotations

import statistics
import time

from segda.log import info


def report(name: str, segda_rates: list[float], base_rates: list[float], unit: str, per: int = 1) -> dict:
    s, b = statistics.median(segda_rates), statistics.median(base_rates)
    info(f"{name}: segda {s:.2f} {unit} (runs {', '.join(f'{r:.2f}' for r in segda_rates)}); "
         f"baseline {b:.2f} {unit} (runs {', '.join(f'{r:.2f}' for r in base_rates)})")
    if per > 1:
        info(f"per worker: segda {s / per:.2f}, baseline {b / per:.2f} {unit}")
    ratio = s / b
    print(f"{name} speed-up (median segda / median baseline): {ratio:.1f}x" if ratio >= 0.1 else
          f"{name} speed ratio (median segda / median baseline): {ratio:.3f}x (baseline {1 / ratio:.0f}x faster)")
    return {"segda": s, "baseline": b, "ratio": ratio, "segda_runs": segda_rates, "baseline_runs": base_rates}


def rate(iterable, limit: int) -> float:
    """Samples per second of `iterable`'s batches after the first (start-up is not throughput), over `limit`."""
    it = iter(iterable)
    first = next(it)  # start-up (worker fork, first shard open) is not throughput
    n, start = 0, time.perf_counter()
    for batch in it:
        n += len(batch["key"]) if isinstance(batch, dict) else len(batch[0])
        if n >= limit:
            break
    del first
    return n / (time.perf_counter() - start)
