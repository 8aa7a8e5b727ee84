"""Loader workers forked from a process that used OpenCV's thread pool start (they used to hang for ever), and
each takes the OpenCV threads its policy gives it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = """
import sys, cv2, numpy as np, torch
from torch.utils.data import IterableDataset
from segda.data.loader import make_loader

class Frames(IterableDataset):
    def __iter__(self):
        frame = np.zeros((600, 800, 3), np.uint8)
        for i in range(3):
            yield {"i": i, "small": torch.from_numpy(cv2.resize(frame, (400, 300))), "cv2": cv2.getNumThreads()}

cv2.setNumThreads(3)  # a pool that no worker asks for: each worker reconfigures it
big = np.random.default_rng(0).integers(0, 255, (1500, 1500, 3), dtype=np.uint8)
for _ in range(3):  # the training process resizes frames (a dataset's statistics, a synthetic set): pool threads wait
    cv2.resize(big, (3000, 3000))
batches = list(make_loader(Frames(), workers=1, pin_memory=False, threads=sys.argv[1]))
print([b["i"] for b in batches], batches[0]["cv2"])
"""


def _probe(threads: str) -> tuple[str, int]:
    # as many training processes as cores: thread_budget gives the worker one thread, whatever the machine
    env = {**os.environ, "LOCAL_WORLD_SIZE": str(os.cpu_count() or 1)}
    try:
        out = subprocess.run([sys.executable, "-c", PROBE, threads], capture_output=True, text=True, timeout=30,
                             env=env)
    except subprocess.TimeoutExpired:
        raise AssertionError("the loader's worker hung: OpenCV's thread pool was forked while its threads waited")
    assert out.returncode == 0, out.stderr
    keys, cv2_threads = out.stdout.strip().rsplit(" ", 1)
    return keys, int(cv2_threads)


@pytest.mark.slow
def test_workers_forked_after_opencv_used_its_thread_pool_start_and_deliver():
    assert _probe("auto") == ("[0, 1, 2]", 1)


@pytest.mark.slow
def test_with_data_threads_library_a_worker_has_opencvs_own_thread_count():
    default = int(subprocess.run([sys.executable, "-c", "import cv2; print(cv2.getNumThreads())"],
                                 capture_output=True, text=True, check=True).stdout)
    keys, threads = _probe("library")
    assert keys == "[0, 1, 2]"
    assert threads == default != 3  # OpenCV's default in a fresh process, not the parent's 3 nor its stopped pool's 1
