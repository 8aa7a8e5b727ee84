"""On a CPU, freed tensors are reused rather than faulted back in from the kernel at every step."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import resource, sys
from segda.host_memory import keep_freed_memory
print(keep_freed_memory())  # before torch is loaded, as the segda command does
import torch
faults = []
for _ in range(32):  # a step's big tensor (64 MB, over glibc's 32 MB mmap ceiling), made and freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(16 * 1024 * 1024).sum()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
steady = sorted(faults[16:])  # glibc reuses the block after 2-10 steps (more with one thread), and in some runs
print(steady[len(steady) // 2])  # faults it in again for a step or two later on: the median of the last 16 steps
"""


def _faults(**env) -> tuple[str, int]:
    import os

    # CUDA_VISIBLE_DEVICES="": on a machine with a GPU, a CPU run (segda leaves malloc alone where a GPU is in reach)
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": "", **env}).stdout.split()
    return out[0], int(out[1])


@pytest.mark.slow
def test_a_freed_big_tensor_is_reused_without_page_faults_and_the_switch_turns_it_off():
    kept, faults_kept = _faults()
    off, faults_off = _faults(SEGDA_KEEP_FREED_MEMORY="0")
    assert (kept, off) == ("True", "False")
    # 64 MB is 16384 pages of 4 KB: each is faulted in again when malloc gave the block back to the kernel
    assert faults_off > 10000, faults_off
    assert faults_kept < 1000, faults_kept


OVER_2_GIB = """
import ctypes
from segda.host_memory import keep_freed_memory
print(keep_freed_memory())
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.sbrk.restype, libc.sbrk.argtypes = ctypes.c_void_p, [ctypes.c_ssize_t]
size = 640 * 2 ** 20  # a step at 1024x1024 crops: 8x19x1024x1024 logits and their gradients, 640 MB each
blocks = [libc.malloc(size) for _ in range(4)]  # from the heap, never touched: nothing becomes resident
top = libc.sbrk(0)
for block in blocks:
    libc.free(block)
print((top - libc.sbrk(0)) // 2 ** 20)  # MB of heap given back to the kernel by the frees
"""


def test_a_step_that_frees_over_2_gib_at_once_keeps_it_too():
    """mallopt's trim threshold is an int: at its largest (2 GiB - 1) glibc still gave a heap top of 2.5 GB back
    to the kernel at every step of 1024x1024 crops, and faulted it in again (~650k faults, 5 s steps instead of
    2.7). -1 turns trimming off. The heap's end is read directly (sbrk): no page is touched, so the test holds
    with transparent huge pages too."""
    import os

    out = subprocess.run([sys.executable, "-c", OVER_2_GIB], capture_output=True, text=True, check=True,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}).stdout.split()
    assert out == ["True", "0"], out


def test_a_gpu_in_reach_leaves_malloc_alone_unless_hidden(monkeypatch, tmp_path):
    from segda import host_memory

    monkeypatch.setattr(host_memory.os.path, "exists", lambda path: path == "/dev/nvidiactl")
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert host_memory._gpu_in_reach()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert not host_memory._gpu_in_reach()
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    assert not host_memory._gpu_in_reach()
