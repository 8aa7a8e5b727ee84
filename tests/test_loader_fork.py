"""Loader workers forked from a process that used OpenCV's thread pool start (they used to hang for ever)."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import cv2, numpy as np, torch
from torch.utils.data import IterableDataset
from segda.data.loader import make_loader

class Frames(IterableDataset):
    def __iter__(self):
        frame = np.zeros((600, 800, 3), np.uint8)
        for i in range(3):
            yield {"i": i, "small": torch.from_numpy(cv2.resize(frame, (400, 300)))}

cv2.setNumThreads(2)  # the pool of a 2-core machine, whatever this one has
big = np.random.default_rng(0).integers(0, 255, (1500, 1500, 3), dtype=np.uint8)
for _ in range(3):  # the training process resizes frames (a dataset's statistics, a synthetic set): pool threads wait
    cv2.resize(big, (3000, 3000))
print([b["i"] for b in make_loader(Frames(), workers=1, pin_memory=False)])
"""


def test_workers_forked_after_opencv_used_its_thread_pool_start_and_deliver():
    try:
        out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        raise AssertionError("the loader's worker hung: OpenCV's thread pool was forked while its threads waited")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[0] == "[0, 1, 2]", out.stdout
