"""The DataLoader every stream goes through, and what each of its worker processes sets up first.

Batches are built inside the workers (`batch_size=None`): the DataLoader only moves them. Each worker leaves its
rank's process group (a launcher's SIGTERM must not kill it mid-checkpoint) and limits its own threads.

Threads: OpenCV and torch each start one thread per core in every process, so K workers and a training process
on C cores would run (K + 1) x C threads. torch's OpenMP threads spin while they wait for each other: on a core
that another busy process holds, a CPU operator of the training process waits for a descheduled thread, and
measured here (2 cores, 1 worker, a tiny model's step) it ran 40x slower than with one thread. `thread_budget`
shares the cores out instead: each worker gets (C - 1) // K threads (at least one), the training process the rest.
OMP_NUM_THREADS, when set (accelerate launch sets 1 for multi-process runs), is left as it is for the training
process.
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


def thread_budget(workers: int, cores: int | None = None, processes_per_node: int | None = None) -> tuple[int, int]:
    """(threads of the training process, threads of each of its `workers` loader workers): this process's share
    of the node's cores (LOCAL_WORLD_SIZE training processes share them) split so that no core runs two."""
    processes = processes_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    share = max(1, (cores or available_cores()) // max(processes, 1))
    if workers == 0:
        return share, 0
    per_worker = max(1, (share - 1) // workers)
    return max(1, share - workers * per_worker), per_worker


def threads_per_worker(workers: int) -> int:
    return thread_budget(workers)[1]


def limit_main_threads(workers: int, policy: str = "auto") -> int:
    """Give the training process its share of threads (thread_budget), unless OMP_NUM_THREADS says otherwise or
    the policy (data.threads) is "library"; returns the count in use."""
    if policy == "auto" and not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(thread_budget(workers)[0])
    return torch.get_num_threads()


def make_loader(stream: IterableDataset, workers: int, pin_memory: bool, threads: str = "auto") -> DataLoader:
    if workers:
        stop_opencv_pool()
    # Its own generator: starting an iterator draws a seed, and drawing it from the global RNG would shift the
    # model's dropout randomness whenever a run resumes mid-epoch (an extra loader start), breaking exact resume.
    return DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                      prefetch_factor=4 if workers else None, generator=torch.Generator().manual_seed(0),
                      worker_init_fn=_WorkerInit(threads_per_worker(workers) if threads == "auto" else 0)
                      if workers else None,
                      persistent_workers=False)


def stop_opencv_pool() -> None:
    """Run OpenCV single-threaded in this process before it forks loader workers.

    OpenCV's thread pool does not survive fork: a child forked while the pool's threads wait on its condition
    variable hangs for ever when it reconfigures or uses the pool (glibc's pthread_cond_destroy waits for waiters
    that exist only in the parent). Measured: a self-training run whose main process had resized a frame hung in
    its first worker's cv2.setNumThreads. One thread stops the pool's threads; a training or evaluation process
    decodes nothing itself while its workers run, and each worker sets its own count (`_WorkerInit`). A library
    caller's process keeps OpenCV single-threaded afterwards (cv2.setNumThreads(-1) gives the default back).
    """
    import cv2

    cv2.setNumThreads(1)


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

        if self.threads:  # 0: data.threads=library, each library's own choice (torch's DataLoader sets 1)
            cv2.setNumThreads(self.threads)
            torch.set_num_threads(self.threads)
        else:  # OpenCV's default (one thread per core), not the single thread its parent kept (stop_opencv_pool)
            cv2.setNumThreads(-1)
