"""Stream WebDataset shards into training and evaluation batches: split -> read -> shuffle -> decode -> batch.

    loader, steps = train_loader(ds, cfg.data, rank=r, world=w, seed=0, epoch=e, start_step=s)
    for batch in loader:   # {"image": uint8 (B,H,W,3), "label": uint8 (B,H,W), "key": [...], "skipped": int}

Shards are split by rank, then by worker, inside the pipeline (`segda.data.plan`); the loader must NOT go through
`accelerator.prepare`, which would re-split batches (half the data unused, or duplicates). Batches are built in
the workers. Samples are shuffled as raw bytes and skipped before decoding when resuming mid-epoch, so a resumed
run sees exactly the batches an uninterrupted one would have seen. Each sample's augmentation is seeded by
(seed, epoch, key), so it does not depend on which rank or worker happens to read it.

Bad data (truncated shard, undecodable image, missing label, sha256 mismatch) is skipped with a warning naming
the shard and key and counted in the batches' `skipped` field; `strict` raises instead.
"""

from __future__ import annotations

import hashlib
import tarfile
import tempfile
import zlib
from collections import deque
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_iterator

from segda.config import DataConfig
from segda.data import plan as planning
from segda.data import transforms as T
from segda.data.datasets import Dataset, with_counts
from segda.data.sources import open_url
from segda.log import SegdaError, warn

_END = object()
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp")
LABEL_EXT = "label.png"


class ShardReader:
    """Yields raw samples ({"__key__", image bytes, "label.png", ...}) of shard segments, skipping bad data."""

    def __init__(self, ds: Dataset, *, strict: bool = False, verify: bool = False, allow_pipe: bool = False):
        self.ds, self.strict, self.verify, self.allow_pipe = ds, strict, verify, allow_pipe
        self.skipped = 0

    def segment(self, shard: int, start: int = 0, stop: int | None = None) -> Iterator[dict]:
        url = self.ds.shards[shard].url
        position = 0
        try:
            with self._open(shard) as stream:
                files = ({**f, "__url__": url} for f in tar_file_iterator(stream))
                for sample in group_by_keys(files):
                    if stop is not None and position >= stop:
                        return
                    position += 1
                    if position <= start:
                        continue
                    if self._complete(sample, url):
                        yield sample
            lost = self._lost(shard, start, stop, position)
            if lost:  # a tar that ends early, on a member boundary
                self._bad(f"shard {url} holds {position} samples, the manifest says at least "
                          f"{max(position, start) + lost}: {lost} planned sample(s) lost", lost)
        except (tarfile.TarError, OSError, ValueError, EOFError) as err:
            lost = self._lost(shard, start, stop, position)
            self._bad(f"shard {url} is corrupt or truncated after {position} samples ({type(err).__name__}: "
                      f"{err}); {lost} planned sample(s) lost", lost)

    def _lost(self, shard: int, start: int, stop: int | None, position: int) -> int:
        """Planned samples of [start, stop) never reached (stop None: up to the manifest's count, if known)."""
        end = stop if stop is not None else self.ds.shards[shard].num_samples
        return max(0, (end if end is not None else position) - max(position, start))

    def _open(self, shard: int):
        info = self.ds.shards[shard]
        stream = open_url(info.url, allow_pipe=self.allow_pipe)
        if not (self.verify and info.sha256):
            return stream
        # Refusing a bad shard means hashing it before yielding anything from it: spool it, hash, then read.
        spool = tempfile.SpooledTemporaryFile(max_size=256 << 20)
        digest = hashlib.sha256()
        with stream:
            for chunk in iter(lambda: stream.read(1 << 20), b""):
                digest.update(chunk)
                spool.write(chunk)
        if digest.hexdigest() != info.sha256:
            spool.close()
            raise ValueError(f"sha256 {digest.hexdigest()[:12]}... does not match the manifest's "
                             f"{info.sha256[:12]}...: re-download or re-create the shard")
        spool.seek(0)
        return spool

    def _complete(self, sample: dict, url: str) -> bool:
        if LABEL_EXT not in sample:
            self._bad(f"sample {sample['__key__']} in {url} has no label ({LABEL_EXT}); skipped")
            return False
        if not any(ext in sample for ext in IMAGE_EXTS):
            self._bad(f"sample {sample['__key__']} in {url} has no image ({'/'.join(IMAGE_EXTS)}); skipped")
            return False
        return True

    def _bad(self, message: str, count: int = 1) -> None:
        if self.strict:
            raise SegdaError(message + " (strict mode; set data.strict=false to skip bad data)")
        warn(message)
        self.skipped += count


def decode_sample(sample: dict) -> tuple[np.ndarray, np.ndarray]:
    ext = next(e for e in IMAGE_EXTS if e in sample)
    return T.decode_image(sample[ext]), T.decode_label(sample[LABEL_EXT])


def _shuffled(samples: Iterator[dict], buffer_size: int, rng: np.random.Generator) -> Iterator[dict]:
    buffer: list[dict] = []
    for sample in samples:
        buffer.append(sample)
        if len(buffer) >= buffer_size:
            yield buffer.pop(int(rng.integers(len(buffer))))
    while buffer:
        yield buffer.pop(int(rng.integers(len(buffer))))


def _worker_index() -> int:
    info = get_worker_info()
    return 0 if info is None else info.id


class TrainStream(IterableDataset):
    """One epoch of training batches for one rank; every rank yields exactly `num_batches` batches."""

    def __init__(self, ds: Dataset, cfg: DataConfig, *, rank: int, world: int, seed: int, epoch: int,
                 start_step: int = 0):
        if not ds.counts_known:
            raise SegdaError(f"training needs per-shard sample counts: point data.train at the manifest of "
                             f"{ds.spec} (written by `segda shards`), or count them with with_counts()")
        self.ds, self.cfg, self.seed, self.epoch, self.rank = ds, cfg, seed, epoch, rank
        counts = [s.num_samples for s in ds.shards]
        frames_per_batch = cfg.batch_size // cfg.crops_per_frame  # the plan counts frames, a batch holds crops
        if sum(counts) < world:
            raise SegdaError(f"{ds.spec} has {sum(counts)} samples: too few for {world} processes")
        self.plans = planning.train_plan(counts, rank, world, cfg.workers, frames_per_batch, seed, epoch)
        self.skip_batches = planning.batches_consumed([len(p.batch_sizes) for p in self.plans], start_step)
        # torch's DataLoader always starts its round-robin at worker 0; the uninterrupted run would take the next
        # batch from plan (start_step mod K), so DataLoader worker w serves plan (w + rotation) mod K.
        self.rotation = start_step % len(self.plans)

    @property
    def num_batches(self) -> int:
        return sum(len(p.batch_sizes) - s for p, s in zip(self.plans, self.skip_batches))

    def __iter__(self):
        worker = (_worker_index() + self.rotation) % len(self.plans)
        plan, skip = self.plans[worker], self.skip_batches[worker]
        reader = ShardReader(self.ds, strict=self.cfg.strict, verify=self.cfg.verify,
                             allow_pipe=self.cfg.allow_pipe)
        raw = (s for seg in plan.segments for s in reader.segment(seg.shard, seg.start, seg.stop))
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker])
        stream = _shuffled(raw, self.cfg.shuffle_buffer, rng)
        for _ in range(sum(plan.batch_sizes[:skip])):  # resume: drop what was already trained on, undecoded
            next(stream, None)
        frames = self._augmented(stream, reader)
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
            yield _collate(batch, reader)

    def _augmented(self, stream: Iterator[dict], reader: ShardReader) -> Iterator[list[tuple] | None]:
        """Decode each frame once and cut `crops_per_frame` independent augmented crops from it (None: bad frame)."""
        cfg = self.cfg
        for sample in stream:
            key = sample["__key__"]
            try:
                image, label = decode_sample(sample)
            except T.DecodeError as err:
                reader._bad(f"sample {key} in {sample['__url__']}: {err}; skipped")
                yield None  # keeps one raw sample = one batch slot, so resume positions stay exact
                continue
            rng = np.random.default_rng([self.seed, self.epoch, zlib.crc32(key.encode())])
            yield [(key, *self._augment(image, label, rng)) for _ in range(cfg.crops_per_frame)]

    def _augment(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator):
        cfg = self.cfg
        image, label = T.random_scale_crop(image, label, rng, cfg.base_size, cfg.scale_range, cfg.crop_size,
                                           cfg.cat_max_ratio)
        if cfg.flip:
            image, label = T.random_flip(image, label, rng)
        if cfg.photometric:
            image = T.photometric_distortion(image, rng)
        return image, label


def _collate(batch: list[tuple], reader: ShardReader) -> dict:
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
        reader = ShardReader(self.ds, strict=self.cfg.strict, verify=self.cfg.verify,
                             allow_pipe=self.cfg.allow_pipe)
        batch: list[tuple] = []
        for shard, start, stop in self.tasks[_worker_index()]:
            for sample in reader.segment(shard, start, stop):
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


def _truncate(counts: list[int], limit: int) -> list[int]:
    out, left = [], limit
    for c in counts:
        out.append(min(c, left))
        left -= out[-1]
    return out


def _eval_batch(batch: list[tuple], reader: ShardReader) -> dict:
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
                      prefetch_factor=4 if workers else None, persistent_workers=False,
                      generator=torch.Generator().manual_seed(0))


def train_loader(ds: Dataset, cfg: DataConfig, *, rank: int, world: int, seed: int, epoch: int,
                 start_step: int = 0, pin_memory: bool = False) -> tuple[DataLoader, int]:
    """The loader of one training epoch for one rank, positioned at `start_step`, and its number of batches."""
    _warn_unverifiable(ds, cfg)
    stream = TrainStream(ds, cfg, rank=rank, world=world, seed=seed, epoch=epoch, start_step=start_step)
    return _loader(stream, cfg.workers, pin_memory), stream.num_batches


def eval_loader(ds: Dataset, cfg: DataConfig, *, rank: int, world: int, batch_size: int = 1,
                resize: tuple[int, int] | None = None, limit: int = 0, pin_memory: bool = False) -> DataLoader:
    _warn_unverifiable(ds, cfg)
    stream = EvalStream(ds, cfg, rank=rank, world=world, batch_size=batch_size, resize=resize, limit=limit)
    return _loader(stream, cfg.workers, pin_memory)


__all__ = ["ShardReader", "TrainStream", "EvalStream", "train_loader", "eval_loader", "with_counts"]
