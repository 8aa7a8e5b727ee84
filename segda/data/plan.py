"""Who reads which samples: the pure arithmetic behind splitting a dataset over ranks and workers.

The shards of an epoch (shuffled per epoch for training) are laid end to end as one virtual sequence of samples.
Each rank takes a contiguous range of it, and each worker a contiguous range of its rank's batches, so every rank
reads mostly whole shards, however many shards and slots there are, and no sample is read by two slots.

Training: every rank gets exactly floor(N / world) samples (the N mod world left over differ from epoch to epoch),
so every rank yields the same number of batches and DDP never waits on a rank that ran dry. Only the last batch of
a rank may be partial. Evaluation: ranks get N split as evenly as possible, every sample exactly once.
Rank and world size are arguments, never read from globals: the plan is testable with fake ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

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
