"""`segda bench adapters`: evaluating several adapters of one base, the base loaded once and the adapters
switched, against loading base + adapter afresh for each."""

from __future__ import annotations

import time
from pathlib import Path

from segda.bench import report
from segda.log import info


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
    return report("evaluate adapters", [1 / t for t in shared], [1 / t for t in separate], "matrices/s")
