"""Keep freed host memory for reuse: the `segda` command asks for it before torch is loaded.

glibc's malloc hands every block over 32 MB straight back to the kernel when it is freed (mmap, munmap), so a CPU
training step that makes a few full-resolution tensors (a batch of 8 crops of 512x512 has 8x19x512x512 logits,
160 MB) faults each page of them back in at every step. Measured with `segda bench loop --model tiny --crop
512x512 --batch 8` on 2 cores: 200k page faults and 0.49 s of kernel time in a 1.33 s step; with freed memory
kept, 16k faults, 0.03 s and a 0.80 s step (1.66x). A GPU run is not concerned (its tensors live in CUDA's own
caching allocator, and its loader workers' frames are under 32 MB, which glibc already reuses), so a machine with an
NVIDIA GPU in reach is left as it is. The price is that a process and its forked loader workers keep their peak
footprint until they exit, as CUDA's allocator does. `SEGDA_KEEP_FREED_MEMORY=0` leaves
malloc as it is.

Asked for late (torch loaded, its threads running) it helps less: 1.27x in the same step, so the command line asks
first and training or evaluation on a CPU asks again (for a library caller; once per process).
"""

from __future__ import annotations

import ctypes
import os

from segda.launchenv import flag

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4  # glibc's mallopt parameters (malloc.h)
_BLOCKS_FROM_HEAP_UP_TO = 1 << 30  # blocks up to 1 GiB come from the heap and are reused after free
_done = False


def keep_freed_memory() -> bool:
    """Ask glibc to serve large blocks from its heap and never trim it; True if it now does (once per process:
    forked loader workers inherit it). A no-op on other C libraries, when SEGDA_KEEP_FREED_MEMORY=0, and on a
    machine with an NVIDIA GPU that the run may use (its tensors are not malloc's)."""
    global _done
    if _done:
        return True
    if os.environ.get("SEGDA_KEEP_FREED_MEMORY", "1") == "0" or _gpu_in_reach():
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library already loaded: no ldconfig lookup
    except (OSError, AttributeError):  # not glibc (macOS, musl without mallopt): nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # glibc before 2.26 or so refuses a threshold over 32 MB: then no block is mmapped at all (M_MMAP_MAX 0)
    from_heap = bool(mallopt(_M_MMAP_THRESHOLD, _BLOCKS_FROM_HEAP_UP_TO)) or bool(mallopt(_M_MMAP_MAX, 0))
    kept = bool(mallopt(_M_TRIM_THRESHOLD, -1))  # never trim (mallopt(3)); INT_MAX still trimmed a top of 2 GiB+
    _done = from_heap and kept
    return _done


def _gpu_in_reach() -> bool:
    """An NVIDIA device node that the environment does not hide (ACCELERATE_USE_CPU, CUDA_VISIBLE_DEVICES="")."""
    if flag("ACCELERATE_USE_CPU"):
        return False
    if os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1"):
        return False
    return os.path.exists("/dev/nvidiactl")
