"""Evaluation batches: every sample of a dataset exactly once across ranks x workers, in order, unaugmented.

    for batch in eval_loader(ds, cfg.data, rank=r, world=w, batch_size=4, resize=(1024, 512)):
        ...  # {"key": [...], "image": [uint8 (h, w, 3)], "label": [uint8 (h, w)], "skipped": int}

Indexed datasets are read sample by sample (a chunk of requests ahead of decoding); shard URL patterns,
manifests without offsets and data.verify stream whole shards (`segda.data.reader.ShardReader`).
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import IterableDataset

from segda.config import DataConfig
from segda.data import plan as planning
from segda.data import transforms as T
from segda.data.augment import decode_sample
from segda.data.datasets import Dataset
from segda.data.loader import make_loader, worker_index
from segda.data.reader import SampleReader, ShardReader
from segda.log import SegdaError, report_suppressed, warn


class EvalStream(IterableDataset):
    """Evaluation samples of one rank, in order; across ranks x workers every sample is yielded exactly once."""

    def __init__(self, ds: Dataset, cfg: DataConfig, *, rank: int, world: int, batch_size: int = 1,
                 resize: tuple[int, int] | None = None, limit: int = 0):
        self.ds, self.cfg, self.resize, self.batch_size = ds, cfg, resize, batch_size
        workers = max(cfg.workers, 1)
        if ds.counts_known:
            counts = [s.num_samples for s in ds.shards]
            if limit:
                counts = _truncate(counts, limit)
            self.tasks = [[(seg.shard, seg.start, seg.stop) for seg in p.segments]
                          for p in planning.eval_plan(counts, rank, world, cfg.workers, batch_size)]
        else:
            if limit:
                raise SegdaError("an evaluation sample limit needs per-shard counts: use the manifest")
            self.tasks = [[(s, 0, None) for s in shards]
                          for shards in planning.eval_plan_unknown_counts(len(ds.shards), rank, world, workers)]

    def __iter__(self):
        return self.worker_iter(worker_index())

    def worker_iter(self, worker: int) -> Iterator[dict]:
        tasks = self.tasks[worker]
        if self.ds.indexed and not self.cfg.verify:
            reader = SampleReader(self.ds, strict=self.cfg.strict, threads=self.cfg.io_threads,
                                  timeout=self.cfg.timeout, retries=self.cfg.retries)
            raw = _read_ahead(reader, [(shard, p) for shard, start, stop in tasks for p in range(start, stop)],
                              chunk=max(self.batch_size, 16))
        else:
            reader = ShardReader(self.ds, strict=self.cfg.strict, verify=self.cfg.verify,
                                 allow_pipe=self.cfg.allow_pipe, timeout=self.cfg.timeout, retries=self.cfg.retries)
            raw = (s for shard, start, stop in tasks for s in reader.segment(shard, start, stop))
        batch: list[tuple] = []
        try:
            for sample in raw:
                if sample is None:
                    continue
                try:
                    image, label = decode_sample(sample)
                except T.DecodeError as err:
                    reader.bad.report(f"sample {sample['__key__']} in {sample['__url__']}: {err}; skipped")
                    continue
                if self.resize:
                    image = T.resize_image(image, self.resize)
                batch.append((sample["__key__"], image, label))
                if len(batch) == self.batch_size:
                    yield _eval_batch(batch, reader.bad.take())
                    batch = []
            if batch or reader.bad.count:
                yield _eval_batch(batch, reader.bad.take())
        finally:
            report_suppressed()


def _read_ahead(reader: SampleReader, items: list[tuple[int, int]], chunk: int) -> Iterator[dict | None]:
    """The samples at `items`, fetched one chunk ahead of the one being decoded: enough to hide each request's
    round trip, never a whole share of frames held in memory at once."""
    try:
        pending = reader.fetch(items[:chunk])
        for lo in range(chunk, len(items) + chunk, chunk):
            ahead = reader.fetch(items[lo:lo + chunk]) if lo < len(items) else []
            yield from reader.read(pending)
            pending = ahead
    finally:
        reader.close()


def _truncate(counts: list[int], limit: int) -> list[int]:
    out, left = [], limit
    for c in counts:
        out.append(min(c, left))
        left -= out[-1]
    return out


def _eval_batch(batch: list[tuple], skipped: int) -> dict:
    return {"key": [k for k, _, _ in batch], "image": [torch.from_numpy(i) for _, i, _ in batch],
            "label": [torch.from_numpy(lab) for _, _, lab in batch], "skipped": skipped}


def eval_loader(ds: Dataset, cfg: DataConfig, *, rank: int, world: int, batch_size: int = 1,
                resize: tuple[int, int] | None = None, limit: int = 0, pin_memory: bool = False):
    if cfg.verify and not any(s.sha256 for s in ds.shards):
        warn(f"data.verify is on but {ds.spec} carries no sha256 to check against: name the dataset by its "
             "manifest to verify shards")
    stream = EvalStream(ds, cfg, rank=rank, world=world, batch_size=batch_size, resize=resize, limit=limit)
    return make_loader(stream, cfg.workers, pin_memory, cfg.threads)
