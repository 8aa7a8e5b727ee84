"""Stream WebDataset shards into training and evaluation batches: plan -> read -> decode -> augment -> batch.

    for batch in training_batches(ds, cfg.data, rank=r, world=w, seed=0, start=s):   # endless, over epochs
        ...  # {"image": uint8 (B,H,W,3), "label": uint8 (B,H,W), "key": [...], "skipped": int, "epoch": int}

Which rank and worker reads which samples is `segda.data.plan`; the loader must NOT go through
`accelerator.prepare`, which would re-split batches (half the data unused, or duplicates). Batches are built in
the workers. An indexed dataset (manifest with byte offsets) is read sample by sample in a per-epoch permutation of
the whole dataset, through one DataLoader whose workers live across epochs. A dataset without offsets is read
shard by shard (contiguous ranges through a shuffle buffer, one DataLoader per epoch), as segda < 0.2 did.

Each sample's augmentation is seeded by (seed, epoch, key), so it does not depend on which rank or worker reads it,
and a resumed run sees exactly the batches an uninterrupted one would have seen. A bad sample is replaced by a
good one of the same batch, so every rank keeps its batch count.
"""

from __future__ import annotations

import os
import zlib
from collections import deque
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from segda.config import DataConfig
from segda.data import plan as planning
from segda.data import transforms as T
from segda.data.datasets import Dataset, with_counts
from segda.data.reader import IMAGE_EXTS, LABEL_EXT, SampleReader, ShardReader, is_labeled
from segda.log import SegdaError, warn

_END = object()
START = {"epoch": 0, "consumed": 0, "end": None}
"""The data position of a new run: nothing of epoch 0 consumed yet."""


def decode_sample(sample: dict) -> tuple[np.ndarray, np.ndarray]:
    """(image, label); an image-only sample (unlabeled shards) gets a label of IGNORE everywhere."""
    ext = next(e for e in IMAGE_EXTS if e in sample)
    image = T.decode_image(sample[ext])
    if LABEL_EXT not in sample:
        return image, np.full(image.shape[:2], T.IGNORE, np.uint8)
    return image, T.decode_label(sample[LABEL_EXT])


def reads_by_sample(ds: Dataset, cfg: DataConfig) -> bool:
    """Random access when the manifest allows it; data.verify hashes whole shards, so it reads them whole."""
    return ds.indexed and not cfg.verify


def require_sample_by_sample(ds: Dataset, cfg: DataConfig) -> None:
    """Rare-class sampling draws frames one by one: refuse a dataset that can only be read shard by shard."""
    if not reads_by_sample(ds, cfg):
        raise SegdaError(f"rare-class sampling draws frames one by one, but {ds.spec} is read shard by shard (no "
                         "byte offsets in its manifest, or data.verify is on): index it with `segda index "
                         "MANIFEST`, turn data.verify off, or set adapt.rare_class_temperature=0")


def _worker_index() -> int:
    info = get_worker_info()
    return 0 if info is None else info.id


def _frames_per_batch(cfg: DataConfig) -> int:
    return cfg.batch_size // cfg.crops_per_frame  # the plan counts frames, a batch holds crops


class _Augmenter:
    """Decode a raw sample once and cut `crops_per_frame` augmented crops from it, seeded by (seed, epoch, key)."""

    def __init__(self, cfg: DataConfig, seed: int, labeled: bool = True):
        self.cfg, self.seed = cfg, seed
        self.cat_max_ratio = cfg.cat_max_ratio if labeled else 1.0  # no classes to balance without labels

    def crops(self, sample: dict, epoch: int, reader, draw: tuple[int, int] | None = None) -> list[tuple] | None:
        """`draw`: (position in the epoch's order, class) of a rare-class draw: the crop must hold that class, and
        a frame drawn twice in an epoch gets two different crops."""
        key = sample["__key__"]
        try:
            image, label = decode_sample(sample)
        except T.DecodeError as err:
            reader._bad(f"sample {key} in {sample['__url__']}: {err}; skipped")
            return None
        rng = np.random.default_rng([self.seed, epoch, zlib.crc32(key.encode()), *(draw[:1] if draw else ())])
        want = draw[1] if draw else None
        return [(key, *self._augment(image, label, rng, want)) for _ in range(self.cfg.crops_per_frame)]

    def _augment(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator, want: int | None = None):
        cfg = self.cfg
        image, label = T.random_scale_crop(image, label, rng, cfg.base_size.wh, cfg.scale_range, cfg.crop_size.wh,
                                           self.cat_max_ratio, want)
        if cfg.flip:
            image, label = T.random_flip(image, label, rng)
        if cfg.photometric:
            image = T.photometric_distortion(image, rng)
        return image, label


class TrainStream(IterableDataset):
    """Training batches of one rank from an indexed dataset, starting at a data `position` ({"epoch", "consumed",
    "end"}: how far the epoch's order had got, see `segda.data.plan`) and going on over the following epochs;
    `num_batches` of them, or endlessly. Each batch carries the position reached once every rank has trained on
    it: what a checkpoint records, valid on any number of ranks."""

    def __init__(self, ds: Dataset, cfg: DataConfig, *, rank: int, world: int, seed: int,
                 position: dict | None = None, num_batches: int | None = None, order_of=planning.epoch_order):
        _check_trainable(ds, world)
        self.ds, self.cfg, self.rank, self.world, self.seed = ds, cfg, rank, world, seed
        self.order_of = order_of  # each epoch's order of samples (a permutation, or rare-class sampling's draws)
        position = position or START
        self.epoch0, self.start0 = position["epoch"], position["consumed"]
        self.end0 = position.get("end") or planning.epoch_end(ds.num_samples, world)
        self.batches_per_epoch = planning.batches_per_epoch(ds.num_samples, world, _frames_per_batch(cfg))
        self.first = len(self._epoch_batches(self.epoch0, self.start0, self.end0))
        self.num_batches = num_batches

    def __iter__(self):
        return self.worker_iter(_worker_index())

    def worker_iter(self, worker: int) -> Iterator[dict]:
        """What loader worker `worker` yields (benchmarks call this to simulate many workers in one process)."""
        reader = SampleReader(self.ds, strict=self.cfg.strict, threads=self.cfg.io_threads,
                              timeout=self.cfg.timeout, retries=self.cfg.retries)
        augmenter = _Augmenter(self.cfg, self.seed, is_labeled(self.ds))
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
            args = self.ds.num_samples, self.rank, self.world, _frames_per_batch(self.cfg)
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

    def _batch(self, reader: SampleReader, augmenter: _Augmenter, number: int, fetched) -> dict:
        epoch, b, start, end = self._locate(number)
        batches = self._epoch_batches(epoch, start, end)
        draws = self._draws(epoch, b, start, end)
        frames = [[None if s is None else augmenter.crops(s, epoch, reader, d)
                   for s, d in zip(reader.read(fetched), draws)]]
        while not any(c is not None for c in frames[-1]):  # all bad: borrow from the rank's next batches
            if len(frames) > len(batches):
                raise SegdaError(f"rank {self.rank} found no readable sample in {self.ds.spec}; check the "
                                 "warnings above")
            counted = reader.skipped
            other = (b + len(frames)) % len(batches)
            more = [self.ds.locate(int(i)) for i in batches[other]]
            frames.append([None if s is None else augmenter.crops(s, epoch, reader, d)
                           for s, d in zip(reader.read(more), self._draws(epoch, other, start, end))])
            reader.skipped = counted  # borrowed frames' problems belong to their own batch
        good = [c for c in frames[-1] if c is not None]
        filled = [c if c is not None else good[i % len(good)] for i, c in enumerate(frames[0])]
        position = planning.position_after(b, len(batches), _frames_per_batch(self.cfg), self.world, epoch, start,
                                           end)
        return {**_collate([crop for crops in filled for crop in crops], reader), "epoch": epoch,
                "position": position}


class SequentialTrainStream(IterableDataset):
    """One epoch of training batches for one rank, read shard by shard (datasets without byte offsets)."""

    def __init__(self, ds: Dataset, cfg: DataConfig, *, rank: int, world: int, seed: int, epoch: int,
                 start_step: int = 0):
        _check_trainable(ds, world)
        self.ds, self.cfg, self.seed, self.epoch, self.rank = ds, cfg, seed, epoch, rank
        counts = [s.num_samples for s in ds.shards]
        self.plans = planning.train_plan(counts, rank, world, cfg.workers, _frames_per_batch(cfg), seed, epoch)
        self.skip_batches = planning.batches_consumed([len(p.batch_sizes) for p in self.plans], start_step)
        # torch's DataLoader always starts its round-robin at worker 0; the uninterrupted run would take the next
        # batch from plan (start_step mod K), so DataLoader worker w serves plan (w + rotation) mod K.
        self.rotation = start_step % len(self.plans)

    @property
    def num_batches(self) -> int:
        return sum(len(p.batch_sizes) - s for p, s in zip(self.plans, self.skip_batches))

    def __iter__(self):
        return self.worker_iter(_worker_index())

    def worker_iter(self, loader_worker: int) -> Iterator[dict]:
        worker = (loader_worker + self.rotation) % len(self.plans)
        plan, skip = self.plans[worker], self.skip_batches[worker]
        reader = ShardReader(self.ds, strict=self.cfg.strict, verify=self.cfg.verify,
                             allow_pipe=self.cfg.allow_pipe, timeout=self.cfg.timeout,
                             retries=self.cfg.retries)
        raw = (s for seg in plan.segments for s in reader.segment(seg.shard, seg.start, seg.stop))
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker])
        stream = _shuffled(raw, self.cfg.shuffle_buffer, rng)
        for _ in range(sum(plan.batch_sizes[:skip])):  # resume: drop what was already trained on, undecoded
            next(stream, None)
        augmenter = _Augmenter(self.cfg, self.seed, is_labeled(self.ds))
        frames = (augmenter.crops(s, self.epoch, reader) for s in stream)
        recent: deque = deque(maxlen=max(plan.batch_sizes, default=1))
        for size in plan.batch_sizes[skip:]:
            batch = []
            for _ in range(size):
                crops = next(frames, _END)
                while crops is None and not recent:  # nothing to refill from yet: take the next readable frame
                    crops = next(frames, _END)
                if crops is None or crops is _END:  # bad or lost: refill from recent ones, keep the batch count
                    if not recent:
                        raise SegdaError(f"worker {worker} of rank {self.rank} found no readable sample in "
                                         f"{self.ds.spec}; check the warnings above")
                    crops = recent[len(batch) % len(recent)]
                recent.append(crops)
                batch.extend(crops)
            yield {**_collate(batch, reader), "epoch": self.epoch}


def _check_trainable(ds: Dataset, world: int) -> None:
    if not ds.counts_known:
        raise SegdaError(f"training needs per-shard sample counts: point data.train at the manifest of "
                         f"{ds.spec} (written by `segda shards`), or count them with with_counts()")
    if ds.num_samples < world:
        raise SegdaError(f"{ds.spec} has {ds.num_samples} samples: too few for {world} processes")


def _shuffled(samples: Iterator[dict], buffer_size: int, rng: np.random.Generator) -> Iterator[dict]:
    buffer: list[dict] = []
    for sample in samples:
        buffer.append(sample)
        if len(buffer) >= buffer_size:
            yield buffer.pop(int(rng.integers(len(buffer))))
    while buffer:
        yield buffer.pop(int(rng.integers(len(buffer))))


def _collate(batch: list[tuple], reader) -> dict:
    skipped, reader.skipped = reader.skipped, 0
    return {
        "key": [k for k, _, _ in batch],
        "image": torch.from_numpy(np.stack([img for _, img, _ in batch])),
        "label": torch.from_numpy(np.stack([lab for _, _, lab in batch])),
        "skipped": skipped,
    }


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
        return self.worker_iter(_worker_index())

    def worker_iter(self, worker: int) -> Iterator[dict]:
        tasks = self.tasks[worker]
        if reads_by_sample(self.ds, self.cfg):
            reader = SampleReader(self.ds, strict=self.cfg.strict, threads=self.cfg.io_threads,
                                  timeout=self.cfg.timeout, retries=self.cfg.retries)
            raw = _read_ahead(reader, [(shard, p) for shard, start, stop in tasks for p in range(start, stop)],
                              chunk=max(self.batch_size, 16))
        else:
            reader = ShardReader(self.ds, strict=self.cfg.strict, verify=self.cfg.verify,
                                 allow_pipe=self.cfg.allow_pipe, timeout=self.cfg.timeout,
                             retries=self.cfg.retries)
            raw = (s for shard, start, stop in tasks for s in reader.segment(shard, start, stop))
        batch: list[tuple] = []
        for sample in raw:
            if sample is None:
                continue
            try:
                image, label = decode_sample(sample)
            except T.DecodeError as err:
                reader._bad(f"sample {sample['__key__']} in {sample['__url__']}: {err}; skipped")
                continue
            if self.resize:
                image = T.resize_image(image, self.resize)
            batch.append((sample["__key__"], image, label))
            if len(batch) == self.batch_size:
                yield _eval_batch(batch, reader)
                batch = []
        if batch or reader.skipped:
            yield _eval_batch(batch, reader)


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


def _eval_batch(batch: list[tuple], reader) -> dict:
    skipped, reader.skipped = reader.skipped, 0
    return {"key": [k for k, _, _ in batch], "image": [torch.from_numpy(i) for _, i, _ in batch],
            "label": [torch.from_numpy(lab) for _, _, lab in batch], "skipped": skipped}


def _warn_unverifiable(ds: Dataset, cfg: DataConfig) -> None:
    if cfg.verify and not any(s.sha256 for s in ds.shards):
        warn(f"data.verify is on but {ds.spec} carries no sha256 to check against: name the dataset by its "
             "manifest to verify shards")


def _loader(stream: IterableDataset, workers: int, pin_memory: bool) -> DataLoader:
    # batch_size=None: batches are built inside the workers; the DataLoader only moves them.
    # Its own generator: starting an iterator draws a seed, and drawing it from the global RNG would shift the
    # model's dropout randomness whenever a run resumes mid-epoch (an extra loader start), breaking exact resume.
    return DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                      prefetch_factor=4 if workers else None, generator=torch.Generator().manual_seed(0),
                      worker_init_fn=_own_process_group if workers else None)


def _own_process_group(worker_id: int) -> None:
    """A launcher stopping a job signals the whole process group (torchrun does): the loader's workers must not
    die of that while their rank finishes its step and checkpoints, so they leave the group. SIGTERM sent to a
    worker itself still ends it (the DataLoader's shutdown relies on that), and torch's watchdog ends a worker
    whose rank died."""
    os.setpgid(0, 0)


def batches_per_epoch(ds: Dataset, cfg: DataConfig, world: int) -> int:
    """Batches each rank yields per epoch (equal on every rank)."""
    _check_trainable(ds, world)
    return planning.batches_per_epoch(ds.num_samples, world, _frames_per_batch(cfg))


def train_stream(ds: Dataset, cfg: DataConfig, *, rank: int, world: int, seed: int, epoch: int,
                 start_step: int = 0) -> TrainStream | SequentialTrainStream:
    """One training epoch of one rank from `start_step` on, read by sample (indexed) or by shard."""
    if reads_by_sample(ds, cfg):
        per_epoch = batches_per_epoch(ds, cfg, world)
        position = {"epoch": epoch, "consumed": start_step * _frames_per_batch(cfg) * world, "end": None}
        return TrainStream(ds, cfg, rank=rank, world=world, seed=seed, position=position,
                           num_batches=per_epoch - start_step)
    return SequentialTrainStream(ds, cfg, rank=rank, world=world, seed=seed, epoch=epoch, start_step=start_step)


def train_loader(ds: Dataset, cfg: DataConfig, *, rank: int, world: int, seed: int, epoch: int,
                 start_step: int = 0, pin_memory: bool = False) -> tuple[DataLoader, int]:
    """The loader of one training epoch for one rank, positioned at `start_step`, and its number of batches."""
    _warn_unverifiable(ds, cfg)
    stream = train_stream(ds, cfg, rank=rank, world=world, seed=seed, epoch=epoch, start_step=start_step)
    return _loader(stream, cfg.workers, pin_memory), stream.num_batches


def training_batches(ds: Dataset, cfg: DataConfig, *, rank: int, world: int, seed: int,
                     position: dict | None = None, pin_memory: bool = False, order_of=None) -> Iterator[dict]:
    """Endless training batches of one rank from data `position` on (default: the start of epoch 0), each
    tagged with its "epoch" and the "position" reached after it.

    Indexed datasets go through one DataLoader whose workers live across epochs (no restart stall at each epoch
    boundary), and a position written with another number of ranks is honoured (see `segda.data.plan`).
    The others get one DataLoader per epoch and must resume on the world size that wrote the position. Close the
    generator to stop the workers. `order_of(N, seed, epoch)`: each epoch's sample order, instead of a permutation
    (indexed datasets only: rare-class sampling).
    """
    _warn_unverifiable(ds, cfg)
    position = position or START
    if order_of is not None:
        require_sample_by_sample(ds, cfg)
    if reads_by_sample(ds, cfg):
        stream = TrainStream(ds, cfg, rank=rank, world=world, seed=seed, position=position,
                             order_of=order_of or planning.epoch_order)
        yield from _loader(stream, cfg.workers, pin_memory)
        return
    per_epoch, frames = batches_per_epoch(ds, cfg, world), _frames_per_batch(cfg)
    epoch, step = position["epoch"], position["consumed"] // (frames * world)
    while True:
        stream = SequentialTrainStream(ds, cfg, rank=rank, world=world, seed=seed, epoch=epoch, start_step=step)
        for batch in _loader(stream, cfg.workers, pin_memory):
            step += 1
            done = step == per_epoch
            batch["position"] = {"epoch": epoch + done, "consumed": 0 if done else step * frames * world,
                                 "end": None}
            yield batch
        epoch, step = epoch + 1, 0


def paired_batches(source: Dataset, target: Dataset, cfg: DataConfig, target_cfg: DataConfig | None = None, *,
                   rank: int, world: int, seed: int,
                   position: dict | None = None, pin_memory: bool = False, source_order_of=None) -> Iterator[dict]:
    """Source and target batches side by side, for adaptation without target labels: {"source": batch,
    "target": batch, "position": {"source": ..., "target": ...}}. Each side has its own plan, seed, position and
    epochs (the shorter one simply starts its next epoch sooner), split by rank and worker as a single stream is,
    so each side trains on every sample of its epoch once, and every rank gets one pair per step
    (`source_order_of`: rare-class sampling's draws on the source side instead). `target_cfg`: the target's data
    settings where they differ (its base size); batch size and crop must be the source's. "epoch" is the
    source's; "key" and "skipped" cover both sides."""
    position = position or {"source": START, "target": START}
    sides = {name: training_batches(ds, side_cfg, rank=rank, world=world, seed=seed + offset,
                                    position=position[name], pin_memory=pin_memory, order_of=order_of)
             for name, ds, side_cfg, offset, order_of in (("source", source, cfg, 0, source_order_of),
                                                          ("target", target, target_cfg or cfg, 7919, None))}
    try:
        for source_batch, target_batch in zip(sides["source"], sides["target"]):
            yield {"source": source_batch, "target": target_batch, "epoch": source_batch["epoch"],
                   "key": source_batch["key"] + target_batch["key"],
                   "skipped": source_batch["skipped"] + target_batch["skipped"],
                   "position": {"source": source_batch["position"], "target": target_batch["position"]}}
    finally:
        for stream in sides.values():
            stream.close()


def elastic(ds: Dataset, cfg: DataConfig) -> bool:
    """Whether a data position written by one number of ranks can be resumed on another."""
    return reads_by_sample(ds, cfg)


def eval_loader(ds: Dataset, cfg: DataConfig, *, rank: int, world: int, batch_size: int = 1,
                resize: tuple[int, int] | None = None, limit: int = 0, pin_memory: bool = False) -> DataLoader:
    _warn_unverifiable(ds, cfg)
    stream = EvalStream(ds, cfg, rank=rank, world=world, batch_size=batch_size, resize=resize, limit=limit)
    return _loader(stream, cfg.workers, pin_memory)


__all__ = ["TrainStream", "SequentialTrainStream", "EvalStream", "train_stream", "train_loader", "elastic", "training_batches",
           "eval_loader", "batches_per_epoch", "with_counts"]
