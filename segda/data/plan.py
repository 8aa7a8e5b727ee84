"""Who reads which samples: the pure arithmetic behind splitting a dataset over ranks and workers.

Indexed datasets (a manifest with each sample's byte offset, `segda shards` >= 0.2) are read sample by sample:

- Training: each epoch has one seeded permutation of ALL samples, `epoch_order(N, seed, epoch)`, defined without
  reference to the world size. Rank r takes positions r, r + W, r + 2W, ... of it, so the b-th batches of all ranks
  together are one contiguous stretch of the permutation: after S steps, exactly the first S x B x W samples of
  the order have been trained on, whatever the ranks and workers (what an elastic resume needs to know).
  Batches are uniform random draws from the whole dataset, not windows of one city.
- The loader's batches form one endless sequence over epochs (global batch g = epoch x batches_per_epoch + b);
  worker k of K serves g = start + k, start + k + K, ..., exactly the order in which torch's DataLoader takes
  batches from its workers, so workers live across epochs and a resume at any step needs no bookkeeping.

Datasets without offsets (older manifests, shard URL patterns, data.verify) are read shard by shard:

The shards of an epoch (shuffled per epoch for training) are laid end to end as one virtual sequence of samples.
Each rank takes a contiguous range of it, and each worker a contiguous range of its rank's batches, so every rank
reads mostly whole shards, however many shards and slots there are, and no sample is read by two slots.

Training: every rank gets exactly floor(N / world) samples (the N mod world left over differ from epoch to epoch),
so every rank yields the same number of batches and DDP never waits on a rank that ran dry. Only the last batch of
a rank may be partial. Evaluation: ranks get N split as evenly as possible, every sample exactly once.
Rank and world size are arguments, never read from globals: the plan is testable with fake ranks.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Segment:
    shard: int
    """Index into the dataset's shard list."""
    start: int
    """First sample position inside the shard (tar order)."""
    stop: int
    """One past the last sample position."""


@dataclass(frozen=True)
class WorkerPlan:
    segments: tuple[Segment, ...]
    batch_sizes: tuple[int, ...]
    """Sizes of the batches this worker yields, in order."""

    @property
    def num_samples(self) -> int:
        return sum(self.batch_sizes)


@dataclass(frozen=True)
class DataPosition:
    """How far one stream's data order has got: `consumed` positions of epoch `epoch`'s order are trained on, by
    every rank together; `end` is where that epoch stops (None: where the current world size stops it). It does not
    depend on the world size, which is what lets a run resume on another number of processes."""

    epoch: int = 0
    consumed: int = 0
    end: int | None = None

    @classmethod
    def of(cls, value) -> "DataPosition":
        """From a DataPosition, a state dict ({epoch, consumed, end}), or None (the start)."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        return cls(int(value["epoch"]), int(value["consumed"]), value.get("end"))

    def state_dict(self) -> dict:
        return asdict(self)


def epoch_order(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The epoch's permutation of all sample indices: a function of (seed, epoch) alone, never of the world size."""
    return np.random.default_rng([seed, epoch, 0x0DE4]).permutation(num_samples)


def batches_per_epoch(num_samples: int, world: int, batch_size: int) -> int:
    """Batches every rank yields per epoch: floor(N / world) samples each, the last batch possibly partial."""
    per_rank = num_samples // world
    if per_rank == 0:
        raise ValueError(f"{num_samples} samples cannot feed {world} ranks")
    return -(-per_rank // batch_size)


def epoch_end(num_samples: int, world: int) -> int:
    """How many positions of the epoch's order are trained on with `world` ranks (the N mod world rest)."""
    return num_samples // world * world


def rank_batches(num_samples: int, rank: int, world: int, batch_size: int, seed: int, epoch: int,
                 start: int = 0, end: int | None = None, order_of=epoch_order) -> list[np.ndarray]:
    """The global sample indices of each of this rank's batches, for positions [start, end) of the epoch's order.

    A whole epoch is start=0, end=epoch_end(N, world). A resumed epoch starts where the checkpoint's ranks had
    got to and ends where they would have (its `end`), whatever the world size now: its R = end - start samples
    go R // world to each rank (positions r, r + W, ...), and the R mod W left over join the last batch of ranks
    0, 1, ..., so every one of them is trained on exactly once and every rank has the same number of batches.
    `order_of(N, seed, epoch)` gives the epoch's order: `epoch_order`, or a sampled one (rare-class sampling).
    """
    positions = rank_positions(num_samples, rank, world, batch_size, start, end)
    if not positions:
        return []
    order = order_of(num_samples, seed, epoch)
    return [order[p] for p in positions]


def rank_positions(num_samples: int, rank: int, world: int, batch_size: int, start: int = 0,
                   end: int | None = None) -> list[np.ndarray]:
    """The positions in the epoch's order (not the samples) of each of this rank's batches: see `rank_batches`."""
    end = epoch_end(num_samples, world) if end is None else end
    if end - start < world:
        return []  # fewer samples left than ranks: they rest, like the N mod W remainder of every epoch
    remaining = np.arange(start, end)
    share = len(remaining) // world
    mine = remaining[rank: share * world: world]
    batches = [mine[i:i + batch_size] for i in range(0, share, batch_size)]
    extra = share * world + rank
    if extra < len(remaining):
        batches[-1] = np.append(batches[-1], remaining[extra])
    return batches


def position_after(batch: int, num_batches: int, batch_size: int, world: int, epoch: int, start: int,
                   end: int) -> DataPosition:
    """Where the epoch's order stands once every rank has finished its batch `batch` of `num_batches` (counted
    from `start`): the data position a checkpoint records, independent of the world size."""
    if batch + 1 >= num_batches:
        return DataPosition(epoch + 1, 0, None)
    return DataPosition(epoch, start + (batch + 1) * batch_size * world, end)


def worker_batches(start: int, stop: int | None, worker: int, workers: int):
    """Global batch numbers served by `worker` of `workers` (0: in-process), from `start` to `stop` (None: endless).

    torch's DataLoader takes batch i from worker i mod K (it starts every iterator at worker 0), so dealing the
    batches out the same way keeps the loader's output in global batch order.
    """
    k = max(workers, 1)
    if stop is None:
        return itertools.count(start + worker, k)
    return range(start + worker, stop, k)


def shard_order(num_shards: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    if not shuffle:
        return list(range(num_shards))
    return np.random.default_rng([seed, epoch, 0x5E6DA]).permutation(num_shards).tolist()


def segments_for_range(counts: list[int], order: list[int], start: int, stop: int) -> tuple[Segment, ...]:
    """The pieces of shards that cover virtual positions [start, stop) of the shards laid end to end in `order`."""
    segments, offset = [], 0
    for shard in order:
        lo, hi = max(start, offset), min(stop, offset + counts[shard])
        if lo < hi:
            segments.append(Segment(shard, lo - offset, hi - offset))
        offset += counts[shard]
        if offset >= stop:
            break
    return tuple(segments)


def train_plan(counts: list[int], rank: int, world: int, workers: int, batch_size: int, seed: int,
               epoch: int) -> list[WorkerPlan]:
    """Per-worker plans of one rank for one training epoch (workers=0 means one in-process reader)."""
    per_rank = sum(counts) // world
    if per_rank == 0:
        raise ValueError(f"{sum(counts)} samples cannot feed {world} ranks")
    order = shard_order(len(counts), seed, epoch, shuffle=True)
    sizes = [batch_size] * (per_rank // batch_size) + ([per_rank % batch_size] if per_rank % batch_size else [])
    plans, first = [], rank * per_rank
    for lo, hi in _even_split(len(sizes), max(workers, 1)):
        start = first + sum(sizes[:lo])
        stop = start + sum(sizes[lo:hi])
        plans.append(WorkerPlan(segments_for_range(counts, order, start, stop), tuple(sizes[lo:hi])))
    return plans


def eval_plan(counts: list[int], rank: int, world: int, workers: int, batch_size: int) -> list[WorkerPlan]:
    """Per-worker plans of one rank for evaluation: contiguous, in order, every sample exactly once overall."""
    lo_rank, hi_rank = _even_split(sum(counts), world)[rank]
    plans = []
    for lo, hi in _even_split(hi_rank - lo_rank, max(workers, 1)):
        n = hi - lo
        sizes = [batch_size] * (n // batch_size) + ([n % batch_size] if n % batch_size else [])
        segments = segments_for_range(counts, list(range(len(counts))), lo_rank + lo, lo_rank + hi)
        plans.append(WorkerPlan(segments, tuple(sizes)))
    return plans


def eval_plan_unknown_counts(num_shards: int, rank: int, world: int, workers: int) -> list[list[int]]:
    """Without a manifest: whole shards dealt round-robin to the world x workers slots (exactly once)."""
    slots = world * max(workers, 1)
    return [list(range(rank * max(workers, 1) + w, num_shards, slots)) for w in range(max(workers, 1))]


def _even_split(n: int, parts: int) -> list[tuple[int, int]]:
    """[lo, hi) ranges of n items over `parts`, sizes differing by at most one, the larger ones first."""
    base, extra = divmod(n, parts)
    bounds, lo = [], 0
    for p in range(parts):
        hi = lo + base + (1 if p < extra else 0)
        bounds.append((lo, hi))
        lo = hi
    return bounds


def batches_consumed(batch_counts: list[int], steps: int) -> list[int]:
    """How many batches each worker has delivered after `steps` batches of torch's DataLoader.

    The DataLoader takes batches from its workers in turn (0, 1, ..., K-1, 0, ...), skipping workers that are
    exhausted. Resuming at `steps` means each worker skips its first `consumed[k]` batches.
    """
    consumed = [0] * len(batch_counts)
    remaining, worker = steps, 0
    if steps > sum(batch_counts):
        raise ValueError(f"step {steps} is past the end of an epoch of {sum(batch_counts)} batches")
    while remaining:
        if consumed[worker] < batch_counts[worker]:
            consumed[worker] += 1
            remaining -= 1
        worker = (worker + 1) % len(batch_counts)
    return consumed
