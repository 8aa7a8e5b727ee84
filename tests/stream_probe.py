"""Run under `accelerate launch`: each rank streams one training epoch and its evaluation share, writes keys.

    accelerate launch ... tests/stream_probe.py MANIFEST OUT_DIR
"""

import json
import sys
from pathlib import Path

from accelerate import Accelerator

from segda.config import DataConfig
from segda.data.datasets import resolve_dataset
from segda.data.eval_stream import eval_loader
from segda.data.stream import TrainingData, batches_per_epoch

manifest, out = sys.argv[1], Path(sys.argv[2])
acc = Accelerator(cpu=True)
cfg = DataConfig(batch_size=2, workers=2, crop_size="32x32", base_size="160x88")
ds = resolve_dataset(manifest)
data = TrainingData(ds, cfg, rank=acc.process_index, world=acc.num_processes, seed=0)
n = batches_per_epoch(ds, cfg, acc.num_processes)
stream = iter(data)
train = [next(stream)["key"] for _ in range(n)]
data.close()
evaluated = [k for b in eval_loader(ds, cfg, rank=acc.process_index, world=acc.num_processes, batch_size=3)
             for k in b["key"]]
out.mkdir(parents=True, exist_ok=True)
(out / f"rank-{acc.process_index}.json").write_text(json.dumps(
    {"world": acc.num_processes, "planned": n, "train": train, "eval": evaluated}))
