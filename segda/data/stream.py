"""Training batches: plan -> read -> decode -> augment -> batch, one way for every dataset.

    data = TrainingData(ds, cfg.data, rank=r, world=w, seed=0)   # a stateful part of the checkpoint
    data.load_state_dict(saved)            # optional: resume at a data position
    for batch in data: ...                 # endless, over epochs: {"image": uint8 (B,H,W,3), "label": uint8 (B,H,W),
                                           #  "valid": int32 (B,3), "key": [...], "skipped": int, "epoch": int}
    data.state_dict()                      # the position after the last batch handed out

Which rank and worker reads which samples is `segda.data.plan`: each epoch is one seeded permutation of the whole
dataset, read sample by sample (a seek, or one Range request per run of neighbouring samples). A dataset without
byte offsets is indexed first (`segda.data.datasets.indexed_for_training`). The loader must NOT go through
`accelerator.prepare`, which would re-split batches (half the data unused, or duplicates). Batches are built in the
workers, which live across epochs.

Each sample's augmentation is seeded by (seed, epoch, key), so it does not depend on which rank or worker reads it,
and a resumed run sees exactly the batches an uninterrupted one would have seen. A bad sample is replaced by a
good one of the same batch (`segda.data.bad`), so every rank keeps its batch count.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset

from segda.config import DataConfig
from segda.data import plan as planning
from segda.data.augment import Augmenter
from segda.data.datasets import Dataset, indexed_for_training
from segda.data.loader import make_loader, worker_index
from segda.data.plan import DataPosition
from segda.data.reader import SampleReader, is_labeled
from segda.log import SegdaError, report_suppressed


def frames_per_batch(cfg: DataConfig) -> int:
    return cfg.batch_size // cfg.crops_per_frame  # the plan counts frames, a batch holds crops


def batches_per_epoch(ds: Dataset, cfg: DataConfig, world: int) -> int:
    """Batches each rank yields per epoch (equal on every rank)."""
    check_trainable(ds, world)
    return planning.batches_per_epoch(ds.num_samples, world, frames_per_batch(cfg))


class TrainStream(IterableDataset):
    """Training batches of one rank from an indexed dataset, starting at a data `position` (see `DataPosition`)
    and going on over the following epochs; `num_batches` of them, or endlessly. Each batch carries the position
    reached once every rank has trained on it: what a checkpoint records, valid on any number of ranks."""

    def __init__(self, ds: Dataset, cfg: DataConfig, *, rank: int, world: int, seed: int,
                 position: DataPosition | dict | None = None, num_batches: int | None = None,
                 order_of=planning.epoch_order):
        check_trainable(ds, world)
        if not ds.indexed:
            raise ValueError(f"{ds.spec} has no byte offsets: pass it through indexed_for_training first")
        self.ds, self.cfg, self.rank, self.world, self.seed = ds, cfg, rank, world, seed
        self.order_of = order_of  # each epoch's order of samples (a permutation, or rare-class sampling's draws)
        position = DataPosition.of(position)
        self.epoch0, self.start0 = position.epoch, position.consumed
        self.end0 = position.end or planning.epoch_end(ds.num_samples, world)
        self.batches_per_epoch = planning.batches_per_epoch(ds.num_samples, world, frames_per_batch(cfg))
        self.first = len(self._epoch_batches(self.epoch0, self.start0, self.end0))
        self.num_batches = num_batches

    def __iter__(self):
        return self.worker_iter(worker_index())

    def worker_iter(self, worker: int) -> Iterator[dict]:
        """What loader worker `worker` yields (benchmarks call this to simulate many workers in one process)."""
        reader = SampleReader(self.ds, strict=self.cfg.strict, threads=self.cfg.io_threads,
                              timeout=self.cfg.timeout, retries=self.cfg.retries)
        augmenter = Augmenter(self.cfg, self.seed, is_labeled(self.ds), reader.bad)
        numbers = iter(planning.worker_batches(0, self.num_batches, worker, self.cfg.workers))
        number = next(numbers, None)
        ahead = self._fetch(reader, number)
        try:
            while number is not None:
                following = next(numbers, None)
                pending, ahead = ahead, self._fetch(reader, following)  # the next batch's reads overlap this one
                yield self._batch(reader, augmenter, number, pending)
                number = following
        finally:
            reader.close()
            report_suppressed()

    def _locate(self, number: int) -> tuple[int, int, int, int]:
        """(epoch, batch in it, first position, end position) of this stream's batch `number`."""
        if number < self.first:
            return self.epoch0, number, self.start0, self.end0
        epoch, b = divmod(number - self.first, self.batches_per_epoch)
        return self.epoch0 + 1 + epoch, b, 0, planning.epoch_end(self.ds.num_samples, self.world)

    def _fetch(self, reader: SampleReader, number: int | None):
        if number is None:
            return None
        epoch, b, start, end = self._locate(number)
        return reader.fetch([self.ds.locate(int(i)) for i in self._epoch_batches(epoch, start, end)[b]])

    def _epoch_plan(self, epoch: int, start: int, end: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """(samples, positions in the epoch's order) of each of this rank's batches, made once per epoch."""
        key = (epoch, start, end)
        if getattr(self, "_cached", (None,))[0] != key:
            args = self.ds.num_samples, self.rank, self.world, frames_per_batch(self.cfg)
            self._cached = (key, planning.rank_batches(*args, self.seed, epoch, start, end, self.order_of),
                            planning.rank_positions(*args, start, end))
        return self._cached[1], self._cached[2]

    def _epoch_batches(self, epoch: int, start: int, end: int) -> list[np.ndarray]:
        return self._epoch_plan(epoch, start, end)[0]

    def _draws(self, epoch: int, b: int, start: int, end: int) -> list:
        """Rare-class sampling: (position, drawn class) of each sample of batch b; otherwise Nones."""
        batches, positions = self._epoch_plan(epoch, start, end)
        draws_of = getattr(self.order_of, "draws", None)
        if draws_of is None:
            return [None] * len(batches[b])
        drawn = draws_of(self.ds.num_samples, self.seed, epoch)[1]
        return [(int(p), int(drawn[p])) for p in positions[b]]

    def _batch(self, reader: SampleReader, augmenter: Augmenter, number: int, fetched) -> dict:
        epoch, b, start, end = self._locate(number)
        batches = self._epoch_batches(epoch, start, end)
        draws = self._draws(epoch, b, start, end)
        frames = [[None if s is None else augmenter.crops(s, epoch, d) for s, d in zip(reader.read(fetched), draws)]]
        while not any(c is not None for c in frames[-1]):  # all bad: borrow from the rank's next batches
            if len(frames) > len(batches):
                raise SegdaError(f"rank {self.rank} found no readable sample in {self.ds.spec}; check the warnings "
                                 "above")
            other = (b + len(frames)) % len(batches)
            more = [self.ds.locate(int(i)) for i in batches[other]]
            with reader.bad.not_counted():  # borrowed frames' problems belong to their own batch
                frames.append([None if s is None else augmenter.crops(s, epoch, d)
                               for s, d in zip(reader.read(more), self._draws(epoch, other, start, end))])
        good = [c for c in frames[-1] if c is not None]
        filled = [c if c is not None else good[i % len(good)] for i, c in enumerate(frames[0])]
        position = planning.position_after(b, len(batches), frames_per_batch(self.cfg), self.world, epoch, start, end)
        return {**collate([crop for crops in filled for crop in crops]), "skipped": reader.bad.take(),
                "epoch": epoch, "position": position}


def collate(crops: list[tuple]) -> dict:
    return {"key": [c[0] for c in crops], "image": torch.from_numpy(np.stack([c[1] for c in crops])),
            "label": torch.from_numpy(np.stack([c[2] for c in crops])),
            "valid": torch.from_numpy(np.stack([c[3] for c in crops]))}


def check_trainable(ds: Dataset, world: int) -> None:
    if not ds.counts_known:
        raise SegdaError(f"training needs per-shard sample counts: point data.train at the manifest of {ds.spec} "
                         "(written by `segda shards`)")
    if ds.num_samples < world:
        raise SegdaError(f"{ds.spec} has {ds.num_samples} samples: too few for {world} processes")


class TrainingData:
    """The endless training batches of one rank, and the data position they have reached: a stateful part of
    every checkpoint (`state_dict` is the position after the last batch handed out, which the loop has trained
    on whenever it checkpoints). `order_of(N, seed, epoch)`: each epoch's sample order instead of a permutation
    (rare-class sampling). Close it to stop the loader's workers."""

    def __init__(self, ds: Dataset, cfg: DataConfig, *, rank: int, world: int, seed: int, pin_memory: bool = False,
                 order_of=None):
        self.ds = indexed_for_training(ds, cfg, rank=rank, world=world)
        check_trainable(self.ds, world)
        self.cfg, self.rank, self.world, self.seed, self.pin_memory = cfg, rank, world, seed, pin_memory
        self.order_of = order_of or planning.epoch_order
        self.position = DataPosition()
        self._loader_iter = None

    @property
    def num_samples(self) -> int:
        return self.ds.num_samples

    def state_dict(self) -> dict:
        return self.position.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if self._loader_iter is not None:
            raise RuntimeError("load the data position before iterating")
        self.position = DataPosition.of(state)

    def describe_position(self) -> str:
        return f"epoch {self.position.epoch}, {self.position.consumed} of its samples done"

    def __iter__(self) -> Iterator[dict]:
        stream = TrainStream(self.ds, self.cfg, rank=self.rank, world=self.world, seed=self.seed,
                             position=self.position, order_of=self.order_of)
        self._loader_iter = loader_iter = iter(make_loader(stream, self.cfg.workers, self.pin_memory, self.cfg.threads))
        for batch in loader_iter:
            self.position = batch.pop("position")
            yield batch

    def close(self) -> None:
        """Stop the loader's workers now, not when the garbage collector finds the iterator."""
        shutdown = getattr(self._loader_iter, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


class PairedData:
    """Source and target batches side by side, for adaptation without target labels: {"source": batch, "target":
    batch, "epoch", "key", "skipped"}. Each side has its own plan, seed, position and epochs (the shorter one simply
    starts its next epoch sooner), split by rank and worker as a single stream is, so each side trains on every
    sample of its epoch once and every rank gets one pair per step. "epoch" is the source's; "key" and "skipped"
    cover both sides. Its state is both sides' positions."""

    def __init__(self, source: TrainingData, target: TrainingData):
        self.sides = {"source": source, "target": target}

    @property
    def num_samples(self) -> int:
        return self.sides["source"].num_samples

    def state_dict(self) -> dict:
        return {name: side.state_dict() for name, side in self.sides.items()}

    def load_state_dict(self, state: dict) -> None:
        for name, side in self.sides.items():
            side.load_state_dict(state[name])

    def describe_position(self) -> str:
        return "; ".join(f"{name}: {side.describe_position()}" for name, side in self.sides.items())

    def __iter__(self) -> Iterator[dict]:
        for source, target in zip(self.sides["source"], self.sides["target"]):
            yield {"source": source, "target": target, "epoch": source["epoch"], "key": source["key"] + target["key"],
                   "skipped": source["skipped"] + target["skipped"]}

    def close(self) -> None:
        for side in self.sides.values():
            side.close()
