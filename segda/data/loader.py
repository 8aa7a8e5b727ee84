"""The DataLoader every stream goes through, and what each of its worker processes sets up first.

Batches are built inside the workers (`batch_size=None`): the DataLoader only moves them. Each worker leaves its
rank's process group (a launcher's SIGTERM must not kill it mid-checkpoint) and limits its own threads: OpenCV
and torch would each start one thread per core in every worker, so K workers on C cores would run K x C threads
that fight over the cores with each other and with the training process (`threads_per_worker`).
"""

from __future__ import annotations

import os

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info


def worker_index() -> int:
    info = get_worker_info()
    return 0 if info is None else info.id


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def threads_per_worker(workers: int, cores: int | None = None, processes_per_node: int | None = None) -> int:
    """Threads each loader worker may use: the node's cores shared out between every training process and its
    workers (LOCAL_WORLD_SIZE processes, each with `workers` workers and itself), at least one."""
    cores = cores or available_cores()
    processes = processes_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, cores // (processes * (workers + 1)))


def make_loader(stream: IterableDataset, workers: int, pin_memory: bool) -> DataLoader:
    # Its own generator: starting an iterator draws a seed, and drawing it from the global RNG would shift the
    # model's dropout randomness whenever a run resumes mid-epoch (an extra loader start), breaking exact resume.
    return DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                      prefetch_factor=4 if workers else None, generator=torch.Generator().manual_seed(0),
                      worker_init_fn=_WorkerInit(threads_per_worker(workers)) if workers else None,
                      persistent_workers=False)


class _WorkerInit:
    """Run first in each worker process (a class, not a closure: spawned workers must be able to pickle it)."""

    def __init__(self, threads: int):
        self.threads = threads

    def __call__(self, worker_id: int) -> None:
        # A launcher stopping a job signals the whole process group (torchrun does): the loader's workers must
        # not die of that while their rank finishes its step and checkpoints, so they leave the group. SIGTERM
        # sent to a worker itself still ends it (the DataLoader's shutdown relies on that), and torch's watchdog
        # ends a worker whose rank died.
        os.setpgid(0, 0)
        import cv2

        cv2.setNumThreads(self.threads)
        torch.set_num_threads(self.threads)
