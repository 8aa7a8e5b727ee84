"""Helpers for tests that run segda the way users do: the CLI's own `main` in the test process (`segda_here`: the
same parsing, errors and exit status, without the ~5 s a new interpreter spends importing torch and transformers), in
a subprocess where the process itself is under test (signals, kill -9, timeouts), or under `accelerate launch`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

TINY_MODEL = "model.config={hidden_sizes: [16, 32, 64, 128], decoder_hidden_size: 64}"
"""A SegFormer of MiT-b0's structure at a quarter of its width: seconds per run on a CPU."""


def cpu_env(**extra) -> dict:
    # No GPU either: on a GPU machine, CPU processes of accelerate still pick a CUDA device by rank (its barrier)
    return {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
            "CUDA_VISIBLE_DEVICES": "", **extra}


def segda(*args, timeout: int = 300, check: bool = True, **popen) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "segda", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=cpu_env(), **popen)
    if check and proc.returncode != 0:
        raise AssertionError(f"segda {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def launch_args(processes: int = 2, mixed_precision: str = "no", config_file: str | None = None) -> list[str]:
    """`accelerate launch` for N CPU processes on one machine (`--cpu --num_processes 2` would run only one)."""
    if config_file:
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config_file]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", mixed_precision, "--dynamo_backend", "no",
            "--main_process_port", "0"]


def accelerate_launch(*args, processes: int = 2, mixed_precision: str = "no", config_file: str | None = None,
                      timeout: int = 300, module: bool = True) -> subprocess.CompletedProcess:
    cmd = launch_args(processes, mixed_precision, config_file) + (["-m", "segda"] if module else []) + list(
        map(str, args))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=cpu_env())
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    return proc


REPO = Path(__file__).resolve().parents[1]


def free_port_for_launch() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def segda_killed_at(marker: Path, *args, timeout: float = 120) -> None:
    """Run `segda ARGS` and kill -9 it the moment `marker` (a checkpoint folder) exists: a crash, not a shutdown."""
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-m", "segda", *map(str, args)], env=cpu_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while not marker.exists() and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


class Ran:
    """What an in-process `segda` command left: its exit status and what it printed."""

    def __init__(self, returncode: int, stdout: str, stderr: str):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def segda_here(*args, check: bool = True, timeout: float = 300) -> Ran:
    """`segda ARGS` in this process (no interpreter start-up: seconds saved per call), as the CLI runs it: the same
    argument parsing, error handling and exit status, on the CPU with one thread as `cpu_env()` gives a subprocess.
    stderr is caught at the file descriptor, so what forked loader workers and C code print is in `.stderr` too.
    A call that runs past `timeout` seconds dumps every thread's stack and ends the test process (a subprocess
    would have been killed): a hang fails the suite instead of stalling it."""
    import contextlib
    import faulthandler
    import io
    import tempfile
    from unittest import mock

    from accelerate.state import AcceleratorState

    from segda import cli, log

    AcceleratorState._reset_state(reset_partial_state=True)
    out = io.StringIO()
    saved = {k: os.environ.get(k) for k in ("ACCELERATE_USE_CPU", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS")}
    os.environ.update(ACCELERATE_USE_CPU="1", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")  # as cpu_env()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what OMP_NUM_THREADS=1 gives a subprocess: the same sums as `segda` there, bit for bit
    sys.stderr.flush()
    stderr_fd = os.dup(2)
    with tempfile.TemporaryFile("w+", buffering=1) as err:
        os.dup2(err.fileno(), 2)
        faulthandler.dump_traceback_later(timeout, exit=True, file=stderr_fd)
        try:
            # CUDA_VISIBLE_DEVICES is read once, when CUDA starts: a GPU this process already saw stays out of reach
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
                    mock.patch("torch.cuda.is_available", return_value=False):
                try:
                    code = cli.main([str(a) for a in args])
                except SystemExit as stop:  # argparse refusing an argument
                    code = stop.code if isinstance(stop.code, int) else 2
        finally:
            faulthandler.cancel_dump_traceback_later()
            err.flush()
            os.dup2(stderr_fd, 2)
            os.close(stderr_fd)
            for key, value in saved.items():
                os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
            log.set_main_process(True)
            torch.set_num_threads(threads)
            AcceleratorState._reset_state(reset_partial_state=True)
        err.seek(0)
        ran = Ran(code, out.getvalue(), err.read())
    if check and code != 0:
        raise AssertionError(f"segda {' '.join(map(str, args))} failed ({code}):\n{ran.stderr[-4000:]}")
    return ran


# Operators that make the host wait for the device on a GPU: reading a value (item, bool, float, tolist of a
# scalar), and those whose output size depends on the data (boolean masks, nonzero, unique; bincount reads max).
SYNCING = {"_local_scalar_dense", "nonzero", "masked_select", "unique_dim", "_unique2", "bincount", "is_nonzero",
           "equal"}


class SyncCounter(TorchDispatchMode):
    """Counts syncing operators run on this thread (dispatch modes are thread-local: loader threads are not seen)."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        if name in SYNCING or (name == "index" and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else []))):
            self.calls.append(name)
        return func(*args, **(kwargs or {}))
